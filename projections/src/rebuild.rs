//! Rebuild without downtime (DESIGN.md §6).
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
//!   [`RawEvent`]s (JSON left as text for the fold to decode into its own types); the rebuild
//!   folds batches into rows held in memory for a chunk of `chunk_size` events; a task writes
//!   the previous chunk meanwhile (new rows by `COPY`), its poison events and the cursor in one
//!   transaction. A fresh rebuild also leaves out the unique indexes of the fold's keyless
//!   tables for as long as every row it writes is new, and builds them when it first needs
//!   them ([`NeedKeys`]) or at the end.
//! - Otherwise: the projection's own `apply`, batch by batch, a transaction each.
//!
//! Both fold with the code the live worker folds with, so rows come out byte-identical to the
//! live fold (DESIGN.md §3.4). Live workers keep writing the old tables until the switch and
//! afterwards skip everything the rebuild covered (at or below the floor); readers see the old
//! model or the new one, never a half-built one. Events the live worker parked (and not since
//! retried) are left out here too, so that both folds see the same events; poison events the
//! rebuild finds are parked (`parked_by = rebuild`) with the chunk that skips them. No side
//! effects run: rebuilds only fold.
//!
//! Shadow transactions commit with `synchronous_commit = off`: a commit lost in a crash takes
//! its cursor with it, and the resume redoes it.

