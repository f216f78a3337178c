//! An event as read back from the log (Postgres) or received from the bus (NATS).

use crate::position::LogPosition;
use crate::{
    ActivityEvent, CommunityEvent, EventMetadata, MembershipEvent, MessageEvent, UserEvent,
};
use serde::{Deserialize, Serialize};

/// One stored event with its place in the log. Payload and metadata stay as JSON until a consumer
/// that cares decodes them with [`RecordedEvent::decode`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    pub position: LogPosition,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: serde_json::Value,
    pub metadata: serde_json::Value,
}

/// A recorded event decoded into its aggregate's enum.
#[derive(Clone, Debug, PartialEq)]
pub enum AnyEvent {
    Community(CommunityEvent),
    Membership(MembershipEvent),
    User(UserEvent),
    Message(MessageEvent),
    Activity(ActivityEvent),
    /// An aggregate type this build does not know (written by a newer version): skipped by
    /// projections that do not care, never an error.
    Unknown,
}

/// The bus/outbox message id of an event: `aggregate_type/aggregate_id/sequence`.
pub fn message_id(aggregate_type: &str, aggregate_id: &str, sequence: i64) -> String {
    format!("{aggregate_type}/{aggregate_id}/{sequence}")
}

impl AnyEvent {
    /// Decodes an event of `aggregate_type` from any JSON source (a `Value`, or text read
    /// straight into the event types).
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        aggregate_type: &str,
        payload: D,
    ) -> Result<Self, D::Error> {
        use crate::aggregate_types::*;
        Ok(match aggregate_type {
            COMMUNITY => AnyEvent::Community(CommunityEvent::deserialize(payload)?),
            MEMBERSHIP => AnyEvent::Membership(MembershipEvent::deserialize(payload)?),
            USER => AnyEvent::User(UserEvent::deserialize(payload)?),
            MESSAGE => AnyEvent::Message(MessageEvent::deserialize(payload)?),
            ACTIVITY => AnyEvent::Activity(ActivityEvent::deserialize(payload)?),
            _ => AnyEvent::Unknown,
        })
    }
}

impl RecordedEvent {
    /// The bus/outbox message id: `aggregate_type/aggregate_id/sequence`.
    pub fn message_id(&self) -> String {
        message_id(&self.aggregate_type, &self.aggregate_id, self.sequence)
    }

    pub fn decode(&self) -> Result<AnyEvent, serde_json::Error> {
        AnyEvent::deserialize(&self.aggregate_type, &self.payload)
    }

    pub fn metadata(&self) -> EventMetadata {
        EventMetadata::deserialize(&self.metadata).unwrap_or_default()
    }
}
