#!/usr/bin/env bash
# Installs (Debian's `chromium` and `chromium-driver`) and starts or stops chromedriver
# on 127.0.0.1, for the tests that drive web pages in a real headless Chromium.
#   scripts/chromium.sh install
#   scripts/chromium.sh start [PORT]  -> prints its WebDriver URL (default port 9515)
#   scripts/chromium.sh stop
# chromedriver has no bind-address flag. By default it listens on 127.0.0.1 and ::1
# only ("Only local connections are allowed"); given --allowed-ips (even
# --allowed-ips=127.0.0.1) or --allowed-origins it listens on all interfaces and
# filters clients by that allowlist instead. So it is started without them.
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
    # A session a test never closed keeps its Chromium running after chromedriver is
    # gone: end chromedriver's children (the browsers; their helpers follow) first.
    for f in "$RUN"/chromedriver-*.pid; do
      [ -f "$f" ] && pkill -TERM -P "$(cat "$f")" 2>/dev/null || true
    done
    stop_servers chromedriver
    ;;
  *) echo "usage: $0 install|start [PORT]|stop" >&2; exit 2 ;;
esac
