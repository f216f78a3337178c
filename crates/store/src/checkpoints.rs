//! Projection bookkeeping (used by rookery-projections): checkpoints per `(projection,
//! partition)`, the advisory locks that keep one worker per partition and one rebuild per
//! projection active, each projection's state row, and parked poison events (dead letters).
//!
//! A checkpoint is always written on the caller's connection (`&mut PgConnection`) so that it
//! commits in the same transaction as the read-model rows it covers. Batches run in a
//! [`BatchTx`], which opens by locking their checkpoint row as [`lock`] does and moves it with
//! the commit; a rebuild's switch locks every row of the projection with [`lock_all`], so the two
//! serialise without any other coordination.

use chrono::{DateTime, Utc};
use rookery_events::LogPosition;
use serde::Serialize;
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, Executor as _, PgConnection, PgPool, Postgres, Row};
use std::sync::atomic::{AtomicU64, Ordering};

/// Where one partition of one projection stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Checkpoint {
    pub partition: u32,
    /// Log key of the last event applied (or parked) from the bus.
    pub position: LogPosition,
    /// Last JetStream stream sequence handled; consumers restart after it.
    pub stream_seq: u64,
    /// Every event of this partition with a key at or below the floor is applied.
    pub floor: LogPosition,
    /// Events applied so far (for status and metrics).
    pub applied: i64,
    /// Consecutive failed attempts on the partition's next event.
    pub attempts: i32,
}

impl Checkpoint {
    /// Everything of this partition up to here is applied.
    pub fn applied_through(&self) -> LogPosition {
        self.position.max(self.floor)
    }

    /// Whether a delivery was already applied (a redelivery, a re-seeded message, or an event a
    /// rebuild covered).
    pub fn covers(&self, stream_seq: u64, key: LogPosition) -> bool {
        stream_seq <= self.stream_seq || key <= self.applied_through()
    }
}

const CHECKPOINT_COLUMNS: &str =
    "partition, txid, gpos, stream_seq, floor_txid, floor_gpos, applied, attempts";

fn checkpoint_from_row(row: &sqlx::postgres::PgRow) -> Result<Checkpoint, sqlx::Error> {
    Ok(Checkpoint {
        partition: u32::try_from(row.try_get::<i32, _>("partition")?).unwrap_or(0),
        position: LogPosition::from_db(row.try_get("txid")?, row.try_get("gpos")?),
        stream_seq: u64::try_from(row.try_get::<i64, _>("stream_seq")?).unwrap_or(0),
        floor: LogPosition::from_db(row.try_get("floor_txid")?, row.try_get("floor_gpos")?),
        applied: row.try_get("applied")?,
        attempts: row.try_get("attempts")?,
    })
}

fn partition_i32(partition: u32) -> i32 {
    i32::try_from(partition).unwrap_or(i32::MAX)
}

fn seq_i64(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// Registers a projection: its state row (recording `version` only when it is new) and a
/// checkpoint row for each of `partitions`. Idempotent.
pub async fn ensure(
    pool: &PgPool,
    projection: &str,
    version: i32,
    partitions: u32,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_state (projection, version) VALUES ($1, $2)
         ON CONFLICT (projection) DO NOTHING",
    )
    .bind(projection)
    .bind(version)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, partition)
         SELECT $1, p FROM generate_series(0, $2 - 1) AS p
         ON CONFLICT (projection, partition) DO NOTHING",
    )
    .bind(projection)
    .bind(i32::try_from(partitions.max(1)).unwrap_or(i32::MAX))
    .execute(pool)
    .await?;
    Ok(())
}

/// The checkpoint of one partition (default when the row does not exist yet).
pub async fn load(
    pool: &PgPool,
    projection: &str,
    partition: u32,
) -> Result<Checkpoint, sqlx::Error> {
    let sql = format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM projection_checkpoints
         WHERE projection = $1 AND partition = $2"
    );
    let row = sqlx::query(&sql)
        .bind(projection)
        .bind(partition_i32(partition))
        .fetch_optional(pool)
        .await?;
    match row {
        Some(row) => checkpoint_from_row(&row),
        None => Ok(Checkpoint {
            partition,
            ..Checkpoint::default()
        }),
    }
}

