//! The relay: tails the Postgres log in commit-safe order and publishes it to the stream.
//!
//! While active it runs three things at once, so that neither Postgres nor NATS waits for the
//! other: a reader reads the next batches ahead (each read only needs the previous batch's last
//! position), the publisher keeps one window of pipelined publishes open across batch
//! boundaries (see `bus::Chain`), and a saver stores the cursor behind them.
//!
//! The cursor is stored only after JetStream acknowledged everything up to it, so a crash at
//! any instant at worst leaves it behind what the stream holds; the next relay re-publishes from
//! there and the stream de-duplicates by `Nats-Msg-Id`. One relay per stream is active at a
//! time (an advisory lock); others stand by.

use crate::bus::{Bus, Chain};
use crate::config::RelayConfig;
use crate::message::Outgoing;
use anyhow::{anyhow, Context as _};
use rookery_events::LogPosition;
use rookery_store::log::read_committed_raw;
use rookery_store::relay::{load_cursor, save_cursor, RelayLock};
use rookery_store::KeptConn;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

/// The channel the `events` insert trigger notifies at commit.
pub const NOTIFY_CHANNEL: &str = "rookery_events";

const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the active relay confirms it still holds the lock while busy (it also checks
/// after every error). Losing it only risks duplicate publishes, which the stream absorbs.
const LOCK_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How soon to retry LISTEN after losing it; meanwhile the relay polls.
const LISTEN_RETRY: Duration = Duration::from_secs(5);
/// Batches read ahead of the one being published: one hides the read, a second absorbs a slow
/// one, more would only hold memory.
const READ_AHEAD: usize = 2;
/// How long a relay that stops (or loses its lock) still tries to store its last cursor. Not
/// storing it only means re-publishing duplicates later, so this never holds a shutdown long.
const FINAL_SAVE_LIMIT: Duration = Duration::from_secs(2);

/// Live figures for status, tests and the bench; every change is also recorded through the
/// `metrics` facade (labelled with the stream), which `/metrics` renders.
#[derive(Debug)]
pub struct RelayStats {
    /// Events newly stored on the stream (duplicates of earlier attempts not counted).
    pub published_total: AtomicU64,
    /// Events confirmed on the stream, duplicates included.
    pub relayed_total: AtomicU64,
    pub cursor_txid: AtomicU64,
    pub cursor_gpos: AtomicI64,
    /// This relay holds the lock and is publishing.
    pub active: AtomicBool,
    /// When the last batch was confirmed, or the log last read empty (a caught-up relay is
    /// still alive).
    pub last_batch_unix_ms: AtomicI64,
    /// Times publishing stopped short (a publish or Postgres failed); retried automatically.
    pub failed_batches: AtomicU64,
    /// Cursor saves that reached Postgres.
    pub cursor_saves_total: AtomicU64,
    exported: Exported,
}

/// The same figures as `metrics` handles, registered once (the hot path only adds to them).
#[derive(Debug)]
struct Exported {
    published: metrics::Counter,
    relayed: metrics::Counter,
    failed: metrics::Counter,
    saves: metrics::Counter,
    cursor_txid: metrics::Gauge,
    cursor_gpos: metrics::Gauge,
    active: metrics::Gauge,
    last_batch: metrics::Gauge,
}

impl Exported {
    fn new(stream: &str) -> Self {
        let label = || [("stream", stream.to_string())];
        Self {
            published: metrics::counter!("rookery_relay_events_published_total", &label()),
            relayed: metrics::counter!("rookery_relay_events_confirmed_total", &label()),
            failed: metrics::counter!("rookery_relay_failed_batches_total", &label()),
            saves: metrics::counter!("rookery_relay_cursor_saves_total", &label()),
            cursor_txid: metrics::gauge!("rookery_relay_cursor_txid", &label()),
            cursor_gpos: metrics::gauge!("rookery_relay_cursor_gpos", &label()),
            active: metrics::gauge!("rookery_relay_active", &label()),
            last_batch: metrics::gauge!("rookery_relay_last_batch_timestamp_seconds", &label()),
        }
    }
}

impl RelayStats {
    /// Figures of the relay of `stream`.
    pub fn new(stream: &str) -> Self {
        Self {
            published_total: AtomicU64::new(0),
            relayed_total: AtomicU64::new(0),
            cursor_txid: AtomicU64::new(0),
            cursor_gpos: AtomicI64::new(0),
            active: AtomicBool::new(false),
            last_batch_unix_ms: AtomicI64::new(0),
            failed_batches: AtomicU64::new(0),
            cursor_saves_total: AtomicU64::new(0),
            exported: Exported::new(stream),
        }
    }

    /// The stored cursor as this relay last saw it.
    pub fn cursor(&self) -> LogPosition {
        LogPosition::new(
            self.cursor_txid.load(Ordering::Relaxed),
            self.cursor_gpos.load(Ordering::Relaxed),
        )
    }

    fn set_cursor(&self, p: LogPosition) {
        self.cursor_txid.store(p.txid, Ordering::Relaxed);
        self.cursor_gpos.store(p.gpos, Ordering::Relaxed);
        self.exported.cursor_txid.set(p.txid as f64);
        self.exported.cursor_gpos.set(p.gpos as f64);
    }

    /// `relayed` more events confirmed on the stream, `published` of them new to it.
    fn confirmed(&self, relayed: u64, published: u64) {
        self.relayed_total.fetch_add(relayed, Ordering::Relaxed);
        self.published_total.fetch_add(published, Ordering::Relaxed);
        self.exported.relayed.increment(relayed);
        self.exported.published.increment(published);
    }

    fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::SeqCst);
        self.exported.active.set(if active { 1.0 } else { 0.0 });
    }

    /// A batch was confirmed, or the log read empty.
    fn batch_done(&self) {
        let now = now_ms();
        self.last_batch_unix_ms.store(now, Ordering::Relaxed);
        self.exported.last_batch.set(now as f64 / 1000.0);
    }

    fn failed(&self) {
        self.failed_batches.fetch_add(1, Ordering::Relaxed);
        self.exported.failed.increment(1);
    }

    fn cursor_saved(&self, position: LogPosition) {
        self.set_cursor(position);
        self.cursor_saves_total.fetch_add(1, Ordering::Relaxed);
        self.exported.saves.increment(1);
    }
}

