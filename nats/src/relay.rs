//! The relay: tails the Postgres log in commit-safe order and publishes it to the stream.
//!
//! Its cursor is stored in Postgres only after JetStream acknowledged everything up to it, so
//! a crash at any instant at worst re-publishes a batch, which the stream de-duplicates by
//! `Nats-Msg-Id`. One relay per stream is active at a time (an advisory lock); others stand by.

use crate::bus::Bus;
use crate::config::RelayConfig;
use anyhow::Context as _;
use rookery_events::LogPosition;
use rookery_store::log::read_committed;
use rookery_store::relay::{load_cursor, save_cursor, RelayLock};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The channel the `events` insert trigger notifies at commit.
pub const NOTIFY_CHANNEL: &str = "rookery_events";

const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the active relay confirms it still holds the lock while busy (it also checks
/// after every error). Losing it only risks duplicate publishes, which the stream absorbs.
const LOCK_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How soon to retry LISTEN after losing it; meanwhile the relay polls.
const LISTEN_RETRY: Duration = Duration::from_secs(5);

/// Live figures for status and metrics.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Events newly stored on the stream (duplicates of earlier attempts not counted).
    pub published_total: AtomicU64,
    /// Events confirmed on the stream, duplicates included: how far the cursor moved.
    pub relayed_total: AtomicU64,
    pub cursor_txid: AtomicU64,
    pub cursor_gpos: AtomicI64,
    /// This relay holds the lock and is publishing.
    pub active: AtomicBool,
    /// When the last batch finished (also an empty one: a caught-up relay is still alive).
    pub last_batch_unix_ms: AtomicI64,
    /// Batches that stopped short (a publish or Postgres failed); retried automatically.
    pub failed_batches: AtomicU64,
}

impl RelayStats {
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
    }
}

/// Postgres → JetStream.
pub struct Relay {
    pool: PgPool,
    bus: Bus,
    config: RelayConfig,
    stats: Arc<RelayStats>,
}

/// What one batch did.
struct Batch {
    /// Events read from the log.
    read: usize,
    /// Events confirmed on the stream (all of `read` unless `error`).
    relayed: usize,
    /// The cursor after the batch (saved when anything was relayed).
    cursor: LogPosition,
    /// Why publishing stopped short; the confirmed prefix is saved regardless.
    error: Option<anyhow::Error>,
}

enum Leadership {
    Shutdown,
    LockLost,
}

