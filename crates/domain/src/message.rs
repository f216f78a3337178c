//! The `message` aggregate: one chat message, its id from
//! [`rookery_events::message::message_id`] for platform messages (a random one for hub chat), so
//! posting the same platform message again is a no-op. Who sent it is resolved by the caller
//! (a shadow user for a platform account the hub does not know).

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use rookery_events::{aggregate_types, MessageEvent, Platform, Role};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::decider::Decider;
use crate::validation::{
    validate_channel, validate_message_external_id, validate_message_text,
    validate_platform_user_id, validate_platform_username, validate_reason,
};
use crate::DomainError;

#[derive(Default, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default)]
pub struct Message {
    /// `None` until posted.
    pub id: Option<Uuid>,
    pub community_id: Option<Uuid>,
    pub sender_id: Option<Uuid>,
    pub text: String,
    pub deleted: bool,
}

/// Where a platform message came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformOrigin {
    pub platform: Platform,
    pub external_id: String,
    pub platform_user_id: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum MessageCommand {
    /// A no-op when the message exists (a platform re-delivering it).
    Post {
        message_id: Uuid,
        community_id: Uuid,
        channel: String,
        sender_id: Uuid,
        sender_username: String,
        origin: Option<PlatformOrigin>,
        text: String,
        sent_at: DateTime<Utc>,
    },
    /// Its sender changes the text.
    Edit {
        actor_id: Uuid,
        text: String,
        edited_at: DateTime<Utc>,
    },
    /// Moderators and above.
    Delete {
        actor_role: Role,
        reason: Option<String>,
    },
}

impl Message {
    pub fn exists(&self) -> bool {
        self.id.is_some()
    }

    /// All the rules: the events `command` produces from this state, without applying them.
    pub fn decide(&self, command: MessageCommand) -> Result<Vec<MessageEvent>, DomainError> {
        match command {
            MessageCommand::Post {
                message_id,
                community_id,
                channel,
                sender_id,
                sender_username,
                origin,
                text,
                sent_at,
            } => {
                // Checked before the repeat is recognised, so a bad request is refused the
                // same way whether or not it repeats one.
                validate_channel(&channel)?;
                validate_message_text(&text)?;
                validate_platform_username(&sender_username)?;
                if let Some(origin) = &origin {
                    validate_message_external_id(&origin.external_id)?;
                    validate_platform_user_id(&origin.platform_user_id)?;
                }
                if self.exists() {
                    return Ok(vec![]);
                }
                let (platform, external_id, platform_user_id) = match origin {
                    Some(o) => (
                        Some(o.platform),
                        Some(o.external_id),
                        Some(o.platform_user_id),
                    ),
                    None => (None, None, None),
                };
                Ok(vec![MessageEvent::MessagePosted {
                    message_id,
                    community_id,
                    channel: channel.trim().to_string(),
                    sender_id,
                    sender_username: sender_username.trim().to_string(),
                    platform,
                    external_id,
                    platform_user_id,
                    text,
                    sent_at,
                }])
            }
            MessageCommand::Edit {
                actor_id,
                text,
                edited_at,
            } => {
                if !self.exists() {
                    return Err(DomainError::NotFound("message"));
                }
                if self.sender_id != Some(actor_id) {
                    return Err(DomainError::forbidden("only its sender can edit a message"));
                }
                if self.deleted {
                    return Err(DomainError::invalid_state("the message was deleted"));
                }
                validate_message_text(&text)?;
                if text == self.text {
                    return Ok(vec![]);
                }
                Ok(vec![MessageEvent::MessageEdited { text, edited_at }])
            }
            MessageCommand::Delete { actor_role, reason } => {
                if !self.exists() {
                    return Err(DomainError::NotFound("message"));
                }
                if !actor_role.can_moderate() {
                    return Err(DomainError::forbidden(
                        "only moderators and above can delete messages",
                    ));
                }
                if let Some(reason) = &reason {
                    validate_reason(reason)?;
                }
                if self.deleted {
                    return Ok(vec![]);
                }
                Ok(vec![MessageEvent::MessageDeleted { reason }])
            }
        }
    }
}

impl Aggregate for Message {
    const TYPE: &'static str = aggregate_types::MESSAGE;
    type Command = MessageCommand;
    type Event = MessageEvent;
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
            MessageEvent::MessagePosted {
                message_id,
                community_id,
                sender_id,
                text,
                ..
            } => {
                self.id = Some(message_id);
                self.community_id = Some(community_id);
                self.sender_id = Some(sender_id);
                self.text = text;
            }
            MessageEvent::MessageEdited { text, .. } => self.text = text,
            MessageEvent::MessageDeleted { .. } => self.deleted = true,
        }
    }
}

