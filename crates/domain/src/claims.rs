//! Uniqueness across aggregates. An aggregate only sees its own stream, so "one community per
//! name" or "one hub user per platform account" cannot be decided inside one. Instead the store
//! keeps a claims table `(kind, key) → aggregate` written in the same transaction as the events:
//! the domain says which claims each event takes or releases, the store's unique key refuses a
//! second taker, and the whole commit rolls back.

use rookery_events::{CommunityEvent, Platform, UserEvent};

use crate::DomainError;

/// Claim kinds, as stored.
pub mod kinds {
    pub const COMMUNITY_NAME: &str = "community_name";
    pub const PLATFORM_SERVER: &str = "platform_server";
    pub const EMAIL: &str = "email";
    pub const PLATFORM_IDENTITY: &str = "platform_identity";
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOp {
    Take { kind: &'static str, key: String },
    Release { kind: &'static str, key: String },
}

impl ClaimOp {
    pub fn kind(&self) -> &'static str {
        match self {
            ClaimOp::Take { kind, .. } | ClaimOp::Release { kind, .. } => kind,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            ClaimOp::Take { key, .. } | ClaimOp::Release { key, .. } => key,
        }
    }
}

/// Claims taken or released by a community event.
pub fn community_claims(event: &CommunityEvent) -> Vec<ClaimOp> {
    match event {
        CommunityEvent::CommunityCreated { name, .. } => {
            vec![ClaimOp::Take {
                kind: kinds::COMMUNITY_NAME,
                key: name.clone(),
            }]
        }
        CommunityEvent::PlatformServerLinked {
            platform,
            server_id,
        } => vec![ClaimOp::Take {
            kind: kinds::PLATFORM_SERVER,
            key: platform_key(*platform, server_id),
        }],
        CommunityEvent::PlatformServerUnlinked {
            platform,
            server_id,
        } => vec![ClaimOp::Release {
            kind: kinds::PLATFORM_SERVER,
            key: platform_key(*platform, server_id),
        }],
        CommunityEvent::CommunityProfileUpdated { .. }
        | CommunityEvent::JoinModeChanged { .. }
        | CommunityEvent::CommunityArchived { .. }
        | CommunityEvent::ReputationPolicySet { .. } => vec![],
    }
}

/// Claims taken or released by a user event.
pub fn user_claims(event: &UserEvent) -> Vec<ClaimOp> {
    match event {
        UserEvent::UserRegistered { email, .. } => {
            vec![ClaimOp::Take {
                kind: kinds::EMAIL,
                key: email.clone(),
            }]
        }
        UserEvent::PlatformIdentityLinked {
            platform,
            platform_user_id,
            ..
        } => {
            vec![ClaimOp::Take {
                kind: kinds::PLATFORM_IDENTITY,
                key: platform_key(*platform, platform_user_id),
            }]
        }
        UserEvent::PlatformIdentityUnlinked {
            platform,
            platform_user_id,
        }
        | UserEvent::ShadowUserMerged {
            platform,
            platform_user_id,
            ..
        } => {
            vec![ClaimOp::Release {
                kind: kinds::PLATFORM_IDENTITY,
                key: platform_key(*platform, platform_user_id),
            }]
        }
        // A shadow user holds its account like a linked identity, so a registered user linking
        // it must take it over (a merge) rather than hold it twice.
        UserEvent::ShadowUserCreated {
            platform,
            platform_user_id,
            ..
        } => vec![ClaimOp::Take {
            kind: kinds::PLATFORM_IDENTITY,
            key: platform_key(*platform, platform_user_id),
        }],
    }
}

/// The request field to name when a claim of `kind` is already taken (`"id"` for an unknown kind).
pub fn claim_field(kind: &str) -> &'static str {
    match kind {
        kinds::COMMUNITY_NAME => "name",
        kinds::PLATFORM_SERVER => "server_id",
        kinds::EMAIL => "email",
        kinds::PLATFORM_IDENTITY => "platform_user_id",
        _ => "id",
    }
}

/// The rejection to report when a claim of `kind` is already held by another aggregate.
pub fn claim_conflict(kind: &str) -> DomainError {
    DomainError::conflict(match kind {
        kinds::COMMUNITY_NAME => "this community name is taken",
        kinds::PLATFORM_SERVER => "this platform server already belongs to a community",
        kinds::EMAIL => "this email is already registered",
        kinds::PLATFORM_IDENTITY => "this platform account is already linked to another user",
        _ => "this value is already taken",
    })
}

/// `<platform>:<id>`. Platform names hold no ':', so the first ':' always ends the platform even
/// when the id contains more.
/// The claim key of a platform account (or server) `id` on `platform`.
pub fn platform_key(platform: Platform, id: &str) -> String {
    format!("{platform}:{id}")
}

#[cfg(test)]
mod tests {
    use rookery_events::{JoinMode, Platform};
    use uuid::Uuid;