use crate::projection::{
    BulkFold, BulkStart, NeedKeys, PoisonEvent, Projection, RawEvent, TableNames,
};
use anyhow::{bail, Context as _};
use futures::StreamExt;
use rookery_events::{LogPosition, RecordedEvent};
use rookery_store::checkpoints::{self, NewDeadLetter, ParkedBy, RebuildLock};
use rookery_store::log::{self, LogEntry};
use sqlx::{PgConnection, PgPool};
use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// `maintenance_work_mem` for building a shadow table's deferred indexes, at least (the sort of
/// a million members' index entries fits).
const INDEX_BUILD_MEMORY: &str = "128MB";

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
        partitions: partitions.max(1),
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
        let _ = checkpoints::fail_rebuild(pool, name, &format!("rebuild failed: {e:#}")).await;
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
    counting: Option<(u64, AbortOnDrop<Result<i64, sqlx::Error>>)>,
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
        self.excluded = checkpoints::excluded_positions(self.pool, name)
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
                AbortOnDrop(tokio::spawn(async move {
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
        let state = checkpoints::load_state(self.pool, p.name()).await?;
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
            for index in indexes(&mut tx, shadow).await? {
                if !index.unique && index.constraint.is_none() {
                    sqlx::query(&format!("DROP INDEX \"{}\"", index.name))
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        checkpoints::begin_rebuild(&mut tx, p.name(), p.version(), LogPosition::ZERO, 0).await?;
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

    /// Folds `(after, upto]` into the shadow tables. Outside the switch (`conn` is `None`) each
    /// batch is its own transaction saving the cursor; in the switch, batches run in savepoints
    /// of the switch transaction. Returns the new cursor.
    async fn fold(
        &mut self,
        mut conn: Option<&mut PgConnection>,
        after: LogPosition,
        upto: LogPosition,
    ) -> anyhow::Result<LogPosition> {
        if self.bulk.is_some() {
            return self.fold_bulk(conn, after, upto).await;
        }
        let mut cursor = after;
        // Reading the next batch overlaps applying this one.
        let mut reader = Reader::spawn(self.pool.clone(), after, upto, self.config.batch_size);
        while let Some(batch) = reader.next().await {
            let batch = batch.context("reading the log")?;
            let Some(last) = batch.last().map(|e| e.event.position) else {
                continue;
            };
            self.apply_batch(conn.as_deref_mut(), &batch, last).await?;
            cursor = last;
            self.done += batch.len() as u64;
            self.folded += batch.len() as u64;
            self.report_progress();
        }
        Ok(cursor)
    }

    /// Applies one batch (minus excluded events) and saves the cursor, parking poison events and
    /// retrying without them.
    async fn apply_batch(
        &mut self,
        conn: Option<&mut PgConnection>,
        batch: &[LogEntry],
        last: LogPosition,
    ) -> anyhow::Result<()> {
        let name = self.projection.name();
        let mut outer = conn;
        let mut new_poison: Vec<(usize, String)> = Vec::new();
        loop {
            let mut tx = match outer.as_deref_mut() {
                Some(c) => sqlx::Connection::begin(c).await?,
                None => {
                    let mut tx = self.pool.begin().await?;
                    // Losing the last shadow commits in a crash is harmless (the cursor is lost
                    // with them; the resume redoes them), so do not wait for the disk.
                    sqlx::query("SET LOCAL synchronous_commit = off")
                        .execute(&mut *tx)
                        .await?;
                    tx
                }
            };
            let events: Vec<RecordedEvent> = batch
                .iter()
                .filter(|e| !self.excluded.contains(&e.event.position))
                .map(|e| e.event.clone())
                .collect();
            match self.projection.apply(&mut tx, &self.shadow, &events).await {
                Ok(()) => {}
                Err(e) => {
                    let Some(p) = PoisonEvent::find(&e) else {
                        return Err(e);
                    };
                    let Some(i) = batch.iter().position(|x| x.event.position == p.position) else {
                        return Err(e);
                    };
                    if !self.excluded.insert(p.position) {
                        return Err(e);
                    }
                    tracing::warn!(projection = name, position = %p.position, reason = %p.reason, "poison event; parking it");
                    new_poison.push((i, p.to_string()));
                    // Dropping `tx` rolls the batch (or its savepoint) back.
                    continue;
                }
            }
            for (i, reason) in &new_poison {
                let entry = &batch[*i];
                let letter = NewDeadLetter {
                    projection: name,
                    partition: entry.partition(self.partitions),
                    stream_seq: None,
                    position: Some(entry.event.position),
                    message_id: Some(entry.event.message_id()),
                    event: serde_json::to_value(&entry.event).ok(),
                    error: reason,
                    attempts: 1,
                    parked_by: ParkedBy::Rebuild,
                };
                checkpoints::park(&mut tx, &letter).await?;
            }
            let done = i64::try_from(self.done + batch.len() as u64).unwrap_or(i64::MAX);
            let total =
                i64::try_from(self.total.max(self.done + batch.len() as u64)).unwrap_or(i64::MAX);
            checkpoints::save_rebuild_cursor(&mut tx, name, last, done, total).await?;
            tx.commit().await?;
            self.parked += new_poison.len() as u64;
            return Ok(());
        }
    }

    /// Sets up the projection's [`BulkFold`], if it has one, once (`total` is known by then).
    /// Fresh shadow tables (still empty) lose the unique indexes of its keyless tables until it
    /// needs them or the end.
    async fn start_bulk(&mut self) -> anyhow::Result<()> {
        if self.bulk_started {
            return Ok(());
        }
        self.bulk_started = true;
        // The pass's exact count may not be in yet: the planner's estimate of the log's length
        // sizes what the fold keeps per row well enough.
        let estimate: i64 = sqlx::query_scalar(
            "SELECT GREATEST(reltuples, 0)::bigint FROM pg_class WHERE oid = 'events'::regclass",
        )
        .fetch_optional(self.pool)
        .await?
        .unwrap_or(0);
        let start = BulkStart {
            // Rows commit only with the cursor moving past them: nothing folded, nothing stored.
            empty: self.done == 0,
            events: self
                .total
                .max(self.done)
                .max(u64::try_from(estimate).unwrap_or(0)),
        };
        let Some(mut bulk) = self.projection.bulk_fold(&self.shadow, start) else {
            return Ok(());
        };
        let keyless = self.keyless_tables_of(bulk.as_ref());
        if !keyless.is_empty() {
            let mut conn = self.pool.acquire().await?;
            if !start.empty {
                let missing = missing_indexes(&mut conn, &keyless, Only::Unique).await?;
                bulk.set_keys(missing.is_empty());
            } else {
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                for (_, shadow) in &keyless {
                    drop_unique_indexes(&mut tx, shadow).await?;
                }
                tx.commit().await?;
                bulk.set_keys(false);
            }
        }
        self.bulk = Some(bulk);
        Ok(())
    }

    /// `(live, shadow)` names of the bulk fold's keyless tables.
    fn keyless_tables(&self) -> Vec<(String, String)> {
        self.bulk
            .as_deref()
            .map(|b| self.keyless_tables_of(b))
            .unwrap_or_default()
    }

    fn keyless_tables_of(&self, bulk: &dyn BulkFold) -> Vec<(String, String)> {
        self.shadow
            .iter()
            .filter(|(logical, _)| bulk.keyless_tables().contains(logical))
            .map(|(logical, shadow)| (logical.to_string(), shadow.to_string()))
            .collect()
    }

    /// [`Self::fold`] through the projection's [`BulkFold`]: batches are folded in memory and
    /// written a chunk at a time. Outside the switch a task commits each chunk (with the cursor)
    /// while the next one is folded; in the switch, chunks go into its transaction.
    async fn fold_bulk(
        &mut self,
        mut conn: Option<&mut PgConnection>,
        after: LogPosition,
        upto: LogPosition,
    ) -> anyhow::Result<LogPosition> {
        let mut reader = Reader::spawn_raw(self.pool.clone(), after, upto, self.config.batch_size);
        // Outside the switch, loads have a connection of their own: chunks are committed on
        // others meanwhile.
        let mut own = match conn {
            Some(_) => None,
            None => Some(Guarded::acquire(self.pool).await?),
        };
        // The log stream, the loads and the chunk being written each hold a connection; with
        // fewer in the pool the writes wait for the loads (on their connection) instead.
        let pipelined = self.pool.options().get_max_connections() >= 3;
        let chunk_size = self.config.chunk_size.max(1);
        let mut writing: Option<Writing> = None;
        let mut chunk = Chunk::new(after);
        while let Some(batch) = reader.next().await {
            let batch = batch.context("reading the log")?;
            let Some(last) = batch.last().map(|e| e.event.position) else {
                continue;
            };
            let n = batch.len();
            let load: &mut PgConnection = match (conn.as_deref_mut(), own.as_deref_mut()) {
                (Some(c), _) | (None, Some(c)) => c,
                (None, None) => bail!("no connection to load rows through"),
            };
            let (mut events, mut partitions) = self.unpack(batch);
            let mut keyed = false;
            while !self
                .fold_bulk_batch(load, &mut events, &mut partitions, &mut chunk.letters)
                .await?
            {
                if keyed {
                    bail!("the bulk fold asked for keys it was given");
                }
                // Building them waits for the chunk being written anyway.
                self.finish_writing(&mut writing).await?;
                let keyless = self.keyless_tables();
                build_missing_indexes(load, &keyless, Only::Unique).await?;
                self.bulk_fold()?.set_keys(true);
                keyed = true;
            }
            chunk.events += n;
            chunk.last = last;
            // Rows held bound memory too: a chunk of events touching many rows each ends early.
            if chunk.events >= chunk_size || self.bulk_fold()?.held() >= 2 * chunk_size {
                let full = std::mem::replace(&mut chunk, Chunk::new(last));
                let target = Target::of(conn.as_deref_mut(), own.as_deref_mut(), pipelined);
                self.write_chunk(target, &mut writing, full).await?;
            }
        }
        let cursor = chunk.last;
        if chunk.events > 0 {
            let target = Target::of(conn, own.as_deref_mut(), pipelined);
            self.write_chunk(target, &mut writing, chunk).await?;
        }
        self.finish_writing(&mut writing).await?;
        if let Some(own) = own.as_mut() {
            own.keep();
        }
        Ok(cursor)
    }

    fn bulk_fold(&mut self) -> anyhow::Result<&mut Box<dyn BulkFold>> {
        self.bulk
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("the projection has no bulk fold"))
    }

    /// A batch's events (minus excluded ones) and their partitions.
    fn unpack(&self, batch: Vec<RawEntry>) -> (Vec<RawEvent>, Vec<u32>) {
        let mut events = Vec::with_capacity(batch.len());
        let mut partitions = Vec::with_capacity(batch.len());
        for entry in batch {
            if self.excluded.contains(&entry.event.position) {
                continue;
            }
            partitions.push(entry.partition_key % self.partitions.max(1));
            events.push(entry.event);
        }
        (events, partitions)
    }

    /// Folds one batch in memory, leaving out poison events (noted to be parked with the
    /// chunk). False when the fold needs the keys of the keyless tables first.
    async fn fold_bulk_batch(
        &mut self,
        conn: &mut PgConnection,
        events: &mut Vec<RawEvent>,
        partitions: &mut Vec<u32>,
        letters: &mut Vec<Letter>,
    ) -> anyhow::Result<bool> {
        let name = self.projection.name();
        loop {
            let e = match self.bulk_fold()?.fold(conn, events).await {
                Ok(()) => return Ok(true),
                Err(e) if e.downcast_ref::<NeedKeys>().is_some() => return Ok(false),
                Err(e) => e,
            };
            let Some(p) = PoisonEvent::find(&e) else {
                return Err(e);
            };
            let Some(i) = events.iter().position(|x| x.position == p.position) else {
                return Err(e);
            };
            if !self.excluded.insert(p.position) {
                return Err(e);
            }
            tracing::warn!(projection = name, position = %p.position, reason = %p.reason, "poison event; parking it");
            let reason = p.to_string();
            let event = events.remove(i);
            let recorded = event.to_recorded().ok();
            letters.push(Letter {
                partition: partitions.remove(i),
                position: event.position,
                message_id: event.message_id(),
                event: recorded.and_then(|r| serde_json::to_value(&r).ok()),
                error: reason,
            });
        }
    }

    /// Writes a folded chunk: in the switch into its transaction, otherwise by a task (once the
    /// previous chunk's task has committed).
    async fn write_chunk(
        &mut self,
        target: Target<'_>,
        writing: &mut Option<Writing>,
        chunk: Chunk,
    ) -> anyhow::Result<()> {
        let name = self.projection.name();
        self.finish_writing(writing).await?;
        let write = self.bulk_fold()?.take()?;
        let done = self.done + chunk.events as u64;
        let saved = (
            i64::try_from(done).unwrap_or(i64::MAX),
            i64::try_from(self.total.max(done)).unwrap_or(i64::MAX),
        );
        let parked = chunk.letters.len() as u64;
        match target {
            Target::Switch(conn) => {
                commit_chunk(conn, write, name, &chunk, saved).await?;
                self.bulk_fold()?.settle();
                self.chunk_committed(chunk.events as u64, parked);
            }
            Target::Inline(conn) => {
                let mut tx = sqlx::Connection::begin(conn).await?;
                sqlx::query("SET LOCAL synchronous_commit = off")
                    .execute(&mut *tx)
                    .await?;
                commit_chunk(&mut tx, write, name, &chunk, saved).await?;
                tx.commit().await?;
                self.bulk_fold()?.settle();
                self.chunk_committed(chunk.events as u64, parked);
            }
            Target::Task => {
                let pool = self.pool.clone();
                let events = chunk.events as u64;
                let task = tokio::spawn(async move {
                    let mut conn = Guarded::acquire(&pool).await?;
                    let mut tx = sqlx::Connection::begin(&mut *conn.0).await?;
                    // Losing the last shadow commits in a crash is harmless (the cursor is lost
                    // with them; the resume redoes them), so do not wait for the disk.
                    sqlx::query("SET LOCAL synchronous_commit = off")
                        .execute(&mut *tx)
                        .await?;
                    commit_chunk(&mut tx, write, name, &chunk, saved).await?;
                    tx.commit().await?;
                    conn.keep();
                    Ok(())
                });
                *writing = Some(Writing {
                    task: AbortOnDrop(task),
                    events,
                    parked,
                });
            }
        }
        Ok(())
    }

    /// Waits for the chunk being written, if any, to commit.
    async fn finish_writing(&mut self, writing: &mut Option<Writing>) -> anyhow::Result<()> {
        let Some(mut w) = writing.take() else {
            return Ok(());
        };
        (&mut w.task.0)
            .await
            .context("the task writing a chunk stopped")?
            .context("writing a chunk of the rebuild")?;
        self.bulk_fold()?.settle();
        self.chunk_committed(w.events, w.parked);
        Ok(())
    }

    fn chunk_committed(&mut self, events: u64, parked: u64) {
        self.done += events;
        self.folded += events;
        self.parked += parked;
        self.report_progress();
    }

    /// Takes in the count of the pass's events once it is there.
    fn counted(&mut self) {
        let Some((base, task)) = self.counting.as_mut() else {
            return;
        };
        if !task.0.is_finished() {
            return;
        }
        if let Some(Ok(Ok(n))) = futures::FutureExt::now_or_never(&mut task.0) {
            self.total = *base + u64::try_from(n).unwrap_or(0);
        }
        self.counting = None;
    }

    /// The switch, tried again (from the same cursor: a failed switch rolls back entirely) when
    /// it timed out waiting for table locks behind long readers.
    async fn switch_with_retries(&mut self, cursor: LogPosition) -> anyhow::Result<LogPosition> {
        let mut attempt = 1;
        loop {
            // A failed switch rolled back, poison it parked included: forget what it learnt.
            let saved = (self.done, self.folded, self.parked, self.excluded.clone());
            match self.switch(cursor).await {
                Ok(head) => return Ok(head),
                Err(e) if attempt < 3 && is_lock_timeout(&e) => {
                    tracing::warn!(
                        projection = self.projection.name(),
                        attempt,
                        "switch timed out on a table lock; trying again"
                    );
                    (self.done, self.folded, self.parked, self.excluded) = saved;
                    if let Some(bulk) = self.bulk.as_mut() {
                        bulk.discard();
                    }
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The switch: one transaction. Returns the head the floors were raised to.
    async fn switch(&mut self, cursor: LogPosition) -> anyhow::Result<LogPosition> {
        let p = self.projection;
        let name = p.name();
        self.pass += 1;
        let mut conn = Guarded::acquire(self.pool).await?;
        let mut tx = sqlx::Connection::begin(&mut *conn.0).await?;
        sqlx::query(&format!(
            "SET LOCAL lock_timeout = {}",
            self.config.lock_timeout.as_millis()
        ))
        .execute(&mut *tx)
        .await?;
        // From here on no live batch of this projection can commit: they all start by locking
        // their checkpoint row.
        let locked = checkpoints::lock_all(&mut tx, name)
            .await
            .context("locking the checkpoints")?;
        let head = log::committed_head(&mut *tx)
            .await?
            .unwrap_or(cursor)
            .max(cursor);
        if let Some(ahead) = locked.iter().find(|c| c.position > head) {
            // Live workers only apply relayed events, which are below the committed head; a
            // checkpoint beyond it means the log was tampered with.
            bail!(
                "partition {} has applied {} beyond the committed head {head}",
                ahead.partition,
                ahead.position
            );
        }
        let remaining = log::count_after(self.pool, cursor).await.unwrap_or(0);
        self.total = self.done + u64::try_from(remaining).unwrap_or(0);
        if head > cursor {
            self.fold(Some(&mut *tx), cursor, head).await?;
        }
        self.swap_tables(&mut tx).await?;
        checkpoints::raise_floor_all(&mut tx, name, self.partitions, head).await?;
        checkpoints::finish_rebuild(&mut tx, name, p.version()).await?;
        tx.commit().await.context("committing the switch")?;
        conn.keep();
        Ok(head)
    }

    async fn swap_tables(&self, conn: &mut PgConnection) -> anyhow::Result<()> {
        for (live, shadow) in self.shadow.iter() {
            // The shadow's indexes got generated names; give them the live ones afterwards so
            // names do not drift with every rebuild.
            let live_indexes = indexes(conn, live).await?;
            let shadow_indexes = indexes(conn, shadow).await?;
            let old = format!("{live}__old");
            sqlx::query(&format!("ALTER TABLE \"{live}\" RENAME TO \"{old}\""))
                .execute(&mut *conn)
                .await?;
            sqlx::query(&format!("ALTER TABLE \"{shadow}\" RENAME TO \"{live}\""))
                .execute(&mut *conn)
                .await?;
            sqlx::query(&format!("DROP TABLE \"{old}\""))
                .execute(&mut *conn)
                .await?;
            for index in &shadow_indexes {
                let Some(live_index) = live_indexes
                    .iter()
                    .find(|l| l.definition == index.definition)
                else {
                    continue;
                };
                if live_index.name != index.name {
                    sqlx::query(&format!(
                        "ALTER INDEX \"{}\" RENAME TO \"{}\"",
                        index.name, live_index.name
                    ))
                    .execute(&mut *conn)
                    .await?;
                }
            }
        }
        Ok(())
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

/// Where [`Rebuild::write_chunk`] writes.
enum Target<'c> {
    /// Into the switch's transaction.
    Switch(&'c mut PgConnection),
    /// In a transaction of its own on the loads' connection, waiting for it.
    Inline(&'c mut PgConnection),
    /// In a transaction of its own, by a task, while the next chunk is folded.
    Task,
}

impl<'c> Target<'c> {
    fn of(
        switch: Option<&'c mut PgConnection>,
        own: Option<&'c mut PgConnection>,
        pipelined: bool,
    ) -> Self {
        match (switch, own) {
            (Some(conn), _) => Target::Switch(conn),
            (None, Some(conn)) if !pipelined => Target::Inline(conn),
            (None, _) => Target::Task,
        }
    }
}

/// Events folded since the last chunk was written.
struct Chunk {
    events: usize,
    /// The cursor once the chunk is written.
    last: LogPosition,
    /// Poison events left out of the chunk, parked with it.
    letters: Vec<Letter>,
}

impl Chunk {
    fn new(after: LogPosition) -> Self {
        Self {
            events: 0,
            last: after,
            letters: Vec::new(),
        }
    }
}

/// A poison event to park.
struct Letter {
    partition: u32,
    position: LogPosition,
    message_id: String,
    event: Option<serde_json::Value>,
    error: String,
}

/// A chunk being committed by a task.
struct Writing {
    task: AbortOnDrop<anyhow::Result<()>>,
    events: u64,
    parked: u64,
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

/// Stops the task when the rebuild gives up (its transaction rolls back).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A chunk's rows, its poison events and the cursor, in the caller's transaction.
async fn commit_chunk(
    conn: &mut PgConnection,
    write: Box<dyn crate::projection::BulkWrite>,
    name: &'static str,
    chunk: &Chunk,
    (done, total): (i64, i64),
) -> anyhow::Result<()> {
    write.write(&mut *conn).await?;
    for letter in &chunk.letters {
        let letter = NewDeadLetter {
            projection: name,
            partition: letter.partition,
            stream_seq: None,
            position: Some(letter.position),
            message_id: Some(letter.message_id.clone()),
            event: letter.event.clone(),
            error: &letter.error,
            attempts: 1,
            parked_by: ParkedBy::Rebuild,
        };
        checkpoints::park(&mut *conn, &letter).await?;
    }
    checkpoints::save_rebuild_cursor(&mut *conn, name, chunk.last, done, total).await?;
    Ok(())
}

fn is_lock_timeout(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(cause.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::Database(db)) if db.code().as_deref() == Some("55P03"))
    })
}

/// One index of a table.
struct Index {
    name: String,
    unique: bool,
    /// The constraint it backs: its kind (`p`rimary key, `u`nique, e`x`clusion).
    constraint: Option<char>,
    /// `USING btree (cols) …`: the definition without name and table.
    using: String,
    /// What makes two indexes on different tables the same.
    definition: String,
}

async fn indexes(conn: &mut PgConnection, table: &str) -> anyhow::Result<Vec<Index>> {
    let rows: Vec<(String, bool, Option<String>, String)> = sqlx::query_as(
        "SELECT ci.relname::text, i.indisunique, c.contype::text, pg_get_indexdef(i.indexrelid)
         FROM pg_index i JOIN pg_class ci ON ci.oid = i.indexrelid
         LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid
         WHERE i.indrelid = to_regclass($1)
         ORDER BY ci.relname",
    )
    .bind(format!("\"{table}\""))
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, unique, constraint, def)| {
            // "CREATE [UNIQUE] INDEX name ON public.table USING btree (cols)"
            let using = def
                .find(" USING ")
                .map_or(def.as_str(), |i| &def[i + 1..])
                .to_string();
            let definition = format!("{}{using}", if unique { "UNIQUE " } else { "" });
            Index {
                name,
                unique,
                constraint: constraint.and_then(|c| c.chars().next()),
                using,
                definition,
            }
        })
        .collect())
}

/// Which of a table's indexes [`build_missing_indexes`] builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Only {
    All,
    Unique,
}

/// An index of a live table its shadow lacks, or has without the constraint it backs.
struct Missing {
    shadow: String,
    /// The live table's index.
    index: Index,
    /// The shadow's index of the same definition, when only the constraint is missing (a
    /// crash came between building the index and attaching it).
    built: Option<String>,
}

impl Missing {
    /// The shadow index's name.
    fn name(&self) -> String {
        self.built.clone().unwrap_or_else(|| {
            format!("{}{}", self.index.name, crate::projection::SHADOW_SUFFIX)
                .chars()
                .take(63)
                .collect()
        })
    }

    /// The constraint the index backs on the live table, as `ADD CONSTRAINT` spells it.
    fn constraint(&self) -> Option<&'static str> {
        match self.index.constraint {
            Some('p') => Some("PRIMARY KEY"),
            Some('u') => Some("UNIQUE"),
            _ => None,
        }
    }
}

/// What the `(live, shadow)` tables' shadows lack of their live tables' indexes.
async fn missing_indexes(
    conn: &mut PgConnection,
    tables: &[(String, String)],
    only: Only,
) -> anyhow::Result<Vec<Missing>> {
    let mut missing = Vec::new();
    for (live, shadow) in tables {
        let have = indexes(conn, shadow).await?;
        for index in indexes(conn, live).await? {
            if only == Only::Unique && !index.unique {
                continue;
            }
            let built = have.iter().find(|h| h.definition == index.definition);
            let m = Missing {
                shadow: shadow.clone(),
                built: built.map(|h| h.name.clone()),
                index,
            };
            match built {
                None => missing.push(m),
                Some(h) if m.constraint().is_some() && h.constraint.is_none() => missing.push(m),
                Some(_) => {}
            }
        }
    }
    Ok(missing)
}

/// Builds a missing index, in a transaction (a savepoint inside the switch) of its own.
async fn build_index(conn: &mut PgConnection, m: &Missing) -> anyhow::Result<()> {
    if m.built.is_some() {
        return Ok(());
    }
    let (name, shadow) = (m.name(), &m.shadow);
    let unique = if m.index.unique { "UNIQUE " } else { "" };
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    // The default 64 MB spills a million members' index entries to disk; never lower a bigger
    // setting. An index lost in a crash is simply built again (by definition, on resume), so
    // the commit need not wait for the disk either.
    sqlx::query(
        "SELECT set_config('synchronous_commit', 'off', true),
                CASE WHEN pg_size_bytes(current_setting('maintenance_work_mem')) < pg_size_bytes($1)
                     THEN set_config('maintenance_work_mem', $1, true) END",
    )
    .bind(INDEX_BUILD_MEMORY)
    .execute(&mut *tx)
    .await?;
    sqlx::query(&format!(
        "CREATE {unique}INDEX \"{name}\" ON \"{shadow}\" {}",
        m.index.using
    ))
    .execute(&mut *tx)
    .await
    .with_context(|| format!("building index {name} on {shadow}"))?;
    tx.commit().await?;
    Ok(())
}

/// Makes a built unique index back the primary key or unique constraint its live twin backs.
/// After the builds: it locks the table exclusively, which would deadlock two builds.
async fn attach_constraint(conn: &mut PgConnection, m: &Missing) -> anyhow::Result<()> {
    let Some(kind) = m.constraint() else {
        return Ok(());
    };
    let (name, shadow) = (m.name(), &m.shadow);
    sqlx::query(&format!(
        "ALTER TABLE \"{shadow}\" ADD CONSTRAINT \"{name}\" {kind} USING INDEX \"{name}\""
    ))
    .execute(&mut *conn)
    .await
    .with_context(|| format!("making {name} the {kind} of {shadow}"))?;
    Ok(())
}

/// Gives each `(live, shadow)` table the indexes of `live` it lacks, one after the other on
/// `conn`; a unique index backing a primary key or unique constraint on `live` backs the same
/// constraint on `shadow`.
async fn build_missing_indexes(
    conn: &mut PgConnection,
    tables: &[(String, String)],
    only: Only,
) -> anyhow::Result<()> {
    let missing = missing_indexes(conn, tables, only).await?;
    for m in &missing {
        build_index(conn, m).await?;
    }
    for m in &missing {
        attach_constraint(conn, m).await?;
    }
    Ok(())
}

/// Drops `table`'s unique indexes and the primary key and unique constraints they back
/// (exclusion constraints stay: they cannot be rebuilt from an index).
async fn drop_unique_indexes(conn: &mut PgConnection, table: &str) -> anyhow::Result<()> {
    for index in indexes(conn, table).await? {
        let sql = match index.constraint {
            _ if !index.unique => continue,
            Some('p' | 'u') => {
                format!("ALTER TABLE \"{table}\" DROP CONSTRAINT \"{}\"", index.name)
            }
            Some(_) => continue,
            None => format!("DROP INDEX \"{}\"", index.name),
        };
        sqlx::query(&sql)
            .execute(&mut *conn)
            .await
            .with_context(|| format!("dropping {} of {table}", index.name))?;
    }
    Ok(())
}

/// Streams the log in batches from a task of its own, a batch ahead of the consumer; stops
/// when dropped.
struct Reader<T> {
    rx: tokio::sync::mpsc::Receiver<Result<Vec<T>, sqlx::Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl Reader<LogEntry> {
    fn spawn(pool: PgPool, after: LogPosition, upto: LogPosition, batch_size: usize) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(async move {
            forward(log::stream_committed(&pool, after, upto), tx, batch_size).await;
        });
        Self { rx, task }
    }
}

impl Reader<RawEntry> {
    fn spawn_raw(pool: PgPool, after: LogPosition, upto: LogPosition, batch_size: usize) -> Self {
        // A few batches of slack: the reader and the fold take turns on the cores.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let task = tokio::spawn(async move {
            forward(stream_raw(&pool, after, upto), tx, batch_size).await;
        });
        Self { rx, task }
    }
}

impl<T> Reader<T> {
    async fn next(&mut self) -> Option<Result<Vec<T>, sqlx::Error>> {
        self.rx.recv().await
    }
}

impl<T> Drop for Reader<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward<T>(
    stream: impl futures::Stream<Item = Result<T, sqlx::Error>>,
    tx: tokio::sync::mpsc::Sender<Result<Vec<T>, sqlx::Error>>,
    batch_size: usize,
) {
    let mut stream = std::pin::pin!(stream);
    let mut batch = Vec::with_capacity(batch_size);
    while let Some(next) = stream.next().await {
        match next {
            Ok(entry) => batch.push(entry),
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
        if batch.len() >= batch_size.max(1) {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(batch_size));
            if tx.send(Ok(full)).await.is_err() {
                return;
            }
        }
    }
    if !batch.is_empty() {
        let _ = tx.send(Ok(batch)).await;
    }
}

/// A [`RawEvent`] and the partition it belongs to.
struct RawEntry {
    event: RawEvent,
    partition_key: u32,
}

/// The range as [`RawEntry`]s (`upto` is at most the commit-safe head, so the range alone is
/// commit-safe).
fn stream_raw(
    pool: &PgPool,
    after: LogPosition,
    upto: LogPosition,
) -> impl futures::Stream<Item = Result<RawEntry, sqlx::Error>> + Send + '_ {
    log::stream_committed_raw(pool, after, upto, |e| RawEntry {
        event: RawEvent {
            position: e.position,
            aggregate_type: e.aggregate_type.to_owned(),
            aggregate_id: e.aggregate_id.to_owned(),
            sequence: e.sequence,
            event_type: e.event_type.to_owned(),
            event_version: e.event_version.to_owned(),
            payload: e.payload.to_owned(),
            metadata: e.metadata.to_owned(),
        },
        partition_key: e.partition_key,
    })
}

