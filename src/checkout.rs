//! Selling: Stripe Checkout sessions (a hosted payment page for a subscription or a
//! one-time payment) and Billing Portal sessions (the hosted page where customers
//! change plans, cards and cancel). Both are created for a subscriber's customer,
//! made first when needed ([`Customer::get_or_create`]); the webhooks then mirror what
//! the buyer did (`checkout.session.completed` links the customer to the subscriber).

use serde_json::{Value, json};

use crate::Mirror;
use crate::error::{Error, Result};
use crate::models::customer::{Customer, SUBSCRIBER_METADATA_KEY, Subscriber};

/// async-stripe's request for a Checkout Session, which [`Checkout::customize`] hands
/// over (its parameters' enums are in [`crate::types`], e.g. `CheckoutSessionLocale`).
pub use stripe_checkout::checkout_session::CreateCheckoutSession;

/// A Checkout Session to send the buyer to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckoutSession {
    /// Stripe id (`cs_...`).
    pub id: String,
    /// The hosted page: redirect the browser here (303).
    pub url: String,
    /// The customer it is for.
    pub customer: String,
}

/// A Checkout Session to create: [`Checkout::subscription`] or [`Checkout::payment`],
/// then URLs and options, then [`Checkout::create`].
///
/// ```no_run
/// # async fn f(mirror: stripe_mirror::Mirror, user: impl stripe_mirror::Subscriber) -> stripe_mirror::Result<()> {
/// use stripe_mirror::checkout::Checkout;
/// let session = Checkout::subscription("price_pro_monthly")
///     // Not a gated page: the buyer can land before Stripe's webhook does
///     // (confirm the session there with `sync_session`).
///     .success_url("https://example.com/welcome?session={CHECKOUT_SESSION_ID}")
///     .cancel_url("https://example.com/pricing")
///     .trial_days_once(14)
///     .unless_subscribed()
///     .allow_promotion_codes(true)
///     .create(&mirror, &user)
///     .await?;
/// println!("redirect to {}", session.url);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct Checkout {
    mode: stripe_shared::CheckoutSessionMode,
    price: String,
    /// `None`: one, or none for a metered price (Stripe refuses a quantity there).
    quantity: Option<u64>,
    adjustable: Option<(u64, u64)>,
    success_url: Option<String>,
    cancel_url: Option<String>,
    trial_days: Option<u32>,
    trial_once: bool,
    unless_subscribed: bool,
    allow_promotion_codes: bool,
    automatic_tax: bool,
    tax_id_collection: bool,
    metadata: std::collections::BTreeMap<String, String>,
    customize: Option<Customize>,
}

/// The host's last word on the request ([`Checkout::customize`]).
#[derive(Clone)]
struct Customize(
    std::sync::Arc<dyn Fn(CreateCheckoutSession) -> CreateCheckoutSession + Send + Sync>,
);

impl std::fmt::Debug for Customize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Customize(..)")
    }
}

impl Checkout {
    /// A subscription to a recurring price.
    pub fn subscription(price_id: &str) -> Self {
        Checkout {
            mode: stripe_shared::CheckoutSessionMode::Subscription,
            price: price_id.to_owned(),
            quantity: None,
            adjustable: None,
            success_url: None,
            cancel_url: None,
            trial_days: None,
            trial_once: false,
            unless_subscribed: false,
            allow_promotion_codes: false,
            automatic_tax: false,
            tax_id_collection: false,
            metadata: Default::default(),
            customize: None,
        }
    }

    /// A one-time payment of `quantity` of a one-time price.
    pub fn payment(price_id: &str, quantity: u64) -> Self {
        Checkout {
            mode: stripe_shared::CheckoutSessionMode::Payment,
            quantity: Some(quantity),
            ..Self::subscription(price_id)
        }
    }

    /// Where Stripe sends the buyer after paying (`{CHECKOUT_SESSION_ID}` is filled in).
    pub fn success_url(mut self, url: &str) -> Self {
        self.success_url = Some(url.to_owned());
        self
    }

    /// Where Stripe sends the buyer who goes back.
    pub fn cancel_url(mut self, url: &str) -> Self {
        self.cancel_url = Some(url.to_owned());
        self
    }

    /// A free trial before the first charge (subscriptions only), every time: a
    /// subscriber who cancels and subscribes again gets it again
    /// ([`trial_days_once`](Self::trial_days_once) does not).
    pub fn trial_days(mut self, days: u32) -> Self {
        self.trial_days = Some(days);
        self
    }