impl Relay {
    pub fn new(pool: PgPool, bus: Bus, config: RelayConfig) -> Self {
        Self {
            pool,
            bus,
            config,
            stats: Arc::new(RelayStats::default()),
        }
    }

    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown` completes: stands by until it holds the relay lock, then relays.
    /// A batch in flight at shutdown is dropped before its cursor is saved, which is safe: the
    /// next relay re-publishes it and the stream de-duplicates.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let stream = self.bus.config().stream.clone();
        loop {
            let mut lock = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                lock = self.acquire(&stream) => lock,
            };
            tracing::info!(stream = %stream, "relay active");
            self.stats.active.store(true, Ordering::SeqCst);
            let end = tokio::select! {
                _ = &mut shutdown => Leadership::Shutdown,
                end = self.lead(&mut lock) => end,
            };
            // Cleared before the lock goes, so two relays never both report active.
            self.stats.active.store(false, Ordering::SeqCst);
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

    /// One batch from the stored cursor, without the lock (tests and benchmarks). Returns how
    /// many events it relayed (confirmed on the stream, duplicates included); 0 when caught up.
    pub async fn relay_once(&self) -> anyhow::Result<u64> {
        let cursor = load_cursor(&self.pool, &self.bus.config().stream)
            .await
            .context("loading the relay cursor")?;
        self.stats.set_cursor(cursor);
        let batch = self.relay_batch(cursor).await?;
        match batch.error {
            Some(err) => Err(err),
            None => Ok(batch.relayed as u64),
        }
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

    /// Relays while the lock is held. Errors are logged and retried from the stored cursor
    /// with backoff, never returned: the relay must outlive Postgres and NATS restarts.
    async fn lead(&self, lock: &mut RelayLock) -> Leadership {
        let mut listener = listen(&self.pool).await;
        let mut listen_retry_at = Instant::now() + LISTEN_RETRY;
        let mut cursor: Option<LogPosition> = None;
        let mut backoff = MIN_BACKOFF;
        let mut lock_check_due = Instant::now() + LOCK_CHECK_INTERVAL;
        loop {
            if Instant::now() >= lock_check_due {
                if !lock.is_held().await {
                    return Leadership::LockLost;
                }
                lock_check_due = Instant::now() + LOCK_CHECK_INTERVAL;
            }
            let result = match cursor {
                Some(c) => self.relay_batch(c).await,
                None => match load_cursor(&self.pool, &self.bus.config().stream).await {
                    Ok(c) => {
                        self.stats.set_cursor(c);
                        self.relay_batch(c).await
                    }
                    Err(err) => Err(anyhow::Error::new(err).context("loading the relay cursor")),
                },
            };
            match result {
                Ok(Batch {
                    read,
                    relayed,
                    cursor: next,
                    error: None,
                }) => {
                    debug_assert_eq!(read, relayed);
                    backoff = MIN_BACKOFF;
                    cursor = Some(next);
                    if read as i64 >= self.config.batch_size {
                        continue;
                    }
                }
                // Part of the batch is on the stream and its cursor saved: carry on from there
                // at once. Each such retry makes progress, so this cannot spin.
                Ok(Batch {
                    relayed,
                    cursor: next,
                    error: Some(err),
                    ..
                }) if relayed > 0 => {
                    self.stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        stream = %self.bus.config().stream,
                        relayed,
                        error = format!("{err:#}"),
                        "relay batch published in part; continuing after the confirmed events"
                    );
                    backoff = MIN_BACKOFF;
                    cursor = Some(next);
                    continue;
                }
                Ok(Batch {
                    error: Some(err), ..
                })
                | Err(err) => {
                    self.stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        stream = %self.bus.config().stream,
                        error = format!("{err:#}"),
                        retry_in_ms = backoff.as_millis() as u64,
                        "relay batch failed; retrying from the stored cursor"
                    );
                    cursor = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    // A failure may mean Postgres went away, and the lock with it.
                    lock_check_due = Instant::now();
                    continue;
                }
            }
            if listener.is_none() && Instant::now() >= listen_retry_at {
                listener = listen(&self.pool).await;
                listen_retry_at = Instant::now() + LISTEN_RETRY;
            }
            self.wait_for_events(&mut listener).await;
        }
    }

    /// Waits for a NOTIFY or the poll interval, whichever comes first.
    async fn wait_for_events(&self, listener: &mut Option<PgListener>) {
        let poll = tokio::time::sleep(self.config.poll_interval);
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

    /// Reads a batch after `cursor`, publishes it, and saves the cursor after the last event
    /// JetStream confirmed. `Err` only when Postgres fails; a publish failure is reported in
    /// [`Batch::error`] after saving the confirmed prefix.
    #[tracing::instrument(
        skip_all,
        fields(stream = %self.bus.config().stream, after = %cursor, events, stored)
    )]
    async fn relay_batch(&self, cursor: LogPosition) -> anyhow::Result<Batch> {
        let entries = read_committed(&self.pool, cursor, self.config.batch_size)
            .await
            .context("reading committed events")?;
        let span = tracing::Span::current();
        span.record("events", entries.len());
        let published = self.bus.publish_chain(&entries).await;
        span.record("stored", published.stored);
        let mut next = cursor;
        if let Some(last) = published
            .confirmed
            .checked_sub(1)
            .map(|i| entries[i].event.position)
        {
            save_cursor(
                &self.pool,
                &self.bus.config().stream,
                last,
                published.stored as i64,
            )
            .await
            .context("saving the relay cursor")?;
            self.stats.set_cursor(last);
            self.stats
                .published_total
                .fetch_add(published.stored, Ordering::Relaxed);
            self.stats
                .relayed_total
                .fetch_add(published.confirmed as u64, Ordering::Relaxed);
            next = last;
        }
        if published.error.is_none() {
            self.stats
                .last_batch_unix_ms
                .store(now_ms(), Ordering::Relaxed);
        }
        tracing::debug!(
            events = entries.len(),
            relayed = published.confirmed,
            stored = published.stored,
            cursor = %next,
            "relay batch"
        );
        Ok(Batch {
            read: entries.len(),
            relayed: published.confirmed,
            cursor: next,
            error: published.error,
        })
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
