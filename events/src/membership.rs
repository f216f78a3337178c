//! Events of the `membership` aggregate: one per `community × hub user`, its id derived with
//! [`membership_id`] so the same pair always lands on the same stream.

use crate::decimal::Decimal4;
use crate::types::Role;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// The membership aggregate id of `user_id` in `community_id` (UUID v5 over both ids).
pub fn membership_id(community_id: Uuid, user_id: Uuid) -> Uuid {
    let mut name = [0u8; 32];
    name[..16].copy_from_slice(community_id.as_bytes());
    name[16..].copy_from_slice(user_id.as_bytes());
    Uuid::new_v5(&MEMBERSHIP_NAMESPACE, &name)
}

/// Namespace of membership ids (a fixed random UUID; never change it).
pub const MEMBERSHIP_NAMESPACE: Uuid = Uuid::from_u128(0x5a0e_77c1_2f0b_4d7e_9b1e_3c55_b0d4_a6e1);

/// How a membership that did not come from the user's own join began.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JoinVia {
    /// The user's first message or activity in the community, arriving from a platform.
    Activity,
    /// A shadow user's membership, moved to the registered user who claimed its platform account.
    Merge,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub enum MembershipEvent {
    /// The user became an active member (by joining, being added, founding the community, their
    /// first platform activity there, or a merge).
    MemberJoined {
        community_id: Uuid,
        user_id: Uuid,
        role: Role,
        /// Absent for a join, an addition or a founding.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        via: Option<JoinVia>,
    },
    /// The user asked to join a community in approval mode.
    JoinRequested {
        community_id: Uuid,
        user_id: Uuid,
    },
    MemberRoleChanged {
        community_id: Uuid,
        user_id: Uuid,
        from: Role,
        to: Role,
    },
    MemberLeft {
        community_id: Uuid,
        user_id: Uuid,
    },
    MemberRemoved {
        community_id: Uuid,
        user_id: Uuid,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    MemberBanned {
        community_id: Uuid,
        user_id: Uuid,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    MemberUnbanned {
        community_id: Uuid,
        user_id: Uuid,
    },
    /// A moderator warned the member.
    MemberWarned {
        community_id: Uuid,
        user_id: Uuid,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A moderator silenced the member for `duration_secs` (enforced on the platforms).
    MemberTimedOut {
        community_id: Uuid,
        user_id: Uuid,
        duration_secs: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A moderator kicked the member out; unlike a ban, they may join again.
    MemberKicked {
        community_id: Uuid,
        user_id: Uuid,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// An admin moved the member's reputation by `delta`.
    ReputationAdjusted {
        community_id: Uuid,
        user_id: Uuid,
        delta: Decimal4,
        reason: String,
    },
    /// An admin set the member's reputation to `score`.
    ReputationSet {
        community_id: Uuid,
        user_id: Uuid,
        score: Decimal4,
        reason: String,
    },
    /// A shadow user's membership moved to `to_user_id`, the registered user who claimed the
    /// shadow's platform account; this membership ends, the other begins (`via: merge`).
    MembershipMoved {
        community_id: Uuid,
        user_id: Uuid,
        to_user_id: Uuid,
    },
}

impl MembershipEvent {
    pub fn name(&self) -> &'static str {
        match self {
            MembershipEvent::MemberJoined { .. } => "MemberJoined",
            MembershipEvent::JoinRequested { .. } => "JoinRequested",
            MembershipEvent::MemberRoleChanged { .. } => "MemberRoleChanged",
            MembershipEvent::MemberLeft { .. } => "MemberLeft",
            MembershipEvent::MemberRemoved { .. } => "MemberRemoved",
            MembershipEvent::MemberBanned { .. } => "MemberBanned",
            MembershipEvent::MemberUnbanned { .. } => "MemberUnbanned",
            MembershipEvent::MemberWarned { .. } => "MemberWarned",
            MembershipEvent::MemberTimedOut { .. } => "MemberTimedOut",
            MembershipEvent::MemberKicked { .. } => "MemberKicked",
            MembershipEvent::ReputationAdjusted { .. } => "ReputationAdjusted",
            MembershipEvent::ReputationSet { .. } => "ReputationSet",
            MembershipEvent::MembershipMoved { .. } => "MembershipMoved",
        }
    }

    /// The `(community, user)` pair every membership event names.
    pub fn subject(&self) -> (Uuid, Uuid) {
        match *self {
            MembershipEvent::MemberJoined {
                community_id,
                user_id,
                ..
            }
            | MembershipEvent::JoinRequested {
                community_id,
                user_id,
            }
            | MembershipEvent::MemberRoleChanged {
                community_id,
                user_id,
                ..
            }
            | MembershipEvent::MemberLeft {
                community_id,
                user_id,
            }
            | MembershipEvent::MemberRemoved {
                community_id,
                user_id,
                ..
            }
            | MembershipEvent::MemberBanned {
                community_id,
                user_id,
                ..
            }
            | MembershipEvent::MemberUnbanned {
                community_id,
                user_id,
            }
            | MembershipEvent::MemberWarned {
                community_id,
                user_id,
                ..
            }
            | MembershipEvent::MemberTimedOut {
                community_id,
                user_id,
                ..
            }
            | MembershipEvent::MemberKicked {
                community_id,
                user_id,
                ..
            }
            | MembershipEvent::ReputationAdjusted {
                community_id,
                user_id,
                ..
            }
            | MembershipEvent::ReputationSet {
                community_id,
                user_id,
                ..
            }
            | MembershipEvent::MembershipMoved {
                community_id,
                user_id,
                ..
            } => (community_id, user_id),
        }
    }
}

crate::domain_event!(MembershipEvent, "1.0");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_id_is_stable_and_pair_specific() {
        let (c, u) = (Uuid::from_u128(1), Uuid::from_u128(2));
        assert_eq!(membership_id(c, u), membership_id(c, u));
        assert_ne!(membership_id(c, u), membership_id(u, c));
        // A storage contract: this value must never change.
        assert_eq!(
            membership_id(c, u).to_string(),
            membership_id(c, u).hyphenated().to_string()
        );
    }
}
