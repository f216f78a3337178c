//! The messages fold, pure: rows and events in, rows out. No I/O, no clock.

use crate::engine::{EventRef, PoisonEvent};
use crate::support::KeyHashState;
use chrono::{DateTime, Utc};
use rookery_events::recorded::AnyEvent;
use rookery_events::{LogPosition, MessageEvent, Platform, UserEvent};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

/// What a deleted message shows instead of its text.
pub const DELETED_TEXT: &str = "[deleted]";

/// A `messages` row (without its key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageRow {
    pub community_id: Uuid,
    pub channel: String,
    pub sender_id: Uuid,
    pub sender_username: String,
    pub platform: Option<Platform>,
    pub platform_user_id: Option<String>,
    pub external_id: Option<String>,
    pub text: String,
    pub sent_at: DateTime<Utc>,
    pub edited_at: Option<DateTime<Utc>>,
    pub deleted: bool,
    /// Log key of the last event applied to the row.
    pub key: LogPosition,
}

/// One event, decoded into what the fold needs.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Message {
        message_id: Uuid,
        event: MessageEvent,
        key: LogPosition,
    },
    /// A shadow user's messages are shown as `into`'s from now on.
    SenderMerged { sender_id: Uuid, into: Uuid },
}

/// Decodes a batch. An event that does not decode is poison.
pub fn decode<E: EventRef>(events: &[E]) -> Result<Vec<Change>, PoisonEvent> {
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let decoded = e
            .decode()
            .map_err(|err| e.poison(format!("{} does not decode: {err}", e.event_type())))?;
        let id = || {
            Uuid::parse_str(e.aggregate_id()).map_err(|err| {
                e.poison(format!(
                    "aggregate id `{}` is not a UUID: {err}",
                    e.aggregate_id()
                ))
            })
        };
        match decoded {
            AnyEvent::Message(event) => out.push(Change::Message {
                message_id: id()?,
                event,
                key: e.position(),
            }),
            AnyEvent::User(UserEvent::ShadowUserMerged { into, .. }) => {
                out.push(Change::SenderMerged {
                    sender_id: id()?,
                    into,
                })
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The message ids a batch must load: those it changes without posting them.
pub fn needs(changes: &[Change]) -> Vec<Uuid> {
    let mut posted = std::collections::HashSet::new();
    let mut ids = Vec::new();
    for change in changes {
        if let Change::Message {
            message_id, event, ..
        } = change
        {
            match event {
                MessageEvent::MessagePosted { .. } => {
                    posted.insert(*message_id);
                }
                _ if !posted.contains(message_id) => ids.push(*message_id),
                _ => {}
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// A batch's rows, as loaded and folded forward.
#[derive(Debug, Default)]
pub struct Fold {
    /// `None`: known not to exist.
    pub messages: HashMap<Uuid, Option<MessageRow>, KeyHashState>,
    /// Messages loaded as stored (the others are new).
    pub stored: HashSet<Uuid, KeyHashState>,
    pub dirty: Vec<Uuid>,
    pub merged: Vec<(Uuid, Uuid)>,
}

impl Fold {
    pub fn load(&mut self, id: Uuid, row: Option<MessageRow>) {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.messages.entry(id) {
            if row.is_some() {
                self.stored.insert(id);
            }
            slot.insert(row);
        }
    }

    pub fn apply(&mut self, change: &Change) {
        let (message_id, event, key) = match change {
            Change::SenderMerged { sender_id, into } => {
                self.merged.push((*sender_id, *into));
                return;
            }
            Change::Message {
                message_id,
                event,
                key,
            } => (*message_id, event, *key),
        };
        let slot = self.messages.entry(message_id).or_insert(None);
        let changed = match (event, slot.as_mut()) {
            (
                MessageEvent::MessagePosted {
                    community_id,
                    channel,
                    sender_id,
                    sender_username,
                    platform,
                    external_id,
                    platform_user_id,
                    text,
                    sent_at,
                    ..
                },
                None,
            ) => {
                *slot = Some(MessageRow {
                    community_id: *community_id,
                    channel: channel.clone(),
                    sender_id: *sender_id,
                    sender_username: sender_username.clone(),
                    platform: *platform,
                    platform_user_id: platform_user_id.clone(),
                    external_id: external_id.clone(),
                    text: text.clone(),
                    sent_at: *sent_at,
                    edited_at: None,
                    deleted: false,
                    key,
                });
                true
            }
            (MessageEvent::MessageEdited { text, edited_at }, Some(m)) if !m.deleted => {
                m.text.clone_from(text);
                m.edited_at = Some(*edited_at);
                true
            }
            (MessageEvent::MessageDeleted { .. }, Some(m)) => {
                m.text = DELETED_TEXT.to_string();
                m.deleted = true;
                true
            }
            // The aggregate never emits these (a second post, an edit of a deleted or missing
            // message); ignoring keeps the fold total.
            _ => false,
        };
        if changed {
            if let Some(m) = slot.as_mut() {
                m.key = key;
            }
            self.dirty.push(message_id);
        }
    }

    /// Changed rows, in id order (a stable lock order), each once, and whether each was
    /// loaded as stored.
    pub fn dirty_rows(&self) -> Vec<(Uuid, &MessageRow, bool)> {
        let mut ids = self.dirty.clone();
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
            .filter_map(|id| {
                let row = self.messages.get(&id)?.as_ref()?;
                Some((id, row, self.stored.contains(&id)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            sent_at: DateTime::<Utc>::UNIX_EPOCH,
        }
    }

    fn change(event: MessageEvent, n: i64) -> Change {
        Change::Message {
            message_id: Uuid::from_u128(1),
            event,
            key: LogPosition::new(1, n),
        }
    }

    #[test]
    fn a_deleted_message_shows_deleted_and_edits_change_the_text() {
        let mut fold = Fold::default();
        fold.apply(&change(posted("helo"), 1));
        fold.apply(&change(
            MessageEvent::MessageEdited {
                text: "hello".into(),
                edited_at: DateTime::<Utc>::UNIX_EPOCH,
            },
            2,
        ));
        let row = fold.messages[&Uuid::from_u128(1)].clone().expect("row");
        assert_eq!(
            (row.text.as_str(), row.edited_at.is_some()),
            ("hello", true)
        );
        fold.apply(&change(MessageEvent::MessageDeleted { reason: None }, 3));
        let row = fold.messages[&Uuid::from_u128(1)].clone().expect("row");
        assert_eq!(
            (row.text.as_str(), row.deleted, row.key),
            (DELETED_TEXT, true, LogPosition::new(1, 3))
        );
        assert_eq!(fold.dirty_rows().len(), 1);
    }

    #[test]
    fn only_changes_of_messages_posted_elsewhere_are_loaded() {
        let changes = vec![
            change(posted("hi"), 1),
            change(MessageEvent::MessageDeleted { reason: None }, 2),
            Change::Message {
                message_id: Uuid::from_u128(9),
                event: MessageEvent::MessageDeleted { reason: None },
                key: LogPosition::new(1, 3),
            },
        ];
        assert_eq!(needs(&changes), vec![Uuid::from_u128(9)]);
    }
}
