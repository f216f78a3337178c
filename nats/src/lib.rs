//! Rookery's NATS JetStream side: the stream and consumer definitions, subjects, the relay that
//! publishes the Postgres log, and the durable consumers projections read from.
//!
//! Everything that talks to async-nats lives here, written for nats-server 2.9 (no subject
//! transforms, no multi-filter consumers): the relay computes each event's partition itself and
//! puts it in the subject, `<prefix>.<partition>.<aggregate_type>.<event_type>`, so a consumer
//! per partition needs only one filter and sees each aggregate's events in order.
//!
//! Guarantees this crate provides (docs/architecture.md):
//! - **No lost events**: the relay reads the log in commit-safe order and stores its cursor only
//!   after JetStream acknowledged everything up to it (a cursor left behind only means
//!   re-publishing, which the stream de-duplicates).
//! - **Effectively once** on the bus: every message carries `Nats-Msg-Id =
//!   aggregate_type/aggregate_id/sequence`, so re-publishing after a crash is de-duplicated
//!   within the stream's duplicate window.
//! - **Order**: the stream holds the relayed events in log order (so each aggregate's in
//!   sequence order). Publishes are pipelined, and each one sent while its predecessor is
//!   unconfirmed is chained to it with `Nats-Expected-Last-Msg-Id`, so a publish lost in a
//!   reconnect cannot be overtaken. A partition consumer is recreated at the projection's
//!   checkpoint rather than resumed, so nothing left unacked by a crashed worker arrives behind
//!   newer messages.
//!
//! # Layout
//! - [`config`]: [`BusConfig`] and [`RelayConfig`] with their defaults.
//! - [`bus`]: [`Bus`]: connecting, the stream definition (created or updated at start-up),
//!   subjects, the pipelined [`Bus::publish_batch`], stream state.
//! - [`consumer`]: per-partition durable pull consumers (a fresh name per (re)creation, one pull
//!   subscription kept open), [`Delivery`], [`ack_all`], and the [`Bus::fetch_all`] diagnostic
//!   reader.
//! - [`relay`]: [`Relay`]: standby/active via the Postgres advisory lock, a reader reading ahead
//!   (LISTEN/NOTIFY with a polling fallback), one publish window across batches, the cursor
//!   saved behind the acks, backoff and retry.
//! - `message` (private): a log row as a bus message: subject, headers, and the body spliced
//!   from Postgres' JSON text.
//! - [`headers`]: the header names every message carries.

pub mod bus;
pub mod config;
pub mod consumer;
mod message;
pub mod relay;

pub use bus::{subject_token, Bus, StreamState};
pub use config::{BusConfig, RelayConfig};
pub use consumer::{ack_all, Delivery, PartitionConsumer};
pub use relay::{Relay, RelayStats};

/// Header names on every relayed message.
pub mod headers {
    /// JetStream's de-duplication key: `aggregate_type/aggregate_id/sequence`.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// The log key as its opaque token, `"<txid>.<gpos>"`.
    pub const POSITION: &str = "Rookery-Position";
    pub const AGGREGATE_TYPE: &str = "Rookery-Aggregate-Type";
    pub const AGGREGATE_ID: &str = "Rookery-Aggregate-Id";
    pub const SEQUENCE: &str = "Rookery-Sequence";
    pub const EVENT_TYPE: &str = "Rookery-Event-Type";
    /// When Postgres recorded the event (RFC 3339), for lag in seconds.
    pub const RECORDED_AT: &str = "Rookery-Recorded-At";
    /// Set by the relay on every message sent while the one before it is unconfirmed: that
    /// message's id, which must be the stream's last (see [`crate::Bus::publish_batch`]).
    pub const EXPECTED_LAST_MSG_ID: &str = "Nats-Expected-Last-Msg-Id";
}
