#!/usr/bin/env bash
# Installs (pinned, into .run/ssm) and starts or stops stripe-stateful-mock on 127.0.0.1.
#   scripts/stripe-mock.sh start [PORT]  -> prints its base URL (default port 8430)
#   scripts/stripe-mock.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="$PWD/.run"
VERSION=0.0.16
mkdir -p "$RUN/ssm"

install() {
  if [ ! -f "$RUN/ssm/node_modules/stripe-stateful-mock/package.json" ] \
     || ! grep -q "\"version\": \"$VERSION\"" "$RUN/ssm/node_modules/stripe-stateful-mock/package.json"; then
    (cd "$RUN/ssm" && { [ -f package.json ] || echo '{"private": true}' >package.json; } \
      && npm install --no-audit --no-fund --silent "stripe-stateful-mock@$VERSION" >&2)
  fi
}

case "${1:-}" in
  install) install ;;
  start)
    install
    PORT="${2:-8430}"
    PIDFILE="$RUN/stripe-mock-$PORT.pid"
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then kill "$(cat "$PIDFILE")"; sleep 0.5; fi
    node scripts/stripe_stateful_mock.js "$PORT" >"$RUN/stripe-mock-$PORT.log" 2>&1 &
    echo $! >"$PIDFILE"
    for _ in $(seq 1 100); do
      if (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then echo "http://127.0.0.1:$PORT/"; exit 0; fi
      sleep 0.1
    done
    echo "stripe-stateful-mock did not start; see $RUN/stripe-mock-$PORT.log" >&2; exit 1
    ;;
  stop)
    for f in "$RUN"/stripe-mock-*.pid; do
      [ -f "$f" ] || continue
      kill "$(cat "$f")" 2>/dev/null || true
      rm -f "$f"
    done
    ;;
  *) echo "usage: $0 install|start [PORT]|stop" >&2; exit 2 ;;
esac
