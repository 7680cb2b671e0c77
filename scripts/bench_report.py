#!/usr/bin/env python3
"""Turns scripts/bench.sh's JSON lines into benches/README.md (figures, targets, notes)."""
import datetime
import json
import os
import platform
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
machine = next((r["machine"] for r in rows if "machine" in r), None)
if machine is None:  # an older results file: its time, no load figure
    stamp = datetime.datetime.fromtimestamp(os.path.getmtime(sys.argv[1]), datetime.timezone.utc)
    machine = {"at": f"{stamp:%Y-%m-%d %H:%M}", "load": None}
corpus = next(r["corpus"] for r in rows if "corpus" in r)
floors = {r["backend"]: r["floor"] for r in rows if "floor" in r}
ingest = [(r["backend"], r["ingest"]) for r in rows if "ingest" in r]
backfill = [r["backfill"] for r in rows if "backfill" in r]
reads = next((r["reads"] for r in rows if "reads" in r), None)
http = next((r["http_floor"] for r in rows if isinstance(r.get("http_floor"), dict)), None)
flush = next((r["disk_flush_us"] for r in rows if "disk_flush_us" in r), None)

def cpu():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()

def ok(flag):
    return "met" if flag else "**missed**"

out = []
p = out.append
p("# Benchmarks")
p("")
p("Written by `scripts/bench.sh` (one command, a few minutes): release build, a SQLite file")
p("with the mirror's settings (WAL, `synchronous = FULL`: a 200 means the event is on disk)")
p("and Postgres 15 at its default durability (`fsync` on, `synchronous_commit` on), both on")
p("this machine. Tests never time anything; these figures are measured here only.")
p("Each timed Postgres run (the floors too) starts after a `CHECKPOINT`, so that none pays")
p("for the pages the run before it left dirty.")
p("")
load = f", load average before the run {machine['load']:.2f}" if machine["load"] is not None else ""
p(f"Run: {machine['at']} UTC, {os.cpu_count()} cores ({cpu()}){load}. "
  "The VM is noisy: runs minutes apart differ by up to 40 %, and more over an hour (benches/notes.md).")
p("")
p(f"Corpus: {corpus['events']} distinct signed events built from Stripe's example objects"
  f" (`tests/fixtures/stripe_fixtures3.json`): customer created and updated, product, price,"
  f" subscription created and updated, invoice paid; mean body {corpus['mean_body_bytes']} bytes.")
p("Clients: `ureq` agents on keep-alive connections, in the bench process, posting to the")
p("real axum route (`axum::webhook_router`) on 127.0.0.1: they share the 2 cores with the server.")
p("")
p("## The floor: one bare INSERT of an event-sized body per transaction")
p("")
p("| backend | 1 client | 8 clients | body |")
p("|---|---|---|---|")
for b, f in floors.items():
    p(f"| {b} | {f['clients_1']:,.0f} rows/s | {f['clients_8']:,.0f} rows/s | {f['body_bytes']} bytes |")
p("")
if flush:
    p("## The disk: one flush of N pages")
    p("")
    p("| " + " | ".join(f"{n} page{'s' if n != '1' else ''}" for n in flush) + " |")
    p("|" + "---|" * len(flush))
    p("| " + " | ".join(f"{us:,.0f} µs" for us in flush.values()) + " |")
    p("")
    p("N 4 KiB pages written over a file's allocated blocks, then `fdatasync` (median of 300).")
    p("On this disk a flush costs more with each page it carries: a delivery one at a time")
    p("writes about 10 pages (the event, its delivery log row, the object, their indexes;")
    p("benches/notes.md counts them) where the floor's bare INSERT writes one or two.")
    p("")
if http:
    p("## The HTTP floor: the same posts to an axum route that answers without a database")
    p("")
    p("| 1 client | p50 | 8 clients | p50 |")
    p("|---|---|---|---|")
    p(f"| {http['clients_1']:,.0f} requests/s | {http['p50_ms_1']*1000:.0f} µs | {http['clients_8']:,.0f} requests/s | {http['p50_ms_8']*1000:.0f} µs |")
    p("")
    p("What a delivery costs before the mirror does anything: one at a time, ingest pays this")
    p("plus the transaction, so it cannot reach the database floor's rate.")
    p("")