/// How many events follow `after` (committed or not, as `log::count_after`), counting no
/// further than `limit`.
async fn count_after_at_most(
    pool: &PgPool,
    after: LogPosition,
    limit: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT 1 FROM events
             WHERE (transaction_id, global_position) > ($1::bigint::text::xid8, $2)
             LIMIT $3) AS s",
    )
    .bind(after.txid_i64())
    .bind(after.gpos)
    .bind(limit)
    .fetch_one(pool)
    .await
}

/// Keys that may be present, with false positives but never a false negative (a blocked Bloom
/// filter): what a [`BulkFold`] consults to skip loading rows that
/// cannot be stored yet. Its size is fixed when created, so memory stays bounded however long
/// the log; past its capacity it merely answers "maybe" more often.
pub struct KeyFilter {
    words: Vec<u64>,
    blocks: u64,
}

/// Words per block: one cache line, so a lookup touches one line.
const BLOCK_WORDS: usize = 8;

impl KeyFilter {
    /// A filter for about `keys` keys at ~1 % false positives (12 bits a key), between 64 KiB
    /// and 64 MiB.
    pub fn with_capacity(keys: u64) -> Self {
        let bits = keys
            .saturating_mul(12)
            .clamp(1 << 19, 1 << 29)
            .next_power_of_two();
        let words = usize::try_from(bits / 64).unwrap_or(1 << 23);
        Self {
            words: vec![0; words],
            blocks: (words / BLOCK_WORDS) as u64,
        }
    }

