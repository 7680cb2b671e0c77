#!/usr/bin/env bash
# Every benchmark in one run, written to benches/README.md (a few minutes):
#   - a Postgres 15 at its default durability (fsync on; scripts/postgres.sh) and a
#     SQLite file with the mirror's settings (WAL, synchronous = FULL);
#   - release build; the database's floor, webhook ingest over HTTP, statements and
#     commits per event (benches/ingest.rs); backfill at 10k and 100k objects with
#     peak RSS, subscription checks with 100k customers (benches/backfill.rs).
#
#   scripts/bench.sh [EVENTS]     (default 3500 events per ingest run)
set -euo pipefail
cd "$(dirname "$0")/.."
events=${1:-3500}
# Stopped at the end, as scripts/test.sh does: a server left running would hold the
# port a later test run (or CI on this machine) starts its own on.
trap 'scripts/postgres.sh stop || true' EXIT
export STRIPE_MIRROR_BENCH_POSTGRES
STRIPE_MIRROR_BENCH_POSTGRES=$(scripts/postgres.sh start)
out=target/bench-results.jsonl
mkdir -p target
echo "bench: building (release)" >&2
cargo bench --all-features --no-run --bench ingest --bench backfill 2>&1 | tail -n 1 >&2
printf '{"machine": {"at": "%s", "load": %s}}\n' "$(date -u '+%Y-%m-%d %H:%M')" "$(cut -d' ' -f1 /proc/loadavg)" >"$out"
run() { echo "bench: $*" >&2; cargo bench -q --all-features "$@" 2>/dev/null | grep '^{' | tee -a "$out" >&2; }
run --bench ingest -- "$events"
run --bench backfill -- backfill 10000
run --bench backfill -- backfill 100000
run --bench backfill -- reads 100000
python3 scripts/bench_report.py "$out" >benches/README.md
echo "bench: wrote benches/README.md" >&2
