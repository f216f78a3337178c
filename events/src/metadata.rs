//! Metadata stored beside every event (`events.metadata`): who did it, as part of which request
//! and conversation, and when. cqrs-es stores metadata as a string map; this is its typed form.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// `user:<uuid>`, `service:<name>` or `system`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// When the command was accepted (RFC 3339, UTC). Projections read time from here, never
    /// from the wall clock, so rebuilding yields the same rows.
    pub occurred_at: String,
}

impl EventMetadata {
    pub fn new(occurred_at: DateTime<Utc>) -> Self {
        Self {
            occurred_at: occurred_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            ..Self::default()
        }
    }

    pub fn with_actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    pub fn to_map(&self) -> HashMap<String, String> {
        let mut map = HashMap::with_capacity(5);
        let fields = [
            ("actor", &self.actor),
            ("request_id", &self.request_id),
            ("correlation_id", &self.correlation_id),
            ("causation_id", &self.causation_id),
        ];
        for (k, v) in fields {
            if let Some(v) = v {
                map.insert(k.to_string(), v.clone());
            }
        }
        map.insert("occurred_at".to_string(), self.occurred_at.clone());
        map
    }

    /// The time the event occurred, if the metadata carries a valid one.
    pub fn occurred_at(&self) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(&self.occurred_at)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_through_the_string_map() {
        let mut m = EventMetadata::new(DateTime::<Utc>::UNIX_EPOCH).with_actor("user:1");
        m.request_id = Some("r-1".into());
        let json = serde_json::to_value(m.to_map()).expect("map serializes");
        let back: EventMetadata = serde_json::from_value(json).expect("map deserializes");
        assert_eq!(back, m);
        assert_eq!(back.occurred_at(), Some(DateTime::<Utc>::UNIX_EPOCH));
    }
}
