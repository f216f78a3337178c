//! The Rookery event contract.
//!
//! Events are past-tense facts, one serde enum per aggregate, externally tagged the way cqrs-es
//! stores them (`{"MemberJoined": {...}}`). The aggregate type names and event names are a storage
//! contract: changing one needs a new `event_version` and an upcaster, never a silent edit. The
//! JSON Schemas in `events/schemas/` are generated from these types and a test fails when they drift.
//!
//! # Layout
//! - [`community`], [`membership`], [`user`], [`message`], [`activity`]: the event enums per
//!   aggregate, and the ids derived from natural keys.
//! - [`reputation`]: a community's reputation policy and the tiers of a score.
//! - [`decimal`]: [`Decimal4`], exact decimal numbers (scores, weights, amounts).
//! - [`types`]: value types shared by events and commands (platform, role, join mode, …).
//! - [`metadata`]: who/why/when of every event (actor, request, correlation and causation ids).
//! - [`position`]: the log key `(transaction_id, global_position)` and its opaque token form.
//! - [`recorded`]: an event as read back from the log or the bus.

pub mod activity;
pub mod community;
pub mod decimal;
pub mod membership;
pub mod message;
pub mod metadata;
pub mod position;
pub mod recorded;
pub mod reputation;
pub mod schema;
pub mod types;
pub mod user;

pub use activity::{Activity, ActivityEvent, SubTier};
pub use community::CommunityEvent;
pub use decimal::Decimal4;
pub use membership::{JoinVia, MembershipEvent};
pub use message::MessageEvent;
pub use metadata::EventMetadata;
pub use position::{LogPosition, ParsePositionError};
pub use recorded::RecordedEvent;
pub use reputation::{ReputationPolicy, Tier, Weights};
pub use types::{JoinMode, MemberStatus, Platform, Role};
pub use user::UserEvent;

/// Aggregate type names as stored in `events.aggregate_type`.
pub mod aggregate_types {
    pub const COMMUNITY: &str = "community";
    pub const MEMBERSHIP: &str = "membership";
    pub const USER: &str = "user";
    pub const MESSAGE: &str = "message";
    pub const ACTIVITY: &str = "activity";
}

/// Implements `cqrs_es::DomainEvent` for an externally tagged enum: the event type is the variant
/// name, read from the serialized form so the two can never disagree.
macro_rules! domain_event {
    ($ty:ty, $version:expr) => {
        impl cqrs_es::DomainEvent for $ty {
            fn event_type(&self) -> String {
                self.name().to_string()
            }
            fn event_version(&self) -> String {
                $version.to_string()
            }
        }
    };
}
pub(crate) use domain_event;
