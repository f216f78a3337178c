//! Rebuild without downtime (DESIGN.md §6).
//!
//! 1. Mark the projection `rebuilding` and create empty shadow tables `<t>__rebuild` (LIKE the
//!    live ones, INCLUDING ALL), or, when resuming after a crash, keep them and continue from the
//!    rebuild cursor in `projection_state`.
//! 2. Fold the Postgres log in commit-safe order into the shadow tables with the projection's
//!    own `apply` (so rows come out byte-identical to the live fold), in big batches, each saving
//!    the cursor in its transaction. Repeat catch-up passes up to the committed head until the
//!    remaining gap is small.
//! 3. One switch transaction: lock the projection's checkpoint rows (live batches start by
//!    locking theirs, so they wait), fold the rest up to the committed head of that moment,
//!    rename live → `<t>__old`, shadow → live, drop the old tables, give the shadow's indexes the
//!    live names, raise every partition's floor to that head, mark the projection running.
//!
//! Live workers keep writing the old tables until the switch and afterwards skip everything the
//! rebuild covered (at or below the floor); readers see the old model or the new one, never a
//! half-built one. Events the live worker parked (and not since retried) are left out here too,
//! so that both folds see the same events. No side effects run: rebuilds only call `apply`.

use crate::projection::{PoisonEvent, Projection, TableNames};
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
    /// Events per shadow transaction.
    pub batch_size: usize,
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
        partitions: partitions.max(1),
        config,
        shadow: TableNames::shadow(projection.tables()),
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
            let remaining = log::count_after(self.pool, cursor).await?;
            self.total = self.done + u64::try_from(remaining).unwrap_or(0);
            if remaining < self.config.switch_gap || self.pass >= self.config.max_passes {
                break;
            }
            self.pass += 1;
            cursor = self.fold(None, cursor, head).await?;
        }
        self.build_deferred_indexes().await?;
        let head = self.switch_with_retries(cursor).await?;
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
                if !index.unique && !index.constraint {
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
    /// left out while loading. Idempotent, so a resumed rebuild gets them too.
    async fn build_deferred_indexes(&self) -> anyhow::Result<()> {
        let mut conn = self.pool.acquire().await?;
        for (live, shadow) in self.shadow.iter() {
            let have = indexes(&mut conn, shadow).await?;
            for index in indexes(&mut conn, live).await? {
                if have.iter().any(|h| h.definition == index.definition) {
                    continue;
                }
                let unique = if index.unique { "UNIQUE " } else { "" };
                let name: String = format!("{}{}", index.name, crate::projection::SHADOW_SUFFIX)
                    .chars()
                    .take(63)
                    .collect();
                sqlx::query(&format!(
                    "CREATE {unique}INDEX \"{name}\" ON \"{shadow}\" {}",
                    index.using
                ))
                .execute(&mut *conn)
                .await
                .with_context(|| format!("building index {name} on {shadow}"))?;
            }
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
        let mut tx = self.pool.begin().await?;
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
        let head = committed_head(&mut tx).await?.unwrap_or(cursor).max(cursor);
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
    /// Backs a constraint (primary key, unique constraint).
    constraint: bool,
    /// `USING btree (cols) …`: the definition without name and table.
    using: String,
    /// What makes two indexes on different tables the same.
    definition: String,
}

async fn indexes(conn: &mut PgConnection, table: &str) -> anyhow::Result<Vec<Index>> {
    let rows: Vec<(String, bool, bool, String)> = sqlx::query_as(
        "SELECT ci.relname::text, i.indisunique,
                EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid),
                pg_get_indexdef(i.indexrelid)
         FROM pg_index i JOIN pg_class ci ON ci.oid = i.indexrelid
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
                constraint,
                using,
                definition,
            }
        })
        .collect())
}

/// Streams the log in batches from a task of its own, a batch ahead of the consumer; stops
/// when dropped.
struct Reader {
    rx: tokio::sync::mpsc::Receiver<Result<Vec<LogEntry>, sqlx::Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl Reader {
    fn spawn(pool: PgPool, after: LogPosition, upto: LogPosition, batch_size: usize) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(async move {
            let mut stream = log::stream_committed(&pool, after, upto);
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
        });
        Self { rx, task }
    }

    async fn next(&mut self) -> Option<Result<Vec<LogEntry>, sqlx::Error>> {
        self.rx.recv().await
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The commit-safe head, read on the switch's own connection (after its locks are taken).
async fn committed_head(conn: &mut PgConnection) -> anyhow::Result<Option<LogPosition>> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, global_position FROM events
         WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY transaction_id DESC, global_position DESC LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|(t, g)| LogPosition::from_db(t, g)))
}
