//! Folding through the projection's [`BulkFold`]: batches folded into rows held in memory, a chunk
//! of them written (new rows by `COPY`) by a task while the next chunk is folded, each chunk
//! with its poison events and the rebuild cursor in one transaction.

use super::indexes::{build_missing_indexes, drop_unique_indexes, missing_indexes, Only};
use super::reader::{RawEntry, Reader};
use super::{dead_letters, state, Guarded, Rebuild, RebuildProgress};
use crate::engine::dead_letters::{NewDeadLetter, ParkedBy};
use crate::engine::event::PoisonEvent;
use crate::engine::projection::{BulkFold, BulkStart, BulkWrite, NeedKeys};
use crate::engine::RawEvent;
use anyhow::{bail, Context as _};
use rookery_events::LogPosition;
use sqlx::PgConnection;
use tokio_util::task::AbortOnDropHandle;

impl<F: FnMut(RebuildProgress) + Send> Rebuild<'_, F> {
    /// Sets up the projection's [`BulkFold`], if it has one, once (`total` is known by then).
    /// Fresh shadow tables (still empty) lose the unique indexes of its keyless tables until it
    /// needs them or the end.
    pub(super) async fn start_bulk(&mut self) -> anyhow::Result<()> {
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
    pub(super) fn keyless_tables(&self) -> Vec<(String, String)> {
        self.bulk
            .as_deref()
            .map(|b| self.keyless_tables_of(b))
            .unwrap_or_default()
    }

    pub(super) fn keyless_tables_of(&self, bulk: &dyn BulkFold) -> Vec<(String, String)> {
        self.shadow
            .iter()
            .filter(|(logical, _)| bulk.keyless_tables().contains(logical))
            .map(|(logical, shadow)| (logical.to_string(), shadow.to_string()))
            .collect()
    }

    /// [`Self::fold`] through the projection's [`BulkFold`]: batches are folded in memory and
    /// written a chunk at a time. Outside the switch a task commits each chunk (with the cursor)
    /// while the next one is folded; in the switch, chunks go into its transaction.
    pub(super) async fn fold_bulk(
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
            // Entries of the batch not yet counted in a chunk (events of other aggregates too).
            let mut uncounted = batch.len();
            let (mut events, mut partitions) = self.unpack(batch);
            // Events the fold leaves to `apply` split the batch: what precedes one is folded
            // and written first.
            while let Some(i) = self.by_apply_at(&events)? {
                let mut rest = events.split_off(i);
                let mut rest_partitions = partitions.split_off(i);
                let event = rest.remove(0);
                let partition = rest_partitions.remove(0);
                if let Some(segment_last) = events.last().map(|e| e.position) {
                    let load = loads(conn.as_deref_mut(), own.as_deref_mut())?;
                    let folded = events.len();
                    self.fold_segment(load, &mut writing, events, partitions, &mut chunk)
                        .await?;
                    chunk.events += folded;
                    uncounted -= folded;
                    chunk.last = segment_last;
                }
                let held = std::mem::replace(&mut chunk, Chunk::new(event.position));
                if held.events > 0 || !held.letters.is_empty() {
                    let target = Target::of(conn.as_deref_mut(), own.as_deref_mut(), pipelined);
                    self.write_chunk(target, &mut writing, held).await?;
                }
                self.finish_writing(&mut writing).await?;
                let recorded = event
                    .to_recorded()
                    .with_context(|| format!("event {} does not parse", event.position))?;
                self.apply_batch(
                    conn.as_deref_mut(),
                    vec![recorded],
                    vec![partition],
                    1,
                    event.position,
                )
                .await?;
                uncounted -= 1;
                self.chunk_committed(1, 0);
                (events, partitions) = (rest, rest_partitions);
            }
            let load = loads(conn.as_deref_mut(), own.as_deref_mut())?;
            self.fold_segment(load, &mut writing, events, partitions, &mut chunk)
                .await?;
            chunk.events += uncounted;
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

    /// Folds events of one batch in memory into `chunk`, building the keys of the keyless
    /// tables first when the fold asks for them.
    async fn fold_segment(
        &mut self,
        load: &mut PgConnection,
        writing: &mut Option<Writing>,
        mut events: Vec<RawEvent>,
        mut partitions: Vec<u32>,
        chunk: &mut Chunk,
    ) -> anyhow::Result<()> {
        let mut keyed = false;
        while !self
            .fold_bulk_batch(load, &mut events, &mut partitions, &mut chunk.letters)
            .await?
        {
            if keyed {
                bail!("the bulk fold asked for keys it was given");
            }
            // Building them waits for the chunk being written anyway.
            self.finish_writing(writing).await?;
            let keyless = self.keyless_tables();
            build_missing_indexes(load, &keyless, Only::Unique).await?;
            self.bulk_fold()?.set_keys(true);
            keyed = true;
        }
        Ok(())
    }

    /// Where the first event the fold leaves to `apply` is in `events`.
    fn by_apply_at(&mut self, events: &[RawEvent]) -> anyhow::Result<Option<usize>> {
        let bulk = self.bulk_fold()?;
        Ok(events.iter().position(|e| bulk.by_apply(e)))
    }

    pub(super) fn bulk_fold(&mut self) -> anyhow::Result<&mut Box<dyn BulkFold>> {
        self.bulk
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("the projection has no bulk fold"))
    }

    /// A batch's events of the projection's aggregates (minus excluded ones) and their
    /// partitions.
    pub(super) fn unpack(&self, batch: Vec<RawEntry>) -> (Vec<RawEvent>, Vec<u32>) {
        let mut events = Vec::with_capacity(batch.len());
        let mut partitions = Vec::with_capacity(batch.len());
        for entry in batch {
            if !self.projection.folds(&entry.event.aggregate_type)
                || self.excluded.contains(&entry.event.position)
            {
                continue;
            }
            partitions.push(entry.partition_key % self.partitions.max(1));
            events.push(entry.event);
        }
        (events, partitions)
    }

    /// Folds one batch in memory, leaving out poison events (noted to be parked with the
    /// chunk). False when the fold needs the keys of the keyless tables first.
    pub(super) async fn fold_bulk_batch(
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
    pub(super) async fn write_chunk(
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
                    task: AbortOnDropHandle::new(task),
                    events,
                    parked,
                });
            }
        }
        Ok(())
    }

    /// Waits for the chunk being written, if any, to commit.
    pub(super) async fn finish_writing(
        &mut self,
        writing: &mut Option<Writing>,
    ) -> anyhow::Result<()> {
        let Some(mut w) = writing.take() else {
            return Ok(());
        };
        (&mut w.task)
            .await
            .context("the task writing a chunk stopped")?
            .context("writing a chunk of the rebuild")?;
        self.bulk_fold()?.settle();
        self.chunk_committed(w.events, w.parked);
        Ok(())
    }

    pub(super) fn chunk_committed(&mut self, events: u64, parked: u64) {
        self.done += events;
        self.folded += events;
        self.parked += parked;
        self.report_progress();
    }
}

