//! Advisory locks: one active worker per `(projection, partition)` and one rebuild per
//! projection, each held by a database session so that a process that dies lets go at once.

use super::checkpoints::partition_i32;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};
use std::sync::atomic::{AtomicU64, Ordering};

/// FNV-1a of the projection name, as the first half of a two-key advisory lock. The relay uses
/// the one-bigint key space, so the two never collide.
fn lock_class(projection: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in projection.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    i32::from_ne_bytes(h.to_ne_bytes())
}

/// The second key of a rebuild's lock (partitions are never negative).
const REBUILD_LOCK: i32 = -1;

/// One database session holding the partition locks of a worker process.
///
/// Advisory locks belong to a session, so the session is a connection opened outside the pool
/// (a pooled one would go back to the pool still holding them) and shared by the worker's
/// partitions to spend one connection, not one per partition. When the session is lost its locks
/// are gone: the generation changes, and every partition must stop and take its lock again.
pub struct LockSession {
    options: PgConnectOptions,
    conn: tokio::sync::Mutex<Option<PgConnection>>,
    generation: AtomicU64,
}

impl LockSession {
    /// A session on the same server and database as `pool` (connected lazily).
    pub fn new(pool: &PgPool) -> Self {
        Self {
            options: (*pool.connect_options()).clone(),
            conn: tokio::sync::Mutex::new(None),
            generation: AtomicU64::new(1),
        }
    }

    /// Changes whenever the session (and with it every lock) is lost.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    async fn run<T>(
        &self,
        f: impl for<'c> FnOnce(
            &'c mut PgConnection,
        ) -> futures::future::BoxFuture<'c, Result<T, sqlx::Error>>,
    ) -> Result<T, sqlx::Error> {
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            *guard = Some(PgConnection::connect_with(&self.options).await?);
        }
        let Some(conn) = guard.as_mut() else {
            return Err(sqlx::Error::PoolClosed);
        };
        let result = f(conn).await;
        if result.is_err() {
            // The session may be broken; drop it so its locks are certainly gone, and tell the
            // holders.
            *guard = None;
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        result
    }

    /// Tries to take the lock of `(projection, partition)`; on success returns the session
    /// generation it is valid for.
    pub async fn try_lock(
        &self,
        projection: &str,
        partition: u32,
    ) -> Result<Option<u64>, sqlx::Error> {
        let (class, key) = (lock_class(projection), partition_i32(partition));
        let got = self
            .run(move |conn| {
                Box::pin(async move {
                    sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1, $2)")
                        .bind(class)
                        .bind(key)
                        .fetch_one(conn)
                        .await
                })
            })
            .await?;
        // Read after the call: a generation bumped by a failure cannot be returned as valid.
        Ok(got.then(|| self.generation()))
    }

    /// Releases the lock of `(projection, partition)` if this session still holds it.
    pub async fn unlock(&self, projection: &str, partition: u32) {
        let (class, key) = (lock_class(projection), partition_i32(partition));
        let _ = self
            .run(move |conn| {
                Box::pin(async move {
                    sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock($1, $2)")
                        .bind(class)
                        .bind(key)
                        .fetch_one(conn)
                        .await
                })
            })
            .await;
    }

    /// Whether locks taken at `generation` are still held (pings the session).
    pub async fn is_held(&self, generation: u64) -> bool {
        if self.generation() != generation {
            return false;
        }
        let ping = self
            .run(|conn| {
                Box::pin(async move {
                    sqlx::query_scalar::<_, i32>("SELECT 1")
                        .fetch_one(conn)
                        .await
                })
            })
            .await;
        ping.is_ok() && self.generation() == generation
    }
}

/// Holds a projection's rebuild lock for as long as it lives (its own session).
pub struct RebuildLock {
    conn: PgConnection,
}

impl RebuildLock {
    /// Tries to become the only rebuild of `projection`; `None` when another one runs.
    pub async fn try_acquire(pool: &PgPool, projection: &str) -> Result<Option<Self>, sqlx::Error> {
        let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
            .bind(lock_class(projection))
            .bind(REBUILD_LOCK)
            .fetch_one(&mut conn)
            .await?;
        if got {
            Ok(Some(Self { conn }))
        } else {
            let _ = conn.close().await;
            Ok(None)
        }
    }

    /// Releases the lock by ending the session.
    pub async fn release(self) {
        let _ = self.conn.close().await;
    }
}

/// Whether some session holds `projection`'s rebuild lock (i.e. a rebuild is running now).
pub async fn rebuild_running(pool: &PgPool, projection: &str) -> Result<bool, sqlx::Error> {
    // Two-key advisory locks appear in pg_locks with classid = key1, objid = key2, objsubid = 2.
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_locks
                        WHERE locktype = 'advisory' AND objsubid = 2 AND granted
                          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                          AND classid::bigint = ($1::bigint & 4294967295) AND objid::bigint = ($2::bigint & 4294967295))",
    )
    .bind(i64::from(lock_class(projection)))
    .bind(i64::from(REBUILD_LOCK))
    .fetch_one(pool)
    .await
}