/// Every checkpoint of a projection, by partition.
pub async fn load_all(pool: &PgPool, projection: &str) -> Result<Vec<Checkpoint>, sqlx::Error> {
    let sql = format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM projection_checkpoints
         WHERE projection = $1 ORDER BY partition"
    );
    let rows = sqlx::query(&sql).bind(projection).fetch_all(pool).await?;
    rows.iter().map(checkpoint_from_row).collect()
}

/// Locks and re-reads one partition's checkpoint inside the caller's transaction, with whether
/// the projection is paused. `None` when the row does not exist (call [`ensure`] first).
///
/// Every batch starts here: holding the row serialises the batch against other workers of the
/// same partition and against a rebuild's switch, and re-reading it inside the transaction is what
/// makes skipping redeliveries exact.
pub async fn lock(
    conn: &mut PgConnection,
    projection: &str,
    partition: u32,
) -> Result<Option<(Checkpoint, bool)>, sqlx::Error> {
    let row = sqlx::query(&lock_sql("$1", "$2"))
        .bind(projection)
        .bind(partition_i32(partition))
        .fetch_optional(&mut *conn)
        .await?;
    locked_checkpoint(row.as_ref())
}

/// [`lock`]'s statement, its projection and partition written as `projection` and `partition`
/// (placeholders, or literals in a [`BatchTx`]).
fn lock_sql(projection: &str, partition: &str) -> String {
    format!(
        "SELECT {CHECKPOINT_COLUMNS},
                COALESCE((SELECT paused FROM projection_state s WHERE s.projection = c.projection), false) AS paused
         FROM projection_checkpoints c
         WHERE projection = {projection} AND partition = {partition}
         FOR UPDATE"
    )
}

fn locked_checkpoint(
    row: Option<&sqlx::postgres::PgRow>,
) -> Result<Option<(Checkpoint, bool)>, sqlx::Error> {
    match row {
        Some(row) => Ok(Some((checkpoint_from_row(row)?, row.try_get("paused")?))),
        None => Ok(None),
    }
}

/// Locks every checkpoint row of a projection (in partition order, so concurrent lockers cannot
/// deadlock) inside the caller's transaction.
pub async fn lock_all(
    conn: &mut PgConnection,
    projection: &str,
) -> Result<Vec<Checkpoint>, sqlx::Error> {
    let sql = format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM projection_checkpoints
         WHERE projection = $1 ORDER BY partition FOR UPDATE"
    );
    let rows = sqlx::query(&sql)
        .bind(projection)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(checkpoint_from_row).collect()
}

/// Where a batch moves its partition's checkpoint when it commits: to `position`, to
/// `stream_seq` unless the checkpoint is already past it, `applied` more events counted, and any
/// recorded failure cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Advance {
    pub position: LogPosition,
    pub stream_seq: u64,
    pub applied: i64,
}

impl Advance {
    /// The statement for `projection` (a quoted literal) and `partition`.
    fn sql(&self, projection: &str, partition: i32) -> String {
        format!(
            "UPDATE projection_checkpoints
             SET txid = {}, gpos = {}, stream_seq = GREATEST(stream_seq, {}),
                 applied = applied + {},
                 attempts = 0, last_error = NULL, last_error_at = NULL, updated_at = now()
             WHERE projection = {projection} AND partition = {partition}",
            self.position.txid_i64(),
            self.position.gpos,
            seq_i64(self.stream_seq),
            self.applied,
        )
    }
}

