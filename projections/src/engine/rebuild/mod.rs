//! Rebuild without downtime (docs/architecture.md, "Rebuilds").
//!
//! 1. Mark the projection `rebuilding` and create empty shadow tables `<t>__rebuild` (LIKE the
//!    live ones, INCLUDING ALL, secondary indexes left out), or, when resuming after a crash,
//!    keep them and continue from the rebuild cursor in `projection_state`.
//! 2. Fold the Postgres log in commit-safe order into the shadow tables, each transaction
//!    saving the cursor with the rows (so a crash loses nothing but redoes the last chunk).
//!    Repeat catch-up passes up to the committed head until the remaining gap is small, then
//!    build the indexes left out, side by side.
//! 3. One switch transaction: lock the projection's checkpoint rows (live batches start by
//!    locking theirs, so they wait), fold the rest up to the committed head of that moment,
//!    rename live → `<t>__old`, shadow → live, drop the old tables, give the shadow's indexes the
//!    live names, raise every partition's floor to that head, mark the projection running.
//!
//! How step 2 folds depends on the projection:
//! - With a [`BulkFold`] (members): three tasks in a pipeline. One streams the log as
//!   [`RawEvent`](crate::engine::RawEvent)s (JSON left as text for the fold to decode into its own types); the rebuild
//!   folds batches into rows held in memory for a chunk of `chunk_size` events; a task writes
//!   the previous chunk meanwhile (new rows by `COPY`), its poison events and the cursor in one
//!   transaction. A fresh rebuild also leaves out the unique indexes of the fold's keyless
//!   tables for as long as every row it writes is new, and builds them when it first needs
//!   them ([`NeedKeys`](crate::engine::NeedKeys)) or at the end.
//! - Otherwise: the projection's own `apply`, batch by batch, a transaction each.
//!
//! Both fold with the code the live worker folds with, so rows come out byte-identical to the
//! live fold (guarantee 4, determinism). Live workers keep writing the old tables until the switch and
//! afterwards skip everything the rebuild covered (at or below the floor); readers see the old
//! model or the new one, never a half-built one. Events the live worker parked (and not since
//! retried) are left out here too, so that both folds see the same events; poison events the
//! rebuild finds are parked (`parked_by = rebuild`) with the chunk that skips them. No side
//! effects run: rebuilds only fold.
//!
//! Shadow transactions commit with `synchronous_commit = off`: a commit lost in a crash takes
//! its cursor with it, and the resume redoes it.
//!
//! # Layout
//! - this module: configuration, progress, the report, and the run: prepare the shadow tables,
//!   catch-up passes, deferred indexes, the switch.
//! - `apply`: folding through the projection's `apply`, a batch per transaction.
//! - `bulk`: folding through its [`BulkFold`], chunks written by a task while the next is folded.
//! - `switch`: the switch transaction and its retries.
//! - `indexes`: the shadow tables' indexes (deferred, unique ones dropped and rebuilt, renamed).
//! - `reader`: the log streamed a batch ahead of the fold.

mod apply;
mod bulk;
mod indexes;
mod reader;
mod switch;

use super::checkpoints;
use super::dead_letters;
use super::locks::RebuildLock;
use super::projection::{BulkFold, Projection, TableNames};
use super::state;
use anyhow::{bail, Context as _};
use indexes::{attach_constraint, build_index, missing_indexes, table_indexes, Only};
use reader::count_after_at_most;
use rookery_events::LogPosition;
use rookery_store::log;
use sqlx::{PgConnection, PgPool};
use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::task::AbortOnDropHandle;

