//! Events of the `community` aggregate.

use crate::reputation::ReputationPolicy;
use crate::types::{JoinMode, Platform};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub enum CommunityEvent {
    /// A community was founded; its owner became a member in the same commit.
    CommunityCreated {
        community_id: Uuid,
        /// Unique URL-safe name (`^[a-z0-9][a-z0-9-]{2,62}$`).
        name: String,
        display_name: String,
        platform: Platform,
        is_public: bool,
        join_mode: JoinMode,
        owner_id: Uuid,
    },
    /// Profile fields changed; absent fields kept their value.
    CommunityProfileUpdated {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        display_name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        description: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        is_public: Option<bool>,
    },
    /// A platform server (guild, channel, workspace) now belongs to this community.
    PlatformServerLinked {
        platform: Platform,
        server_id: String,
    },
    PlatformServerUnlinked {
        platform: Platform,
        server_id: String,
    },
    JoinModeChanged {
        join_mode: JoinMode,
    },
    CommunityArchived {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The community's reputation rules from here on (events before keep the rules they had).
    ReputationPolicySet {
        policy: ReputationPolicy,
    },
}

impl CommunityEvent {
    pub fn name(&self) -> &'static str {
        match self {
            CommunityEvent::CommunityCreated { .. } => "CommunityCreated",
            CommunityEvent::CommunityProfileUpdated { .. } => "CommunityProfileUpdated",
            CommunityEvent::PlatformServerLinked { .. } => "PlatformServerLinked",
            CommunityEvent::PlatformServerUnlinked { .. } => "PlatformServerUnlinked",
            CommunityEvent::JoinModeChanged { .. } => "JoinModeChanged",
            CommunityEvent::CommunityArchived { .. } => "CommunityArchived",
            CommunityEvent::ReputationPolicySet { .. } => "ReputationPolicySet",
        }
    }
}

crate::domain_event!(CommunityEvent, "1.0");
