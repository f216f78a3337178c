//! Rookery aggregates, commands and domain rules. Pure: no I/O.
//!
//! Every aggregate has a synchronous `decide(&self, command) -> Result<Vec<Event>, DomainError>`
//! holding all its rules; its [`cqrs_es::Aggregate::handle`] only writes what `decide` returns, so
//! callers that batch commands can decide without the cqrs-es machinery. Commands carry what the
//! aggregate cannot see itself (the actor's role, the community's join mode), resolved by the
//! caller from read models; the aggregate decides what that allows.
//!
//! # Layout
//! - [`community`]: the community aggregate (profile, join mode, platform servers, archival,
//!   reputation policy).
//! - [`membership`]: one `community × user` membership (join, roles, leave, remove, ban,
//!   warn, timeout, kick, reputation by hand, moves from a shadow user).
//! - [`user`]: the hub user (registration, linked platform accounts, shadow users).
//! - [`message`]: one chat message (posted, edited, deleted by a moderator).
//! - [`activity`]: one platform activity (follow, subscription, cheer, raid, …).
//! - [`validation`]: field rules shared with the API.
//! - [`Decider`]: what the application needs of an aggregate (decide, claims), implemented beside
//!   each aggregate.
//! - [`claims`]: which uniqueness claims (names, emails, platform ids) each event takes or releases.
//! - [`DomainError`]: the one rejection type, one variant per HTTP status.

pub mod activity;
pub mod claims;
pub mod community;
mod decider;
mod error;
pub mod membership;
pub mod message;
pub mod user;
pub mod validation;

pub use activity::{validate_activity, ActivityCommand, ActivityRecord};
pub use claims::{claim_conflict, claim_field, community_claims, user_claims, ClaimOp};
pub use community::{Community, CommunityCommand, LinkedServer};
pub use decider::Decider;
pub use error::DomainError;
pub use membership::{CommunityContext, Membership, MembershipCommand};
pub use message::{Message, MessageCommand, PlatformOrigin};
pub use user::{PlatformIdentity, User, UserCommand};
