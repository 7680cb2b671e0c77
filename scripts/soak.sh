#!/usr/bin/env bash
# The soak of tests/soak.rs at full size (about 5 minutes warm): 20,000 signed events,
# each delivered two or three times, shuffled, from 16 clients, to 4 server processes
# on one Postgres (default durability), then to 2 processes on one SQLite file; every
# outcome checked in the database. Release build (the benches' one is reused).
# scripts/test.sh runs the same trials with 2,000 events in debug, with the fault tests.
#
#   scripts/soak.sh [EVENTS]      (default 20000)
set -euo pipefail
cd "$(dirname "$0")/.."
export STRIPE_MIRROR_SOAK_EVENTS=${1:-20000}
# Stopped at the end, as scripts/test.sh does: a server left running would hold the
# port a later test run (or CI on this machine) starts its own on.
trap 'scripts/postgres.sh stop || true' EXIT
export STRIPE_MIRROR_TEST_POSTGRES
STRIPE_MIRROR_TEST_POSTGRES=$(scripts/postgres.sh start)
mkdir -p .run
echo "soak: building (release)" >&2
cargo test --release --all-features --test soak --no-run 2>&1 | tail -n 1 >&2
cargo test -q --release --all-features --test soak -- --ignored --nocapture --test-threads 1 soak_ \
  | tee .run/soak-report.txt
