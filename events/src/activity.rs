//! Events of the `activity` aggregate: one platform activity (a follow, a subscription, a
//! cheer, …) in a community, its id derived with [`activity_id`] from the platform's id for it,
//! so a re-delivered activity is a no-op.

use crate::decimal::Decimal4;
use crate::types::Platform;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// Namespace of activity ids (a fixed random UUID; never change it).
pub const ACTIVITY_NAMESPACE: Uuid = Uuid::from_u128(0x7d2a_41c9_e836_4b0f_95a1_c3e4_f60b_2d17);

/// The activity aggregate id of the platform activity `external_id` in `community_id`.
pub fn activity_id(community_id: Uuid, platform: Platform, external_id: &str) -> Uuid {
    let name = format!("{community_id}/{platform}/{external_id}");
    Uuid::new_v5(&ACTIVITY_NAMESPACE, name.as_bytes())
}

/// A subscription's tier, as the platforms name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum SubTier {
    #[serde(rename = "1000")]
    Tier1,
    #[serde(rename = "2000")]
    Tier2,
    #[serde(rename = "3000")]
    Tier3,
}

impl SubTier {
    pub fn as_str(self) -> &'static str {
        match self {
            SubTier::Tier1 => "1000",
            SubTier::Tier2 => "2000",
            SubTier::Tier3 => "3000",
        }
    }
}

/// What happened, with its data. Stored as `{"type": "cheer", "data": {"bits": 300}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum Activity {
    Follow,
    Subscription {
        tier: SubTier,
    },
    /// `count` subscriptions given to others at once.
    GiftSubscription {
        count: u32,
    },
    Cheer {
        bits: u64,
    },
    Raid {
        viewers: u64,
    },
    Donation {
        amount: Decimal4,
        currency: String,
    },
    Boost,
    StreamOnline,
    StreamOffline,
}

impl Activity {
    /// The `type` name (`gift_subscription`).
    pub fn kind(&self) -> &'static str {
        match self {
            Activity::Follow => "follow",
            Activity::Subscription { .. } => "subscription",
            Activity::GiftSubscription { .. } => "gift_subscription",
            Activity::Cheer { .. } => "cheer",
            Activity::Raid { .. } => "raid",
            Activity::Donation { .. } => "donation",
            Activity::Boost => "boost",
            Activity::StreamOnline => "stream_online",
            Activity::StreamOffline => "stream_offline",
        }
    }

    /// Every kind, as the API names them.
    pub const KINDS: &'static [&'static str] = &[
        "follow",
        "subscription",
        "gift_subscription",
        "cheer",
        "raid",
        "donation",
        "boost",
        "stream_online",
        "stream_offline",
    ];
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub enum ActivityEvent {
    /// A platform user did something in a community.
    ActivityRecorded {
        activity_id: Uuid,
        community_id: Uuid,
        /// The hub user it came from (a shadow user for a platform account not known before).
        user_id: Uuid,
        platform: Platform,
        /// The platform's id for it.
        external_id: String,
        platform_user_id: String,
        username: String,
        activity: Activity,
        /// When the platform says it happened (when it was accepted, if the platform did not say).
        occurred_at: DateTime<Utc>,
    },
}

impl ActivityEvent {
    pub fn name(&self) -> &'static str {
        match self {
            ActivityEvent::ActivityRecorded { .. } => "ActivityRecorded",
        }
    }
}

crate::domain_event!(ActivityEvent, "1.0");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activities_are_stored_with_their_type_and_data() {
        let cheer = Activity::Cheer { bits: 300 };
        assert_eq!(
            serde_json::to_value(&cheer).ok(),
            Some(serde_json::json!({"type": "cheer", "data": {"bits": 300}}))
        );
        let sub: Activity = serde_json::from_value(
            serde_json::json!({"type": "subscription", "data": {"tier": "3000"}}),
        )
        .expect("subscription");
        assert_eq!(
            sub,
            Activity::Subscription {
                tier: SubTier::Tier3
            }
        );
        let follow: Activity =
            serde_json::from_value(serde_json::json!({"type": "follow"})).expect("follow");
        assert_eq!(follow, Activity::Follow);
        for kind in Activity::KINDS {
            assert!(!kind.is_empty());
        }
    }

    #[test]
    fn activity_ids_are_a_storage_contract() {
        let id = activity_id(Uuid::from_u128(1), Platform::Twitch, "abc");
        assert_eq!(id.to_string(), "8c4c60f5-b7ee-5691-87a4-bbf440751769");
    }
}
