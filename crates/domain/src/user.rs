//! The `user` (hub user) aggregate: registration and linked platform accounts. Credentials are not
//! here: the application stores the password hash in its own table in the same commit as
//! `UserRegistered`, so no secret ever reaches the event log. Email and platform-account
//! uniqueness live in [`crate::claims`].

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use rookery_events::{aggregate_types, Platform, UserEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::claims::{user_claims, ClaimOp};
use crate::decider::Decider;
use crate::validation::{
    normalize_email, validate_platform_user_id, validate_platform_username, validate_username,
};
use crate::DomainError;

#[derive(Default, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default)]
pub struct User {
    /// `None` until the user registers.
    pub id: Option<Uuid>,
    pub username: String,
    /// Normalized (trimmed, lower-cased).
    pub email: String,
    pub identities: Vec<PlatformIdentity>,
    /// Made for a platform account the hub did not know; never signs in.
    pub shadow: bool,
    /// The registered user a shadow was merged into (it holds nothing since).
    pub merged_into: Option<Uuid>,
}

/// A platform account owned by the user; at most one per platform.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PlatformIdentity {
    pub platform: Platform,
    pub platform_user_id: String,
    pub username: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum UserCommand {
    Register {
        user_id: Uuid,
        username: String,
        email: String,
    },
    LinkIdentity {
        platform: Platform,
        platform_user_id: String,
        username: String,
    },
    UnlinkIdentity {
        platform: Platform,
        platform_user_id: String,
    },
    /// A hub user for a platform account not known before (its id from
    /// [`rookery_events::user::shadow_user_id`]); a no-op when it exists.
    CreateShadow {
        user_id: Uuid,
        platform: Platform,
        platform_user_id: String,
        username: String,
    },
    /// The registered user `into` claims this shadow user's account.
    MergeInto { into: Uuid },
}

impl User {
    pub fn exists(&self) -> bool {
        self.id.is_some()
    }

    /// A registered (not shadow) user.
    pub fn is_registered(&self) -> bool {
        self.exists() && !self.shadow
    }

    /// The user's account on `platform`, if linked.
    pub fn identity(&self, platform: Platform) -> Option<&PlatformIdentity> {
        self.identities.iter().find(|i| i.platform == platform)
    }

    /// All the rules: the events `command` produces from this state, without applying them.
    pub fn decide(&self, command: UserCommand) -> Result<Vec<UserEvent>, DomainError> {
        match command {
            UserCommand::Register {
                user_id,
                username,
                email,
            } => {
                if self.exists() {
                    return Err(DomainError::conflict("user already registered"));
                }
                validate_username(&username)?;
                let email = normalize_email(&email)?;
                Ok(vec![UserEvent::UserRegistered {
                    user_id,
                    username,
                    email,
                }])
            }
            UserCommand::LinkIdentity {
                platform,
                platform_user_id,
                username,
            } => {
                if !self.is_registered() {
                    return Err(DomainError::NotFound("user"));
                }
                validate_platform_user_id(&platform_user_id)?;
                validate_platform_username(&username)?;
                match self.identity(platform) {
                    Some(linked) if linked.platform_user_id == platform_user_id => Ok(vec![]),
                    Some(_) => Err(DomainError::conflict(format!(
                        "already linked to another {platform} account; unlink it first"
                    ))),
                    None => Ok(vec![UserEvent::PlatformIdentityLinked {
                        platform,
                        platform_user_id,
                        username: username.trim().to_string(),
                    }]),
                }
            }
            UserCommand::UnlinkIdentity {
                platform,
                platform_user_id,
            } => {
                if !self.exists() {
                    return Err(DomainError::NotFound("user"));
                }
                match self.identity(platform) {
                    Some(linked) if linked.platform_user_id == platform_user_id => {
                        Ok(vec![UserEvent::PlatformIdentityUnlinked {
                            platform,
                            platform_user_id,
                        }])
                    }
                    _ => Err(DomainError::NotFound("platform identity")),
                }
            }
            UserCommand::CreateShadow {
                user_id,
                platform,
                platform_user_id,
                username,
            } => {
                if self.exists() {
                    return Ok(vec![]);
                }
                validate_platform_user_id(&platform_user_id)?;
                validate_platform_username(&username)?;
                Ok(vec![UserEvent::ShadowUserCreated {
                    user_id,
                    platform,
                    platform_user_id,
                    username: username.trim().to_string(),
                }])
            }
            UserCommand::MergeInto { into } => {
                if !self.shadow {
                    return Err(DomainError::invalid_state(
                        "only a shadow user can be merged",
                    ));
                }
                if self.merged_into.is_some() {
                    return Err(DomainError::conflict("this account was claimed already"));
                }
                let Some(identity) = self.identities.first() else {
                    return Err(DomainError::invalid_state(
                        "the shadow user holds no account",
                    ));
                };
                Ok(vec![UserEvent::ShadowUserMerged {
                    into,
                    platform: identity.platform,
                    platform_user_id: identity.platform_user_id.clone(),
                }])
            }
        }
    }
}

impl Aggregate for User {
    const TYPE: &'static str = aggregate_types::USER;
    type Command = UserCommand;
    type Event = UserEvent;
    type Error = DomainError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            UserEvent::UserRegistered {
                user_id,
                username,
                email,
            } => {
                self.id = Some(user_id);
                self.username = username;
                self.email = email;
            }
            UserEvent::PlatformIdentityLinked {
                platform,
                platform_user_id,
                username,
            } => {
                self.identities.retain(|i| i.platform != platform);
                self.identities.push(PlatformIdentity {
                    platform,
                    platform_user_id,
                    username,
                });
            }
            UserEvent::PlatformIdentityUnlinked {
                platform,
                platform_user_id,
            } => {
                self.identities.retain(|i| {
                    !(i.platform == platform && i.platform_user_id == platform_user_id)
                });
            }
            UserEvent::ShadowUserCreated {
                user_id,
                platform,
                platform_user_id,
                username,
            } => {
                self.id = Some(user_id);
                self.shadow = true;
                self.username = username.clone();
                self.identities = vec![PlatformIdentity {
                    platform,
                    platform_user_id,
                    username,
                }];
            }
            UserEvent::ShadowUserMerged { into, .. } => {
                self.merged_into = Some(into);
                self.identities.clear();
            }
        }
    }
}

