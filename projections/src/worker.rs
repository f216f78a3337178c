//! The live worker: one task per bus partition, each folding its partition's deliveries into the
//! read model, with the checkpoint in the same transaction (DESIGN.md §3.1–3.3, §6).
//!
//! Per partition: take the advisory lock of `(projection, partition)` (standing by while another
//! process holds it), recreate the durable consumer at the checkpoint's stream sequence, then
//! loop: fetch → one transaction that locks and re-reads the checkpoint, applies the deliveries
//! it does not cover, parks poison, moves the checkpoint → commit → ack. Acks come after the
//! commit, so a crash anywhere means a redelivery, which the checkpoint turns into a no-op. The
//! transaction's own statements ride with its `BEGIN` and `COMMIT` ([`BatchTx`]), on a
//! connection the partition keeps while batches follow each other ([`KeptConn`], without the
//! pool's check at every acquire and release), so a batch costs the read model's round trips
//! plus two.
//!
//! Batches commit with `synchronous_commit = off`: the read model is derived data, so instead of
//! waiting for every batch's WAL flush the worker notices when Postgres lost a commit in a crash
//! (the locked checkpoint is behind what this worker committed) and replays from the checkpoint.
//!
//! Side effects (reactors) are gated here, not in the fold: a reactor would run after a batch
//! commits, for the events that batch applied, and rebuilds never reach this code. Events a
//! rebuild covered are below the checkpoint floor and are skipped before that point.

use crate::projection::{PoisonEvent, Projection, TableNames};
use anyhow::{bail, Context as _};
use rookery_events::{LogPosition, RecordedEvent};
use rookery_nats::{Bus, Delivery, PartitionConsumer};
use rookery_store::checkpoints::{self, Advance, BatchTx, LockSession, NewDeadLetter, ParkedBy};
use rookery_store::KeptConn;
use sqlx::PgPool;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How a worker fetches, retries and parks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Deliveries per batch (one transaction).
    pub batch_size: usize,
    /// How long a fetch waits for the first message when the partition is idle. Fetches return
    /// as soon as anything arrives, so this bounds idle polling, not latency.
    pub fetch_wait: Duration,
    /// Least time between the starts of two batches of a partition that keeps up. Under load
    /// events arrive faster than this, and the next batch takes all of them: a bounded delay
    /// that turns hundreds of one-event transactions per second into a few larger ones. A
    /// batch after a full one (catching up) never waits.
    pub min_batch_interval: Duration,
    /// Consecutive failures on the same event before it is parked as poison.
    pub max_attempts: u32,
    /// Backoff after a failure doubles from `backoff_min` up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How often a standby worker tries to take a partition over.
    pub standby_retry: Duration,
    /// How often an active worker confirms it still holds its partition locks.
    pub lock_check_interval: Duration,
    /// How often a paused worker looks whether it was resumed.
    pub pause_poll: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            fetch_wait: Duration::from_secs(1),
            min_batch_interval: Duration::from_millis(3),
            max_attempts: 5,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            standby_retry: Duration::from_secs(1),
            lock_check_interval: Duration::from_secs(5),
            pause_poll: Duration::from_millis(500),
        }
    }
}

/// Counters for metrics, shared with whoever exports them.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Events folded into the read model.
    pub applied_total: AtomicU64,
    /// Deliveries skipped as already applied (redeliveries, events a rebuild covered).
    pub skipped_total: AtomicU64,
    /// Events parked as poison.
    pub parked_total: AtomicU64,
    /// Committed batches.
    pub batches_total: AtomicU64,
    /// Failed (rolled back) batches.
    pub failures_total: AtomicU64,
    /// Wall-clock time of the last committed batch (Unix ms; 0 = never). Metrics only.
    pub last_batch_unix_ms: AtomicI64,
    /// Duration of the last committed batch, in microseconds.
    pub last_batch_micros: AtomicU64,
    /// Partitions this process is currently active on.
    pub active_partitions: AtomicU64,
    /// Woken after every committed batch, for observers that wait for a write to become
    /// visible without polling the read model.
    pub committed: tokio::sync::Notify,
}

/// A projection's live worker.
pub struct ProjectionWorker {
    shared: Arc<Shared>,
}