    /// A free trial for a subscriber's first subscription only: none for one who has
    /// had a subscription before (any but one whose first payment never came), so
    /// cancelling and subscribing again does not restart it. Asks Stripe for the
    /// customer's subscriptions, as [`unless_subscribed`](Self::unless_subscribed) does.
    pub fn trial_days_once(mut self, days: u32) -> Self {
        self.trial_days = Some(days);
        self.trial_once = true;
        self
    }

    /// Refuses with [`Error::AlreadySubscribed`] when the subscriber already holds a
    /// subscription Stripe still bills (`active`, `trialing`, `past_due`, `unpaid`,
    /// `paused`): a second one would bill them twice (a pricing page left open in
    /// another tab, the back button after paying). Send them to the Billing Portal
    /// instead. Stripe is asked for the customer's subscriptions, so a purchase whose
    /// webhook has not landed yet counts too; what it answers is mirrored on the way.
    /// Two sessions made before either is paid both pass: Stripe's own "limit customers
    /// to one subscription" Checkout setting covers that.
    pub fn unless_subscribed(mut self) -> Self {
        self.unless_subscribed = true;
        self
    }

    /// How many of the price: the seats of a per-seat plan (one unless set). A metered
    /// price takes none: Stripe bills its usage, and refuses a quantity.
    pub fn quantity(mut self, quantity: u64) -> Self {
        self.quantity = Some(quantity);
        self
    }

    /// Lets the buyer choose the quantity on the payment page, from `min` to `max`
    /// (seats: the subscription's item then holds what they chose).
    pub fn adjustable_quantity(mut self, min: u64, max: u64) -> Self {
        self.adjustable = Some((min, max));
        self
    }

    /// Stripe Tax computes the tax from the buyer's address, which Checkout collects and
    /// saves to the customer (`customer_update[address]=auto`: Stripe refuses automatic
    /// tax for an existing customer without it). Needs Stripe Tax set up in the
    /// Dashboard.
    pub fn automatic_tax(mut self, yes: bool) -> Self {
        self.automatic_tax = yes;
        self
    }

    /// Lets a business buyer enter its tax id (an EU VAT number), saved to the customer
    /// with the business name it gives (`customer_update[name]=auto`).
    pub fn tax_id_collection(mut self, yes: bool) -> Self {
        self.tax_id_collection = yes;
        self
    }

    /// Lets the buyer enter a promotion code.
    pub fn allow_promotion_codes(mut self, yes: bool) -> Self {
        self.allow_promotion_codes = yes;
        self
    }