p("## Webhook ingest over HTTP (durable acknowledgement)")
p("")
p("| backend | deliveries at once | handler | events/s | p50 | p99 | vs 1-client floor | statements/event | commits/event | non-200 |")
p("|---|---|---|---|---|---|---|---|---|---|")
for b, r in ingest:
    p(f"| {b} | {r['clients']} | {'one no-op' if r['handler'] else 'none'} | **{r['events_per_s']:,.0f}** | "
      f"{r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['ratio_to_floor_1']:.2f} | "
      f"{r['statements_per_event']:.1f} | {r['commits_per_event']:.2f} | {r['non_200']} |")
p("")
p("Statements count every SQL statement but transaction control (BEGIN, SAVEPOINT,")
p("RELEASE, COMMIT); commits count outer commits plus writes outside a transaction")
p("(not PRAGMAs: the checkpointer's copy of the WAL, counted as a statement, commits")
p("no transaction), counted by a diesel `Instrumentation` on every connection")
p("(the checkpointer's too). Delivery log, event,")
p("claim, built-in sync and outcome are one transaction; deliveries arriving together")
p("share it (group commit), so 8 at once need less than one commit each.")
p("")
p("## Targets (issue #10)")
p("")
targets = []
for b, r in ingest:
    f1 = floors[b]["clients_1"]
    if r["clients"] == 1 and not r["handler"]:
        targets.append((f"{b}: one at a time >= half the 1-client floor ({f1/2:,.0f}/s)", r["events_per_s"] >= f1 / 2, f"{r['events_per_s']:,.0f}/s"))
    if r["clients"] == 8 and not r["handler"]:
        want = 5000 if b == "sqlite" else 3000
        targets.append((f"{b}: 8 at once above the 1-client floor and >= {want:,}/s", r["events_per_s"] >= max(want, f1), f"{r['events_per_s']:,.0f}/s"))
    if r["clients"] == 1:
        limit = 2 if r["handler"] else 1
        targets.append((f"{b}: commits per event {'with' if r['handler'] else 'without'} a handler <= {limit}", r["commits_per_event"] <= limit + 0.01, f"{r['commits_per_event']:.2f}"))
for r in backfill:
    targets.append((f"backfill {r['objects']:,} objects >= 30,000 objects/s (SQLite)", r["objects_per_s"] >= 30000, f"{r['objects_per_s']:,.0f}/s"))
    targets.append((f"backfill {r['objects']:,} objects: peak RSS < 64 MiB", r["peak_rss_mib"] < 64, f"{r['peak_rss_mib']:.0f} MiB"))
if reads:
    targets.append(("subscription check p50 < 30 µs at 100k", reads["subscription_p50_us"] < 30, f"{reads['subscription_p50_us']:.0f} µs"))
    targets.append(("subscription check p99 < 200 µs at 100k", reads["subscription_p99_us"] < 200, f"{reads['subscription_p99_us']:.0f} µs"))
p("| target | measured | |")
p("|---|---|---|")
for name, flag, value in targets:
    p(f"| {name} | {value} | {ok(flag)} |")
p("")
p("## Backfill (`sync_all` from a local stub serving list pages, SQLite)")
p("")
p("| objects (half customers, half subscriptions) | seconds | objects/s | peak RSS of the process |")
p("|---|---|---|---|")
for r in backfill:
    p(f"| {r['objects']:,} | {r['seconds']:.1f} | **{r['objects_per_s']:,.0f}** | {r['peak_rss_mib']:.0f} MiB |")
p("")
p("Each size runs in its own process; the stub in the same process writes each page on demand, as JSON text (no `serde_json::Value` built and serialized: in a real backfill the pages cost the mirror nothing until they arrive).")
p("")
if reads:
    p("## Subscription checks (SQLite, from the local database)")
    p("")
    p(f"{reads['customers']:,} customers and {reads['subscriptions']:,} subscriptions mirrored; "
      f"{reads['samples']:,} checks of random subscribers after a warm-up.")
    p("")
    p("| check | p50 | p99 |")
    p("|---|---|---|")
    p(f"| `Customer::by_subscriber` + `customer.subscription()` | **{reads['subscription_p50_us']:.0f} µs** | {reads['subscription_p99_us']:.0f} µs |")
    p(f"| `require_subscription(user).check()` (the gate) | {reads['gate_p50_us']:.0f} µs | {reads['gate_p99_us']:.0f} µs |")
    p("")
notes = os.path.join(os.path.dirname(__file__), "..", "benches", "notes.md")
if os.path.exists(notes):
    p(open(notes).read().rstrip())
    p("")
print("\n".join(out))
