"""Runs localstripe (PyPI, GPL; installed by scripts/localstripe.sh, never vendored)
for tests and the demo: on 127.0.0.1 only, state in memory only (the stock command
binds all interfaces and pickles its store to /tmp/localstripe.pickle).

TEST INFRASTRUCTURE, not part of the crate: localstripe predates Stripe's Prices
API, so this launcher adds a thin `/v1/prices` layer that stores each price as a
localstripe plan (Stripe accepts a plan id wherever a price id goes) and lets
`items[N][price]` stand for `items[N][plan]` on subscription creates and updates. The crate never
falls back from prices to plans itself; prices are also tested against
stripe-stateful-mock, which implements them. One-time prices (no `recurring`), which
plans cannot hold, are kept by this layer alone, for one-time Checkout payments.

Also TEST INFRASTRUCTURE: localstripe has no Checkout or Billing Portal, so this
launcher serves `POST/GET /v1/checkout/sessions` and `POST /v1/billing_portal/sessions`
in Stripe's shapes, and stands in for Stripe's hosted pages with two plain pages:
`/_checkout/{id}` (a Pay button: creates the subscription in localstripe with the test
Visa card, sends `checkout.session.completed` to localstripe's registered webhooks,
redirects to the success URL) and `/_portal/{id}` (the customer's subscriptions and a
link back). Nothing like Stripe's real pages; only enough to drive the examples and
their browser test.

Usage: python localstripe_server.py PORT
"""
import html
import secrets
import sys
import time

from aiohttp import web
from multidict import MultiDict
from localstripe import resources, server, webhooks
from localstripe.errors import UserError

# Keep state in memory: no shared pickle file between runs or parallel servers.
resources.Store.dump_to_disk = lambda self: None
resources.Store.try_load_from_disk = lambda self: None

LOOKUP_KEY = "_lookup_key"
# This layer's own objects live in localstripe's store (so `DELETE /_config/data`
# clears them too) under keys no localstripe class lists.
LAYER = "layer:"


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
    prices = [plan_to_price(p._export()) for p in plans] + layer_objects("price")
    prices.sort(key=lambda p: (p["created"], p["id"]))
    return prices


def layer_objects(kind):
    return [obj for key, obj in resources.store.items() if key.startswith(LAYER + kind + ":")]


def layer_get(kind, id):
    obj = resources.store.get(LAYER + kind + ":" + id)
    if obj is None:
        raise UserError(404, "No such %s: %s" % (kind, id))
    return obj


def layer_put(obj):
    resources.store[LAYER + obj["object"] + ":" + obj["id"]] = obj
    return obj


def find_price(id):
    found = [p for p in all_prices() if p["id"] == id]
    if not found:
        raise UserError(404, "No such price: %s" % id)
    return found[0]


async def create_price(request):
    data = await server.get_post_data(request) or {}
    recurring = data.get("recurring") or {}
    metadata = dict(data.get("metadata") or {})
    lookup_key = data.get("lookup_key")
    if lookup_key:
        if any(p["lookup_key"] == lookup_key for p in all_prices()):
            raise UserError(400, "A price with lookup key %s already exists." % lookup_key)
        metadata[LOOKUP_KEY] = lookup_key
    if not recurring:  # a one-time price: no plan can hold it
        resources.Product._api_retrieve(data.get("product"))
        return server.json_response(layer_put({
            "id": "price_" + secrets.token_hex(8), "object": "price", "active": True,
            "billing_scheme": "per_unit", "created": int(time.time()),
            "currency": data.get("currency"), "livemode": False, "lookup_key": lookup_key,
            "metadata": dict(data.get("metadata") or {}), "nickname": data.get("nickname"),
            "product": data.get("product"), "recurring": None, "type": "one_time",
            "unit_amount": int(data.get("unit_amount", 0))}))
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
    return server.json_response(find_price(request.match_info["id"]))


