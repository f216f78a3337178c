//! Events of the `user` (hub user) aggregate. Credentials never appear here: they live in their own
//! table, written in the same transaction as `UserRegistered`.

use crate::types::Platform;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub enum UserEvent {
    UserRegistered {
        user_id: Uuid,
        username: String,
        /// Lower-cased; unique across users.
        email: String,
    },
    /// The hub user owns this platform account (one hub user per account, one account per
    /// platform per user).
    PlatformIdentityLinked {
        platform: Platform,
        platform_user_id: String,
        username: String,
    },
    PlatformIdentityUnlinked {
        platform: Platform,
        platform_user_id: String,
    },
}

impl UserEvent {
    pub fn name(&self) -> &'static str {
        match self {
            UserEvent::UserRegistered { .. } => "UserRegistered",
            UserEvent::PlatformIdentityLinked { .. } => "PlatformIdentityLinked",
            UserEvent::PlatformIdentityUnlinked { .. } => "PlatformIdentityUnlinked",
        }
    }
}

crate::domain_event!(UserEvent, "1.0");