/// A projection batch's transaction in two round trips of its own instead of four: `BEGIN`,
/// `SET LOCAL synchronous_commit = off` and the checkpoint's locking read ([`lock`]) travel as
/// one simple-query message, the checkpoint's [`Advance`] and `COMMIT` as another. Round trips,
/// not statements, are what a batch costs on a small machine (each is a wake-up of a Postgres
/// backend and of the worker). Those statements' values are integers and a projection name
/// checked to be a plain identifier, so writing them into the text is safe; the read model's
/// own statements run on [`BatchTx::conn`] with bound parameters as usual.
///
/// Not sqlx's `Transaction`, which would send `BEGIN` and `COMMIT` on their own. It runs on a
/// connection the caller took (a worker keeps one between batches, see
/// [`KeptConn`](crate::KeptConn)) and hands it back when it ends. A `BatchTx` dropped before
/// [`commit`](BatchTx::commit) or [`rollback`](BatchTx::rollback) (an error on the way, a
/// cancelled future) closes its connection instead: the server then rolls back, and no pooled or
/// kept connection is ever left inside a transaction.
///
/// Only for writes that may be lost in a crash because their checkpoint is lost with them (the
/// commit does not wait for the WAL flush; the worker's module docs say why that is safe).
pub struct BatchTx {
    /// Taken out only by `commit` or `rollback`, which end the transaction and consume `self`.
    conn: Option<PoolConnection<Postgres>>,
    projection: String,
    partition: i32,
}

impl BatchTx {
    /// Begins the transaction on `conn` and locks and reads the checkpoint, with whether the
    /// projection is paused; `None` when the checkpoint row does not exist (call [`ensure`]
    /// first).
    pub async fn begin(
        conn: PoolConnection<Postgres>,
        projection: &str,
        partition: u32,
    ) -> Result<(Self, Option<(Checkpoint, bool)>), sqlx::Error> {
        if projection.is_empty()
            || !projection
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(sqlx::Error::InvalidArgument(format!(
                "projection name {projection:?} is not a plain identifier"
            )));
        }
        let projection = format!("'{projection}'");
        let partition = partition_i32(partition);
        let mut tx = Self {
            conn: Some(conn),
            projection,
            partition,
        };
        let sql = format!(
            "BEGIN; SET LOCAL synchronous_commit = off; {}",
            lock_sql(&tx.projection, &partition.to_string())
        );
        let rows = tx.conn().fetch_all(sql.as_str()).await?;
        let checkpoint = locked_checkpoint(rows.first())?;
        Ok((tx, checkpoint))
    }

    /// The transaction's connection, for the read model's statements.
    pub fn conn(&mut self) -> &mut PgConnection {
        match self.conn.as_mut() {
            Some(conn) => conn,
            None => unreachable!("a BatchTx ends only by consuming itself"),
        }
    }

    /// Moves the checkpoint (when `advance` is given) and commits, in one round trip; hands
    /// back the connection.
    pub async fn commit(
        self,
        advance: Option<Advance>,
    ) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        let sql = match advance {
            Some(a) => format!("{}; COMMIT", a.sql(&self.projection, self.partition)),
            None => "COMMIT".to_string(),
        };
        self.end(&sql).await
    }

    /// Rolls back; hands back the connection.
    pub async fn rollback(self) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        self.end("ROLLBACK").await
    }

    async fn end(mut self, sql: &str) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        self.conn().execute(sql).await?;
        match self.conn.take() {
            Some(conn) => Ok(conn),
            None => unreachable!("a BatchTx ends only by consuming itself"),
        }
    }
}

impl Drop for BatchTx {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            // Still inside the transaction: closing the connection makes the server roll back.
            conn.close_on_drop();
        }
    }
}