    /// Metadata of your own on the session and, in subscription mode, on the
    /// subscription it makes (Cashier's `withMetadata`), beside the subscriber's key
    /// ([`SUBSCRIBER_METADATA_KEY`], which links the buyer and cannot be set here).
    pub fn metadata(mut self, key: &str, value: &str) -> Self {
        self.metadata.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Anything else Stripe's Checkout takes (a locale, billing address collection,
    /// custom text, consent collection...), set on async-stripe's request just before it
    /// is sent. Its customer, `client_reference_id`, mode, metadata and subscription
    /// metadata (which link the buyer to your user) and trial stay as Checkout's own
    /// methods set them: a closure that changes one (an async-stripe setter replaces a
    /// whole map) is [`Error::Config`], nothing sent.
    ///
    /// ```no_run
    /// # async fn f(mirror: stripe_mirror::Mirror, user: impl stripe_mirror::Subscriber) -> stripe_mirror::Result<()> {
    /// use stripe_mirror::checkout::Checkout;
    /// use stripe_mirror::types::{CheckoutSessionBillingAddressCollection, CheckoutSessionLocale};
    /// let session = Checkout::subscription("price_pro_monthly")
    ///     .success_url("https://example.com/welcome?session={CHECKOUT_SESSION_ID}")
    ///     .customize(|request| {
    ///         request
    ///             .locale(CheckoutSessionLocale::Fr)
    ///             .billing_address_collection(CheckoutSessionBillingAddressCollection::Required)
    ///     })
    ///     .create(&mirror, &user)
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn customize(
        mut self,
        f: impl Fn(CreateCheckoutSession) -> CreateCheckoutSession + Send + Sync + 'static,
    ) -> Self {
        self.customize = Some(Customize(std::sync::Arc::new(f)));
        self
    }

    /// The form posted to `/v1/checkout/sessions` for `customer` and `subscriber_id`;
    /// `metered` when the mirror holds the price as metered.
    fn request(
        &self,
        customer: &str,
        subscriber_id: &str,
        metered: bool,
    ) -> Result<stripe_checkout::checkout_session::CreateCheckoutSession> {
        use stripe_checkout::checkout_session::{
            CreateCheckoutSession, CreateCheckoutSessionLineItems,
            CreateCheckoutSessionLineItemsAdjustableQuantity,
            CreateCheckoutSessionSubscriptionData,
        };
        let success = self.success_url.as_deref().ok_or_else(|| {
            Error::Config("Checkout needs a success URL: call .success_url(...)".into())
        })?;
        if self.metadata.contains_key(SUBSCRIBER_METADATA_KEY) {
            return Err(Error::Config(format!(
                "Checkout metadata {SUBSCRIBER_METADATA_KEY:?} is the subscriber's link, \
                 set from the user the session is created for: use another key"
            )));
        }
        let subscriber_metadata = || {
            let mut metadata: std::collections::HashMap<String, String> =
                self.metadata.clone().into_iter().collect();
            metadata.insert(SUBSCRIBER_METADATA_KEY.to_owned(), subscriber_id.to_owned());
            metadata
        };
        // Stripe's bounds: the quantity within the range the buyer may choose from.
        const MAX_QUANTITY: u64 = 999_999;
        let quantity = match (self.quantity, self.adjustable) {
            (Some(quantity), _) => quantity,
            (None, Some((min, _))) => min.max(1),
            (None, None) => 1,
        };
        if let Some((min, max)) = self.adjustable
            && (min > max || max > MAX_QUANTITY || !(min..=max).contains(&quantity))
        {
            return Err(Error::Config(format!(
                "adjustable_quantity({min}, {max}) with quantity {quantity}: Stripe needs \
                 min <= quantity <= max <= {MAX_QUANTITY}"
            )));
        }
        if metered && (self.quantity.is_some() || self.adjustable.is_some()) {
            return Err(Error::Config(format!(
                "{} is a metered price: Stripe bills its usage and takes no quantity; \
                 remove .quantity(...) and .adjustable_quantity(...)",
                self.price
            )));
        }
        let adjustable =
            self.adjustable.map(
                |(min, max)| CreateCheckoutSessionLineItemsAdjustableQuantity {
                    enabled: true,
                    minimum: Some(i64::try_from(min).unwrap_or(i64::MAX)),
                    maximum: Some(i64::try_from(max).unwrap_or(i64::MAX)),
                },
            );
        let line = CreateCheckoutSessionLineItems {
            price: Some(self.price.clone()),
            quantity: (!metered).then_some(quantity),
            adjustable_quantity: adjustable,
            ..Default::default()
        };
        let mut request = CreateCheckoutSession::new()
            .mode(self.mode.clone())
            .customer(customer)
            .client_reference_id(subscriber_id)
            .line_items(vec![line])
            .success_url(success)
            .metadata(subscriber_metadata());
        if let Some(cancel) = &self.cancel_url {
            request = request.cancel_url(cancel.as_str());
        }
        if self.allow_promotion_codes {
            request = request.allow_promotion_codes(true);
        }
        if self.automatic_tax || self.tax_id_collection {
            use stripe_checkout::checkout_session::{
                CreateCheckoutSessionAutomaticTax, CreateCheckoutSessionCustomerUpdate,
                CreateCheckoutSessionCustomerUpdateAddress as Address,
                CreateCheckoutSessionCustomerUpdateName as Name,
                CreateCheckoutSessionTaxIdCollection,
            };
            // The session is for an existing customer: what the buyer enters is saved
            // to it, which Stripe requires for tax and tax ids.
            let mut update = CreateCheckoutSessionCustomerUpdate::new();
            if self.automatic_tax {
                request = request.automatic_tax(CreateCheckoutSessionAutomaticTax::new(true));
                update.address = Some(Address::Auto);
            }
            if self.tax_id_collection {
                request =
                    request.tax_id_collection(CreateCheckoutSessionTaxIdCollection::new(true));
                update.name = Some(Name::Auto);
            }
            request = request.customer_update(update);
        }
        if self.mode == stripe_shared::CheckoutSessionMode::Subscription {
            let data = CreateCheckoutSessionSubscriptionData {
                metadata: Some(subscriber_metadata()),
                trial_period_days: self.trial_days,
                ..Default::default()
            };
            request = request.subscription_data(data);
        } else if self.trial_days.is_some() {
            return Err(Error::Config(
                "a trial only applies to Checkout in subscription mode".into(),
            ));
        }
        if let Some(Customize(customize)) = &self.customize {
            let before = serde_json::to_value(&request).unwrap_or_default();
            request = customize(request);
            let after = serde_json::to_value(&request).unwrap_or_default();
            // async-stripe's setters replace whole values: a closure setting its own
            // `subscription_data` or `metadata` drops the subscriber's link (and the
            // trial) without a word. Refused instead of sent.
            let kept = [
                "/inner/customer".to_owned(),
                "/inner/client_reference_id".to_owned(),
                "/inner/mode".to_owned(),
                format!("/inner/metadata/{SUBSCRIBER_METADATA_KEY}"),
                format!("/inner/subscription_data/metadata/{SUBSCRIBER_METADATA_KEY}"),
                "/inner/subscription_data/trial_period_days".to_owned(),
            ];
            if let Some(changed) = kept.iter().find(|p| before.pointer(p) != after.pointer(p)) {
                let field = changed.trim_start_matches("/inner/").replace('/', ".");
                return Err(Error::Config(format!(
                    "Checkout::customize changed `{field}`, which links the buyer to your \
                     user or is set by Checkout's own methods (a setter of async-stripe \
                     replaces the whole value): set it with those methods \
                     (`metadata`, `trial_days`) instead"
                )));
            }
        }
        Ok(request)
    }

    /// Creates the session for `subscriber`: for the customer the Billing Portal opens
    /// (the one holding their newest subscription, should they have two), made first
    /// when they have none. A mirrored customer Stripe no longer has (deleted while its
    /// webhook was missed) is found out here: it becomes a tombstone, and the session is
    /// made for their next customer or a new one, so that user can still buy.
    pub async fn create(
        &self,
        mirror: &Mirror,
        subscriber: &(impl Subscriber + ?Sized),
    ) -> Result<CheckoutSession> {
        let id = subscriber.subscriber_id();
        // The customer that pays, should the subscriber have two (as the Portal opens).
        let customer = match Customer::billing_customer(mirror, &id).await? {
            Some(customer) => customer,
            None => Customer::get_or_create(mirror, subscriber).await?,
        };
        let sent = customer.id.clone();
        match self.open(mirror, customer, &id).await {
            Err(err) if stale_customer(mirror, &err, &sent).await => {
                let customer = match Customer::billing_customer(mirror, &id).await? {
                    Some(customer) => customer,
                    None => Customer::get_or_create(mirror, subscriber).await?,
                };
                self.open(mirror, customer, &id).await
            }
            done => done,
        }
    }

    /// This Checkout as it goes out for `customer`: refused when the subscriber is
    /// already subscribed ([`unless_subscribed`](Self::unless_subscribed)), without its
    /// trial when they had one before ([`trial_days_once`](Self::trial_days_once)).
    async fn checked(&self, mirror: &Mirror, customer: &str, subscriber: &str) -> Result<Self> {
        let subscribing = self.mode == stripe_shared::CheckoutSessionMode::Subscription;
        if !subscribing || !(self.unless_subscribed || self.trial_once) {
            return Ok(self.clone());
        }
        // Stripe's list for the customer the session is for, mirrored (a purchase whose
        // webhook has not landed yet), then every customer of the subscriber.
        let mut query = serde_json::Map::new();
        query.insert("customer".into(), json!(customer));
        query.insert("status".into(), json!("all"));
        let object = format!("subscriptions of customer {customer}");
        let client = mirror.stripe().await?;
        let (listed, at) = client
            .list_all("/subscriptions", query, &object, "subscription")
            .await?;
        use crate::models::subscription::{SUBSCRIPTIONS, Subscription, SubscriptionStatus as S};
        for mut subscription in listed {
            // Items past the first page, as `sync_all` completes them; what cannot be
            // completed is written as listed and flagged for `reconcile`.
            let _ = crate::sync::remote::complete(&client, &SUBSCRIPTIONS, &mut subscription).await;
            Subscription::sync_from_stripe_data_at(mirror, &subscription, at).await?;
        }
        // Every customer the subscriber has had in this mode, deleted ones too (a trial
        // on a customer since deleted was still had).
        let (who, live) = (subscriber.to_owned(), mirror.live_mode());
        let held = mirror
            .db()
            .read(move |conn| {
                let ids = Customer::ids_ever_by_subscriber(conn, &who, live)?;
                Subscription::of_customers(conn, &ids)
            })
            .await?;
        let now = mirror.now();
        if self.unless_subscribed
            && let Some(s) = held.iter().find(|s| {
                !s.deleted && !s.has_ended_at(now) && s.status.as_ref().is_some_and(S::is_billed)
            })
        {
            return Err(Error::AlreadySubscribed {
                subscriber: subscriber.to_owned(),
                subscription: s.id.clone(),
                status: s.status.as_ref().map(|s| s.to_string()).unwrap_or_default(),
            });
        }
        let mut this = self.clone();
        let had_one = held.iter().any(|s| {
            s.trial_end.is_some()
                || !matches!(s.status, Some(S::Incomplete | S::IncompleteExpired) | None)
        });
        if self.trial_once && had_one {
            this.trial_days = None;
        }
        Ok(this)
    }

    /// Creates the session for this customer.
    async fn open(
        &self,
        mirror: &Mirror,
        customer: Customer,
        subscriber_id: &str,
    ) -> Result<CheckoutSession> {
        // A metered price takes no quantity (Stripe refuses one): known from the mirror.
        let metered = crate::models::price::Price::get(mirror, &self.price)
            .await?
            .is_some_and(|price| {
                price.data().pointer("/recurring/usage_type") == Some(&json!("metered"))
            });
        // Stripe's answers about this customer (its subscriptions, then the session) both
        // find out a customer it no longer has, which `create` then moves past.
        let this = self.checked(mirror, &customer.id, subscriber_id).await?;
        let request = this.request(&customer.id, subscriber_id, metered)?;
        let object = format!("checkout session for subscriber {subscriber_id}");
        let session = create(mirror, &request, &object).await?;
        session_of(&session, &customer.id, "checkout session").map(|(id, url)| CheckoutSession {
            id,
            url,
            customer: customer.id,
        })
    }
}

/// Confirms a Checkout Session on your success page (`?session={CHECKOUT_SESSION_ID}`)
/// without waiting for webhooks: fetches it, links its customer to its subscriber
/// (the same rule as `checkout.session.completed`: only an unlinked customer to a
/// subscriber without one), and mirrors the subscription it created. Returns the
/// session's status, payment status and whom it names ([`SessionStatus`]): a session
/// paid by bank debit (SEPA, ACH, Bacs) is `complete` days before it is paid, so
/// fulfil a one-time purchase on [`SessionStatus::is_paid`], not on `complete`.
///
/// The id comes from a URL anyone can edit, and the status is the session's, whoever
/// it belongs to: to open a page to the signed-in user, ask the gate for that user
/// (`require_subscription(user).check()`), not this status. Before fulfilling
/// anything on it, check [`SessionStatus::belongs_to`] the signed-in user, and
/// fulfil once per [`SessionStatus::id`] (a reload, or a second tab, brings the same
/// id back); a bank debit paid days later reaches only your
/// `checkout.session.async_payment_succeeded` handler.
///
/// With an access hook ([`Webhooks::on_access_change`](crate::Webhooks::on_access_change)),
/// call [`Webhooks::deliver_access_change`](crate::Webhooks::deliver_access_change)
/// for the signed-in user afterwards: this call marks the subscriber but tells no
/// hook, and Stripe's webhook for the same change then finds nothing new to tell.
///
/// ```no_run
/// # async fn f(mirror: stripe_mirror::Mirror) -> stripe_mirror::Result<()> {
/// # let user = "user-42";
/// let session = stripe_mirror::checkout::sync_session(&mirror, "cs_test_123").await?;
/// if session.is_paid() && session.belongs_to(user) {
///     // fulfil a one-time purchase, once per `session.id`; a subscription's access
///     // is the gate's to say
/// }
/// # Ok(()) }
/// ```
pub async fn sync_session(mirror: &Mirror, session_id: &str) -> Result<SessionStatus> {
    // It comes from the success page's URL: only a session id goes into the request.
    let well_formed = session_id.starts_with("cs_")
        && session_id.len() < 256
        && session_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !well_formed {
        return Err(Error::Refused(format!(
            "{session_id:?} is not a Checkout Session id (cs_...)"
        )));
    }
    let object = format!("checkout session {session_id}");
    let path = format!("/checkout/sessions/{session_id}");
    let session = mirror
        .stripe()
        .await?
        .get(&path, &json!({}), Some(&object))
        .await?;
    let livemode = session
        .get("livemode")
        .and_then(Value::as_bool)
        .unwrap_or(mirror.live_mode());
    let text = |field: &str| {
        session
            .get(field)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let id_of = |field: &str| crate::sync::upsert::id_named(&session, field).map(str::to_owned);
    let status = SessionStatus {
        id: text("id").unwrap_or_else(|| session_id.to_owned()),
        status: text("status"),
        payment_status: text("payment_status"),
        mode: text("mode"),
        // Metadata and `client_reference_id` that disagree name nobody.
        subscriber: crate::webhooks::session_subscriber(&session)
            .ok()
            .flatten()
            .map(str::to_owned),
        customer: id_of("customer"),
        subscription: id_of("subscription"),
        payment_intent: id_of("payment_intent"),
    };
    if !status.is_complete() {
        return Ok(status); // nothing to link until the buyer has finished
    }
    let (linked, source) = (session.clone(), format!("checkout session {session_id}"));
    mirror
        .db()
        .run(move |conn| {
            conn.write(|c| crate::webhooks::link_session(c, &linked, livemode, &source))
        })
        .await?;
    if let Some(id) = crate::sync::upsert::id_named(&session, "subscription") {
        crate::sync::remote::refetch(mirror, &crate::models::subscription::SUBSCRIPTIONS, id)
            .await?;
    }
    Ok(status)
}

/// Where a Checkout Session stands ([`sync_session`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionStatus {
    /// The session's id (`cs_...`): fulfil a purchase once per id.
    pub id: String,
    /// `complete` (the buyer finished), `open` or `expired`.
    pub status: Option<String>,
    /// `paid`; `unpaid` (a bank debit on its way: Stripe then sends
    /// `checkout.session.async_payment_succeeded` or `..._failed`); or
    /// `no_payment_required` (a trial, a 100 % discount).
    pub payment_status: Option<String>,
    /// `payment` (a one-time purchase), `subscription` or `setup`.
    pub mode: Option<String>,
    /// The subscriber the session names: the subscriber metadata
    /// [`Checkout::create`] sets, else its `client_reference_id` (which a buyer can set
    /// on a Payment Link); `None` when neither is there or the two disagree.
    pub subscriber: Option<String>,
    /// The customer that paid (`cus_...`), once there is one.
    pub customer: Option<String>,
    /// The subscription a `subscription` session created (`sub_...`).
    pub subscription: Option<String>,
    /// The payment a `payment` session created (`pi_...`).
    pub payment_intent: Option<String>,
}

impl SessionStatus {
    /// The buyer finished the session (which is not yet payment: see [`is_paid`](Self::is_paid)).
    pub fn is_complete(&self) -> bool {
        self.status.as_deref() == Some("complete")
    }

