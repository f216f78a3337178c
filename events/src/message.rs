//! Events of the `message` aggregate: one chat message in a community's channel, its id derived
//! with [`message_id`] from where it came from, so the same platform message always lands on
//! the same stream and posting it again is a no-op.

use crate::types::Platform;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// Namespace of message ids from platform message ids (a fixed random UUID; never change it).
pub const MESSAGE_NAMESPACE: Uuid = Uuid::from_u128(0x3c1f_9e02_6b5d_4a8f_a2c4_71d0_e6b3_58f9);

/// The message aggregate id of the platform message `external_id` in `community_id`.
pub fn message_id(community_id: Uuid, platform: Platform, external_id: &str) -> Uuid {
    let name = format!("{community_id}/{platform}/{external_id}");
    Uuid::new_v5(&MESSAGE_NAMESPACE, name.as_bytes())
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub enum MessageEvent {
    /// A chat message was posted in a channel of a community, on a platform or in hub chat.
    MessagePosted {
        message_id: Uuid,
        community_id: Uuid,
        channel: String,
        /// The hub user who sent it (a shadow user for a platform account not known before).
        sender_id: Uuid,
        /// The sender's name as the platform (or the hub) showed it then.
        sender_username: String,
        /// Where it came from; all three are absent for hub chat.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        platform: Option<Platform>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        external_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        platform_user_id: Option<String>,
        text: String,
        /// When the platform says it was sent (for hub chat: when it was accepted).
        sent_at: DateTime<Utc>,
    },
    /// Its sender changed the text.
    MessageEdited {
        text: String,
        edited_at: DateTime<Utc>,
    },
    /// A moderator deleted it; read models show it as deleted, the log keeps what it said.
    MessageDeleted {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

impl MessageEvent {
    pub fn name(&self) -> &'static str {
        match self {
            MessageEvent::MessagePosted { .. } => "MessagePosted",
            MessageEvent::MessageEdited { .. } => "MessageEdited",
            MessageEvent::MessageDeleted { .. } => "MessageDeleted",
        }
    }
}

crate::domain_event!(MessageEvent, "1.0");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_stable_per_community_platform_and_external_id() {
        let c = Uuid::from_u128(1);
        let id = message_id(c, Platform::Twitch, "abc");
        assert_eq!(id, message_id(c, Platform::Twitch, "abc"));
        assert_ne!(id, message_id(c, Platform::Discord, "abc"));
        assert_ne!(id, message_id(Uuid::from_u128(2), Platform::Twitch, "abc"));
        // A storage contract: this value must never change.
        assert_eq!(id.to_string(), "9b53fd87-1ef3-53f6-97b2-933cfc39ece7");
    }
}
