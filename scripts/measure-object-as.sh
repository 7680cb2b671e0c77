#!/usr/bin/env bash
# What one `event.object_as::<stripe_mirror::types::Subscription>()` costs a host app,
# against the crate's own row type (`Subscription::from_stripe_json`): the app crate's
# build time (dependencies already built, so only the app's own code is measured) and
# the binary's size, debug and release. Prints a table; the figures are in the README
# ("Build cost") and on `Event::object_as`.
#
#   scripts/measure-object-as.sh [debug|release|both]   (default: both)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
profiles=${1:-both}
app="$root/target/object-as-cost"
mkdir -p "$app/src"
cat > "$app/Cargo.toml" <<TOML
[package]
name = "object-as-cost"
version = "0.0.0"
edition = "2024"
publish = false

[workspace]

[features]
typed = []

[dependencies]
stripe-mirror = { path = "$root" }
serde_json = "1"
tokio = { version = "1", features = ["rt-multi-thread", "macros"] }
TOML
cp "$root/Cargo.lock" "$app/Cargo.lock"
cat > "$app/src/main.rs" <<'RS'
//! A host app's handler reading an event's subscription, typed two ways.
use stripe_mirror::{Event, Mirror, Webhooks};

#[cfg(feature = "typed")]
fn status(event: &Event) -> String {
    // async-stripe's generated type: every nested type's Deserialize is compiled here.
    let sub: stripe_mirror::types::Subscription = event.object_as().expect("a subscription");
    sub.status.to_string()
}

#[cfg(not(feature = "typed"))]
fn status(event: &Event) -> String {
    // The crate's row type, built without a database.
    let sub = stripe_mirror::Subscription::from_stripe_json(event.object()).expect("a subscription");
    sub.status.map(|s| s.to_string()).unwrap_or_default()
}

#[tokio::main]
async fn main() {
    let webhooks = Webhooks::new().on("customer.subscription.*", |event: Event, _m: Mirror| async move {
        println!("{}", status(&event));
        Ok(())
    });
    let event = Event::from_stripe_json(serde_json::json!({"id": "evt_1", "object": "event",
        "type": "customer.subscription.created", "created": 1, "livemode": false, "data": {"object":
        {"id": "sub_1", "object": "subscription", "customer": "cus_1", "status": "active", "items": {"data": []}}}}));
    println!("{} handler(s), {}", webhooks.handler_count("customer.subscription.created"), event.is_ok());
}
RS
export CARGO_TARGET_DIR="$root/target"
cd "$app"
measure() { # profile, features
  local flags=() name=row
  [ "$1" = release ] && flags+=(--release)
  [ -n "$2" ] && { flags+=(--features "$2"); name=object_as; }
  cargo build -q "${flags[@]}" # dependencies (and a first build of the app)
  touch src/main.rs
  local start end
  start=$(date +%s.%N)
  cargo build -q "${flags[@]}"
  end=$(date +%s.%N)
  local bin="$CARGO_TARGET_DIR/$1/object-as-cost"
  [ "$1" = debug ] && bin="$CARGO_TARGET_DIR/debug/object-as-cost"
  printf '%-8s %-10s %8.1f s %10.1f MiB\n' "$1" "$name" "$(echo "$end - $start" | bc)" \
    "$(echo "$(stat -c %s "$bin") / 1048576" | bc -l)"
}
printf '%-8s %-10s %10s %14s\n' profile handler "app build" binary
for p in debug release; do
  [ "$profiles" = both ] || [ "$profiles" = "$p" ] || continue
  measure "$p" ""
  measure "$p" typed
done