    /// Complete, and paid or owing nothing: what a one-time purchase is fulfilled on.
    pub fn is_paid(&self) -> bool {
        self.is_complete()
            && matches!(
                self.payment_status.as_deref(),
                Some("paid" | "no_payment_required")
            )
    }

    /// Whether the session names `subscriber_id` as its buyer ([`SessionStatus::subscriber`]).
    /// The id in the success page's URL can be anyone's: check this for the signed-in
    /// user before fulfilling anything on the session.
    pub fn belongs_to(&self, subscriber_id: &str) -> bool {
        !subscriber_id.is_empty() && self.subscriber.as_deref() == Some(subscriber_id)
    }
}

/// A Billing Portal session to send the customer to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortalSession {
    /// Stripe id (`bps_...`).
    pub id: String,
    /// The hosted portal: redirect the browser here.
    pub url: String,
}

/// Opens the Billing Portal for `subscriber_id`'s customer; the portal sends the
/// customer back to `return_url`. Of a subscriber's customers, the one holding their
/// newest subscription that grants access is opened (else their newest subscription's).
/// A customer Stripe no longer has becomes a tombstone and the subscriber's next one
/// is opened; a subscriber without one is [`Error::NotFound`] (nothing to manage:
/// send them to pricing).
///
/// ```no_run
/// # async fn f(mirror: stripe_mirror::Mirror) -> stripe_mirror::Result<()> {
/// let portal = stripe_mirror::checkout::billing_portal(&mirror, "user-42", "https://example.com/account").await?;
/// println!("redirect to {}", portal.url);
/// # Ok(()) }
/// ```
pub async fn billing_portal(
    mirror: &Mirror,
    subscriber_id: &str,
    return_url: &str,
) -> Result<PortalSession> {
    BillingPortal::new(subscriber_id, return_url)
        .open(mirror)
        .await
}