/// Raises a partition's floor (never lowers it) — only while its checkpoint is still at
/// `committed_seq` or beyond, i.e. no commit the caller made was lost. Returns the checkpoint's
/// stream sequence, so the caller learns in the same statement when commits were lost.
pub async fn raise_floor(
    conn: &mut PgConnection,
    projection: &str,
    partition: u32,
    floor: LogPosition,
    committed_seq: u64,
) -> Result<Option<u64>, sqlx::Error> {
    let seq: Option<i64> = sqlx::query_scalar(
        "WITH raised AS (
            UPDATE projection_checkpoints SET floor_txid = $3, floor_gpos = $4, updated_at = now()
            WHERE projection = $1 AND partition = $2 AND (floor_txid, floor_gpos) < ($3, $4)
              AND stream_seq >= $5)
         SELECT stream_seq FROM projection_checkpoints WHERE projection = $1 AND partition = $2",
    )
    .bind(projection)
    .bind(partition_i32(partition))
    .bind(floor.txid_i64())
    .bind(floor.gpos)
    .bind(seq_i64(committed_seq))
    .fetch_optional(&mut *conn)
    .await?;
    Ok(seq.map(|s| u64::try_from(s).unwrap_or(0)))
}

/// Raises every partition's floor of a projection (a rebuild's switch), creating missing rows
/// for `partitions`.
pub async fn raise_floor_all(
    conn: &mut PgConnection,
    projection: &str,
    partitions: u32,
    floor: LogPosition,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, partition, floor_txid, floor_gpos)
         SELECT $1, p, $3, $4 FROM generate_series(0, $2 - 1) AS p
         ON CONFLICT (projection, partition) DO UPDATE
         SET floor_txid = EXCLUDED.floor_txid, floor_gpos = EXCLUDED.floor_gpos, updated_at = now()
         WHERE (projection_checkpoints.floor_txid, projection_checkpoints.floor_gpos)
             < (EXCLUDED.floor_txid, EXCLUDED.floor_gpos)",
    )
    .bind(projection)
    .bind(i32::try_from(partitions.max(1)).unwrap_or(i32::MAX))
    .bind(floor.txid_i64())
    .bind(floor.gpos)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Forgets the stream sequence of a partition (the stream was recreated and numbers restart);
/// the log-key part of the checkpoint still skips everything already applied.
pub async fn reset_stream_seq(
    pool: &PgPool,
    projection: &str,
    partition: u32,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_checkpoints SET stream_seq = 0, updated_at = now()
         WHERE projection = $1 AND partition = $2",
    )
    .bind(projection)
    .bind(partition_i32(partition))
    .execute(pool)
    .await?;
    Ok(())
}

/// Records a failed attempt on a partition (outside the rolled-back batch, for status).
pub async fn record_failure(
    pool: &PgPool,
    projection: &str,
    partition: u32,
    attempts: i32,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_checkpoints
         SET attempts = $3, last_error = $4, last_error_at = now(), updated_at = now()
         WHERE projection = $1 AND partition = $2",
    )
    .bind(projection)
    .bind(partition_i32(partition))
    .bind(attempts)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// A partition whose last attempt failed (no success since).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PartitionFailure {
    pub partition: u32,
    /// Consecutive failed attempts on the partition's next event (0 for transient failures).
    pub attempts: i32,
    pub last_error: String,
    pub last_error_at: Option<DateTime<Utc>>,
}

/// Partitions of a projection whose last attempt failed.
pub async fn failing_partitions(
    pool: &PgPool,
    projection: &str,
) -> Result<Vec<PartitionFailure>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT partition, attempts, last_error, last_error_at FROM projection_checkpoints
         WHERE projection = $1 AND last_error IS NOT NULL ORDER BY partition",
    )
    .bind(projection)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(PartitionFailure {
                partition: u32::try_from(row.try_get::<i32, _>("partition")?).unwrap_or(0),
                attempts: row.try_get("attempts")?,
                last_error: row.try_get("last_error")?,
                last_error_at: row.try_get("last_error_at")?,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Advisory locks

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

// ---------------------------------------------------------------------------------------------
// Projection state

/// A projection's state row.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProjectionStateRow {
    pub projection: String,
    pub version: i32,
    /// `running`, `rebuilding` or `failed` (see the migration).
    pub state: String,
    pub paused: bool,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub rebuild: Option<RebuildCursor>,
    pub updated_at: DateTime<Utc>,
}

/// A rebuild's resumable progress.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RebuildCursor {
    pub version: i32,
    /// Everything up to here is folded into the shadow tables.
    pub position: LogPosition,
    pub done: i64,
    pub total: i64,
    pub started_at: Option<DateTime<Utc>>,
}

