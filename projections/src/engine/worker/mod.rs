//! The live worker: one task per bus partition, each folding its partition's deliveries into the
//! read model, with the checkpoint in the same transaction (docs/architecture.md, guarantees 1–3).
//!
//! Per partition: take the advisory lock of `(projection, partition)` (standing by while another
//! process holds it), recreate the durable consumer at the checkpoint's stream sequence, then
//! loop: fetch → one transaction that locks and re-reads the checkpoint, applies the deliveries
//! it does not cover, parks poison, moves the checkpoint → commit → ack. Acks come after the
//! commit, so a crash anywhere means a redelivery, which the checkpoint turns into a no-op. The
//! transaction's own statements ride with its `BEGIN` and `COMMIT`
//! ([`BatchTx`](super::checkpoints::BatchTx)), on a connection the partition keeps while batches
//! follow each other ([`KeptConn`](rookery_store::KeptConn), without the
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
//!
//! # Layout
//! - this module: [`WorkerConfig`], [`WorkerStats`], [`ProjectionWorker`] and the task per
//!   partition that takes its lock and stands by while another process holds it.
//! - `partition`: one partition while it is ours: the fetch loop, the consumer, floors, pauses.
//! - `batch`: one batch in one transaction, and what follows its commit (stats, acks).
//! - `failure`: a rolled-back batch: backoff, retries pinned on one event, parking.

mod batch;
mod failure;
mod partition;

use super::checkpoints;
use super::locks::LockSession;
use super::projection::{partitions_of, Freshness, Projection, TableNames};
use super::state;
use anyhow::{bail, Context as _};
use partition::PartitionRun;
use rookery_nats::{Bus, Delivery};
use sqlx::PgPool;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
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
    /// The same for a [`Freshness::Relaxed`] projection.
    pub relaxed_batch_interval: Duration,
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

impl WorkerConfig {
    /// Least time between the starts of two batches of a projection of `freshness`.
    pub fn batch_interval(&self, freshness: Freshness) -> Duration {
        match freshness {
            Freshness::Live => self.min_batch_interval,
            Freshness::Relaxed => self.relaxed_batch_interval,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            fetch_wait: Duration::from_secs(1),
            min_batch_interval: Duration::from_millis(3),
            relaxed_batch_interval: Duration::from_millis(25),
            max_attempts: 5,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            standby_retry: Duration::from_secs(1),
            lock_check_interval: Duration::from_secs(5),
            pause_poll: Duration::from_millis(500),
        }
    }
}

/// Counters for status, tests and the bench, shared with whoever watches them; every change is
/// also recorded through the `metrics` facade (labelled with the projection), which `/metrics`
/// renders.
#[derive(Debug)]
pub struct WorkerStats {
    /// Events handled: folded into the read model, or moved past as another model's.
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
    /// Durations of every committed batch, summed (microseconds).
    pub batch_micros_total: AtomicU64,
    /// Partitions this process is currently active on.
    pub active_partitions: AtomicU64,
    /// Woken after every committed batch, for observers that wait for a write to become
    /// visible without polling the read model.
    pub committed: tokio::sync::Notify,
    exported: Exported,
}

/// The same figures as `metrics` handles, registered once (batches only add to them).
#[derive(Debug)]
struct Exported {
    batches: metrics::Counter,
    applied: metrics::Counter,
    skipped: metrics::Counter,
    parked: metrics::Counter,
    failures: metrics::Counter,
    batch_seconds: metrics::Histogram,
    active_partitions: metrics::Gauge,
}

