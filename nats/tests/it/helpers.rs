//! Shared test support: a uniquely named stream deleted on drop, event writers, and the check
//! that the stream holds exactly the log.

use rookery_nats::{headers, Bus, BusConfig};
use rookery_store::LogEntry;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::ops::Deref;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub fn nats_url() -> String {
    rookery_store::testing::nats_url()
}

/// A config with a stream name and subject prefix of its own.
pub fn unique_config() -> BusConfig {
    let id = uuid::Uuid::new_v4().simple().to_string();
    BusConfig::new(nats_url(), format!("rookery_test_{id}"), format!("rt{id}"))
}

/// Deletes the stream when dropped, also when the test panics.
pub struct StreamGuard {
    url: String,
    stream: String,
}

impl StreamGuard {
    pub fn new(config: &BusConfig) -> Self {
        Self {
            url: config.url.clone(),
            stream: config.stream.clone(),
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let (url, stream) = (self.url.clone(), self.stream.clone());
        // The test's runtime may be blocked in this very drop (unwinding): use a thread with
        // its own runtime and connection.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(client) = async_nats::connect(url.as_str()).await else {
                    return;
                };
                let _ = async_nats::jetstream::new(client)
                    .delete_stream(&stream)
                    .await;
            });
        })
        .join();
    }
}

/// A connected bus on its own stream, deleted on drop.
pub struct TestBus {
    pub bus: Bus,
    _guard: StreamGuard,
}

impl TestBus {
    pub async fn new() -> Self {
        Self::with(|_| {}).await
    }

    pub async fn with(tune: impl FnOnce(&mut BusConfig)) -> Self {
        let mut config = unique_config();
        tune(&mut config);
        let guard = StreamGuard::new(&config);
        let bus = Bus::connect(config).await.unwrap();
        Self { bus, _guard: guard }
    }
}

impl Deref for TestBus {
    type Target = Bus;
    fn deref(&self) -> &Bus {
        &self.bus
    }
}

/// Polls `check` every 20 ms until it returns `Some`, failing the test after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Appends `count` events to one aggregate in one transaction.
pub async fn append(pool: &PgPool, aggregate_id: &str, first_seq: i64, count: i64) {
    let mut tx = pool.begin().await.unwrap();
    for seq in first_seq..first_seq + count {
        insert(&mut tx, "test", aggregate_id, seq).await;
    }
    tx.commit().await.unwrap();
}