const STATE_COLUMNS: &str = "projection, version, state, paused, last_error, last_error_at, \
     rebuild_version, rebuild_txid, rebuild_gpos, rebuild_done, rebuild_total, rebuild_started_at, updated_at";

fn state_from_row(row: &sqlx::postgres::PgRow) -> Result<ProjectionStateRow, sqlx::Error> {
    let txid: Option<i64> = row.try_get("rebuild_txid")?;
    let gpos: Option<i64> = row.try_get("rebuild_gpos")?;
    let rebuild = match (txid, gpos) {
        (Some(t), Some(g)) => Some(RebuildCursor {
            version: row
                .try_get::<Option<i32>, _>("rebuild_version")?
                .unwrap_or(0),
            position: LogPosition::from_db(t, g),
            done: row.try_get::<Option<i64>, _>("rebuild_done")?.unwrap_or(0),
            total: row.try_get::<Option<i64>, _>("rebuild_total")?.unwrap_or(0),
            started_at: row.try_get("rebuild_started_at")?,
        }),
        _ => None,
    };
    Ok(ProjectionStateRow {
        projection: row.try_get("projection")?,
        version: row.try_get("version")?,
        state: row.try_get("state")?,
        paused: row.try_get("paused")?,
        last_error: row.try_get("last_error")?,
        last_error_at: row.try_get("last_error_at")?,
        rebuild,
        updated_at: row.try_get("updated_at")?,
    })
}

pub async fn load_state(
    pool: &PgPool,
    projection: &str,
) -> Result<Option<ProjectionStateRow>, sqlx::Error> {
    let sql = format!("SELECT {STATE_COLUMNS} FROM projection_state WHERE projection = $1");
    let row = sqlx::query(&sql)
        .bind(projection)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(state_from_row).transpose()
}

/// Every registered projection's state, by name.
pub async fn list_states(pool: &PgPool) -> Result<Vec<ProjectionStateRow>, sqlx::Error> {
    let sql = format!("SELECT {STATE_COLUMNS} FROM projection_state ORDER BY projection");
    let rows = sqlx::query(&sql).fetch_all(pool).await?;
    rows.iter().map(state_from_row).collect()
}

/// Pauses or resumes a projection's live workers. Returns false for an unknown projection.
pub async fn set_paused(
    pool: &PgPool,
    projection: &str,
    paused: bool,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE projection_state SET paused = $2, updated_at = now() WHERE projection = $1",
    )
    .bind(projection)
    .bind(paused)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Marks a rebuild as started (or resumed) at `cursor` in the caller's transaction.
pub async fn begin_rebuild(
    conn: &mut PgConnection,
    projection: &str,
    version: i32,
    cursor: LogPosition,
    done: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_state (projection, version, state, rebuild_version, rebuild_txid,
                                       rebuild_gpos, rebuild_done, rebuild_total, rebuild_started_at)
         VALUES ($1, $2, 'rebuilding', $2, $3, $4, $5, $5, now())
         ON CONFLICT (projection) DO UPDATE
         SET state = 'rebuilding', rebuild_version = $2, rebuild_txid = $3, rebuild_gpos = $4,
             rebuild_done = $5, rebuild_total = GREATEST(projection_state.rebuild_total, $5),
             rebuild_started_at = COALESCE(projection_state.rebuild_started_at, now()),
             last_error = NULL, last_error_at = NULL, updated_at = now()",
    )
    .bind(projection)
    .bind(version)
    .bind(cursor.txid_i64())
    .bind(cursor.gpos)
    .bind(done)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Saves a rebuild's cursor in the transaction that wrote the shadow rows up to it.
