//! Webhooks: Stripe pushes events, the mirror stays true, and the host app reacts.
//!
//! [`Webhooks`] is a handler registry that reads like a route table, and
//! [`Webhooks::receive`] is the whole pipeline for one request:
//!
//! 1. verify `Stripe-Signature` ([`signature`]);
//! 2. store the event once and claim it ([`event`]), and in the same transaction
//!    apply the built-in sync (`builtin`) through the stale-write guard and log the
//!    delivery ([`delivery`]; a request refused before this is logged on its own);
//! 3. run the handlers: exact matches, then wildcards, each in registration order;
//! 4. answer: 2xx done or duplicate, 4xx bad input, 5xx so that Stripe retries.
//!
//! Files: `registry` (the route table and how handlers run), `pipeline` (one request),
//! `replay` ([`Webhooks::process_events`]), `builtin` (the crate's own sync),
//! `retention` ([`prune`]: bounds the delivery log and the processed events).

mod builtin;
pub mod delivery;
pub mod event;
pub(crate) mod pipeline;
pub(crate) mod registry;
mod replay;
mod retention;
pub mod signature;

pub(crate) use builtin::{link_session, session_subscriber};
pub use delivery::{Delivery, Outcome};
pub use event::Event;
pub(crate) use pipeline::Failure;
pub use pipeline::{WebhookRequest, WebhookResponse};
pub use registry::AccessReport;
pub(crate) use registry::matches_pattern;
pub use registry::{
    DEFAULT_BODY_LIMIT, DEFAULT_HANDLER_TIMEOUT, DEFAULT_LEASE, DEFAULT_READ_TIMEOUT, HandlerError,
    Webhooks, WithState,
};
pub use replay::{EventFilter, ProcessReport};
pub use retention::{MIN_AGE, PruneReport, prune};
pub use signature::SignatureError;
