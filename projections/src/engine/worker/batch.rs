//! One batch in one transaction: lock and re-read the checkpoint, skip what it covers, apply the
//! rest, park poison, move the checkpoint with the commit; then count, notify and ack.

use super::super::checkpoints::{Advance, BatchTx};
use super::super::dead_letters::{self, NewDeadLetter, ParkedBy};
use super::super::event::PoisonEvent;
use super::partition::PartitionRun;
use super::{BatchOutcome, BatchSummary};
use anyhow::{bail, Context as _};
use rookery_events::RecordedEvent;
use rookery_nats::Delivery;
use tokio::time::Instant;

impl PartitionRun {
    /// One batch in one transaction. Returns without writing when the projection is paused.
    #[tracing::instrument(skip_all, fields(projection = self.name(), partition = self.partition, events = deliveries.len()))]
    pub(super) async fn process(
        &mut self,
        deliveries: &[Delivery],
    ) -> anyhow::Result<BatchOutcome> {
        let mut conn = self
            .conn
            .take()
            .await
            .context("starting the batch transaction")?;
        let shared = &self.shared;
        let name = self.name();
        // Indexes of deliveries found to be poison, with why; bounded by the batch size.
        let mut poison: Vec<(usize, String)> = Vec::new();
        loop {
            // See the module docs for why not waiting for the flush is safe.
            let (mut tx, cp) = BatchTx::begin(conn, name, self.partition)
                .await
                .context("starting the batch transaction")?;
            let Some((cp, paused)) = cp else {
                bail!(
                    "checkpoint row of {name} partition {} is missing",
                    self.partition
                );
            };
            if paused || cp.stream_seq < self.committed_seq {
                let conn = tx
                    .rollback()
                    .await
                    .context("ending the batch transaction")?;
                self.conn.give_back(conn, None);
                return Ok(if paused {
                    BatchOutcome::Paused
                } else {
                    BatchOutcome::Rewound {
                        checkpoint: cp.stream_seq,
                    }
                });
            }
            let mut events: Vec<RecordedEvent> = Vec::with_capacity(deliveries.len());
            // Events of other aggregates are handled by moving past them, undecoded.
            let mut not_ours = 0usize;
            let mut parks: Vec<NewDeadLetter<'_>> = Vec::new();
            let mut done = BatchSummary::default();
            let (mut last_seq, mut last_key) = (cp.stream_seq, cp.position);
            for (i, d) in deliveries.iter().enumerate() {
                match &d.event {
                    Err(_) | Ok(_) if d.stream_seq <= cp.stream_seq => done.skipped += 1,
                    Err(reason) => parks.push(self.dead_letter(d, None, reason, 1)),
                    Ok(event) if cp.covers(d.stream_seq, event.position) => done.skipped += 1,
                    Ok(event) => {
                        last_key = last_key.max(event.position);
                        match poison.iter().find(|(j, _)| *j == i) {
                            Some((_, reason)) => {
                                parks.push(self.dead_letter(d, Some(event), reason, 1))
                            }
                            None if shared.projection.folds(&event.aggregate_type) => {
                                events.push(event.clone())
                            }
                            None => not_ours += 1,
                        }
                    }
                }
                last_seq = last_seq.max(d.stream_seq);
            }
            if !events.is_empty() {
                if let Err(e) = shared
                    .projection
                    .apply(tx.conn(), &shared.tables, &events)
                    .await
                {
                    let Some(p) = PoisonEvent::find(&e) else {
                        return Err(e);
                    };
                    let found = deliveries
                        .iter()
                        .position(|d| d.event.as_ref().is_ok_and(|ev| ev.position == p.position));
                    match found {
                        Some(i) if !poison.iter().any(|(j, _)| *j == i) => {
                            tracing::warn!(projection = name, partition = self.partition, position = %p.position, reason = %p.reason, "poison event; parking it");
                            poison.push((i, p.to_string()));
                            conn = tx.rollback().await.context("rolling back the batch")?;
                            continue;
                        }
                        _ => return Err(e),
                    }
                }
            }
            for letter in &parks {
                dead_letters::park(tx.conn(), letter)
                    .await
                    .context("parking a poison event")?;
            }
            let handled = events.len() + not_ours;
            done.applied = handled as u64;
            done.parked = parks.len() as u64;
            // The checkpoint moves with the commit, in one round trip: the rows every partition
            // shares (counts) stay locked only for that round trip after the writes.
            let advance = (last_seq > cp.stream_seq || last_key > cp.position).then_some(Advance {
                position: last_key,
                stream_seq: last_seq,
                applied: handled as i64,
            });
            let conn = tx
                .commit(advance)
                .await
                .context("committing the batch and its checkpoint")?;
            self.conn.give_back(conn, None);
            tracing::Span::current().record("events", events.len());
            return Ok(BatchOutcome::Committed(done));
        }
    }

    pub(super) fn dead_letter<'a>(
        &'a self,
        d: &Delivery,
        event: Option<&RecordedEvent>,
        error: &'a str,
        attempts: i32,
    ) -> NewDeadLetter<'a> {
        NewDeadLetter {
            projection: self.name(),
            partition: self.partition,
            stream_seq: Some(d.stream_seq),
            position: event.map(|e| e.position),
            message_id: event.map(RecordedEvent::message_id),
            event: event.and_then(|e| serde_json::to_value(e).ok()),
            error,
            attempts,
            parked_by: ParkedBy::Live,
        }
    }

    pub(super) async fn after_commit(
        &mut self,
        deliveries: &[Delivery],
        done: &BatchSummary,
        started: Instant,
    ) {
        self.shared.stats.batch_committed(done, started.elapsed());
        self.failure = None;
        self.backoff = self.shared.config.backoff_min;
        let last = deliveries.iter().map(|d| d.stream_seq).max().unwrap_or(0);
        self.committed_seq = self.committed_seq.max(last);
        if self.single_until.is_some_and(|until| last >= until) {
            self.single_until = None;
        }
        self.ack(deliveries).await;
    }

    /// Acknowledges `deliveries` with one ack. A lost ack only means a redelivery, which the
    /// checkpoint absorbs; but the consumer may be broken, so on failure it starts again from
    /// the checkpoint (and false is returned).
    pub(super) async fn ack(&mut self, deliveries: &[Delivery]) -> bool {
        match rookery_nats::ack_all(self.shared.bus.client(), deliveries).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    projection = self.name(),
                    partition = self.partition,
                    error = format!("{e:#}"),
                    "ack failed; recreating the consumer"
                );
                self.consumer = None;
                false
            }
        }
    }
}
