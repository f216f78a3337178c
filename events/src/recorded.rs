//! An event as read back from the log (Postgres) or received from the bus (NATS).

use crate::position::LogPosition;
use crate::{CommunityEvent, EventMetadata, MembershipEvent, UserEvent};
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
    /// An aggregate type this build does not know (written by a newer version): skipped by
    /// projections that do not care, never an error.
    Unknown,
}

impl RecordedEvent {
    /// The bus/outbox message id: `aggregate_type/aggregate_id/sequence`.
    pub fn message_id(&self) -> String {
        format!(
            "{}/{}/{}",
            self.aggregate_type, self.aggregate_id, self.sequence
        )
    }

    pub fn decode(&self) -> Result<AnyEvent, serde_json::Error> {
        use crate::aggregate_types::*;
        Ok(match self.aggregate_type.as_str() {
            COMMUNITY => AnyEvent::Community(CommunityEvent::deserialize(&self.payload)?),
            MEMBERSHIP => AnyEvent::Membership(MembershipEvent::deserialize(&self.payload)?),
            USER => AnyEvent::User(UserEvent::deserialize(&self.payload)?),
            _ => AnyEvent::Unknown,
        })
    }

    pub fn metadata(&self) -> EventMetadata {
        EventMetadata::deserialize(&self.metadata).unwrap_or_default()
    }
}
