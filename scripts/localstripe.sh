#!/usr/bin/env bash
# Installs (pinned, into .run/venv) and starts or stops localstripe on 127.0.0.1.
#   scripts/localstripe.sh start [PORT]  -> prints its base URL (default port 8420)
#   scripts/localstripe.sh stop [PORT]  (every one started here, without a port)
# The same venv holds the official Stripe Python SDK, used by the tests to
# cross-check webhook signatures.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="$PWD/.run"
VENV="$RUN/venv"
LOCALSTRIPE_VERSION=1.15.10
STRIPE_SDK_VERSION=11.6.0
mkdir -p "$RUN"
. scripts/lib.sh

install() {
  # Installed, and at the pinned versions (a bumped pin reinstalls).
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "
import importlib.metadata as m, localstripe, stripe
assert m.version('localstripe') == '$LOCALSTRIPE_VERSION' and m.version('stripe') == '$STRIPE_SDK_VERSION'
" 2>/dev/null; then
    if ! python3 -m venv "$VENV" >&2; then
      # Debian's python3 leaves venv (ensurepip) to its own package.
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "localstripe: installing Debian's python3-venv" >&2
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null) >&2
        rm -rf "$VENV"
        python3 -m venv "$VENV" >&2
      else
        echo "localstripe: python3 cannot make a venv; install python3-venv" >&2
        exit 1
      fi
    fi
    "$VENV/bin/pip" install -q "localstripe==$LOCALSTRIPE_VERSION" "stripe==$STRIPE_SDK_VERSION" >&2
  fi
}

case "${1:-}" in
  install) install ;;
  start)
    install
    PORT="${2:-8420}"
    start_server localstripe "$PORT" "$VENV/bin/python" scripts/localstripe_server.py "$PORT"
    echo "http://127.0.0.1:$PORT/"
    ;;
  stop)
    stop_servers localstripe "${2:-}"
    ;;
  *) echo "usage: $0 install|start [PORT]|stop" >&2; exit 2 ;;
esac