/// A Billing Portal session with options: a page of its own to open at (a deep link:
/// the card form for a `past_due` subscriber, the cancel or plan change of their
/// subscription) and a portal configuration. [`billing_portal`] is the plain one.
///
/// ```no_run
/// # async fn f(mirror: stripe_mirror::Mirror) -> stripe_mirror::Result<()> {
/// use stripe_mirror::checkout::BillingPortal;
/// // A past-due subscriber, straight to the card form.
/// let portal = BillingPortal::new("user-42", "https://example.com/account")
///     .payment_method_update()
///     .open(&mirror)
///     .await?;
/// println!("redirect to {}", portal.url);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct BillingPortal {
    subscriber: String,
    return_url: String,
    flow: Option<PortalFlow>,
    configuration: Option<String>,
}

/// Where a [`BillingPortal`] session opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortalFlow {
    PaymentMethodUpdate,
    SubscriptionCancel,
    SubscriptionUpdate,
}

impl BillingPortal {
    /// The portal of `subscriber_id`'s paying customer (as [`billing_portal`] opens),
    /// sending them back to `return_url`.
    pub fn new(subscriber_id: &str, return_url: &str) -> Self {
        BillingPortal {
            subscriber: subscriber_id.to_owned(),
            return_url: return_url.to_owned(),
            flow: None,
            configuration: None,
        }
    }