PRORATIONS = ("create_prorations", "always_invoice", "none")


@web.middleware
async def items_price_as_plan(request, handler):
    """`items[N][price]` on a subscription create or update means `items[N][plan]`
    here. localstripe takes no `proration_behavior` on an update (it always prorates):
    a valid one is dropped, anything else refused as Stripe would."""
    if request.method == "POST" and request.path.startswith("/v1/subscriptions"):
        form = await request.post()
        proration = form.get("proration_behavior")
        if proration is not None and proration not in PRORATIONS:
            raise UserError(400, f"Invalid proration_behavior: {proration}")
        request._post = MultiDict(
            (k.replace("][price]", "][plan]") if k.startswith("items[") else k, v)
            for k, v in form.items() if k != "proration_behavior")
    return await handler(request)


# --- Checkout and Billing Portal: TEST INFRASTRUCTURE (see the module docstring) ---

def public(session):
    """A stored session as the API shows it (without this layer's private fields)."""
    return {k: v for k, v in session.items() if not k.startswith("_")}


async def create_checkout_session(request):
    data = await server.get_post_data(request) or {}
    mode, items = data.get("mode"), data.get("line_items") or []
    if mode not in ("subscription", "payment") or len(items) != 1 or not data.get("success_url"):
        raise UserError(400, "This test layer takes mode subscription or payment, "
                        "one line item and a success_url.")
    price = find_price(items[0].get("price"))
    if (mode == "subscription") != (price["type"] == "recurring"):
        raise UserError(400, "Price %s is %s: not for mode %s." % (price["id"], price["type"], mode))
    customer = data.get("customer")
    if customer:
        resources.Customer._api_retrieve(customer)
    id = "cs_test_" + secrets.token_hex(12)
    return server.json_response(public(layer_put({
        "id": id, "object": "checkout.session", "created": int(time.time()),
        "livemode": False, "mode": mode, "status": "open", "payment_status": "unpaid",
        "customer": customer, "client_reference_id": data.get("client_reference_id"),
        "metadata": dict(data.get("metadata") or {}), "subscription": None,
        "success_url": data["success_url"], "cancel_url": data.get("cancel_url"),
        "allow_promotion_codes": data.get("allow_promotion_codes") == "true",
        "currency": price["currency"],
        "amount_total": price["unit_amount"] * int(items[0].get("quantity", 1)),
        "url": "%s/_checkout/%s" % (request.url.origin(), id),
        "_line_items": [{"price": price["id"], "quantity": int(items[0].get("quantity", 1))}],
        "_subscription_data": data.get("subscription_data") or {},
    })))


def retrieve_checkout_session(request):
    return server.json_response(public(layer_get("checkout.session", request.match_info["id"])))


def page(title, body):
    return web.Response(content_type="text/html", text="""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>%s</title></head>
<body style="font: 17px/1.5 system-ui, sans-serif; max-width: 34rem; margin: 3rem auto; color: #1f2937">
<p style="background: #fef3c7; padding: .5rem 1rem; border-radius: 6px">%s (localstripe layer):
a stand-in for Stripe's hosted page, for local tests only.</p>
%s</body></html>""" % (html.escape(title), html.escape(title), body))


def checkout_page(request):
    session = layer_get("checkout.session", request.match_info["id"])
    item = session["_line_items"][0]
    price = find_price(item["price"])
    product = resources.Product._api_retrieve(price["product"])
    every = " / " + price["recurring"]["interval"] if price["recurring"] else ""
    amount = "%s %.2f%s" % (price["currency"].upper(), session["amount_total"] / 100, every)
    cancel = ('<a href="%s" style="margin-left: 1rem">Back</a>' % html.escape(session["cancel_url"])
              if session["cancel_url"] else "")
    return page("Test Checkout", """<h1>%s</h1><p id="amount" style="font-size: 1.6rem">%s</p>
<p>Customer %s, paying with the test card 4242 4242 4242 4242.</p>
<form method="post" action="/_checkout/%s/pay"><button id="pay" type="submit"
 style="font: inherit; padding: .6rem 2rem; background: #635bff; color: white; border: 0; border-radius: 6px">Pay</button>
%s</form>""" % (html.escape(product.name), html.escape(amount),
                html.escape(session["customer"] or "(new)"), session["id"], cancel))