struct Shared {
    pool: PgPool,
    bus: Bus,
    projection: Arc<dyn Projection>,
    config: WorkerConfig,
    stats: Arc<WorkerStats>,
    locks: LockSession,
    tables: TableNames,
}

/// Runs `projection`'s worker on every partition of `bus` until `shutdown` completes; the
/// batches in flight then commit or roll back before it returns.
pub async fn run_projection(
    pool: PgPool,
    bus: Bus,
    projection: Arc<dyn Projection>,
    config: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    ProjectionWorker::new(pool, bus, projection, config)
        .run(shutdown)
        .await
}

/// Applies everything currently on the stream for `projection` (every partition) and returns
/// how many events it applied. For tests and tools that drive a projection deterministically;
/// no live worker of the projection may run at the same time.
pub async fn run_until_idle(
    pool: &PgPool,
    bus: &Bus,
    projection: Arc<dyn Projection>,
    config: WorkerConfig,
) -> anyhow::Result<u64> {
    ProjectionWorker::new(pool.clone(), bus.clone(), projection, config)
        .run_until_idle()
        .await
}

enum Mode {
    Forever,
    UntilIdle,
}

enum End {
    Shutdown,
    LockLost,
    Idle,
}

impl ProjectionWorker {
    pub fn new(
        pool: PgPool,
        bus: Bus,
        projection: Arc<dyn Projection>,
        config: WorkerConfig,
    ) -> Self {
        let locks = LockSession::new(&pool);
        let tables = TableNames::live(projection.tables());
        let shared = Shared {
            pool,
            bus,
            projection,
            config,
            stats: Arc::new(WorkerStats::default()),
            locks,
            tables,
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    pub fn stats(&self) -> Arc<WorkerStats> {
        self.shared.stats.clone()
    }

    pub fn projection_name(&self) -> &'static str {
        self.shared.projection.name()
    }

    /// Runs until `shutdown` completes. Errors inside a partition are logged and retried, never
    /// returned: the worker must outlive Postgres and NATS restarts. It returns an error only
    /// when a partition task panicked.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let name = self.shared.projection.name();
        let partitions = self.shared.bus.config().partitions.max(1);
        self.warn_on_version_mismatch().await;
        let token = CancellationToken::new();
        // Dropping the set (this future aborted) aborts the partition tasks with it.
        let mut tasks = JoinSet::new();
        for partition in 0..partitions {
            let (shared, token) = (self.shared.clone(), token.clone());
            tasks.spawn(async move { shared.partition_task(partition, token).await });
        }
        tracing::info!(projection = name, partitions, "projection worker started");
        tokio::pin!(shutdown);
        let mut outcome = Ok(());
        tokio::select! {
            () = &mut shutdown => {}
            Some(joined) = tasks.join_next() => {
                if let Err(e) = joined {
                    outcome = Err(anyhow::anyhow!("projection {name}: a partition task failed: {e}"));
                }
            }
        }
        token.cancel();
        while let Some(joined) = tasks.join_next().await {
            if let (Err(e), true) = (joined, outcome.is_ok()) {
                outcome = Err(anyhow::anyhow!(
                    "projection {name}: a partition task failed: {e}"
                ));
            }
        }
        tracing::info!(projection = name, "projection worker stopped");
        outcome
    }

    /// Applies everything on the stream for every partition, then returns the number of events
    /// applied. Fails if another worker holds one of the partitions.
    pub async fn run_until_idle(&self) -> anyhow::Result<u64> {
        let shared = &self.shared;
        let name = shared.projection.name();
        let before = shared.stats.applied_total.load(Ordering::Relaxed);
        let token = CancellationToken::new();
        for partition in 0..shared.bus.config().partitions.max(1) {
            shared.ensure().await?;
            let Some(generation) = shared.locks.try_lock(name, partition).await? else {
                bail!("another worker holds partition {partition} of {name}");
            };
            let mut run = PartitionRun::new(shared.clone(), partition, generation);
            let end = run.run(&token, Mode::UntilIdle).await;
            shared.locks.unlock(name, partition).await;
            if let Err(e) = end {
                return Err(e.context(format!("running {name} partition {partition} until idle")));
            }
        }
        Ok(shared.stats.applied_total.load(Ordering::Relaxed) - before)
    }