impl Decider for User {
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, DomainError> {
        User::decide(self, command)
    }

    fn claims(event: &Self::Event) -> Vec<ClaimOp> {
        user_claims(event)
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::{AggregateTestExecutor, TestFramework};

    use super::*;

    const USER: Uuid = Uuid::from_u128(7);

    fn given(events: Vec<UserEvent>) -> AggregateTestExecutor<User> {
        TestFramework::<User>::with(()).given(events)
    }

    fn registered() -> UserEvent {
        UserEvent::UserRegistered {
            user_id: USER,
            username: "ferris".into(),
            email: "ferris@example.com".into(),
        }
    }

    fn register(username: &str, email: &str) -> UserCommand {
        UserCommand::Register {
            user_id: USER,
            username: username.into(),
            email: email.into(),
        }
    }

    fn twitch_linked(platform_user_id: &str) -> UserEvent {
        UserEvent::PlatformIdentityLinked {
            platform: Platform::Twitch,
            platform_user_id: platform_user_id.into(),
            username: "ferris_tv".into(),
        }
    }

    fn link_twitch(platform_user_id: &str) -> UserCommand {
        UserCommand::LinkIdentity {
            platform: Platform::Twitch,
            platform_user_id: platform_user_id.into(),
            username: "ferris_tv".into(),
        }
    }

    fn unlink_twitch(platform_user_id: &str) -> UserCommand {
        UserCommand::UnlinkIdentity {
            platform: Platform::Twitch,
            platform_user_id: platform_user_id.into(),
        }
    }

    #[test]
    fn registers_with_a_normalized_email() {
        given(vec![])
            .when(register("ferris", "  Ferris@Example.COM "))
            .then_expect_events(vec![registered()]);
    }

    #[test]
    fn registering_twice_conflicts() {
        given(vec![registered()])
            .when(register("ferris", "ferris@example.com"))
            .then_expect_error(DomainError::conflict("user already registered"));
    }

    #[test]
    fn register_rejects_an_invalid_username() {
        given(vec![])
            .when(register("f", "ferris@example.com"))
            .then_expect_error_message(
                "invalid username: must be 3 to 32 letters, digits, '_', '.' or '-'",
            );
    }

    #[test]
    fn register_rejects_an_invalid_email() {
        given(vec![])
            .when(register("ferris", "ferris"))
            .then_expect_error(DomainError::validation(
                "email",
                "must be an address like name@example.com",
            ));
    }

    #[test]
    fn links_a_platform_identity() {
        given(vec![registered()])
            .when(link_twitch("12345"))
            .then_expect_events(vec![twitch_linked("12345")]);
    }

    #[test]
    fn linking_the_same_identity_again_emits_nothing() {
        given(vec![registered(), twitch_linked("12345")])
            .when(link_twitch("12345"))
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_second_account_on_the_same_platform_conflicts() {
        given(vec![registered(), twitch_linked("12345")])
            .when(link_twitch("67890"))
            .then_expect_error_message("already linked to another twitch account; unlink it first");
    }

    #[test]
    fn accounts_on_different_platforms_can_be_linked() {
        let mut user = User::default();
        for event in [registered(), twitch_linked("12345")] {
            user.apply(event);
        }
        let events = user
            .decide(UserCommand::LinkIdentity {
                platform: Platform::Discord,
                platform_user_id: "80351110224678912".into(),
                username: "Ferris".into(),
            })
            .expect("a discord account links beside a twitch one");
        events.into_iter().for_each(|e| user.apply(e));
        assert_eq!(user.identities.len(), 2);
        assert_eq!(
            user.identity(Platform::Twitch)
                .map(|i| i.platform_user_id.as_str()),
            Some("12345")
        );
    }

    #[test]
    fn linking_to_an_unregistered_user_is_not_found() {
        given(vec![])
            .when(link_twitch("12345"))
            .then_expect_error(DomainError::NotFound("user"));
    }

    #[test]
    fn link_rejects_an_invalid_platform_user_id() {
        given(vec![registered()])
            .when(link_twitch("12 345"))
            .then_expect_error(DomainError::validation(
                "platform_user_id",
                "must be 1 to 128 letters, digits, '_', '.', ':' or '-'",
            ));
    }

    #[test]
    fn unlinks_a_linked_identity() {
        given(vec![registered(), twitch_linked("12345")])
            .when(unlink_twitch("12345"))
            .then_expect_events(vec![UserEvent::PlatformIdentityUnlinked {
                platform: Platform::Twitch,
                platform_user_id: "12345".into(),
            }]);
    }

    #[test]
    fn unlinking_an_identity_that_is_not_linked_is_not_found() {
        given(vec![registered(), twitch_linked("12345")])
            .when(unlink_twitch("67890"))
            .then_expect_error(DomainError::NotFound("platform identity"));
        given(vec![registered()])
            .when(unlink_twitch("12345"))
            .then_expect_error(DomainError::NotFound("platform identity"));
    }

    #[test]
    fn an_unlinked_platform_can_be_linked_to_another_account() {
        let unlinked = UserEvent::PlatformIdentityUnlinked {
            platform: Platform::Twitch,
            platform_user_id: "12345".into(),
        };
        given(vec![registered(), twitch_linked("12345"), unlinked])
            .when(link_twitch("67890"))
            .then_expect_events(vec![twitch_linked("67890")]);
    }

    fn shadow() -> UserEvent {
        UserEvent::ShadowUserCreated {
            user_id: Uuid::from_u128(7),
            platform: Platform::Twitch,
            platform_user_id: "42".into(),
            username: "ferris".into(),
        }
    }

    #[test]
    fn a_shadow_user_is_created_once_and_holds_its_account() {
        let create = || UserCommand::CreateShadow {
            user_id: Uuid::from_u128(7),
            platform: Platform::Twitch,
            platform_user_id: "42".into(),
            username: " ferris ".into(),
        };
        given(vec![])
            .when(create())
            .then_expect_events(vec![shadow()]);
        given(vec![shadow()])
            .when(create())
            .then_expect_events(vec![]);
        assert_eq!(
            User::claims(&shadow()),
            vec![ClaimOp::Take {
                kind: crate::claims::kinds::PLATFORM_IDENTITY,
                key: "twitch:42".into(),
            }]
        );
        // A shadow user is not a registered one: it cannot link accounts of its own.
        given(vec![shadow()])
            .when(link_twitch("43"))
            .then_expect_error(DomainError::NotFound("user"));
    }

    #[test]
    fn a_merge_releases_the_shadows_account_once() {
        let merged = UserEvent::ShadowUserMerged {
            into: Uuid::from_u128(1),
            platform: Platform::Twitch,
            platform_user_id: "42".into(),
        };
        given(vec![shadow()])
            .when(UserCommand::MergeInto {
                into: Uuid::from_u128(1),
            })
            .then_expect_events(vec![merged.clone()]);
        assert_eq!(
            User::claims(&merged),
            vec![ClaimOp::Release {
                kind: crate::claims::kinds::PLATFORM_IDENTITY,
                key: "twitch:42".into(),
            }]
        );
        given(vec![shadow(), merged])
            .when(UserCommand::MergeInto {
                into: Uuid::from_u128(2),
            })
            .then_expect_error(DomainError::Conflict(
                "this account was claimed already".into(),
            ));
        given(vec![registered()])
            .when(UserCommand::MergeInto {
                into: Uuid::from_u128(2),
            })
            .then_expect_error(DomainError::InvalidState(
                "only a shadow user can be merged".into(),
            ));
    }
}