impl Decider for Message {
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, DomainError> {
        Message::decide(self, command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    type Given = TestFramework<Message>;

    fn at() -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_767_225_600, 0).unwrap_or_default()
    }

    fn post(text: &str) -> MessageCommand {
        MessageCommand::Post {
            message_id: Uuid::from_u128(1),
            community_id: Uuid::from_u128(2),
            channel: "general".into(),
            sender_id: Uuid::from_u128(3),
            sender_username: "ferris".into(),
            origin: Some(PlatformOrigin {
                platform: Platform::Twitch,
                external_id: "m-1".into(),
                platform_user_id: "42".into(),
            }),
            text: text.into(),
            sent_at: at(),
        }
    }

    fn posted(text: &str) -> MessageEvent {
        MessageEvent::MessagePosted {
            message_id: Uuid::from_u128(1),
            community_id: Uuid::from_u128(2),
            channel: "general".into(),
            sender_id: Uuid::from_u128(3),
            sender_username: "ferris".into(),
            platform: Some(Platform::Twitch),
            external_id: Some("m-1".into()),
            platform_user_id: Some("42".into()),
            text: text.into(),
            sent_at: at(),
        }
    }

    #[test]
    fn posting_records_the_message_and_a_repeat_is_a_no_op() {
        Given::with(())
            .given_no_previous_events()
            .when(post("hello\nworld"))
            .then_expect_events(vec![posted("hello\nworld")]);
        Given::with(())
            .given(vec![posted("hello")])
            .when(post("hello again"))
            .then_expect_events(vec![]);
    }

    #[test]
    fn text_and_channel_are_bounded() {
        for (text, channel, field) in [
            ("", "general", "text"),
            ("   ", "general", "text"),
            ("bell\u{7}", "general", "text"),
            ("ok", "", "channel"),
        ] {
            let mut command = post(text);
            if let MessageCommand::Post { channel: c, .. } = &mut command {
                *c = channel.into();
            }
            let err = Given::with(())
                .given_no_previous_events()
                .when(command)
                .inspect_result()
                .expect_err("refused");
            assert!(
                matches!(err, DomainError::Validation { field: f, .. } if f == field),
                "{err:?}"
            );
        }
        let long = "x".repeat(10_001);
        assert!(Given::with(())
            .given_no_previous_events()
            .when(post(&long))
            .inspect_result()
            .is_err());
        let longest = "x".repeat(10_000);
        assert!(Given::with(())
            .given_no_previous_events()
            .when(post(&longest))
            .inspect_result()
            .is_ok());
    }

    #[test]
    fn moderators_delete_and_members_do_not() {
        Given::with(())
            .given(vec![posted("spam")])
            .when(MessageCommand::Delete {
                actor_role: Role::Moderator,
                reason: Some("spam".into()),
            })
            .then_expect_events(vec![MessageEvent::MessageDeleted {
                reason: Some("spam".into()),
            }]);
        Given::with(())
            .given(vec![posted("spam")])
            .when(MessageCommand::Delete {
                actor_role: Role::Vip,
                reason: None,
            })
            .then_expect_error(DomainError::Forbidden(
                "only moderators and above can delete messages".into(),
            ));
    }

    #[test]
    fn only_the_sender_edits_and_not_after_a_delete() {
        Given::with(())
            .given(vec![posted("helo")])
            .when(MessageCommand::Edit {
                actor_id: Uuid::from_u128(3),
                text: "hello".into(),
                edited_at: at(),
            })
            .then_expect_events(vec![MessageEvent::MessageEdited {
                text: "hello".into(),
                edited_at: at(),
            }]);
        Given::with(())
            .given(vec![posted("helo")])
            .when(MessageCommand::Edit {
                actor_id: Uuid::from_u128(9),
                text: "hello".into(),
                edited_at: at(),
            })
            .then_expect_error(DomainError::Forbidden(
                "only its sender can edit a message".into(),
            ));
        Given::with(())
            .given(vec![
                posted("helo"),
                MessageEvent::MessageDeleted { reason: None },
            ])
            .when(MessageCommand::Edit {
                actor_id: Uuid::from_u128(3),
                text: "hello".into(),
                edited_at: at(),
            })
            .then_expect_error(DomainError::InvalidState("the message was deleted".into()));
    }
}