    pub fn insert(&mut self, key: &[u8]) {
        self.insert_hash(key_hash(key));
    }

    /// False only if `key` was never inserted.
    pub fn may_contain(&self, key: &[u8]) -> bool {
        self.may_contain_hash(key_hash(key))
    }

    /// Inserts a key by its [`key_hash`].
    pub fn insert_hash(&mut self, hash: u64) {
        let (block, bits) = self.probe(hash);
        for (word, bit) in self.words[block..block + BLOCK_WORDS].iter_mut().zip(bits) {
            *word |= bit;
        }
    }

    /// [`KeyFilter::may_contain`] by the key's [`key_hash`].
    pub fn may_contain_hash(&self, hash: u64) -> bool {
        let (block, bits) = self.probe(hash);
        self.words[block..block + BLOCK_WORDS]
            .iter()
            .zip(bits)
            .all(|(word, bit)| word & bit != 0)
    }

    /// The first word of the key's block, and one bit per word of the block.
    fn probe(&self, hash: u64) -> (usize, [u64; BLOCK_WORDS]) {
        let b = mix(hash);
        let block = usize::try_from(hash % self.blocks).unwrap_or(0) * BLOCK_WORDS;
        let mut bits = [0u64; BLOCK_WORDS];
        for (i, bit) in bits.iter_mut().enumerate() {
            *bit = 1 << ((b >> (6 * i)) & 63);
        }
        (block, bits)
    }
}

