#!/usr/bin/env bash
# The main job: the quickstart loop against real Stripe test mode when
# STRIPE_TEST_SECRET_KEY is set, else against a localstripe started for it on
# 127.0.0.1 (and stopped after) with a fresh SQLite file in .run/.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${STRIPE_TEST_SECRET_KEY:-}" ]; then
  echo "using Stripe test mode (STRIPE_TEST_SECRET_KEY is set)"
  export STRIPE_LIVE_MODE=false
  exec cargo run --example quickstart
fi

PORT="${STRIPE_MIRROR_DEMO_PORT:-8425}"
# Only the demo's own localstripe is stopped after (a test run's keeps its own port).
trap 'scripts/localstripe.sh stop "$PORT"' EXIT
# Assigned before it is exported: a failed start stops the demo here (an empty
# STRIPE_API_BASE would send it to api.stripe.com).
STRIPE_API_BASE=$(scripts/localstripe.sh start "$PORT")
export STRIPE_API_BASE
export STRIPE_SECRET_KEY=sk_test_localstripedemo0000
# localstripe forgets everything when it stops, so the demo starts from an empty mirror.
if [ -z "${DATABASE_URL:-}" ]; then
  mkdir -p .run && rm -f .run/demo.db .run/demo.db-wal .run/demo.db-shm
  export DATABASE_URL=sqlite://.run/demo.db
fi
echo "using localstripe at $STRIPE_API_BASE (set STRIPE_TEST_SECRET_KEY to use Stripe test mode)"
cargo run --example quickstart
