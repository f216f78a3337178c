//! The projection abstraction shared by live workers and rebuilds.

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use rookery_events::recorded::AnyEvent;
use rookery_events::{EventMetadata, LogPosition, RecordedEvent};
use sqlx::PgConnection;
use std::fmt;

/// A read model: a pure fold of the log into its tables.
///
/// Live workers and rebuilds call the same [`Projection::apply`], only with different
/// [`TableNames`], which is what makes a rebuild yield byte-identical rows. An implementation
/// must therefore be deterministic: time comes only from event metadata (`occurred_at`), never
/// the wall clock; no randomness; no reads of other read models (they may lag).
///
/// `apply` receives a batch of events in log order (for one partition when live, for every
/// partition in a rebuild), runs inside the caller's transaction (which also moves the
/// checkpoint), and should load the rows the batch touches, fold in memory and write back with
/// set-based statements: one round trip per table, not per event.
///
/// Projections are *transactional*: their rows commit with their checkpoint. Side effects
/// (reactors such as auto-ban) do not belong in `apply`, which rebuilds and replays also call;
/// a reactor would be run by the live worker after its batch commits, for events above the
/// checkpoint floor only (see `worker`), so rebuilds never trigger it.
pub trait Projection: Send + Sync + 'static {
    /// Stable name: checkpoints, spans, metrics and the CLI use it.
    fn name(&self) -> &'static str;
    /// Bumped when the fold or the tables change; a rebuild builds the new version.
    fn version(&self) -> i32;
    /// Logical names of the tables this projection owns (all swapped together by a rebuild).
    fn tables(&self) -> &'static [&'static str];
    /// Folds `events` (log order) into the tables named by `tables`.
    ///
    /// An event that can never be applied (it does not decode, or misses what the fold needs)
    /// should be reported as an [`anyhow::Error`] carrying a [`PoisonEvent`]: the caller parks
    /// exactly that event and applies the rest. Any other error fails the whole batch, which is
    /// retried.
    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        tables: &'a TableNames,
        events: &'a [RecordedEvent],
    ) -> BoxFuture<'a, anyhow::Result<()>>;

    /// A rebuild's fast path into `tables` (shadow tables it alone writes), see [`BulkFold`].
    /// `None`, the default, makes rebuilds call [`Projection::apply`] batch by batch.
    fn bulk_fold(&self, _tables: &TableNames, _start: BulkStart) -> Option<Box<dyn BulkFold>> {
        None
    }
}

/// What a rebuild tells a [`BulkFold`] when it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BulkStart {
    /// The tables were created empty for this rebuild and nothing else has written them, so a
    /// row is stored only if this fold wrote it. Otherwise (a resumed rebuild) they hold rows
    /// the fold has never seen.
    pub empty: bool,
    /// Events the finished model will cover (those already folded included): a size hint.
    pub events: u64,
}

/// A rebuild's fold of many batches at once, into tables nobody else writes.
///
/// Rows stay in memory across a *chunk* of batches, each changed row is written once per chunk
/// (new rows may be bulk-loaded), and the rebuild writes one chunk while the next is folded.
/// It must leave exactly the rows [`Projection::apply`] would leave after the same events
/// (DESIGN.md §3.4): share the fold itself with `apply` and differ only in how rows are loaded
/// and written.
///
/// The rebuild drives it as: [`fold`](BulkFold::fold) batches until the chunk is big enough,
/// [`take`](BulkFold::take) the chunk's writes and run them in a transaction (which also saves
/// the rebuild cursor), then [`settle`](BulkFold::settle) once that committed. Folding goes on
/// while a taken chunk is being written, so until it is settled the fold must find the taken
/// rows in memory rather than in the tables; chunks are written one at a time, in order.
pub trait BulkFold: Send + Sync {
    /// Folds `events` (log order) into the rows held, loading through `conn` those it needs
    /// and does not hold (`conn` sees every settled chunk). The events are [`RawEvent`]s: decode
    /// them as [`RawEvent::decode`] and [`RawEvent::metadata`] do, which give what
    /// `RecordedEvent`'s methods of the same names give.
    ///
    /// On an error nothing changed: a [`PoisonEvent`] in the error is left out by the caller
    /// and the batch folded again without it.
    fn fold<'a>(
        &'a mut self,
        conn: &'a mut PgConnection,
        events: &'a [RawEvent],
    ) -> BoxFuture<'a, anyhow::Result<()>>;

    /// Rows held for the current chunk (memory is bounded by chunking on it).
    fn held(&self) -> usize;

    /// Takes the writes of what was folded since the last take. Fails if the previous chunk
    /// was not settled.
    fn take(&mut self) -> anyhow::Result<Box<dyn BulkWrite>>;

    /// The last taken chunk committed: its rows may now be read from the tables.
    fn settle(&mut self);

    /// Forgets everything not yet committed (the transaction it would have gone into rolled
    /// back), so that the same events can be folded again.
    fn discard(&mut self);

    /// Logical tables this fold can fill without their unique indexes (primary key included)
    /// for as long as it only adds rows: building those once is cheaper than maintaining them
    /// row by row. The rebuild starts such tables without them when it can.
    fn keyless_tables(&self) -> &'static [&'static str] {
        &[]
    }

    /// Whether the unique indexes of [`BulkFold::keyless_tables`] exist (they do until the
    /// rebuild says otherwise). Without them the fold must neither look a row of those tables
    /// up nor write one it did not create: it fails [`BulkFold::fold`] with [`NeedKeys`]
    /// instead, before changing anything, and the rebuild builds them and folds again.
    fn set_keys(&mut self, _present: bool) {}
}