/// A 64-bit hash of a key, the same in every run. Keys are mostly UUIDs: a multiply-rotate over
/// 8-byte words and a strong finaliser mix them well enough, at a fraction of SipHash's cost.
/// Distinct keys collide about once in 2⁶⁴.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0x243f_6a88_85a3_08d3 ^ key.len() as u64;
    for word in key.chunks(8) {
        let mut w = [0u8; 8];
        w[..word.len()].copy_from_slice(word);
        h = (h ^ u64::from_le_bytes(w))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
    mix(h)
}

/// A `BuildHasher` for maps of rows held in memory by a fold: the word mixing of [`key_hash`],
/// seeded at random like std's SipHash (keys can be chosen from outside: UUIDs derived from
/// platform ids), at a fraction of SipHash's cost on the several UUIDs hashed per event.
#[derive(Clone, Debug)]
pub struct KeyHashState {
    seed: u64,
}

impl Default for KeyHashState {
    fn default() -> Self {
        use std::hash::BuildHasher as _;
        Self {
            seed: std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64),
        }
    }
}

impl std::hash::BuildHasher for KeyHashState {
    type Hasher = KeyHasher;

    fn build_hasher(&self) -> KeyHasher {
        KeyHasher { h: self.seed }
    }
}

/// See [`KeyHashState`].
#[derive(Clone, Debug)]
pub struct KeyHasher {
    h: u64,
}

