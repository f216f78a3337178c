//! Events of the `user` (hub user) aggregate. Credentials never appear here: they live in their own
//! table, written in the same transaction as `UserRegistered`.

use crate::types::Platform;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// Namespace of shadow user ids (a fixed random UUID; never change it).
pub const SHADOW_USER_NAMESPACE: Uuid = Uuid::from_u128(0x9b8e_5d14_c2a7_468f_8e31_f05a_6c7d_2b43);

/// The id of the shadow user of a platform account: the same whoever creates it, so concurrent
/// first messages of one sender create it once.
pub fn shadow_user_id(platform: Platform, platform_user_id: &str) -> Uuid {
    Uuid::new_v5(
        &SHADOW_USER_NAMESPACE,
        format!("{platform}/{platform_user_id}").as_bytes(),
    )
}

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
    /// A hub user made for a platform account the hub did not know, when its first message or
    /// activity arrived; it holds that account (as a linked identity) until a registered user
    /// claims it.
    ShadowUserCreated {
        user_id: Uuid,
        platform: Platform,
        platform_user_id: String,
        username: String,
    },
    /// The registered user `into` claimed this shadow user's platform account: its memberships
    /// moved there (`MembershipMoved`) and it holds nothing any more.
    ShadowUserMerged {
        into: Uuid,
        /// The account it held, released here and linked to `into` in the same commit.
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
            UserEvent::ShadowUserCreated { .. } => "ShadowUserCreated",
            UserEvent::ShadowUserMerged { .. } => "ShadowUserMerged",
        }
    }
}

crate::domain_event!(UserEvent, "1.0");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_user_ids_are_a_storage_contract() {
        let id = shadow_user_id(Platform::Twitch, "141981764");
        assert_eq!(id.to_string(), "671543f1-d2d6-5db7-875c-f52bb09e6a99");
        assert_ne!(id, shadow_user_id(Platform::Kick, "141981764"));
    }
}