/// The connection rows are loaded through: the switch's, or the fold's own.
fn loads<'c>(
    switch: Option<&'c mut PgConnection>,
    own: Option<&'c mut PgConnection>,
) -> anyhow::Result<&'c mut PgConnection> {
    match (switch, own) {
        (Some(c), _) | (None, Some(c)) => Ok(c),
        (None, None) => bail!("no connection to load rows through"),
    }
}

/// Where [`Rebuild::write_chunk`] writes.
pub(super) enum Target<'c> {
    /// Into the switch's transaction.
    Switch(&'c mut PgConnection),
    /// In a transaction of its own on the loads' connection, waiting for it.
    Inline(&'c mut PgConnection),
    /// In a transaction of its own, by a task, while the next chunk is folded.
    Task,
}

impl<'c> Target<'c> {
    pub(super) fn of(
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
pub(super) struct Chunk {
    events: usize,
    /// The cursor once the chunk is written.
    last: LogPosition,
    /// Poison events left out of the chunk, parked with it.
    letters: Vec<Letter>,
}

impl Chunk {
    pub(super) fn new(after: LogPosition) -> Self {
        Self {
            events: 0,
            last: after,
            letters: Vec::new(),
        }
    }
}

/// A poison event to park.
pub(super) struct Letter {
    pub(super) partition: u32,
    pub(super) position: LogPosition,
    pub(super) message_id: String,
    pub(super) event: Option<serde_json::Value>,
    pub(super) error: String,
}

impl Letter {
    /// Parks it for `projection` in the caller's transaction (the one saving the cursor past
    /// it).
    pub(super) async fn park(
        &self,
        conn: &mut PgConnection,
        projection: &'static str,
    ) -> anyhow::Result<()> {
        let letter = NewDeadLetter {
            projection,
            partition: self.partition,
            stream_seq: None,
            position: Some(self.position),
            message_id: Some(self.message_id.clone()),
            event: self.event.clone(),
            error: &self.error,
            attempts: 1,
            parked_by: ParkedBy::Rebuild,
        };
        dead_letters::park(conn, &letter).await?;
        Ok(())
    }
}

/// A chunk being committed by a task.
pub(super) struct Writing {
    task: AbortOnDropHandle<anyhow::Result<()>>,
    events: u64,
    parked: u64,
}

/// A chunk's rows, its poison events and the cursor, in the caller's transaction.
pub(super) async fn commit_chunk(
    conn: &mut PgConnection,
    write: Box<dyn BulkWrite>,
    name: &'static str,
    chunk: &Chunk,
    (done, total): (i64, i64),
) -> anyhow::Result<()> {
    write.write(&mut *conn).await?;
    for letter in &chunk.letters {
        letter.park(&mut *conn, name).await?;
    }
    state::save_rebuild_cursor(&mut *conn, name, chunk.last, done, total).await?;
    Ok(())
}
