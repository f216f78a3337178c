//! One partition while this process holds its lock: the fetch loop, the durable consumer at the
//! checkpoint, raising the floor when idle, pauses, and noticing commits Postgres lost.
//!
//! A batch holding only other aggregates' events is acknowledged without a transaction: the
//! checkpoint moves past it with the next batch that commits, once [`CHECKPOINT_DEFER`] has
//! passed, or when the partition goes idle. Read-your-writes and lag count only the events a
//! model folds, so they do not wait for that; a restart before it replays those events from the
//! checkpoint, and they are moved past again.

use super::{checkpoints, sleep_or_cancel, BatchOutcome, End, Mode, Shared};
use crate::engine::state;
use anyhow::{bail, Context as _};
use rookery_events::LogPosition;
use rookery_nats::{Delivery, PartitionConsumer};
use rookery_store::KeptConn;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One partition while this process holds its lock.
pub(super) struct PartitionRun {
    pub(super) shared: Arc<Shared>,
    pub(super) partition: u32,
    pub(super) generation: u64,
    pub(super) consumer: Option<PartitionConsumer>,
    /// `(first stream_seq, attempts)` of the batch that keeps failing.
    pub(super) failure: Option<(u64, u32)>,
    /// After a failure, batches hold one delivery until the checkpoint passes this sequence, so
    /// a failure is pinned on the event that causes it.
    pub(super) single_until: Option<u64>,
    pub(super) backoff: Duration,
    pub(super) lock_checked: Instant,
    /// The highest stream sequence this run's batches committed (or the checkpoint's when the
    /// consumer opened).
    pub(super) committed_seq: u64,
    /// When the next batch may start (see [`WorkerConfig::batch_interval`]).
    pub(super) next_batch_at: Instant,
    /// The batches' connection, kept while batches follow each other.
    pub(super) conn: KeptConn,
    /// Deliveries moved past (acknowledged) whose checkpoint is not written yet.
    pub(super) deferred: Option<Deferred>,
}

/// How long a checkpoint may stay behind events moved past without a transaction.
pub(super) const CHECKPOINT_DEFER: Duration = Duration::from_millis(500);

/// Events moved past without a transaction since the checkpoint was last written.
#[derive(Clone, Copy, Debug)]
pub(super) struct Deferred {
    since: Instant,
    stream_seq: u64,
    position: LogPosition,
}

impl PartitionRun {
    pub(super) fn new(shared: Arc<Shared>, partition: u32, generation: u64) -> Self {
        let backoff = shared.config.backoff_min;
        Self {
            partition,
            generation,
            consumer: None,
            failure: None,
            single_until: None,
            backoff,
            lock_checked: Instant::now(),
            committed_seq: 0,
            next_batch_at: Instant::now(),
            conn: KeptConn::shared(shared.pool.clone()),
            deferred: None,
            shared,
        }
    }