    /// Opens at the form that replaces the card (what a `past_due` subscriber needs).
    pub fn payment_method_update(mut self) -> Self {
        self.flow = Some(PortalFlow::PaymentMethodUpdate);
        self
    }

    /// Opens at the cancellation of the subscriber's subscription (the newest that grants
    /// access, else the newest one Stripe still bills).
    pub fn subscription_cancel(mut self) -> Self {
        self.flow = Some(PortalFlow::SubscriptionCancel);
        self
    }

    /// Opens at the plan change of the subscriber's subscription (as
    /// [`subscription_cancel`](Self::subscription_cancel) picks it); the plans offered
    /// are the portal configuration's.
    pub fn subscription_update(mut self) -> Self {
        self.flow = Some(PortalFlow::SubscriptionUpdate);
        self
    }

    /// A portal configuration of your own (`bpc_...`), for the features and plans it
    /// offers; the account's default one otherwise.
    pub fn configuration(mut self, id: &str) -> Self {
        self.configuration = Some(id.to_owned());
        self
    }

    /// Creates the session. Of the subscriber's customers, the one holding their newest
    /// subscription that grants access is opened (else their newest subscription's). A
    /// customer Stripe no longer has becomes a tombstone and the next one is opened; a
    /// subscriber without one, or without a subscription for a subscription page, is
    /// [`Error::NotFound`] (nothing to manage: send them to pricing).
    pub async fn open(&self, mirror: &Mirror) -> Result<PortalSession> {
        let subscriber_id = self.subscriber.as_str();
        let none = || Error::NotFound {
            object: "customer of subscriber",
            id: subscriber_id.to_owned(),
        };
        let customer = Customer::billing_customer(mirror, subscriber_id)
            .await?
            .ok_or_else(none)?;
        match self.open_for(mirror, &customer.id).await {
            // Stripe no longer has it (a tombstone now): the subscriber's other customer, if any.
            Err(err) if stale_customer(mirror, &err, &customer.id).await => {
                let customer = Customer::billing_customer(mirror, subscriber_id)
                    .await?
                    .ok_or_else(none)?;
                self.open_for(mirror, &customer.id).await
            }
            done => done,
        }
    }

