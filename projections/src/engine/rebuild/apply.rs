//! Folding through the projection's own `apply`, a batch per transaction that also saves the
//! rebuild cursor (in the switch, a savepoint of its transaction). Poison events are parked with
//! the batch that leaves them out.

use super::bulk::Letter;
use super::reader::Reader;
use super::{state, Rebuild, RebuildProgress};
use crate::engine::event::PoisonEvent;
use anyhow::Context as _;
use rookery_events::{LogPosition, RecordedEvent};
use sqlx::PgConnection;

impl<F: FnMut(RebuildProgress) + Send> Rebuild<'_, F> {
    /// Folds `(after, upto]` into the shadow tables. Outside the switch (`conn` is `None`) each
    /// batch is its own transaction saving the cursor; in the switch, batches run in savepoints
    /// of the switch transaction. Returns the new cursor.
    pub(super) async fn fold(
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
            let n = batch.len() as u64;
            let (events, partitions): (Vec<RecordedEvent>, Vec<u32>) = batch
                .into_iter()
                .filter(|e| {
                    self.projection.folds(&e.event.aggregate_type)
                        && !self.excluded.contains(&e.event.position)
                })
                .map(|e| {
                    let partition = e.partition(self.partitions);
                    (e.event, partition)
                })
                .unzip();
            self.apply_batch(conn.as_deref_mut(), events, partitions, n, last)
                .await?;
            cursor = last;
            self.done += n;
            self.folded += n;
            self.report_progress();
        }
        Ok(cursor)
    }

    /// Applies one batch (events of the projection's aggregates, not excluded, each with its
    /// partition) and saves the cursor at `last` with `counted` more events done, parking
    /// poison events and retrying without them.
    pub(super) async fn apply_batch(
        &mut self,
        conn: Option<&mut PgConnection>,
        mut events: Vec<RecordedEvent>,
        mut partitions: Vec<u32>,
        counted: u64,
        last: LogPosition,
    ) -> anyhow::Result<()> {
        let name = self.projection.name();
        let mut outer = conn;
        let mut letters: Vec<Letter> = Vec::new();
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
            match self.projection.apply(&mut tx, &self.shadow, &events).await {
                Ok(()) => {}
                Err(e) => {
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
                    // Dropping `tx` rolls the batch (or its savepoint) back.
                    let event = events.remove(i);
                    letters.push(Letter {
                        partition: partitions.remove(i),
                        position: event.position,
                        message_id: event.message_id(),
                        event: serde_json::to_value(&event).ok(),
                        error: p.to_string(),
                    });
                    continue;
                }
            }
            for letter in &letters {
                letter.park(&mut tx, name).await?;
            }
            let done = i64::try_from(self.done + counted).unwrap_or(i64::MAX);
            let total = i64::try_from(self.total.max(self.done + counted)).unwrap_or(i64::MAX);
            state::save_rebuild_cursor(&mut tx, name, last, done, total).await?;
            tx.commit().await?;
            self.parked += letters.len() as u64;
            return Ok(());
        }
    }
}
