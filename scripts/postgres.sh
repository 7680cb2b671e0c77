#!/usr/bin/env bash
# Starts or stops a throwaway PostgreSQL server for the tests, on 127.0.0.1 only.
#   scripts/postgres.sh start   -> prints the admin URL; also written to .run/postgres.url
#   scripts/postgres.sh stop
#   scripts/postgres.sh resume  -> starts a stopped server again, keeping its data (fault tests)
# STRIPE_MIRROR_PG_PORT and STRIPE_MIRROR_PG_DIR pick another server (the fault tests
# stop and restart their own, never the shared one).
# Postgres refuses to run as root, so as root it runs as the `postgres` user.
# Durability settings are Postgres's defaults (fsync on), as in production: the tests
# and benchmarks measure what users get.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="$PWD/.run"
DIR="${STRIPE_MIRROR_PG_DIR:-$RUN/pg}"
# `start` wipes the directory of a server that is not running: only ever under .run/.
case "$(realpath -m "$DIR")" in
  "$RUN"/*) ;;
  *) echo "postgres: STRIPE_MIRROR_PG_DIR must be under $RUN" >&2; exit 2 ;;
esac
PORT="${STRIPE_MIRROR_PG_PORT:-54329}"
# gssencmode=disable: the server only trusts 127.0.0.1, and libpq's default ("prefer")
# loads Kerberos to look for a ticket. A pool thread still connecting in the background
# when a test process exits then aborts it in k5_mutex_lock (diesel-rs/diesel#3226).
OPTIONS="gssencmode=disable"
mkdir -p "$RUN"
# As root the server runs as `postgres`, which must reach its directory: in a checkout
# other users cannot (one under /root, mode 0700), the data lives under /tmp instead,
# in a directory named for this checkout. Asked as `nobody`, which every Debian has:
# the `postgres` user may not exist yet (the package is installed below), and start
# and stop must decide alike.
if [ "$(id -u)" = 0 ] && ! runuser -u nobody -- test -x "$RUN" 2>/dev/null; then
  ELSEWHERE="/tmp/stripe-mirror-pg-$(printf %s "$RUN" | md5sum | cut -c1-12)"
  mkdir -p "$ELSEWHERE"
  chmod 755 "$ELSEWHERE"
  DIR=$(realpath -m "$DIR")
  DIR="$ELSEWHERE/${DIR#"$RUN"/}"
fi

find_bin() {
  if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return; fi
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$d" ]; then
    echo "postgres: installing Debian's postgresql package" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) >&2
    d=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  fi
  echo "$d"
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-}" in
  start)
    BIN=$(find_bin)
    if [ -f "$DIR/postmaster.pid" ] && as_pg "$BIN/pg_ctl" -D "$DIR" status >/dev/null 2>&1; then
      :
    else
      rm -rf "$DIR"; mkdir -p "$DIR"
      [ "$(id -u)" = 0 ] && chown postgres "$DIR" && chmod 700 "$DIR"
      as_pg "$BIN/initdb" -D "$DIR" -A trust -U postgres >"$RUN/initdb.log" 2>&1
      as_pg "$BIN/pg_ctl" -D "$DIR" -w -t 60 \
        -o "-h 127.0.0.1 -p $PORT -k $DIR -c max_connections=200" \
        -l "$DIR/server.log" start >/dev/null
    fi
    URL="postgres://postgres@127.0.0.1:$PORT/postgres?$OPTIONS"
    [ -z "${STRIPE_MIRROR_PG_DIR:-}" ] && echo "$URL" >"$RUN/postgres.url"
    echo "$URL"
    ;;
  resume)
    BIN=$(find_bin)
    as_pg "$BIN/pg_ctl" -D "$DIR" -w -t 60 \
      -o "-h 127.0.0.1 -p $PORT -k $DIR -c max_connections=200" \
      -l "$DIR/server.log" start >/dev/null
    echo "postgres://postgres@127.0.0.1:$PORT/postgres?$OPTIONS"
    ;;
  stop)
    BIN=$(find_bin)
    if [ -f "$DIR/postmaster.pid" ]; then
      as_pg "$BIN/pg_ctl" -D "$DIR" -m fast stop >/dev/null 2>&1 || kill "$(head -n 1 "$DIR/postmaster.pid")" 2>/dev/null || true
    fi
    ;;
  *) echo "usage: $0 start|stop|resume" >&2; exit 2 ;;
esac