/// Postgres → JetStream.
pub struct Relay {
    pool: PgPool,
    bus: Bus,
    config: RelayConfig,
    stats: Arc<RelayStats>,
    /// [`Relay::relay_once`]'s read of the batch after the one it published, so a caller that
    /// loops over it reads and publishes at the same time.
    ahead: Mutex<Option<ReadAhead>>,
}

struct ReadAhead {
    after: LogPosition,
    batch: AbortOnDropHandle<anyhow::Result<Vec<Outgoing>>>,
}

enum Leadership {
    Shutdown,
    LockLost,
}

/// Why [`Relay::pump`] stopped (it never stops on its own otherwise).
enum Stop {
    LockLost,
    Failed(anyhow::Error),
}

struct Pumped {
    stop: Stop,
    /// The last event confirmed on the stream, when this pump confirmed any.
    confirmed: Option<LogPosition>,
    /// Handed back by the reader for the next pump.
    listener: Option<PgListener>,
}

impl Relay {
    pub fn new(pool: PgPool, bus: Bus, config: RelayConfig) -> Self {
        let stats = Arc::new(RelayStats::new(&bus.config().stream));
        Self {
            pool,
            bus,
            config,
            stats,
            ahead: Mutex::new(None),
        }
    }

    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown` completes: stands by until it holds the relay lock, then relays.
    /// Publishes in flight at shutdown are dropped before their cursor is saved, which is safe:
    /// the next relay re-publishes them and the stream de-duplicates.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let stream = self.bus.config().stream.clone();
        loop {
            let mut lock = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                lock = self.acquire(&stream) => lock,
            };
            tracing::info!(stream = %stream, "relay active");
            self.stats.set_active(true);
            let saver = CursorSaver::spawn(
                self.pool.clone(),
                stream.clone(),
                self.stats.clone(),
                self.config.min_save_interval,
            );
            let end = tokio::select! {
                _ = &mut shutdown => Leadership::Shutdown,
                end = self.lead(&mut lock, &saver) => end,
            };
            // Cleared before the lock goes, so two relays never both report active.
            self.stats.set_active(false);
            // Still under the lock, so a successor starts from the latest cursor.
            saver.finish(FINAL_SAVE_LIMIT).await;
            lock.release(&stream).await;
            match end {
                Leadership::Shutdown => {
                    tracing::info!(stream = %stream, "relay stopped");
                    return Ok(());
                }
                Leadership::LockLost => {
                    tracing::warn!(stream = %stream, "relay lost its lock; standing by");
                }
            }
        }
    }

    /// One batch from the stored cursor, without the lock (tests and benchmarks): returns once
    /// the batch is confirmed on the stream and the cursor stored. Returns how many events it
    /// relayed (duplicates included); 0 when caught up. It also starts reading the next batch,
    /// which the next call uses if the stored cursor is still where this one left it.
    pub async fn relay_once(&self) -> anyhow::Result<u64> {
        let stream = &self.bus.config().stream;
        let cursor = load_cursor(&self.pool, stream)
            .await
            .context("loading the relay cursor")?;
        self.stats.set_cursor(cursor);
        let ahead = self
            .ahead
            .lock()
            .ok()
            .and_then(|mut ahead| ahead.take())
            .filter(|ahead| ahead.after == cursor);
        let batch = match ahead {
            // A read-ahead that found nothing may be stale; read again rather than report
            // "caught up" from it.
            Some(ahead) => match ahead.batch.await {
                Ok(Ok(batch)) if !batch.is_empty() => batch,
                _ => self.read(cursor).await?,
            },
            None => self.read(cursor).await?,
        };
        if batch.len() as i64 >= self.config.batch_size {
            if let Some(last) = batch.last() {
                self.read_ahead(last.position);
            }
        }

        let mut chain = Chain::new(&self.bus);
        let mut published = self.publish(&mut chain, cursor, batch).await;
        if published.is_ok() {
            published = chain.drain().await;
        }
        if let Some(last) = chain.confirmed() {
            save_cursor(&self.pool, stream, last, chain.stored() as i64)
                .await
                .context("saving the relay cursor")?;
            self.stats.set_cursor(last);
            self.stats
                .confirmed(chain.confirmed_count(), chain.stored());
        }
        published?;
        self.stats.batch_done();
        Ok(chain.confirmed_count())
    }

    /// Starts reading the batch after `after` for the next [`Relay::relay_once`].
    fn read_ahead(&self, after: LogPosition) {
        let (pool, bus, limit) = (self.pool.clone(), self.bus.clone(), self.config.batch_size);
        let batch = AbortOnDropHandle::new(tokio::spawn(async move {
            read_batch(&pool, &bus, after, limit).await
        }));
        if let Ok(mut ahead) = self.ahead.lock() {
            *ahead = Some(ReadAhead { after, batch });
        }
    }

    async fn read(&self, after: LogPosition) -> anyhow::Result<Vec<Outgoing>> {
        read_batch(&self.pool, &self.bus, after, self.config.batch_size).await
    }

    /// Retries until this relay holds the lock; says once that it is standing by.
    async fn acquire(&self, stream: &str) -> RelayLock {
        let mut said_standby = false;
        loop {
            match RelayLock::try_acquire(&self.pool, stream).await {
                Ok(Some(lock)) => return lock,
                Ok(None) if !said_standby => {
                    tracing::info!(stream = %stream, "another relay is active; standing by");
                    said_standby = true;
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(stream = %stream, error = %err, "could not try the relay lock")
                }
            }
            tokio::time::sleep(self.config.standby_retry).await;
        }
    }

    /// Relays while the lock is held. Errors are logged and retried with backoff, never
    /// returned: the relay must outlive Postgres and NATS restarts.
    async fn lead(&self, lock: &mut RelayLock, saver: &CursorSaver) -> Leadership {
        let stream = &self.bus.config().stream;
        let mut listener = listen(&self.pool).await;
        let mut from: Option<LogPosition> = None;
        let mut backoff = MIN_BACKOFF;
        let mut lock_check_due = Instant::now() + LOCK_CHECK_INTERVAL;
        loop {
            if Instant::now() >= lock_check_due {
                if !lock.is_held().await {
                    return Leadership::LockLost;
                }
                lock_check_due = Instant::now() + LOCK_CHECK_INTERVAL;
            }
            let start = match from {
                Some(position) => position,
                None => match load_cursor(&self.pool, stream).await {
                    Ok(cursor) => {
                        self.stats.set_cursor(cursor);
                        cursor
                    }
                    Err(err) => {
                        let err = anyhow::Error::new(err).context("loading the relay cursor");
                        self.back_off(&err, &mut backoff).await;
                        lock_check_due = Instant::now();
                        continue;
                    }
                },
            };
            let pumped = self
                .pump(start, listener.take(), lock, saver, &mut lock_check_due)
                .await;
            listener = pumped.listener;
            match (pumped.stop, pumped.confirmed) {
                (Stop::LockLost, _) => return Leadership::LockLost,
                // Part of the log went out and is being saved: carry on after it at once. Each
                // such retry makes progress, so this cannot spin.
                (Stop::Failed(err), Some(confirmed)) if confirmed > start => {
                    self.stats.failed();
                    tracing::warn!(
                        stream = %stream,
                        confirmed = %confirmed,
                        error = format!("{err:#}"),
                        "relay published in part; continuing after the confirmed events"
                    );
                    backoff = MIN_BACKOFF;
                    from = Some(confirmed);
                }
                (Stop::Failed(err), _) => {
                    self.back_off(&err, &mut backoff).await;
                    from = None;
                    // A failure may mean Postgres went away, and the lock with it.
                    lock_check_due = Instant::now();
                }
            }
        }
    }

    async fn back_off(&self, err: &anyhow::Error, backoff: &mut Duration) {
        self.stats.failed();
        tracing::error!(
            stream = %self.bus.config().stream,
            error = format!("{err:#}"),
            retry_in_ms = backoff.as_millis() as u64,
            "relay failed; retrying from the stored cursor"
        );
        tokio::time::sleep(*backoff).await;
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
    }

    /// Publishes the log from `start` as the reader delivers it, until a failure or the loss of
    /// the lock. Confirmed batches go to the saver as they complete; on a failure, so does the
    /// confirmed part of the last one.
    async fn pump(
        &self,
        start: LogPosition,
        listener: Option<PgListener>,
        lock: &mut RelayLock,
        saver: &CursorSaver,
        lock_check_due: &mut Instant,
    ) -> Pumped {
        let (tx, mut rx) = mpsc::channel(READ_AHEAD);
        let reader = AbortOnDropHandle::new(tokio::spawn(read_ahead(
            self.pool.clone(),
            self.bus.clone(),
            self.config.clone(),
            self.stats.clone(),
            start,
            tx,
            listener,
        )));
        let mut chain = Chain::new(&self.bus);
        let mut reported = Reported::default();
        let mut after = start;
        let stop = loop {
            // Batches take precedence over acks: while the log keeps coming, acks are settled
            // as the window fills; once it stops, the rest are settled here.
            let step = tokio::select! {
                biased;
                _ = tokio::time::sleep_until(*lock_check_due) => Step::CheckLock,
                batch = rx.recv() => Step::Batch(batch),
                settled = chain.settle_one(), if chain.outstanding() > 0 => Step::Settled(settled),
            };
            let result = match step {
                Step::CheckLock => {
                    if !lock.is_held().await {
                        break Stop::LockLost;
                    }
                    *lock_check_due = Instant::now() + LOCK_CHECK_INTERVAL;
                    Ok(())
                }
                Step::Batch(Some(Ok(batch))) => {
                    let next = batch.last().map(|last| last.position);
                    let published = self.publish(&mut chain, after, batch).await;
                    after = next.unwrap_or(after);
                    published
                }
                Step::Batch(Some(Err(err))) => Err(err),
                Step::Batch(None) => Err(anyhow!("the relay's log reader stopped")),
                Step::Settled(settled) => settled,
            };
            self.report(&chain, &mut reported, saver);
            if let Err(err) = result {
                break Stop::Failed(err);
            }
        };
        if let Some(confirmed) = chain.confirmed() {
            if Some(confirmed) != reported.saved {
                saver.save(confirmed, chain.stored() - reported.stored_saved);
            }
        }
        // The reader notices the closed channel and hands its listener back.
        drop(rx);
        let listener = reader.await.ok().flatten();
        Pumped {
            stop,
            confirmed: chain.confirmed(),
            listener,
        }
    }

    /// Moves the stats on and hands a newly confirmed batch end to the saver.
    fn report(&self, chain: &Chain, reported: &mut Reported, saver: &CursorSaver) {
        let confirmed = chain.confirmed_count();
        let stored = chain.stored();
        self.stats
            .confirmed(confirmed - reported.confirmed, stored - reported.stored);
        reported.confirmed = confirmed;
        reported.stored = stored;
        if let Some((checkpoint, stored_then)) = chain.checkpoint() {
            if Some(checkpoint) != reported.saved {
                saver.save(checkpoint, stored_then - reported.stored_saved);
                reported.saved = Some(checkpoint);
                reported.stored_saved = stored_then;
                self.stats.batch_done();
            }
        }
    }

    /// Sends one batch read after `after` into the chain (acks settle as the window fills).
    #[tracing::instrument(
        skip_all,
        fields(stream = %self.bus.config().stream, after = %after, events = batch.len())
    )]
    async fn publish(
        &self,
        chain: &mut Chain,
        after: LogPosition,
        batch: Vec<Outgoing>,
    ) -> anyhow::Result<()> {
        let last = batch.len().saturating_sub(1);
        for (i, msg) in batch.into_iter().enumerate() {
            chain.send(msg, i == last).await?;
        }
        tracing::debug!(
            confirmed = chain.confirmed_count(),
            outstanding = chain.outstanding(),
            "relay batch sent"
        );
        Ok(())
    }
}

enum Step {
    CheckLock,
    Batch(Option<anyhow::Result<Vec<Outgoing>>>),
    Settled(anyhow::Result<()>),
}

/// What [`Relay::report`] has passed on so far, in one pump's chain.
#[derive(Default)]
struct Reported {
    confirmed: u64,
    stored: u64,
    saved: Option<LogPosition>,
    stored_saved: u64,
}

/// Up to `limit` committed events after `after`, as messages.
async fn read_batch<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    bus: &Bus,
    after: LogPosition,
    limit: i64,
) -> anyhow::Result<Vec<Outgoing>> {
    let config = bus.config();
    // Each message is built from the row as it arrives, borrowing its text.
    let messages = read_committed_raw(executor, after, limit, |entry| {
        Outgoing::from_raw(entry, &config.subject_prefix, config.partitions)
            .map_err(|err| (entry.position, err))
    })
    .await
    .context("reading committed events")?;
    messages
        .into_iter()
        .map(|msg| {
            msg.map_err(|(position, err)| {
                anyhow!(err).context(format!("encoding the event at {position}"))
            })
        })
        .collect()
}

/// [`read_batch`] on the reader's kept connection.
async fn read_kept(
    kept: &mut KeptConn,
    bus: &Bus,
    after: LogPosition,
    limit: i64,
) -> anyhow::Result<Vec<Outgoing>> {
    let mut conn = kept.take().await.context("reading committed events")?;
    let read = read_batch(&mut *conn, bus, after, limit).await;
    kept.give_back(conn, read.as_ref().err().and_then(|e| e.downcast_ref()));
    read
}

/// The reader: reads the log from `after` batch by batch into `batches`, waiting for a NOTIFY
/// or the poll interval whenever it has caught up. Stops at the first error (sent on) or when
/// the publisher drops its end, and hands back the listener.
async fn read_ahead(
    pool: PgPool,
    bus: Bus,
    config: RelayConfig,
    stats: Arc<RelayStats>,
    mut after: LogPosition,
    batches: mpsc::Sender<anyhow::Result<Vec<Outgoing>>>,
    mut listener: Option<PgListener>,
) -> Option<PgListener> {
    let mut listen_retry_at = Instant::now() + LISTEN_RETRY;
    let mut next_read_at = Instant::now();
    let mut conn = KeptConn::shared(pool.clone());
    loop {
        tokio::select! {
            _ = batches.closed() => return listener,
            _ = tokio::time::sleep_until(next_read_at) => {}
        }
        next_read_at = Instant::now() + config.min_read_interval;
        let read = tokio::select! {
            _ = batches.closed() => return listener,
            read = read_kept(&mut conn, &bus, after, config.batch_size) => read,
        };
        let batch = match read {
            Ok(batch) => batch,
            Err(err) => {
                let _ = batches.send(Err(err)).await;
                return listener;
            }
        };
        let full = batch.len() as i64 >= config.batch_size;
        match batch.last() {
            Some(last) => {
                after = last.position;
                if batches.send(Ok(batch)).await.is_err() {
                    return listener;
                }
            }
            None => stats.batch_done(),
        }
        if full {
            next_read_at = Instant::now();
            continue;
        }
        if listener.is_none() && Instant::now() >= listen_retry_at {
            listener = listen(&pool).await;
            listen_retry_at = Instant::now() + LISTEN_RETRY;
        }
        tokio::select! {
            _ = batches.closed() => return listener,
            _ = wait_for_events(&mut listener, config.poll_interval) => {}
        }
    }
}

/// Waits for a NOTIFY or the poll interval, whichever comes first.
async fn wait_for_events(listener: &mut Option<PgListener>, poll_interval: Duration) {
    let poll = tokio::time::sleep(poll_interval);
    match listener {
        Some(l) => {
            tokio::select! {
                received = l.recv() => {
                    if let Err(err) = received {
                        tracing::warn!(error = %err, "lost LISTEN {NOTIFY_CHANNEL}; polling");
                        *listener = None;
                    }
                }
                _ = poll => {}
            }
        }
        None => poll.await,
    }
}

/// Stores the cursor behind the publisher, which never waits for it: only the latest
/// confirmed position handed over matters, and positions handed over while a save runs are
/// folded into the next one. Leaving the cursor behind the acks is always safe (re-publishing
/// is de-duplicated); saving it ahead of them never happens, because only confirmed positions
/// are handed over. Saves are at least [`RelayConfig::min_save_interval`] apart (20 ms: at
/// most 50 a second), not one per read.
struct CursorSaver {
    latest: watch::Sender<Pending>,
    task: AbortOnDropHandle<()>,
}

#[derive(Clone, Copy, Default)]
struct Pending {
    position: Option<LogPosition>,
    /// Events newly stored on the stream up to `position`, since this saver started.
    stored: u64,
}

impl CursorSaver {
    fn spawn(pool: PgPool, stream: String, stats: Arc<RelayStats>, every: Duration) -> Self {
        let (latest, pending) = watch::channel(Pending::default());
        let task = AbortOnDropHandle::new(tokio::spawn(save_latest(
            pool, stream, stats, pending, every,
        )));
        Self { latest, task }
    }

    /// `position` is confirmed on the stream, with `stored` more events newly stored since
    /// the last position handed over.
    fn save(&self, position: LogPosition, stored: u64) {
        self.latest.send_modify(|pending| {
            pending.position = Some(position);
            pending.stored += stored;
        });
    }

    /// Lets the last save finish, for at most `limit`.
    async fn finish(self, limit: Duration) {
        let Self { latest, task } = self;
        drop(latest);
        let _ = tokio::time::timeout(limit, task).await;
    }
}

async fn save_latest(
    pool: PgPool,
    stream: String,
    stats: Arc<RelayStats>,
    mut pending: watch::Receiver<Pending>,
    every: Duration,
) {
    let mut saved_stored = 0u64;
    let mut backoff = MIN_BACKOFF;
    let mut next_save = Instant::now();
    // Ends once the relay dropped its end and the last position is saved (or the relay gave
    // up waiting and aborted this task).
    while pending.changed().await.is_ok() {
        // Whatever is handed over meanwhile is saved with it; a closed channel still leaves
        // the last value to save.
        tokio::time::sleep_until(next_save).await;
        next_save = Instant::now() + every;
        let Pending { position, stored } = *pending.borrow_and_update();
        let Some(position) = position else { continue };
        let published = i64::try_from(stored - saved_stored).unwrap_or(i64::MAX);
        match save_cursor(&pool, &stream, position, published).await {
            Ok(()) => {
                saved_stored = stored;
                stats.cursor_saved(position);
                backoff = MIN_BACKOFF;
            }
            Err(err) => {
                tracing::warn!(
                    stream = %stream,
                    cursor = %position,
                    error = %err,
                    retry_in_ms = backoff.as_millis() as u64,
                    "could not save the relay cursor; retrying"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                // Retry with whatever is latest by then.
                pending.mark_changed();
            }
        }
    }
}

/// LISTEN on the events channel; `None` (poll only) when that fails.
async fn listen(pool: &PgPool) -> Option<PgListener> {
    let attempt = async {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        Ok::<_, sqlx::Error>(listener)
    };
    match attempt.await {
        Ok(l) => Some(l),
        Err(err) => {
            tracing::warn!(error = %err, "cannot LISTEN {NOTIFY_CHANNEL}; polling only");
            None
        }
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