    pub(super) fn name(&self) -> &'static str {
        self.shared.projection.name()
    }

    pub(super) async fn run(
        &mut self,
        token: &CancellationToken,
        mode: Mode,
    ) -> anyhow::Result<End> {
        let config = self.shared.config.clone();
        let idle_wait = match mode {
            Mode::Forever => config.fetch_wait,
            Mode::UntilIdle => config.fetch_wait.min(Duration::from_millis(50)),
        };
        loop {
            if token.is_cancelled() {
                return Ok(End::Shutdown);
            }
            if self.shared.locks.generation() != self.generation {
                return Ok(End::LockLost);
            }
            if self.lock_checked.elapsed() >= config.lock_check_interval {
                if !self.shared.locks.is_held(self.generation).await {
                    return Ok(End::LockLost);
                }
                self.lock_checked = Instant::now();
            }
            if self.consumer.is_none() {
                if let Err(e) = self.open_consumer().await {
                    if let Mode::UntilIdle = mode {
                        return Err(e);
                    }
                    tracing::warn!(
                        projection = self.name(),
                        partition = self.partition,
                        error = format!("{e:#}"),
                        "cannot open the consumer; retrying"
                    );
                    if self.back_off(token).await {
                        return Ok(End::Shutdown);
                    }
                    continue;
                }
            }
            let max = if self.single_until.is_some() {
                1
            } else {
                config.batch_size.max(1)
            };
            if Instant::now() < self.next_batch_at {
                tokio::select! {
                    () = token.cancelled() => return Ok(End::Shutdown),
                    () = tokio::time::sleep_until(self.next_batch_at) => {}
                }
            }
            let Some(consumer) = self.consumer.as_mut() else {
                continue;
            };
            let fetched = tokio::select! {
                () = token.cancelled() => return Ok(End::Shutdown),
                fetched = consumer.fetch(max, idle_wait) => fetched,
            };
            let deliveries = match fetched {
                Ok(d) => d,
                Err(e) => {
                    if let Mode::UntilIdle = mode {
                        return Err(e.context("fetching"));
                    }
                    tracing::warn!(
                        projection = self.name(),
                        partition = self.partition,
                        error = format!("{e:#}"),
                        "fetch failed; recreating the consumer"
                    );
                    self.consumer = None;
                    if self.back_off(token).await {
                        return Ok(End::Shutdown);
                    }
                    continue;
                }
            };
            if deliveries.is_empty() {
                if let Err(e) = self.write_deferred().await {
                    tracing::debug!(
                        projection = self.name(),
                        partition = self.partition,
                        error = format!("{e:#}"),
                        "could not write the deferred checkpoint"
                    );
                }
                // Idle for a whole fetch wait: the kept connection goes back to the pool.
                self.conn.release();
                // Read before asking the consumer: if it is drained (nothing left at the server,
                // nothing delivered that was not fetched), every event up to this cursor is on
                // the stream and was handled.
                let relay_cursor = rookery_store::relay::load_cursor(
                    &self.shared.pool,
                    &self.shared.bus.config().stream,
                )
                .await
                .ok();
                let drained = match self.consumer.as_mut() {
                    Some(c) => c.drained().await.ok(),
                    None => None,
                };
                if drained == Some(true) {
                    if let Some(cursor) = relay_cursor {
                        self.raise_floor(cursor).await;
                    }
                    if let Mode::UntilIdle = mode {
                        return Ok(End::Idle);
                    }
                }
                continue;
            }
            let started = Instant::now();
            self.next_batch_at = if deliveries.len() >= max {
                started
            } else {
                started + config.batch_interval(self.shared.projection.freshness())
            };
            if self.move_past(&deliveries).await {
                continue;
            }
            match self.process(&deliveries).await {
                Ok(BatchOutcome::Committed(done)) => {
                    self.deferred = None;
                    self.after_commit(&deliveries, &done, started).await;
                }
                Ok(BatchOutcome::Rewound { checkpoint }) => self.rewind(checkpoint),
                Ok(BatchOutcome::Paused) => {
                    if let Mode::UntilIdle = mode {
                        bail!("projection {} is paused", self.name());
                    }
                    // Nothing was applied; the consumer restarts from the checkpoint on resume.
                    self.consumer = None;
                    if self.wait_while_paused(token).await {
                        return Ok(End::Shutdown);
                    }
                }
                Err(e) => {
                    if self.on_failure(&deliveries, e, token).await {
                        return Ok(End::Shutdown);
                    }
                }
            }
        }
    }

    /// Acknowledges a batch of only other aggregates' events without a transaction (see the
    /// module docs). False when the batch needs one: an event of this model's, one that does
    /// not decode, a failure being pinned down, or a checkpoint deferred for too long.
    async fn move_past(&mut self, deliveries: &[Delivery]) -> bool {
        if self.single_until.is_some() || self.failure.is_some() {
            return false;
        }
        if self
            .deferred
            .is_some_and(|d| d.since.elapsed() >= CHECKPOINT_DEFER)
        {
            return false;
        }
        let mut last = (0, LogPosition::ZERO);
        for d in deliveries {
            match &d.event {
                Ok(e) if !self.shared.projection.folds(&e.aggregate_type) => {
                    last = (last.0.max(d.stream_seq), last.1.max(e.position));
                }
                _ => return false,
            }
        }
        if !self.ack(deliveries).await {
            // The consumer restarts at the checkpoint, before everything moved past.
            self.deferred = None;
            return true;
        }
        self.shared.stats.moved_past(deliveries.len() as u64);
        let since = self.deferred.map_or_else(Instant::now, |d| d.since);
        let (seq, position) = match self.deferred {
            Some(d) => (d.stream_seq.max(last.0), d.position.max(last.1)),
            None => last,
        };
        self.deferred = Some(Deferred {
            since,
            stream_seq: seq,
            position,
        });
        true
    }

    /// Writes the checkpoint past the events moved past, if any.
    async fn write_deferred(&mut self) -> anyhow::Result<()> {
        let Some(d) = self.deferred else {
            return Ok(());
        };
        let conn = self.conn.take().await?;
        let (tx, cp) = checkpoints::BatchTx::begin(conn, self.name(), self.partition).await?;
        let advance = match cp {
            Some((cp, _)) if d.stream_seq > cp.stream_seq => Some(checkpoints::Advance {
                position: d.position.max(cp.position),
                stream_seq: d.stream_seq,
                applied: 0,
            }),
            _ => None,
        };
        let conn = tx.commit(advance).await?;
        self.conn.give_back(conn, None);
        self.committed_seq = self.committed_seq.max(d.stream_seq);
        self.deferred = None;
        Ok(())
    }

    /// (Re)creates the durable consumer at the checkpoint.
    async fn open_consumer(&mut self) -> anyhow::Result<()> {
        let shared = &self.shared;
        let name = self.name();
        let mut cp = checkpoints::load(&shared.pool, name, self.partition)
            .await
            .context("loading the checkpoint")?;
        let stream = shared.bus.stream_state().await?;
        if cp.stream_seq > stream.last_seq {
            // The stream was recreated and numbers from 1 again. The log-key part of the
            // checkpoint still recognises everything already applied.
            tracing::warn!(
                projection = name,
                partition = self.partition,
                checkpoint_seq = cp.stream_seq,
                stream_last_seq = stream.last_seq,
                "stream is behind the checkpoint (recreated?); restarting from its beginning"
            );
            checkpoints::reset_stream_seq(&shared.pool, name, self.partition).await?;
            cp.stream_seq = 0;
        } else if stream.first_seq > cp.stream_seq.saturating_add(1) && stream.messages > 0 {
            tracing::error!(projection = name, partition = self.partition, checkpoint_seq = cp.stream_seq, stream_first_seq = stream.first_seq, "the stream no longer holds messages after the checkpoint; events may be missing until the projection is rebuilt");
        }
        let durable = format!(
            "{}_{}_p{}",
            shared.bus.config().stream,
            name,
            self.partition
        );
        let consumer = if shared.projection.in_log_order() {
            shared.bus.log_consumer(&durable, cp.stream_seq).await?
        } else {
            shared
                .bus
                .partition_consumer(&durable, self.partition, cp.stream_seq)
                .await?
        };
        self.consumer = Some(consumer);
        self.committed_seq = cp.stream_seq;
        Ok(())
    }

    /// Raises the floor to the relay's cursor once the partition is idle. Also how an idle
    /// partition notices lost commits: then it replays from the checkpoint instead.
    async fn raise_floor(&mut self, floor: LogPosition) {
        let shared = &self.shared;
        let result = async {
            let mut conn = shared.pool.acquire().await?;
            checkpoints::raise_floor(
                &mut conn,
                self.name(),
                self.partition,
                floor,
                self.committed_seq,
            )
            .await
        }
        .await;
        match result {
            Ok(Some(checkpoint)) if checkpoint < self.committed_seq => {
                self.rewind(checkpoint);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(projection = self.name(), partition = self.partition, error = %e, "could not raise the floor");
            }
        }
    }

    /// Postgres lost commits of this worker (a crash before their asynchronous flush): start
    /// the consumer again at the checkpoint so they are applied again.
    pub(super) fn rewind(&mut self, checkpoint: u64) {
        tracing::warn!(
            projection = self.name(),
            partition = self.partition,
            checkpoint,
            committed = self.committed_seq,
            "Postgres lost committed batches (crash before their flush); replaying from the checkpoint"
        );
        self.consumer = None;
    }

    /// Returns true on shutdown.
    async fn wait_while_paused(&self, token: &CancellationToken) -> bool {
        tracing::info!(
            projection = self.name(),
            partition = self.partition,
            "paused"
        );
        loop {
            if sleep_or_cancel(self.shared.config.pause_poll, token).await {
                return true;
            }
            match state::load_state(&self.shared.pool, self.name()).await {
                Ok(Some(state)) if state.paused => {}
                Ok(_) => {
                    tracing::info!(
                        projection = self.name(),
                        partition = self.partition,
                        "resumed"
                    );
                    return false;
                }
                Err(_) => {}
            }
        }
    }

    /// Sleeps the current backoff and doubles it. Returns true on shutdown.
    pub(super) async fn back_off(&mut self, token: &CancellationToken) -> bool {
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(self.shared.config.backoff_max);
        sleep_or_cancel(wait, token).await
    }
}