async fn insert(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    aggregate_type: &str,
    aggregate_id: &str,
    sequence: i64,
) {
    sqlx::query(
        "INSERT INTO events
             (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ($1, $2, $3, $4, '1.0', $5, '{}')",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(sequence)
    .bind("TestHappened")
    .bind(serde_json::json!({ "TestHappened": { "n": sequence } }))
    .execute(&mut **tx)
    .await
    .unwrap();
}

/// All committed entries, in log order, once all `expected` are readable. Commit-safe reads
/// wait for every older transaction in the cluster, and tests in other databases run their
/// own transactions, so a just-committed event may take a moment to become readable.
pub async fn read_all(pool: &PgPool, expected: usize) -> Vec<LogEntry> {
    eventually(
        &format!("{expected} committed events"),
        Duration::from_secs(10),
        || async move {
            let all = rookery_store::log::read_committed(
                pool,
                rookery_events::LogPosition::ZERO,
                i64::MAX,
            )
            .await
            .unwrap();
            assert!(
                all.len() <= expected,
                "{} committed events, expected {expected}",
                all.len()
            );
            (all.len() == expected).then_some(all)
        },
    )
    .await
}

/// Waits until all `expected` events are readable in commit-safe order.
pub async fn wait_committed(pool: &PgPool, expected: usize) {
    read_all(pool, expected).await;
}

pub async fn event_count(pool: &PgPool) -> u64 {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await
        .unwrap();
    n as u64
}

/// A separate, larger pool for writers, so they never starve the relay of connections.
pub async fn writer_pool(db_url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(16)
        .connect(db_url)
        .await
        .unwrap()
}

/// Concurrent writers shaped to commit out of `global_position` order: several aggregates per
/// task, transactions of 1–3 events with small random pauses inside them.
#[derive(Clone, Copy)]
pub struct Writers {
    pub tasks: usize,
    pub aggregates_per_task: usize,
    pub events_per_aggregate: i64,
    /// Longest pause inside a transaction, in milliseconds.
    pub max_pause_ms: u64,
}

impl Writers {
    pub fn total(&self) -> u64 {
        (self.tasks * self.aggregates_per_task) as u64 * self.events_per_aggregate as u64
    }

    pub fn spawn(self, pool: PgPool) -> Vec<JoinHandle<()>> {
        (0..self.tasks)
            .map(|t| {
                let pool = pool.clone();
                tokio::spawn(async move { self.write(pool, t as u64).await })
            })
            .collect()
    }

    async fn write(self, pool: PgPool, task: u64) {
        let mut rng = XorShift::new(task);
        let mut aggregates: Vec<(String, i64)> = (0..self.aggregates_per_task)
            .map(|_| (uuid::Uuid::new_v4().to_string(), 1))
            .collect();
        loop {
            aggregates.retain(|(_, next)| *next <= self.events_per_aggregate);
            if aggregates.is_empty() {
                return;
            }
            let pick = rng.below(aggregates.len() as u64) as usize;
            let (id, next) = &mut aggregates[pick];
            let left = self.events_per_aggregate - *next + 1;
            let count = (1 + rng.below(3) as i64).min(left);
            let mut tx = pool.begin().await.unwrap();
            for seq in *next..*next + count {
                insert(&mut tx, "test", id, seq).await;
                let pause = rng.below(self.max_pause_ms + 1);
                if pause > 0 {
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            }
            tx.commit().await.unwrap();
            *next += count;
        }
    }
}

pub async fn join_all(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        h.await.unwrap();
    }
}

/// How many adjacent pairs in log order have decreasing `global_position`: proof that
/// commits really interleaved out of position order.
pub async fn out_of_order_commits(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT global_position,
                    lag(global_position) OVER (ORDER BY transaction_id, global_position) AS prev
             FROM events) s
         WHERE global_position < prev",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Waits until the stream holds `expected` messages.
pub async fn wait_for_stream(bus: &Bus, expected: u64, limit: Duration) {
    eventually(
        &format!("{expected} messages on the stream"),
        limit,
        || async move {
            let state = bus.stream_state().await.unwrap();
            assert!(
                state.messages <= expected,
                "stream holds {} > {expected} messages",
                state.messages
            );
            (state.messages == expected).then_some(())
        },
    )
    .await;
}

/// Every committed event is on the stream exactly once (by `Nats-Msg-Id`), with its position,
/// in log order, and so each aggregate's events in sequence order.
pub async fn assert_stream_matches_log(bus: &Bus, pool: &PgPool) {
    let log = read_all(pool, event_count(pool).await as usize).await;
    let messages = bus.fetch_all(Duration::from_secs(30)).await.unwrap();

    let mut seen: HashMap<String, u32> = HashMap::new();
    let mut last_seq: HashMap<(String, String), i64> = HashMap::new();
    let mut previous: Option<(u64, rookery_events::LogPosition)> = None;
    for (stream_seq, event, hdrs) in &messages {
        // The relay keeps the stream in log order, which implies each aggregate's order.
        if let Some((seq, position)) = previous {
            assert!(*stream_seq > seq);
            assert!(
                event.position > position,
                "stream seq {stream_seq} at {} after {position}",
                event.position
            );
        }
        previous = Some((*stream_seq, event.position));
        let id = hdrs.get(headers::MSG_ID).unwrap().as_str().to_string();
        assert_eq!(id, event.message_id());
        assert_eq!(
            hdrs.get(headers::POSITION).unwrap().as_str(),
            event.position.to_string()
        );
        *seen.entry(id).or_default() += 1;
        let key = (event.aggregate_type.clone(), event.aggregate_id.clone());
        let last = last_seq.entry(key).or_insert(0);
        assert_eq!(
            event.sequence,
            *last + 1,
            "aggregate {} out of order at stream seq {stream_seq}",
            event.aggregate_id
        );
        *last = event.sequence;
    }
    let duplicates: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicates.is_empty(),
        "duplicates on the stream: {duplicates:?}"
    );

    let expected: BTreeSet<String> = log.iter().map(|e| e.event.message_id()).collect();
    let got: BTreeSet<String> = seen.into_keys().collect();
    let missing: Vec<_> = expected.difference(&got).take(5).collect();
    let extra: Vec<_> = got.difference(&expected).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, unexpected {extra:?}"
    );
    assert_eq!(messages.len(), log.len());

    let positions: HashMap<String, String> = log
        .iter()
        .map(|e| (e.event.message_id(), e.event.position.to_string()))
        .collect();
    for (_, event, _) in &messages {
        assert_eq!(positions[&event.message_id()], event.position.to_string());
    }
}

/// Tiny deterministic PRNG: the tests need jitter, not quality.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        if n == 0 {
            0
        } else {
            self.0 % n
        }
    }
}