    /// Applies `deliveries` of `partition` exactly as the live loop does (one transaction that
    /// locks the checkpoint, skips what it covers, parks poison and moves it), without acking
    /// them. For tests and tools: feeding the same deliveries twice is a redelivery.
    pub async fn apply_deliveries(
        &self,
        partition: u32,
        deliveries: &[Delivery],
    ) -> anyhow::Result<BatchSummary> {
        self.shared.ensure().await?;
        let mut run = PartitionRun::new(self.shared.clone(), partition, 0);
        match run.process(deliveries).await? {
            BatchOutcome::Committed(done) => Ok(done),
            BatchOutcome::Paused => bail!("projection {} is paused", self.shared.projection.name()),
            BatchOutcome::Rewound { checkpoint } => {
                bail!("the checkpoint ({checkpoint}) went back while applying")
            }
        }
    }

    async fn warn_on_version_mismatch(&self) {
        let p = &self.shared.projection;
        if let Ok(Some(state)) = checkpoints::load_state(&self.shared.pool, p.name()).await {
            if state.version != p.version() && state.rebuild.is_none() {
                tracing::warn!(
                    projection = p.name(),
                    tables_version = state.version,
                    code_version = p.version(),
                    "the live tables were built by another version; run `rookery projections rebuild {}`",
                    p.name()
                );
            }
        }
    }
}

impl Shared {
    async fn ensure(&self) -> anyhow::Result<()> {
        let p = &self.projection;
        checkpoints::ensure(
            &self.pool,
            p.name(),
            p.version(),
            self.bus.config().partitions,
        )
        .await
        .with_context(|| format!("registering projection {}", p.name()))
    }

    /// Standby until the partition lock is ours, work while it stays ours, repeat until shutdown.
    async fn partition_task(self: Arc<Self>, partition: u32, token: CancellationToken) {
        let name = self.projection.name();
        let mut said_standby = false;
        let mut backoff = self.config.backoff_min;
        loop {
            if token.is_cancelled() {
                return;
            }
            let attempt = async {
                self.ensure().await?;
                Ok::<_, anyhow::Error>(self.locks.try_lock(name, partition).await?)
            };
            let generation = match attempt.await {
                Ok(Some(generation)) => generation,
                Ok(None) => {
                    if !said_standby {
                        tracing::info!(
                            projection = name,
                            partition,
                            "another worker holds this partition; standing by"
                        );
                        said_standby = true;
                    }
                    if sleep_or_cancel(self.config.standby_retry, &token).await {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(
                        projection = name,
                        partition,
                        error = format!("{e:#}"),
                        "cannot take the partition lock; retrying"
                    );
                    if sleep_or_cancel(backoff, &token).await {
                        return;
                    }
                    backoff = (backoff * 2).min(self.config.backoff_max);
                    continue;
                }
            };
            said_standby = false;
            backoff = self.config.backoff_min;
            tracing::info!(projection = name, partition, "partition active");
            self.stats.active_partitions.fetch_add(1, Ordering::Relaxed);
            let mut run = PartitionRun::new(self.clone(), partition, generation);
            let end = run.run(&token, Mode::Forever).await;
            self.stats.active_partitions.fetch_sub(1, Ordering::Relaxed);
            self.locks.unlock(name, partition).await;
            match end {
                Ok(End::LockLost) => {
                    tracing::warn!(
                        projection = name,
                        partition,
                        "lost the partition lock; standing by"
                    )
                }
                Ok(End::Shutdown | End::Idle) => return,
                Err(e) => tracing::error!(
                    projection = name,
                    partition,
                    error = format!("{e:#}"),
                    "partition stopped"
                ),
            }
        }
    }
}

/// What one committed batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchSummary {
    /// Events folded into the read model.
    pub applied: u64,
    /// Deliveries the checkpoint already covered.
    pub skipped: u64,
    /// Poison events parked.
    pub parked: u64,
}

enum BatchOutcome {
    Committed(BatchSummary),
    Paused,
    /// The checkpoint is behind this worker's last commit: Postgres lost commits (a crash
    /// before their asynchronous flush). Nothing was written; replay from the checkpoint.
    Rewound {
        checkpoint: u64,
    },
}