    use super::*;

    #[test]
    fn creating_a_community_takes_its_name() {
        let created = CommunityEvent::CommunityCreated {
            community_id: Uuid::from_u128(1),
            name: "rustaceans".into(),
            display_name: "Rustaceans".into(),
            platform: Platform::Discord,
            is_public: true,
            join_mode: JoinMode::Open,
            owner_id: Uuid::from_u128(2),
        };
        assert_eq!(
            community_claims(&created),
            vec![ClaimOp::Take {
                kind: "community_name",
                key: "rustaceans".into()
            }]
        );
    }

    #[test]
    fn linking_a_server_takes_it_and_unlinking_releases_it() {
        let linked = CommunityEvent::PlatformServerLinked {
            platform: Platform::Discord,
            server_id: "42".into(),
        };
        let unlinked = CommunityEvent::PlatformServerUnlinked {
            platform: Platform::Discord,
            server_id: "42".into(),
        };
        assert_eq!(
            community_claims(&linked),
            vec![ClaimOp::Take {
                kind: "platform_server",
                key: "discord:42".into()
            }]
        );
        assert_eq!(
            community_claims(&unlinked),
            vec![ClaimOp::Release {
                kind: "platform_server",
                key: "discord:42".into()
            }]
        );
    }

    #[test]
    fn other_community_events_claim_nothing() {
        let changed = CommunityEvent::JoinModeChanged {
            join_mode: JoinMode::Invite,
        };
        assert!(community_claims(&changed).is_empty());
        assert!(community_claims(&CommunityEvent::CommunityArchived { reason: None }).is_empty());
    }

    #[test]
    fn registering_takes_the_email() {
        let registered = UserEvent::UserRegistered {
            user_id: Uuid::from_u128(1),
            username: "ferris".into(),
            email: "ferris@example.com".into(),
        };
        let claims = user_claims(&registered);
        assert_eq!(
            claims,
            vec![ClaimOp::Take {
                kind: "email",
                key: "ferris@example.com".into()
            }]
        );
        assert_eq!(
            (claims[0].kind(), claims[0].key()),
            ("email", "ferris@example.com")
        );
    }

    #[test]
    fn linking_an_identity_takes_it_and_unlinking_releases_it() {
        let linked = UserEvent::PlatformIdentityLinked {
            platform: Platform::Twitch,
            platform_user_id: "12345".into(),
            username: "ferris_tv".into(),
        };
        let unlinked = UserEvent::PlatformIdentityUnlinked {
            platform: Platform::Twitch,
            platform_user_id: "12345".into(),
        };
        assert_eq!(
            user_claims(&linked),
            vec![ClaimOp::Take {
                kind: "platform_identity",
                key: "twitch:12345".into()
            }]
        );
        assert_eq!(
            user_claims(&unlinked),
            vec![ClaimOp::Release {
                kind: "platform_identity",
                key: "twitch:12345".into()
            }]
        );
    }

    #[test]
    fn conflicts_name_the_request_field() {
        assert_eq!(claim_field(kinds::COMMUNITY_NAME), "name");
        assert_eq!(claim_field(kinds::PLATFORM_SERVER), "server_id");
        assert_eq!(claim_field(kinds::EMAIL), "email");
        assert_eq!(claim_field(kinds::PLATFORM_IDENTITY), "platform_user_id");
        assert_eq!(
            claim_conflict(kinds::EMAIL),
            DomainError::Conflict("this email is already registered".into())
        );
    }
}
