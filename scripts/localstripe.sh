#!/usr/bin/env bash
# Installs (pinned, into .run/venv) and starts or stops localstripe on 127.0.0.1.
#   scripts/localstripe.sh start [PORT]  -> prints its base URL (default port 8420)
#   scripts/localstripe.sh stop
# The same venv holds the official Stripe Python SDK, used by the tests to
# cross-check webhook signatures.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="$PWD/.run"
VENV="$RUN/venv"
LOCALSTRIPE_VERSION=1.15.10
STRIPE_SDK_VERSION=11.6.0
mkdir -p "$RUN"

install() {
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import localstripe, stripe" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "localstripe==$LOCALSTRIPE_VERSION" "stripe==$STRIPE_SDK_VERSION" >&2
  fi
}

case "${1:-}" in
  install) install ;;
  start)
    install
    PORT="${2:-8420}"
    PIDFILE="$RUN/localstripe-$PORT.pid"
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then kill "$(cat "$PIDFILE")"; sleep 0.5; fi
    "$VENV/bin/python" scripts/localstripe_server.py "$PORT" >"$RUN/localstripe-$PORT.log" 2>&1 &
    echo $! >"$PIDFILE"
    for _ in $(seq 1 100); do
      if (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then echo "http://127.0.0.1:$PORT/"; exit 0; fi
      sleep 0.1
    done
    echo "localstripe did not start; see $RUN/localstripe-$PORT.log" >&2; exit 1
    ;;
  stop)
    for f in "$RUN"/localstripe-*.pid; do
      [ -f "$f" ] || continue
      kill "$(cat "$f")" 2>/dev/null || true
      rm -f "$f"
    done
    ;;
  *) echo "usage: $0 install|start [PORT]|stop" >&2; exit 2 ;;
esac
