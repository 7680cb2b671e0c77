#!/usr/bin/env bash
# Installs (Debian's `chromium` and `chromium-driver`) and starts or stops chromedriver
# on 127.0.0.1, for the tests that drive web pages in a real headless Chromium.
#   scripts/chromium.sh install
#   scripts/chromium.sh start [PORT]  -> prints its WebDriver URL (default port 9515)
#   scripts/chromium.sh stop
# chromedriver listens on 127.0.0.1 (and ::1) only by default; it binds all interfaces
# only when given --allowed-ips/--allowed-origins, which are allowlists, not binds.
# So it is started without them: loopback only, local clients only.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="$PWD/.run"
mkdir -p "$RUN"
. scripts/lib.sh

install() {
  if [ ! -x /usr/bin/chromedriver ]; then
    echo "chromium: installing Debian's chromium and chromium-driver packages" >&2
    (apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) >&2
  fi
}

case "${1:-}" in
  install) install ;;
  start)
    install
    PORT="${2:-9515}"
    start_server chromedriver "$PORT" /usr/bin/chromedriver --port="$PORT"
    echo "http://127.0.0.1:$PORT"
    ;;
  stop)
    stop_servers chromedriver
    ;;
  *) echo "usage: $0 install|start [PORT]|stop" >&2; exit 2 ;;
esac