/// One partition while this process holds its lock.
struct PartitionRun {
    shared: Arc<Shared>,
    partition: u32,
    generation: u64,
    consumer: Option<PartitionConsumer>,
    /// `(first stream_seq, attempts)` of the batch that keeps failing.
    failure: Option<(u64, u32)>,
    /// After a failure, batches hold one delivery until the checkpoint passes this sequence, so
    /// a failure is pinned on the event that causes it.
    single_until: Option<u64>,
    backoff: Duration,
    lock_checked: Instant,
    /// The highest stream sequence this run's batches committed (or the checkpoint's when the
    /// consumer opened).
    committed_seq: u64,
    /// When the next batch may start (see [`WorkerConfig::min_batch_interval`]).
    next_batch_at: Instant,
    /// The batches' connection, kept while batches follow each other.
    conn: KeptConn,
}

impl PartitionRun {
    fn new(shared: Arc<Shared>, partition: u32, generation: u64) -> Self {
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
            shared,
        }
    }

    fn name(&self) -> &'static str {
        self.shared.projection.name()
    }

    async fn run(&mut self, token: &CancellationToken, mode: Mode) -> anyhow::Result<End> {
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
                started + config.min_batch_interval
            };
            match self.process(&deliveries).await {
                Ok(BatchOutcome::Committed(done)) => {
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
        let consumer = shared
            .bus
            .partition_consumer(&durable, self.partition, cp.stream_seq)
            .await?;
        self.consumer = Some(consumer);
        self.committed_seq = cp.stream_seq;
        Ok(())
    }

    /// One batch in one transaction. Returns without writing when the projection is paused.
    #[tracing::instrument(skip_all, fields(projection = self.name(), partition = self.partition, events = deliveries.len()))]
    async fn process(&mut self, deliveries: &[Delivery]) -> anyhow::Result<BatchOutcome> {
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
                            None => events.push(event.clone()),
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
                checkpoints::park(tx.conn(), letter)
                    .await
                    .context("parking a poison event")?;
            }
            done.applied = events.len() as u64;
            done.parked = parks.len() as u64;
            // The checkpoint moves with the commit, in one round trip: the rows every partition
            // shares (counts) stay locked only for that round trip after the writes.
            let advance = (last_seq > cp.stream_seq || last_key > cp.position).then_some(Advance {
                position: last_key,
                stream_seq: last_seq,
                applied: events.len() as i64,
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

    fn dead_letter<'a>(
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

    async fn after_commit(
        &mut self,
        deliveries: &[Delivery],
        done: &BatchSummary,
        started: Instant,
    ) {
        let stats = &self.shared.stats;
        stats
            .applied_total
            .fetch_add(done.applied, Ordering::Relaxed);
        stats
            .skipped_total
            .fetch_add(done.skipped, Ordering::Relaxed);
        stats.parked_total.fetch_add(done.parked, Ordering::Relaxed);
        stats.batches_total.fetch_add(1, Ordering::Relaxed);
        stats
            .last_batch_micros
            .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        stats
            .last_batch_unix_ms
            .store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
        stats.committed.notify_waiters();
        self.failure = None;
        self.backoff = self.shared.config.backoff_min;
        let last = deliveries.iter().map(|d| d.stream_seq).max().unwrap_or(0);
        self.committed_seq = self.committed_seq.max(last);
        if self.single_until.is_some_and(|until| last >= until) {
            self.single_until = None;
        }
        // A lost ack only means a redelivery, which the checkpoint absorbs; but the consumer may
        // be broken, so start it again from the checkpoint.
        if let Err(e) = rookery_nats::ack_all(self.shared.bus.client(), deliveries).await {
            tracing::warn!(
                projection = self.name(),
                partition = self.partition,
                error = format!("{e:#}"),
                "ack failed; recreating the consumer"
            );
            self.consumer = None;
        }
    }

    /// Logs, counts and backs off after a rolled-back batch; parks the event after
    /// `max_attempts` consecutive failures on it. Returns true on shutdown.
    async fn on_failure(
        &mut self,
        deliveries: &[Delivery],
        error: anyhow::Error,
        token: &CancellationToken,
    ) -> bool {
        let config = self.shared.config.clone();
        let name = self.name();
        self.shared
            .stats
            .failures_total
            .fetch_add(1, Ordering::Relaxed);
        let Some(first) = deliveries.first() else {
            return false;
        };
        let transient = is_transient(&error);
        // Connection losses, deadlocks and serialization failures say nothing about the event,
        // so they never count towards parking it.
        let attempts = match (transient, self.failure) {
            (true, Some((seq, n))) if seq == first.stream_seq => n,
            (true, _) => 0,
            (false, Some((seq, n))) if seq == first.stream_seq => n + 1,
            (false, _) => 1,
        };
        if attempts > 0 {
            self.failure = Some((first.stream_seq, attempts));
        }
        let message = format!("{error:#}");
        tracing::error!(projection = name, partition = self.partition, stream_seq = first.stream_seq, attempts, transient, error = %message, "batch failed and was rolled back");
        let _ = checkpoints::record_failure(
            &self.shared.pool,
            name,
            self.partition,
            i32::try_from(attempts).unwrap_or(i32::MAX),
            &message,
        )
        .await;
        let last = deliveries
            .iter()
            .map(|d| d.stream_seq)
            .max()
            .unwrap_or(first.stream_seq);
        self.single_until = Some(self.single_until.map_or(last, |u| u.max(last)));
        // Park only a delivery that failed alone, so an innocent neighbour is never blamed.
        if attempts >= config.max_attempts && deliveries.len() == 1 {
            match self.park(first, &message, attempts).await {
                Ok(()) => {
                    self.failure = None;
                    self.shared
                        .stats
                        .parked_total
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        projection = name,
                        partition = self.partition,
                        stream_seq = first.stream_seq,
                        attempts,
                        "parked the event after repeated failures"
                    );
                }
                Err(e) => tracing::error!(
                    projection = name,
                    partition = self.partition,
                    error = format!("{e:#}"),
                    "could not park the event"
                ),
            }
        }
        self.consumer = None;
        self.back_off(token).await
    }

    /// Parks one delivery and moves the checkpoint past it, in one transaction.
    async fn park(&self, d: &Delivery, error: &str, attempts: u32) -> anyhow::Result<()> {
        let name = self.name();
        let conn = self.shared.pool.acquire().await?;
        let (mut tx, cp) = BatchTx::begin(conn, name, self.partition).await?;
        let Some((cp, _)) = cp else {
            bail!(
                "checkpoint row of {name} partition {} is missing",
                self.partition
            );
        };
        let key = d.event.as_ref().ok().map(|e| e.position);
        if d.stream_seq <= cp.stream_seq || key.is_some_and(|k| cp.covers(d.stream_seq, k)) {
            tx.rollback().await?;
            return Ok(());
        }
        let letter = self.dead_letter(
            d,
            d.event.as_ref().ok(),
            error,
            i32::try_from(attempts).unwrap_or(i32::MAX),
        );
        checkpoints::park(tx.conn(), &letter).await?;
        tx.commit(Some(Advance {
            position: key.map_or(cp.position, |k| k.max(cp.position)),
            stream_seq: d.stream_seq,
            applied: 0,
        }))
        .await?;
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
    fn rewind(&mut self, checkpoint: u64) {
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
            match checkpoints::load_state(&self.shared.pool, self.name()).await {
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
    async fn back_off(&mut self, token: &CancellationToken) -> bool {
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(self.shared.config.backoff_max);
        sleep_or_cancel(wait, token).await
    }
}

/// Returns true when cancelled first.
async fn sleep_or_cancel(wait: Duration, token: &CancellationToken) -> bool {
    tokio::select! {
        () = token.cancelled() => true,
        () = tokio::time::sleep(wait) => false,
    }
}

/// Errors that say nothing about the events being applied: the database went away, a deadlock
/// or serialization failure, a timeout.
pub(crate) fn is_transient(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| match cause.downcast_ref::<sqlx::Error>() {
            Some(
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed,
            ) => true,
            Some(sqlx::Error::Database(db)) => db.code().is_some_and(|code| {
                matches!(
                    &*code,
                    "40001" | "40P01" | "55P03" | "57014" | "57P01" | "57P02" | "57P03" | "53300"
                ) || code.starts_with("08")
            }),
            _ => false,
        })
}
