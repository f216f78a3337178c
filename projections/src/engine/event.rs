//! Events as projections read them: [`RecordedEvent`]s from the bus, [`RawEvent`]s from a
//! rebuild's scan of the log, and [`EventRef`], what a fold reads of either, so that one decoder
//! serves both and they cannot disagree; [`PoisonEvent`], one that can never be applied.

use chrono::{DateTime, Utc};
use rookery_events::recorded::AnyEvent;
use rookery_events::{EventMetadata, LogPosition, RecordedEvent};
use std::fmt;

/// An event as a rebuild reads it: a [`RecordedEvent`] whose payload and metadata are still the
/// JSON text Postgres holds. Bulk folds decode it straight into their own types: building a
/// `serde_json::Value` tree per event only to decode it again (and free it) was most of a
/// rebuild's CPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawEvent {
    pub position: LogPosition,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    /// JSON text.
    pub payload: String,
    /// JSON text.
    pub metadata: String,
}

impl RawEvent {
    /// What [`RecordedEvent::decode`] gives for the same event (parsing the text directly into
    /// the event types is equivalent to parsing it into a `Value` and decoding that; a test
    /// holds the two together).
    pub fn decode(&self) -> Result<AnyEvent, serde_json::Error> {
        let mut json = serde_json::Deserializer::from_str(&self.payload);
        let event = AnyEvent::deserialize(&self.aggregate_type, &mut json)?;
        // An unknown aggregate type reads nothing, so there is no end to check.
        if event != AnyEvent::Unknown {
            json.end()?;
        }
        Ok(event)
    }

    /// What [`RecordedEvent::metadata`] gives for the same event.
    pub fn metadata(&self) -> EventMetadata {
        serde_json::from_str(&self.metadata).unwrap_or_default()
    }

    /// What [`RecordedEvent::message_id`] gives for the same event.
    pub fn message_id(&self) -> String {
        rookery_events::recorded::message_id(
            &self.aggregate_type,
            &self.aggregate_id,
            self.sequence,
        )
    }

    /// The event as workers receive it.
    pub fn to_recorded(&self) -> Result<RecordedEvent, serde_json::Error> {
        Ok(RecordedEvent {
            position: self.position,
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            sequence: self.sequence,
            event_type: self.event_type.clone(),
            event_version: self.event_version.clone(),
            payload: serde_json::from_str(&self.payload)?,
            metadata: serde_json::from_str(&self.metadata)?,
        })
    }
}

/// An event that can never be applied by this projection. Wrap it in the `anyhow::Error` that
/// [`Projection::apply`](super::Projection::apply) returns; workers and rebuilds park the event (counted in
/// `rookery projections status`, listed by [`dead_letters::list`](super::dead_letters::list))
/// and apply the rest of the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoisonEvent {
    pub position: LogPosition,
    pub reason: String,
}

impl fmt::Display for PoisonEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "event at position {} cannot be applied: {}",
            self.position, self.reason
        )
    }
}

impl std::error::Error for PoisonEvent {}

impl PoisonEvent {
    pub fn new(event: &RecordedEvent, reason: impl Into<String>) -> Self {
        Self {
            position: event.position,
            reason: reason.into(),
        }
    }

    /// The poison event an error chain carries, if any.
    pub fn find(error: &anyhow::Error) -> Option<&PoisonEvent> {
        error.chain().find_map(|e| e.downcast_ref::<PoisonEvent>())
    }
}

/// What a fold reads of an event, the same whether it arrived from the bus ([`RecordedEvent`])
/// or from a rebuild's scan of the log ([`RawEvent`]). Write a model's decoder once, over
/// `impl EventRef`, and live batches and rebuilds decode alike.
pub trait EventRef {
    fn position(&self) -> LogPosition;
    fn aggregate_type(&self) -> &str;
    fn aggregate_id(&self) -> &str;
    fn event_type(&self) -> &str;
    /// `aggregate_type/aggregate_id/sequence`: the event's id on the bus and in histories.
    fn message_id(&self) -> String;
    /// The payload as the event contract's types.
    fn decode(&self) -> Result<AnyEvent, serde_json::Error>;
    /// When it occurred, from its metadata: the only clock a projection may read.
    fn occurred_at(&self) -> Result<DateTime<Utc>, PoisonEvent>;

    /// This event as poison, for `reason`.
    fn poison(&self, reason: impl Into<String>) -> PoisonEvent
    where
        Self: Sized,
    {
        PoisonEvent {
            position: self.position(),
            reason: reason.into(),
        }
    }
}