    /// Creates the Billing Portal session for this customer.
    async fn open_for(&self, mirror: &Mirror, customer: &str) -> Result<PortalSession> {
        use stripe_billing::billing_portal_session::{
            CreateBillingPortalSession, CreateBillingPortalSessionFlowData as Flow,
            CreateBillingPortalSessionFlowDataSubscriptionCancel as Cancel,
            CreateBillingPortalSessionFlowDataSubscriptionUpdate as Update,
            CreateBillingPortalSessionFlowDataType as Type,
        };
        let mut request = CreateBillingPortalSession::new()
            .customer(customer)
            .return_url(self.return_url.as_str());
        if let Some(configuration) = &self.configuration {
            request = request.configuration(configuration.as_str());
        }
        match self.flow {
            None => {}
            Some(PortalFlow::PaymentMethodUpdate) => {
                request = request.flow_data(Flow::new(Type::PaymentMethodUpdate));
            }
            Some(flow) => {
                let subscription = self.subscription_of(mirror, customer).await?;
                request = request.flow_data(if flow == PortalFlow::SubscriptionCancel {
                    Flow {
                        subscription_cancel: Some(Cancel::new(subscription)),
                        ..Flow::new(Type::SubscriptionCancel)
                    }
                } else {
                    Flow {
                        subscription_update: Some(Update::new(subscription)),
                        ..Flow::new(Type::SubscriptionUpdate)
                    }
                });
            }
        }
        let object = format!("billing portal session for subscriber {}", self.subscriber);
        let session = create(mirror, &request, &object).await?;
        session_of(&session, customer, "billing portal session")
            .map(|(id, url)| PortalSession { id, url })
    }

