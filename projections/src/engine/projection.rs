//! The projection abstraction shared by live workers and rebuilds: [`Projection`], a rebuild's
//! optional fast path ([`BulkFold`]) and [`TableNames`] (live or shadow).

use super::event::RawEvent;
use futures::future::BoxFuture;
use rookery_events::RecordedEvent;
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
    /// The aggregate types whose events this projection folds. Workers and rebuilds hand
    /// [`Projection::apply`] (and a [`BulkFold`]) only those, in log order, and move the
    /// checkpoint past the others (a batch of only others without a transaction); an event of
    /// one of these types that does not decode is poison. Read-your-writes and lag count only
    /// these types' events.
    fn aggregate_types(&self) -> &'static [&'static str];
    /// Folds `events` (log order) into the tables named by `tables`.
    ///
    /// An event that can never be applied (it does not decode, or misses what the fold needs)
    /// should be reported as an [`anyhow::Error`] carrying a [`PoisonEvent`](super::PoisonEvent): the caller parks
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

    /// Whether this projection folds every event in the log's own order: one consumer over
    /// all partitions and one active worker, instead of one per partition. For folds whose rows
    /// depend on the order of events of different aggregates (a reputation clamped after every
    /// change), which partitions would apply in different orders live and in a rebuild.
    fn in_log_order(&self) -> bool {
        false
    }

    /// How fresh the live worker keeps the rows under load (see [`Freshness`]).
    fn freshness(&self) -> Freshness {
        Freshness::Live
    }

    /// Whether events of `aggregate_type` are this projection's (see
    /// [`Projection::aggregate_types`]).
    fn folds(&self, aggregate_type: &str) -> bool {
        self.aggregate_types().contains(&aggregate_type)
    }
}

/// How often a live worker starts a batch of a projection that keeps up with a busy bus: every
/// batch is a transaction, which costs Postgres a fixed share beyond the events in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Freshness {
    /// Rows someone watches change (a member list, a chat history): a batch every
    /// [`WorkerConfig::min_batch_interval`](super::WorkerConfig::min_batch_interval).
    #[default]
    Live,
    /// Rows read as they stand rather than watched (scores, leaderboards): a batch every
    /// [`WorkerConfig::relaxed_batch_interval`](super::WorkerConfig::relaxed_batch_interval),
    /// so the same events cost a fraction of the transactions and leave the cores to the
    /// live models. Reads with `min_position` wait for them as for any other.
    Relaxed,
}

/// The partitions `projection` is worked in on a bus of `bus_partitions`: one for a projection
/// in log order, else the bus's. Checkpoints, floors and read-your-writes use this count.
pub fn partitions_of(projection: &dyn Projection, bus_partitions: u32) -> u32 {
    if projection.in_log_order() {
        1
    } else {
        bus_partitions.max(1)
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
/// (guarantee 4 in docs/architecture.md): share the fold itself with `apply` and differ only in how rows are loaded
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
    /// On an error nothing changed: a [`PoisonEvent`](super::PoisonEvent) in the error is left out by the caller
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

    /// Whether `event` is one this fold leaves to the projection's own
    /// [`apply`](Projection::apply): one that rewrites rows stored before it (rare, like a
    /// shadow user's merge). The rebuild then writes what the fold holds, applies the event in a
    /// transaction of its own, and goes on folding after it: from then on the tables may hold
    /// rows this fold did not write.
    fn by_apply(&mut self, _event: &RawEvent) -> bool {
        false
    }

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
}