pub async fn save_rebuild_cursor(
    conn: &mut PgConnection,
    projection: &str,
    cursor: LogPosition,
    done: i64,
    total: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_state
         SET rebuild_txid = $2, rebuild_gpos = $3, rebuild_done = $4, rebuild_total = $5, updated_at = now()
         WHERE projection = $1",
    )
    .bind(projection)
    .bind(cursor.txid_i64())
    .bind(cursor.gpos)
    .bind(done)
    .bind(total)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Ends a rebuild in the switch transaction: the live tables now hold `version`.
pub async fn finish_rebuild(
    conn: &mut PgConnection,
    projection: &str,
    version: i32,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_state
         SET state = 'running', version = $2, rebuild_version = NULL, rebuild_txid = NULL,
             rebuild_gpos = NULL, rebuild_done = NULL, rebuild_total = NULL,
             rebuild_started_at = NULL, last_error = NULL, last_error_at = NULL, updated_at = now()
         WHERE projection = $1",
    )
    .bind(projection)
    .bind(version)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records that a rebuild stopped on an error; its cursor stays, so running it again resumes.
pub async fn fail_rebuild(pool: &PgPool, projection: &str, error: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_state
         SET state = 'failed', last_error = $2, last_error_at = now(), updated_at = now()
         WHERE projection = $1",
    )
    .bind(projection)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Dead letters

/// Who parked an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParkedBy {
    Live,
    Rebuild,
}

impl ParkedBy {
    fn as_str(self) -> &'static str {
        match self {
            ParkedBy::Live => "live",
            ParkedBy::Rebuild => "rebuild",
        }
    }
}

/// An event to park.
#[derive(Clone, Debug)]
pub struct NewDeadLetter<'a> {
    pub projection: &'a str,
    pub partition: u32,
    pub stream_seq: Option<u64>,
    /// `None` when the bus message could not be decoded at all.
    pub position: Option<LogPosition>,
    pub message_id: Option<String>,
    /// The recorded event as JSON, when there is one.
    pub event: Option<serde_json::Value>,
    pub error: &'a str,
    pub attempts: i32,
    pub parked_by: ParkedBy,
}

/// Parks an event in the caller's transaction (the one that moves the checkpoint past it).
/// Returns false when the event was already parked for this projection.
pub async fn park(
    conn: &mut PgConnection,
    letter: &NewDeadLetter<'_>,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO projection_dead_letters
             (projection, partition, stream_seq, txid, gpos, message_id, event, error, attempts, source)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (projection, txid, gpos) WHERE txid IS NOT NULL DO NOTHING",
    )
    .bind(letter.projection)
    .bind(partition_i32(letter.partition))
    .bind(letter.stream_seq.map(seq_i64))
    .bind(letter.position.map(|p| p.txid_i64()))
    .bind(letter.position.map(|p| p.gpos))
    .bind(&letter.message_id)
    .bind(&letter.event)
    .bind(letter.error)
    .bind(letter.attempts)
    .bind(letter.parked_by.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// A parked event.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub projection: String,
    pub partition: u32,
    pub stream_seq: Option<u64>,
    pub position: Option<LogPosition>,
    pub message_id: Option<String>,
    pub event: Option<serde_json::Value>,
    pub error: String,
    pub attempts: i32,
    pub parked_by: String,
    pub parked_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    /// `retried` or `skipped`.
    pub resolution: Option<String>,
}

const DEAD_LETTER_COLUMNS: &str = "id, projection, partition, stream_seq, txid, gpos, message_id, \
     event, error, attempts, source, parked_at, resolved_at, resolution";