/// How a rebuild batches and when it switches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebuildConfig {
    /// Events read from the log and folded at a time; for a projection without a
    /// [`BulkFold`], also the events per shadow transaction.
    pub batch_size: usize,
    /// Events per shadow transaction for a projection with a [`BulkFold`], whose rows stay in
    /// memory across them (twice: one chunk is folded while the previous one is written).
    pub chunk_size: usize,
    /// Switch once a catch-up pass would have fewer events than this to fold (the switch folds
    /// them while live batches wait).
    pub switch_gap: i64,
    /// Catch-up passes before switching regardless (writes may never pause long enough).
    pub max_passes: u32,
    /// How long the switch waits for table locks (readers, live batches) before giving up and
    /// trying again.
    pub lock_timeout: Duration,
}

impl Default for RebuildConfig {
    fn default() -> Self {
        Self {
            batch_size: 5_000,
            chunk_size: 50_000,
            switch_gap: 2_000,
            max_passes: 20,
            lock_timeout: Duration::from_secs(10),
        }
    }
}

/// Progress for a progress line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RebuildProgress {
    /// Events folded into the shadow tables (including before a resume).
    pub done: u64,
    /// `done` plus what remained at the start of the current pass.
    pub total: u64,
    /// Events per second in this run.
    pub rate_per_sec: f64,
    /// Time left at that rate (zero when unknown or done).
    pub eta: Duration,
    /// Catch-up pass (1-based); the switch is the last.
    pub pass: u32,
}

/// What a finished rebuild did.
#[derive(Clone, Debug, PartialEq)]
pub struct RebuildReport {
    pub projection: &'static str,
    pub version: i32,
    /// Events folded by this run (after a resume, only the rest).
    pub events: u64,
    /// Events in the rebuilt model in total.
    pub total: u64,
    pub passes: u32,
    /// The switch raised every partition's floor to this key.
    pub head: LogPosition,
    /// Poison events this run parked.
    pub parked: u64,
    pub resumed: bool,
    pub elapsed: Duration,
}

impl fmt::Display for RebuildReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.events as f64 / secs
        } else {
            0.0
        };
        write!(
            f,
            "version {}, {} events ({} this run) in {:.1}s ({:.0} events/s), {} pass(es), switched at {}",
            self.version, self.total, self.events, secs, rate, self.passes, self.head
        )?;
        if self.resumed {
            f.write_str(", resumed")?;
        }
        if self.parked > 0 {
            write!(f, ", {} poison event(s) parked", self.parked)?;
        }
        Ok(())
    }
}

/// Rebuilds `projection` with the default [`RebuildConfig`].
pub async fn rebuild(
    pool: &PgPool,
    projection: Arc<dyn Projection>,
    partitions: u32,
    progress: impl FnMut(RebuildProgress) + Send,
) -> anyhow::Result<RebuildReport> {
    rebuild_with(
        pool,
        projection,
        partitions,
        &RebuildConfig::default(),
        progress,
    )
    .await
}

/// Rebuilds `projection` into shadow tables and switches them in (see the module docs). Only one
/// rebuild of a projection runs at a time; a second one fails at once. On an error the
/// projection is marked `failed` with the cause, and running the rebuild again resumes.
pub async fn rebuild_with(
    pool: &PgPool,
    projection: Arc<dyn Projection>,
    partitions: u32,
    config: &RebuildConfig,
    progress: impl FnMut(RebuildProgress) + Send,
) -> anyhow::Result<RebuildReport> {
    let name = projection.name();
    let Some(lock) = RebuildLock::try_acquire(pool, name).await? else {
        bail!("a rebuild of {name} is already running");
    };
    let mut run = Rebuild {
        pool,
        projection: projection.as_ref(),
        partitions: super::projection::partitions_of(projection.as_ref(), partitions),
        config,
        shadow: TableNames::shadow(projection.tables()),
        bulk: None,
        counting: None,
        bulk_started: false,
        resumed: false,
        excluded: HashSet::new(),
        started: Instant::now(),
        folded: 0,
        done: 0,
        total: 0,
        pass: 0,
        parked: 0,
        progress,
    };
    let result = run.run().await;
    if let Err(e) = &result {
        tracing::error!(
            projection = name,
            error = format!("{e:#}"),
            "rebuild failed; run it again to resume"
        );
        let _ = state::fail_rebuild(pool, name, &format!("rebuild failed: {e:#}")).await;
    }
    lock.release().await;
    result
}

