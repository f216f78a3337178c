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
}

impl User {
    pub fn exists(&self) -> bool {
        self.id.is_some()
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
                if !self.exists() {
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
}
