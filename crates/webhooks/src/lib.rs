//! Rookery's webhooks: what checks the signatures of inbound deliveries, what signs outbound
//! ones, when a failed one is tried again, and the guard that keeps outbound deliveries off
//! private networks. Pure functions over bytes, addresses and durations; the HTTP routes and
//! the dispatcher build on them.
//!
//! # Layout
//! - [`signature`]: secrets in the Standard Webhooks form (`whsec_…`), signing and verifying
//!   Standard Webhooks v1, Twitch EventSub and `X-Hub-Signature-256` (GitHub, Meta), all in
//!   constant time over the raw body.
//! - [`retry`]: when a failed outbound delivery is tried again, and when it is exhausted.
//! - [`sealed`]: secrets at rest, AES-256-GCM under `ROOKERY_SECRET_KEY`, bound to their row.
//! - [`ssrf`]: which destination addresses an outbound delivery may connect to.

pub mod retry;
pub mod sealed;
pub mod signature;
pub mod ssrf;

pub use retry::RetrySchedule;
pub use sealed::{SealError, SealingKey};
pub use signature::{Secret, SignatureError};