impl KeyHasher {
    fn word(&mut self, w: u64) {
        self.h = (self.h ^ w)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
}

impl std::hash::Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.word(u64::from_le_bytes(w));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.word(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.word(n as u64);
    }

    fn finish(&self) -> u64 {
        mix(self.h)
    }
}

/// splitmix64's finaliser.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Rows in PostgreSQL's binary `COPY` format. Each value is encoded by sqlx exactly as a bound
/// parameter of its type, so copied rows equal rows written by `INSERT` byte for byte.
pub struct CopyRows {
    buf: Vec<u8>,
    scratch: sqlx::postgres::PgArgumentBuffer,
    fields: i16,
    rows: usize,
}

/// Sent to the server in pieces of about this size while the rest is being encoded.
const COPY_PIECE: usize = 1 << 20;

impl CopyRows {
    /// Rows of `fields` values each.
    pub fn new(fields: i16) -> Self {
        let mut buf = Vec::with_capacity(COPY_PIECE + 4096);
        // Signature, flags (no OIDs), header extension length.
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes());
        buf.extend_from_slice(&0i32.to_be_bytes());
        Self {
            buf,
            scratch: sqlx::postgres::PgArgumentBuffer::default(),
            fields,
            rows: 0,
        }
    }

    /// Starts a row; exactly `fields` calls of [`CopyRows::value`] follow.
    fn row(&mut self) {
        self.buf.extend_from_slice(&self.fields.to_be_bytes());
        self.rows += 1;
        // Encoders may leave bookkeeping in the argument buffer (jsonb does); it is never used
        // here, so start from a clean one now and then rather than let it grow.
        if self.rows.is_multiple_of(1024) {
            self.scratch = sqlx::postgres::PgArgumentBuffer::default();
        }
    }

    pub fn value<'q, T>(&mut self, value: &T) -> anyhow::Result<()>
    where
        T: sqlx::Encode<'q, sqlx::Postgres>,
    {
        let at = self.buf.len();
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
        // Encode straight into `buf`, lent to the argument buffer, then fill in the length.
        std::mem::swap(&mut *self.scratch, &mut self.buf);
        let encoded = value.encode_by_ref(&mut self.scratch);
        std::mem::swap(&mut *self.scratch, &mut self.buf);
        match encoded.map_err(|e| anyhow::anyhow!("encoding a COPY value: {e}"))? {
            sqlx::encode::IsNull::Yes => self.buf.truncate(at + 4),
            sqlx::encode::IsNull::No => {
                let len = i32::try_from(self.buf.len() - at - 4)
                    .context("a COPY value is larger than 2 GiB")?;
                self.buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
            }
        }
        Ok(())
    }

    /// Whether enough is buffered to send a piece.
    fn is_full(&self) -> bool {
        self.buf.len() >= COPY_PIECE
    }

    /// Hands the buffered bytes over for sending.
    fn drain(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.buf, Vec::with_capacity(COPY_PIECE + 4096))
    }
}

/// Runs `statement` (`COPY … FROM STDIN (FORMAT binary)`) with one row per item, each
/// encoded by `encode` (one [`CopyRows::value`] per field), sending full pieces while encoding
/// the rest. Returns the rows copied.
pub async fn copy_in<I, F>(
    conn: &mut PgConnection,
    statement: &str,
    fields: i16,
    items: I,
    mut encode: F,
) -> anyhow::Result<u64>
where
    I: IntoIterator,
    I::IntoIter: Send,
    F: FnMut(&mut CopyRows, I::Item) -> anyhow::Result<()> + Send,
{
    let mut rows = CopyRows::new(fields);
    let mut copy = conn
        .copy_in_raw(statement)
        .await
        .with_context(|| format!("starting {statement}"))?;
    for item in items {
        rows.row();
        encode(&mut rows, item)?;
        if rows.is_full() {
            copy.send(rows.drain()).await?;
        }
    }
    rows.buf.extend_from_slice(&(-1i16).to_be_bytes());
    copy.send(rows.drain()).await?;
    Ok(copy.finish().await?)
}