class Snapshot:
    """What localstripe's Event needs of an object: `_export()`."""
    def __init__(self, obj):
        self.obj = obj

    def _export(self, expand=None):
        return self.obj


def pay_checkout_session(request):
    session = layer_get("checkout.session", request.match_info["id"])
    if session["status"] == "open":
        if not session["customer"]:
            session["customer"] = resources.Customer._api_create().id
        if session["mode"] == "subscription":
            card = resources.PaymentMethod._api_attach("pm_card_visa", customer=session["customer"])
            resources.Customer._api_update(
                session["customer"], invoice_settings={"default_payment_method": card.id})
            details = session["_subscription_data"]
            item = session["_line_items"][0]
            subscription = resources.Subscription._api_create(
                customer=session["customer"], metadata=details.get("metadata"),
                trial_period_days=details.get("trial_period_days"),
                items=[{"plan": item["price"], "quantity": item["quantity"]}])
            session["subscription"] = subscription.id
        session.update(status="complete", payment_status="paid")
        webhooks.schedule_webhook(
            resources.Event("checkout.session.completed", Snapshot(public(session))))
    raise web.HTTPSeeOther(session["success_url"].replace("{CHECKOUT_SESSION_ID}", session["id"]))


async def create_portal_session(request):
    data = await server.get_post_data(request) or {}
    resources.Customer._api_retrieve(data.get("customer"))
    id = "bps_" + secrets.token_hex(12)
    return server.json_response(layer_put({
        "id": id, "object": "billing_portal.session", "created": int(time.time()),
        "livemode": False, "customer": data["customer"], "return_url": data.get("return_url"),
        "url": "%s/_portal/%s" % (request.url.origin(), id),
    }))


def portal_page(request):
    session = layer_get("billing_portal.session", request.match_info["id"])
    customer = resources.Customer._api_retrieve(session["customer"])
    rows = "".join("<li>%s: %s</li>" % (html.escape(s.id), html.escape(s.status))
                   for s in customer.subscriptions._list) or "<li>No subscriptions</li>"
    back = session["return_url"] or "/"
    return page("Test Billing Portal", """<h1>Billing Portal</h1><p>Customer %s</p><ul>%s</ul>
<p><a id="return" href="%s">Return to the app</a></p>""" % (
        html.escape(customer.id), rows, html.escape(back)))


@web.middleware
async def pages_without_key(request, handler):
    """The stand-in hosted pages are opened by a browser, which has no API key."""
    if request.path.startswith(("/_checkout/", "/_portal/")):
        return await request.match_info.handler(request)
    return await handler(request)


server.app.middlewares.insert(1, pages_without_key)  # after the error middleware, before auth
server.app.middlewares.append(items_price_as_plan)
server.app.router.add_post("/v1/prices", create_price)
server.app.router.add_get("/v1/prices", list_prices)
server.app.router.add_get("/v1/prices/{id}", retrieve_price)
server.app.router.add_post("/v1/checkout/sessions", create_checkout_session)
server.app.router.add_get("/v1/checkout/sessions/{id}", retrieve_checkout_session)
server.app.router.add_get("/_checkout/{id}", checkout_page)
server.app.router.add_post("/_checkout/{id}/pay", pay_checkout_session)
server.app.router.add_post("/v1/billing_portal/sessions", create_portal_session)
server.app.router.add_get("/_portal/{id}", portal_page)

if __name__ == "__main__":
    port = int(sys.argv[1])
    web.run_app(server.app, host="127.0.0.1", port=port, access_log=None, print=None)