    /// The customer's subscription a subscription page is about: the newest that
    /// grants access, else the newest Stripe still bills (`past_due`, `unpaid`,
    /// `paused`); for a cancellation, not one already set to cancel.
    async fn subscription_of(&self, mirror: &Mirror, customer: &str) -> Result<String> {
        use crate::models::subscription::Subscription;
        let held = Subscription::for_customer(mirror, customer).await?;
        let now = mirror.now();
        let cancelling = |s: &Subscription| {
            self.flow == Some(PortalFlow::SubscriptionCancel)
                && (s.cancel_at_period_end == Some(true) || s.cancel_at.is_some())
        };
        let billed = |s: &&Subscription| {
            !s.deleted
                && !s.has_ended_at(now)
                && s.status.as_ref().is_some_and(|status| status.is_billed())
                && !cancelling(s)
        };
        held.iter()
            .find(|s| s.is_valid_at(now) && !cancelling(s))
            .or_else(|| held.iter().find(billed))
            .map(|s| s.id.clone())
            .ok_or_else(|| Error::NotFound {
                object: "subscription of subscriber",
                id: self.subscriber.clone(),
            })
    }
}

/// Whether `err` is Stripe refusing a session because `customer`, the one it was sent,
/// does not exist (`resource_missing` naming it), and a fetch of that customer
/// confirms it is gone: the mirror then holds it as a tombstone.
async fn stale_customer(mirror: &Mirror, err: &Error, customer: &str) -> bool {
    let Error::Stripe(e) = err else { return false };
    let named = e
        .message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|word| word == customer);
    if e.code.as_deref() != Some("resource_missing") || !named {
        return false;
    }
    let customers = &crate::models::customer::CUSTOMERS;
    let gone = matches!(
        crate::sync::remote::refetch(mirror, customers, customer).await,
        Ok(crate::sync::remote::Refetch::Gone)
    );
    if gone {
        tracing::warn!(%customer, "Stripe no longer has this customer: kept as a tombstone");
    }
    gone
}

/// Creates a session (Checkout's or the Portal's) with `request`: Stripe's answer.
async fn create<R>(mirror: &Mirror, request: &R, object: &str) -> Result<Value>
where
    R: stripe_client_core::StripeRequest,
{
    let answer = mirror
        .stripe()
        .await?
        .request(request, None, Some(object))
        .await?;
    Ok(answer.value)
}

/// The id and URL of a created session; an answer without them is a clear error.
fn session_of(session: &Value, customer: &str, kind: &'static str) -> Result<(String, String)> {
    let field = |name: &str| session.get(name).and_then(Value::as_str).map(str::to_owned);
    match (field("id"), field("url")) {
        (Some(id), Some(url)) => Ok((id, url)),
        _ => Err(Error::mapping(
            kind,
            customer,
            "url",
            "the created session has no id or url",
        )),
    }
}
