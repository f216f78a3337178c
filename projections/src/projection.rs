//! The projection abstraction shared by live workers and rebuilds.

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use rookery_events::{LogPosition, RecordedEvent};
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
        .ok_or_else(|| PoisonEvent::new(event, "metadata has no valid `occurred_at`"))
}

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