/// The error a [`BulkFold`] fails with when the batch needs the unique indexes of its keyless
/// tables (see [`BulkFold::set_keys`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeedKeys;

impl fmt::Display for NeedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the batch needs the unique indexes of the shadow tables")
    }
}

impl std::error::Error for NeedKeys {}

/// A chunk's writes, run in the caller's transaction.
pub trait BulkWrite: Send {
    fn write<'a>(self: Box<Self>, conn: &'a mut PgConnection) -> BoxFuture<'a, anyhow::Result<()>>;
}

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

/// Maps a projection's logical table names to the physical ones a batch writes: the same names
/// for live workers, `<table>__rebuild` for a rebuild's shadow tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableNames {
    names: Vec<(&'static str, String)>,
    exclusive: bool,
}

/// Suffix of a rebuild's shadow tables.
pub const SHADOW_SUFFIX: &str = "__rebuild";

impl TableNames {
    /// The live tables.
    pub fn live(tables: &[&'static str]) -> Self {
        Self {
            names: tables.iter().map(|t| (*t, (*t).to_string())).collect(),
            exclusive: false,
        }
    }

    /// A rebuild's shadow tables.
    pub fn shadow(tables: &[&'static str]) -> Self {
        Self {
            names: tables
                .iter()
                .map(|t| (*t, format!("{t}{SHADOW_SUFFIX}")))
                .collect(),
            exclusive: true,
        }
    }

    /// Explicit `(logical, physical)` pairs (e.g. a second copy of a model, for comparisons).
    pub fn from_pairs(pairs: impl IntoIterator<Item = (&'static str, String)>) -> Self {
        Self {
            names: pairs.into_iter().collect(),
            exclusive: false,
        }
    }

    /// Whether the caller is the only writer of these tables (a rebuild's shadow tables), so a
    /// projection may skip the row locks it takes against concurrent partitions. The rows
    /// written must not depend on it.
    pub fn exclusive(&self) -> bool {
        self.exclusive
    }

    /// The physical name of `logical`, quoted for SQL. Asking for a table the projection did not
    /// declare is an error rather than a fallback, so a rebuild can never write live tables.
    pub fn get(&self, logical: &str) -> anyhow::Result<String> {
        self.names
            .iter()
            .find(|(l, _)| *l == logical)
            .map(|(_, p)| format!("\"{p}\""))
            .ok_or_else(|| anyhow::anyhow!("table `{logical}` is not declared by the projection"))
    }

    /// `(logical, physical)` pairs, unquoted.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.names.iter().map(|(l, p)| (*l, p.as_str()))
    }
}

/// An event that can never be applied by this projection. Wrap it in the `anyhow::Error` that
/// [`Projection::apply`] returns; workers and rebuilds park the event (visible in status and
/// `dead-letters list`) and apply the rest of the batch.
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

    #[test]
    fn shadow_names_are_suffixed_and_unknown_tables_refused() {
        let t = TableNames::shadow(&["members", "member_counts"]);
        assert_eq!(
            t.get("members").ok().as_deref(),
            Some("\"members__rebuild\"")
        );
        assert!(t.get("messages").is_err());
        let live = TableNames::live(&["members"]);
        assert_eq!(live.get("members").ok().as_deref(), Some("\"members\""));
    }

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