impl WorkerStats {
    /// Figures of `projection`'s worker in this process.
    pub fn new(projection: &'static str) -> Self {
        let label = [("projection", projection)];
        Self {
            applied_total: AtomicU64::new(0),
            skipped_total: AtomicU64::new(0),
            parked_total: AtomicU64::new(0),
            batches_total: AtomicU64::new(0),
            failures_total: AtomicU64::new(0),
            last_batch_unix_ms: AtomicI64::new(0),
            last_batch_micros: AtomicU64::new(0),
            batch_micros_total: AtomicU64::new(0),
            active_partitions: AtomicU64::new(0),
            committed: tokio::sync::Notify::new(),
            exported: Exported {
                batches: metrics::counter!("rookery_projection_batches_total", &label),
                applied: metrics::counter!("rookery_projection_events_applied_total", &label),
                skipped: metrics::counter!("rookery_projection_events_skipped_total", &label),
                parked: metrics::counter!("rookery_projection_events_parked_total", &label),
                failures: metrics::counter!("rookery_projection_batch_failures_total", &label),
                batch_seconds: metrics::histogram!(
                    "rookery_projection_batch_duration_seconds",
                    &label
                ),
                active_partitions: metrics::gauge!("rookery_projection_active_partitions", &label),
            },
        }
    }

    /// A batch committed after `elapsed`; observers waiting for a write are woken.
    fn batch_committed(&self, done: &BatchSummary, elapsed: Duration) {
        self.applied_total
            .fetch_add(done.applied, Ordering::Relaxed);
        self.skipped_total
            .fetch_add(done.skipped, Ordering::Relaxed);
        self.parked_total.fetch_add(done.parked, Ordering::Relaxed);
        self.batches_total.fetch_add(1, Ordering::Relaxed);
        self.last_batch_micros
            .store(elapsed.as_micros() as u64, Ordering::Relaxed);
        self.batch_micros_total
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        self.last_batch_unix_ms
            .store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
        let e = &self.exported;
        e.batches.increment(1);
        e.applied.increment(done.applied);
        e.skipped.increment(done.skipped);
        e.parked.increment(done.parked);
        e.batch_seconds.record(elapsed.as_secs_f64());
        self.committed.notify_waiters();
    }

    /// Events of other aggregates moved past without a transaction (see `partition`).
    fn moved_past(&self, events: u64) {
        self.applied_total.fetch_add(events, Ordering::Relaxed);
        self.exported.applied.increment(events);
    }

    fn batch_failed(&self) {
        self.failures_total.fetch_add(1, Ordering::Relaxed);
        self.exported.failures.increment(1);
    }

    /// An event parked outside a batch (after repeated failures).
    fn parked_one(&self) {
        self.parked_total.fetch_add(1, Ordering::Relaxed);
        self.exported.parked.increment(1);
    }

    fn partition_active(&self, active: bool) {
        if active {
            self.active_partitions.fetch_add(1, Ordering::Relaxed);
            self.exported.active_partitions.increment(1.0);
        } else {
            self.active_partitions.fetch_sub(1, Ordering::Relaxed);
            self.exported.active_partitions.decrement(1.0);
        }
    }
}

/// What one committed batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchSummary {
    /// Events handled: folded into the read model, or moved past as another model's.
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
        let stats = Arc::new(WorkerStats::new(projection.name()));
        let shared = Shared {
            pool,
            bus,
            projection,
            config,
            stats,
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
        let partitions = self.shared.partitions();
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
        for partition in 0..shared.partitions() {
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
        if let Ok(Some(state)) = state::load_state(&self.shared.pool, p.name()).await {
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
    /// The partitions this projection is worked in (one for a projection in log order).
    fn partitions(&self) -> u32 {
        partitions_of(self.projection.as_ref(), self.bus.config().partitions)
    }

    async fn ensure(&self) -> anyhow::Result<()> {
        let p = &self.projection;
        checkpoints::ensure(&self.pool, p.name(), p.version(), self.partitions())
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
            self.stats.partition_active(true);
            let mut run = PartitionRun::new(self.clone(), partition, generation);
            let end = run.run(&token, Mode::Forever).await;
            self.stats.partition_active(false);
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

/// Returns true when cancelled first.
async fn sleep_or_cancel(wait: Duration, token: &CancellationToken) -> bool {
    tokio::select! {
        () = token.cancelled() => true,
        () = tokio::time::sleep(wait) => false,
    }
}
