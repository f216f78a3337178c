//! Checkpoints: where each `(projection, partition)` stands, written in the same transaction
//! as the read-model rows they cover.
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
use sqlx::{Executor as _, PgConnection, PgPool, Postgres, Row};

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

pub(crate) fn partition_i32(partition: u32) -> i32 {
    i32::try_from(partition).unwrap_or(i32::MAX)
}

pub(crate) fn seq_i64(seq: u64) -> i64 {
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
/// [`KeptConn`](rookery_store::KeptConn)) and hands it back when it ends. A `BatchTx` dropped before
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
}