fn dead_letter_from_row(row: &sqlx::postgres::PgRow) -> Result<DeadLetter, sqlx::Error> {
    let txid: Option<i64> = row.try_get("txid")?;
    let gpos: Option<i64> = row.try_get("gpos")?;
    Ok(DeadLetter {
        id: row.try_get("id")?,
        projection: row.try_get("projection")?,
        partition: u32::try_from(row.try_get::<i32, _>("partition")?).unwrap_or(0),
        stream_seq: row
            .try_get::<Option<i64>, _>("stream_seq")?
            .map(|s| u64::try_from(s).unwrap_or(0)),
        position: txid.zip(gpos).map(|(t, g)| LogPosition::from_db(t, g)),
        message_id: row.try_get("message_id")?,
        event: row.try_get("event")?,
        error: row.try_get("error")?,
        attempts: row.try_get("attempts")?,
        parked_by: row.try_get("source")?,
        parked_at: row.try_get("parked_at")?,
        resolved_at: row.try_get("resolved_at")?,
        resolution: row.try_get("resolution")?,
    })
}

/// Parked events, oldest first; only unresolved ones unless `include_resolved`.
pub async fn list_dead_letters(
    pool: &PgPool,
    projection: Option<&str>,
    include_resolved: bool,
) -> Result<Vec<DeadLetter>, sqlx::Error> {
    let sql = format!(
        "SELECT {DEAD_LETTER_COLUMNS} FROM projection_dead_letters
         WHERE ($1::text IS NULL OR projection = $1) AND ($2 OR resolved_at IS NULL)
         ORDER BY id"
    );
    let rows = sqlx::query(&sql)
        .bind(projection)
        .bind(include_resolved)
        .fetch_all(pool)
        .await?;
    rows.iter().map(dead_letter_from_row).collect()
}

/// One parked event, locked in the caller's transaction.
pub async fn lock_dead_letter(
    conn: &mut PgConnection,
    id: i64,
) -> Result<Option<DeadLetter>, sqlx::Error> {
    let sql = format!(
        "SELECT {DEAD_LETTER_COLUMNS} FROM projection_dead_letters WHERE id = $1 FOR UPDATE"
    );
    let row = sqlx::query(&sql)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(dead_letter_from_row).transpose()
}

/// Marks a parked event resolved (`retried` or `skipped`). Returns false if it was not open.
pub async fn resolve_dead_letter(
    conn: &mut PgConnection,
    id: i64,
    resolution: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE projection_dead_letters SET resolved_at = now(), resolution = $2
         WHERE id = $1 AND resolved_at IS NULL",
    )
    .bind(id)
    .bind(resolution)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Unresolved parked events per projection.
pub async fn count_dead_letters(pool: &PgPool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT projection, count(*) FROM projection_dead_letters
         WHERE resolved_at IS NULL GROUP BY projection ORDER BY projection",
    )
    .fetch_all(pool)
    .await
}

/// Log keys a rebuild must leave out to match the live fold: events parked and not since
/// re-applied (`retried` ones were applied live, so a rebuild applies them too).
pub async fn excluded_positions(
    pool: &PgPool,
    projection: &str,
) -> Result<Vec<LogPosition>, sqlx::Error> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT txid, gpos FROM projection_dead_letters
         WHERE projection = $1 AND txid IS NOT NULL AND gpos IS NOT NULL
           AND (resolution IS NULL OR resolution = 'skipped')",
    )
    .bind(projection)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(t, g)| LogPosition::from_db(t, g))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_redeliveries_and_everything_below_the_floor() {
        let cp = Checkpoint {
            partition: 0,
            position: LogPosition::new(10, 5),
            stream_seq: 7,
            floor: LogPosition::new(20, 1),
            applied: 0,
            attempts: 0,
        };
        assert!(cp.covers(7, LogPosition::new(30, 1)), "same stream seq");
        assert!(cp.covers(8, LogPosition::new(20, 1)), "at the floor");
        assert!(!cp.covers(8, LogPosition::new(20, 2)), "above both");
        assert_eq!(cp.applied_through(), LogPosition::new(20, 1));
    }

    #[test]
    fn lock_classes_differ_per_projection() {
        assert_ne!(lock_class("members"), lock_class("reputation"));
        assert_eq!(lock_class("members"), lock_class("members"));
    }
}