struct Rebuild<'a, F> {
    pool: &'a PgPool,
    projection: &'a dyn Projection,
    partitions: u32,
    config: &'a RebuildConfig,
    shadow: TableNames,
    /// The projection's fast path, if it has one.
    bulk: Option<Box<dyn BulkFold>>,
    /// The count of the current pass's events, under way (and `done` when it started).
    counting: Option<(u64, AbortOnDropHandle<Result<i64, sqlx::Error>>)>,
    bulk_started: bool,
    /// The shadow tables were kept from an earlier, interrupted run.
    resumed: bool,
    /// Events left out: parked live or by this rebuild.
    excluded: HashSet<LogPosition>,
    started: Instant,
    /// Folded by this run.
    folded: u64,
    /// Folded in total (shadow tables' content).
    done: u64,
    total: u64,
    pass: u32,
    parked: u64,
    progress: F,
}

impl<F: FnMut(RebuildProgress) + Send> Rebuild<'_, F> {
    async fn run(&mut self) -> anyhow::Result<RebuildReport> {
        let p = self.projection;
        let name = p.name();
        checkpoints::ensure(self.pool, name, p.version(), self.partitions).await?;
        let (mut cursor, resumed) = self.prepare().await?;
        self.resumed = resumed;
        self.excluded = dead_letters::excluded_positions(self.pool, name)
            .await?
            .into_iter()
            .collect();
        tracing::info!(projection = name, version = p.version(), %cursor, resumed, "rebuild started");

        loop {
            let Some(head) = log::committed_head(self.pool).await? else {
                break;
            };
            if head <= cursor {
                break;
            }
            // Only whether the gap is small decides here. Counting all of a long log takes a
            // while and only feeds progress: that count runs beside the pass.
            let some = count_after_at_most(self.pool, cursor, self.config.switch_gap).await?;
            self.total = self.done + u64::try_from(some).unwrap_or(0);
            self.start_bulk().await?;
            if some < self.config.switch_gap || self.pass >= self.config.max_passes {
                break;
            }
            let pool = self.pool.clone();
            self.counting = Some((
                self.done,
                AbortOnDropHandle::new(tokio::spawn(async move {
                    log::count_after(&pool, cursor).await
                })),
            ));
            self.pass += 1;
            let (pass_started, before) = (Instant::now(), self.folded);
            cursor = self.fold(None, cursor, head).await?;
            tracing::debug!(projection = name, pass = self.pass, events = self.folded - before, elapsed = ?pass_started.elapsed(), "catch-up pass done");
        }
        self.start_bulk().await?;
        let indexing = Instant::now();
        self.build_deferred_indexes().await?;
        tracing::debug!(projection = name, elapsed = ?indexing.elapsed(), "deferred indexes built");
        let switching = Instant::now();
        let head = self.switch_with_retries(cursor).await?;
        tracing::debug!(projection = name, elapsed = ?switching.elapsed(), "switched");
        let report = RebuildReport {
            projection: name,
            version: p.version(),
            events: self.folded,
            total: self.done,
            passes: self.pass,
            head,
            parked: self.parked,
            resumed,
            elapsed: self.started.elapsed(),
        };
        tracing::info!(projection = name, %report, "rebuild switched in");
        Ok(report)
    }

    /// Fresh shadow tables, or the ones a crashed rebuild of the same version left.
    async fn prepare(&mut self) -> anyhow::Result<(LogPosition, bool)> {
        let p = self.projection;
        let state = state::load_state(self.pool, p.name()).await?;
        if let Some(cursor) = state
            .and_then(|s| s.rebuild)
            .filter(|r| r.version == p.version())
        {
            if self.shadow_tables_exist().await? {
                self.done = u64::try_from(cursor.done).unwrap_or(0);
                return Ok((cursor.position, true));
            }
        }
        let mut tx = self.pool.begin().await?;
        for (live, shadow) in self.shadow.iter() {
            sqlx::query(&format!("DROP TABLE IF EXISTS \"{shadow}\""))
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!(
                "CREATE TABLE \"{shadow}\" (LIKE \"{live}\" INCLUDING ALL)"
            ))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("creating shadow table {shadow}"))?;
            // Secondary indexes are cheaper built once at the end than maintained row by row;
            // unique ones stay (upserts need them).
            for index in table_indexes(&mut tx, shadow).await? {
                if !index.unique && index.constraint.is_none() {
                    sqlx::query(&format!("DROP INDEX \"{}\"", index.name))
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        state::begin_rebuild(&mut tx, p.name(), p.version(), LogPosition::ZERO, 0).await?;
        tx.commit().await?;
        self.done = 0;
        Ok((LogPosition::ZERO, false))
    }

    async fn shadow_tables_exist(&self) -> anyhow::Result<bool> {
        for (_, shadow) in self.shadow.iter() {
            let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                .bind(format!("\"{shadow}\""))
                .fetch_one(self.pool)
                .await?;
            if !exists {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Gives each shadow table every index its live table has (by definition), building those
    /// left out while loading. Idempotent, so a resumed rebuild gets them too. The builds run
    /// side by side, each on a connection of its own: one sort per index, and a single build
    /// leaves cores idle.
    async fn build_deferred_indexes(&mut self) -> anyhow::Result<()> {
        let tables: Vec<(String, String)> = self
            .shadow
            .iter()
            .map(|(live, shadow)| (live.to_string(), shadow.to_string()))
            .collect();
        let missing = missing_indexes(&mut *self.pool.acquire().await?, &tables, Only::All).await?;
        let pool = self.pool;
        futures::future::try_join_all(missing.iter().map(|m| async move {
            let mut conn = pool.acquire().await?;
            build_index(&mut conn, m).await
        }))
        .await?;
        let mut conn = self.pool.acquire().await?;
        for m in &missing {
            attach_constraint(&mut conn, m).await?;
        }
        if let Some(bulk) = self.bulk.as_mut() {
            bulk.set_keys(true);
        }
        Ok(())
    }

    /// Takes in the count of the pass's events once it is there.
    fn counted(&mut self) {
        let Some((base, task)) = self.counting.as_mut() else {
            return;
        };
        if !task.is_finished() {
            return;
        }
        if let Some(Ok(Ok(n))) = futures::FutureExt::now_or_never(task) {
            self.total = *base + u64::try_from(n).unwrap_or(0);
        }
        self.counting = None;
    }

    fn report_progress(&mut self) {
        self.counted();
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            self.folded as f64 / secs
        } else {
            0.0
        };
        let total = self.total.max(self.done);
        let left = total - self.done;
        let eta = if rate > 0.0 {
            Duration::from_secs_f64(left as f64 / rate)
        } else {
            Duration::ZERO
        };
        (self.progress)(RebuildProgress {
            done: self.done,
            total,
            rate_per_sec: rate,
            eta,
            pass: self.pass,
        });
    }
}

/// A pooled connection that is closed rather than given back to the pool unless
/// [`Guarded::keep`] was called: a `COPY` cut off half-way (its task aborted, or failed) leaves
/// the session expecting messages the pool's next user would not.
struct Guarded(sqlx::pool::PoolConnection<sqlx::Postgres>, bool);

impl Guarded {
    async fn acquire(pool: &PgPool) -> Result<Self, sqlx::Error> {
        Ok(Self(pool.acquire().await?, false))
    }

    /// Whatever ran on it finished cleanly: it may serve again.
    fn keep(&mut self) {
        self.1 = true;
    }
}

impl std::ops::Deref for Guarded {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.0
    }
}

impl std::ops::DerefMut for Guarded {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.0
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if !self.1 {
            self.0.close_on_drop();
        }
    }
}