impl EventRef for RecordedEvent {
    fn position(&self) -> LogPosition {
        self.position
    }
    fn aggregate_type(&self) -> &str {
        &self.aggregate_type
    }
    fn aggregate_id(&self) -> &str {
        &self.aggregate_id
    }
    fn event_type(&self) -> &str {
        &self.event_type
    }
    fn message_id(&self) -> String {
        RecordedEvent::message_id(self)
    }
    fn decode(&self) -> Result<AnyEvent, serde_json::Error> {
        RecordedEvent::decode(self)
    }
    fn occurred_at(&self) -> Result<DateTime<Utc>, PoisonEvent> {
        occurred_at(self)
    }
}

impl EventRef for RawEvent {
    fn position(&self) -> LogPosition {
        self.position
    }
    fn aggregate_type(&self) -> &str {
        &self.aggregate_type
    }
    fn aggregate_id(&self) -> &str {
        &self.aggregate_id
    }
    fn event_type(&self) -> &str {
        &self.event_type
    }
    fn message_id(&self) -> String {
        RawEvent::message_id(self)
    }
    fn decode(&self) -> Result<AnyEvent, serde_json::Error> {
        RawEvent::decode(self)
    }
    fn occurred_at(&self) -> Result<DateTime<Utc>, PoisonEvent> {
        raw_occurred_at(self)
    }
}

/// When an event occurred, from its metadata: the only clock a projection may read.
pub fn occurred_at(event: &RecordedEvent) -> Result<DateTime<Utc>, PoisonEvent> {
    event
        .metadata()
        .occurred_at()
        .ok_or_else(|| PoisonEvent::new(event, NO_OCCURRED_AT))
}

/// [`occurred_at`] of a [`RawEvent`].
pub fn raw_occurred_at(event: &RawEvent) -> Result<DateTime<Utc>, PoisonEvent> {
    event.metadata().occurred_at().ok_or_else(|| PoisonEvent {
        position: event.position,
        reason: NO_OCCURRED_AT.into(),
    })
}

const NO_OCCURRED_AT: &str = "metadata has no valid `occurred_at`";

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind of payload and metadata, good and bad, decodes the same from text as through
    /// a `serde_json::Value` (a rebuild's bulk fold reads text, live workers get values).
    #[test]
    fn raw_events_decode_like_recorded_ones() {
        use rookery_events::{MembershipEvent, Role, UserEvent};
        let (c, u) = (uuid::Uuid::from_u128(7), uuid::Uuid::from_u128(9));
        let payloads: Vec<(&str, String)> = vec![
            (
                "membership",
                serde_json::to_string(&MembershipEvent::MemberJoined {
                    community_id: c,
                    user_id: u,
                    role: Role::Moderator,
                    via: None,
                })
                .expect("serializes"),
            ),
            (
                "user",
                serde_json::to_string(&UserEvent::UserRegistered {
                    user_id: u,
                    username: "tab\there \"quoted\" ünï".into(),
                    email: "a@x".into(),
                })
                .expect("serializes"),
            ),
            (
                "membership",
                r#"{"MemberJoined": {"community_id": 1}}"#.into(),
            ),
            ("user", r#"{"Nope": {}}"#.into()),
            ("community", r#"{"also": "bad"}"#.into()),
            ("something_newer", r#"{"x": 1}"#.into()),
            ("membership", "[]".into()),
        ];
        let metadatas = [
            r#"{"occurred_at": "2026-01-02T03:04:05.123456789Z", "actor": "user:1"}"#,
            r#"{"occurred_at": "2026-01-02T03:04:05+02:00"}"#,
            r#"{"occurred_at": "yesterday"}"#,
            r#"{"actor": "user:1"}"#,
            r#"{"occurred_at": "2026-01-02T03:04:05Z", "actor": 5}"#,
            "null",
        ];
        for (t, payload) in &payloads {
            for metadata in metadatas {
                let raw = RawEvent {
                    position: LogPosition::new(5, 6),
                    aggregate_type: (*t).into(),
                    aggregate_id: u.to_string(),
                    sequence: 1,
                    event_type: "x".into(),
                    event_version: "1.0".into(),
                    payload: payload.clone(),
                    metadata: metadata.into(),
                };
                let recorded = raw.to_recorded().expect("valid JSON");
                // Error messages may differ (text errors carry a line and column).
                assert_eq!(raw.decode().ok(), recorded.decode().ok(), "{t} {payload}");
                assert_eq!(raw.metadata(), recorded.metadata(), "{metadata}");
                assert_eq!(raw.message_id(), recorded.message_id());
                assert_eq!(raw_occurred_at(&raw), occurred_at(&recorded));
            }
        }
    }

    #[test]
    fn poison_is_found_through_context() {
        let p = PoisonEvent {
            position: LogPosition::new(1, 2),
            reason: "bad".into(),
        };
        let err = anyhow::Error::new(p.clone()).context("applying members");
        assert_eq!(PoisonEvent::find(&err), Some(&p));
    }
}
