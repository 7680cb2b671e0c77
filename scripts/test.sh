#!/usr/bin/env bash
# The whole test suite, on a fresh machine: starts what the tests need (a real
# PostgreSQL server, localstripe, stripe-stateful-mock and chromedriver, all on
# 127.0.0.1), runs every test on SQLite and Postgres, stops what it started. Used by
# .ci/run.
# Tests that need a peer are #[ignore]d for a plain `cargo test`; here they all run
# (ignored ones included), and a missing peer fails the test that needs it.
set -euo pipefail
cd "$(dirname "$0")/.."

cleanup() { scripts/postgres.sh stop || true; scripts/localstripe.sh stop || true; scripts/stripe-mock.sh stop || true; scripts/chromium.sh stop || true; }
trap cleanup EXIT

# Each assigned before it is exported: `export X=$(...)` would hide a failed start.
PG_URL=$(scripts/postgres.sh start)
export STRIPE_MIRROR_TEST_POSTGRES="$PG_URL"
# localstripe and the official Stripe SDK (pinned, in .run/venv), on 127.0.0.1.
STRIPE_MIRROR_TEST_LOCALSTRIPE=$(scripts/localstripe.sh start 8420)
export STRIPE_MIRROR_TEST_LOCALSTRIPE
export STRIPE_MIRROR_TEST_PYTHON="$PWD/.run/venv/bin/python"
# stripe-stateful-mock (pinned, npm, in .run/ssm), on 127.0.0.1.
STRIPE_MIRROR_TEST_STRIPE_MOCK=$(scripts/stripe-mock.sh start 8430)
export STRIPE_MIRROR_TEST_STRIPE_MOCK
# chromedriver and headless Chromium (Debian packages), on 127.0.0.1.
STRIPE_MIRROR_TEST_WEBDRIVER=$(scripts/chromium.sh start 9515)
export STRIPE_MIRROR_TEST_WEBDRIVER

# One build of each kind: incremental caches only cost disk here (3 GB of them).
export CARGO_INCREMENTAL=0

echo "== format and lints"
cargo fmt --all -- --check
# Also half of the MSRV check: clippy's `incompatible_msrv` lint (warn by default)
# reads `rust-version` from Cargo.toml and flags std APIs stabilized after it;
# `-D warnings` makes that an error.
cargo clippy --all-targets --all-features -- -D warnings

echo "== MSRV: no dependency needs a newer Rust than Cargo.toml's rust-version"
python3 scripts/check-msrv.py

echo "== each backend feature builds on its own"
cargo check --lib --no-default-features --features sqlite
cargo check --lib --no-default-features --features postgres

echo "== tests (SQLite file + Postgres at $PG_URL, localstripe at $STRIPE_MIRROR_TEST_LOCALSTRIPE)"
cargo build --all-features --examples
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --all-features --no-fail-fast --run-ignored all
else
  # Without nextest's per-test limit (.config/nextest.toml), a hung test stops the run
  # after an hour instead.
  timeout 3600 cargo test --all-features --no-fail-fast --lib --bins --tests --examples -- --include-ignored
fi
cargo test --all-features --doc

echo "== docs"
RUSTDOCFLAGS="-D warnings" cargo doc --all-features --no-deps
echo "all tests passed"
