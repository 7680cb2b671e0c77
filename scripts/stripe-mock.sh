#!/usr/bin/env bash
# Installs (pinned, into .run/ssm) and starts or stops stripe-stateful-mock on 127.0.0.1.
#   scripts/stripe-mock.sh start [PORT]  -> prints its base URL (default port 8430)
#   scripts/stripe-mock.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="$PWD/.run"
VERSION=0.0.16
mkdir -p "$RUN/ssm"
. scripts/lib.sh

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
    start_server stripe-mock "$PORT" node scripts/stripe_stateful_mock.js "$PORT"
    echo "http://127.0.0.1:$PORT/"
    ;;
  stop)
    stop_servers stripe-mock
    ;;
  *) echo "usage: $0 install|start [PORT]|stop" >&2; exit 2 ;;
esac
