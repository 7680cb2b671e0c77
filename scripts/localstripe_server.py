"""Runs localstripe (PyPI, GPL; installed by scripts/localstripe.sh, never vendored)
for tests and the demo: on 127.0.0.1 only, state in memory only (the stock command
binds all interfaces and pickles its store to /tmp/localstripe.pickle).

TEST INFRASTRUCTURE, not part of the crate: localstripe predates Stripe's Prices
API, so this launcher adds a thin `/v1/prices` layer that stores each price as a
localstripe plan (Stripe accepts a plan id wherever a price id goes) and lets
`items[N][price]` stand for `items[N][plan]` on subscription creates. The crate never
falls back from prices to plans itself; prices are also tested against
stripe-stateful-mock, which implements them.

Usage: python localstripe_server.py PORT
"""
import secrets
import sys

from aiohttp import web
from multidict import MultiDict
from localstripe import resources, server
from localstripe.errors import UserError

# Keep state in memory: no shared pickle file between runs or parallel servers.
resources.Store.dump_to_disk = lambda self: None
resources.Store.try_load_from_disk = lambda self: None

LOOKUP_KEY = "_lookup_key"


def plan_to_price(plan):
    """A localstripe plan, exported, in the shape of a Stripe price."""
    metadata = dict(plan.get("metadata") or {})
    lookup_key = metadata.pop(LOOKUP_KEY, None)
    return {
        "id": plan["id"], "object": "price", "active": plan["active"],
        "billing_scheme": "per_unit", "created": plan["created"],
        "currency": plan["currency"], "livemode": False, "lookup_key": lookup_key,
        "metadata": metadata, "nickname": plan.get("nickname"), "product": plan["product"],
        "recurring": {"interval": plan["interval"], "interval_count": plan["interval_count"],
                      "usage_type": "licensed"},
        "type": "recurring", "unit_amount": plan["amount"],
    }


def all_prices():
    plans = [obj for key, obj in resources.store.items() if key.startswith("plan:")]
    plans.sort(key=lambda p: (p.created, p.id))
    return [plan_to_price(p._export()) for p in plans]


async def create_price(request):
    data = await server.get_post_data(request) or {}
    recurring = data.get("recurring") or {}
    metadata = dict(data.get("metadata") or {})
    lookup_key = data.get("lookup_key")
    if lookup_key:
        if any(p["lookup_key"] == lookup_key for p in all_prices()):
            raise UserError(400, "A price with lookup key %s already exists." % lookup_key)
        metadata[LOOKUP_KEY] = lookup_key
    plan = resources.Plan._api_create(
        id="price_" + secrets.token_hex(8), product=data.get("product"),
        amount=int(data.get("unit_amount", 0)), currency=data.get("currency"),
        interval=recurring.get("interval"),
        interval_count=int(recurring.get("interval_count", 1)),
        nickname=data.get("nickname"), metadata=metadata)
    return server.json_response(plan_to_price(plan._export()))


def list_prices(request):
    query = server.unflatten_data(request.query) or {}
    prices = all_prices()
    if "product" in query:
        prices = [p for p in prices if p["product"] == query["product"]]
    if "active" in query:
        prices = [p for p in prices if str(p["active"]).lower() == str(query["active"]).lower()]
    if "lookup_keys" in query:
        keys = query["lookup_keys"]
        keys = keys if isinstance(keys, list) else [keys]
        prices = [p for p in prices if p["lookup_key"] in keys]
    if "starting_after" in query:
        ids = [p["id"] for p in prices]
        if query["starting_after"] in ids:
            prices = prices[ids.index(query["starting_after"]) + 1:]
    limit = int(query.get("limit", 10))
    return server.json_response({"object": "list", "url": "/v1/prices",
                                 "data": prices[:limit], "has_more": len(prices) > limit})


def retrieve_price(request):
    plan = resources.Plan._api_retrieve(request.match_info["id"])
    return server.json_response(plan_to_price(plan._export()))


@web.middleware
async def items_price_as_plan(request, handler):
    """`items[N][price]` on a subscription create means `items[N][plan]` here."""
    if request.method == "POST" and request.path == "/v1/subscriptions":
        form = await request.post()
        request._post = MultiDict(
            (k.replace("][price]", "][plan]") if k.startswith("items[") else k, v)
            for k, v in form.items())
    return await handler(request)


server.app.middlewares.append(items_price_as_plan)
server.app.router.add_post("/v1/prices", create_price)
server.app.router.add_get("/v1/prices", list_prices)
server.app.router.add_get("/v1/prices/{id}", retrieve_price)

if __name__ == "__main__":
    port = int(sys.argv[1])
    web.run_app(server.app, host="127.0.0.1", port=port, access_log=None, print=None)
