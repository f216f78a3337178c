//! The global log in commit-safe order (docs/architecture.md, "The log").
//!
//! Reads only transactions older than every in-flight one, ordered by the log key
//! `(transaction_id, global_position)`, so a reader's cursor never passes an event that commits
//! later. The relay, rebuilds and replays all read through here.

use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt as _};
use rookery_events::{LogPosition, RecordedEvent};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, Row};

/// A recorded event plus the storage facts the bus needs.
#[derive(Clone, Debug, PartialEq)]
pub struct LogEntry {
    pub event: RecordedEvent,
    /// Stable 32-bit hash of the aggregate id (`events.partition_key`).
    pub partition_key: u32,
    pub recorded_at: DateTime<Utc>,
}

impl LogEntry {
    pub fn partition(&self, partitions: u32) -> u32 {
        self.partition_key % partitions.max(1)
    }
}

/// Up to `limit` committed events after `after`, in log order.
pub async fn read_committed(
    pool: &PgPool,
    after: LogPosition,
    limit: i64,
) -> Result<Vec<LogEntry>, sqlx::Error> {
    read_committed_raw(pool, after, limit, |raw| raw.to_entry())
        .await?
        .into_iter()
        .collect()
}

/// One row of the log with `payload` and `metadata` as the JSON text Postgres holds, borrowed
/// from the row as it arrives: for readers that pass the event on without looking inside (the
/// relay), for which decoding them into `serde_json::Value` to encode them again, and copying
/// every column into a `String` of its own, was most of the CPU.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawLogEntry<'r> {
    pub position: LogPosition,
    pub aggregate_type: &'r str,
    pub aggregate_id: &'r str,
    pub sequence: i64,
    pub event_type: &'r str,
    pub event_version: &'r str,
    /// `payload` in jsonb's text form (keys in jsonb order, `", "` and `": "` separators).
    pub payload: &'r str,
    /// `metadata`, likewise.
    pub metadata: &'r str,
    /// Stable 32-bit hash of the aggregate id (`events.partition_key`).
    pub partition_key: u32,
    pub recorded_at: DateTime<Utc>,
}

impl RawLogEntry<'_> {
    pub fn partition(&self, partitions: u32) -> u32 {
        self.partition_key % partitions.max(1)
    }

    /// The entry with its JSON decoded, owning its columns.
    pub fn to_entry(&self) -> Result<LogEntry, sqlx::Error> {
        let json =
            |text: &str| serde_json::from_str(text).map_err(|e| sqlx::Error::Decode(e.into()));
        Ok(LogEntry {
            event: RecordedEvent {
                position: self.position,
                aggregate_type: self.aggregate_type.to_owned(),
                aggregate_id: self.aggregate_id.to_owned(),
                sequence: self.sequence,
                event_type: self.event_type.to_owned(),
                event_version: self.event_version.to_owned(),
                payload: json(self.payload)?,
                metadata: json(self.metadata)?,
            },
            partition_key: self.partition_key,
            recorded_at: self.recorded_at,
        })
    }
}

/// The select list [`decode_raw`] reads by index. Aliased: an output column named
/// `transaction_id` would capture an `ORDER BY transaction_id` and sort by the bigint, which no
/// index provides (a full scan and sort per call).
macro_rules! raw_columns {
    () => {
        "transaction_id::text::bigint AS txid, global_position, aggregate_type, aggregate_id, \
         sequence, event_type, event_version, payload::text AS payload, \
         metadata::text AS metadata, partition_key, recorded_at"
    };
}

/// [`read_committed`] with each row handed to `map` as a [`RawLogEntry`]: the same events, the
/// same order and the same commit-safety.
pub async fn read_committed_raw<'c, T, F>(
    executor: impl sqlx::PgExecutor<'c>,
    after: LogPosition,
    limit: i64,
    mut map: F,
) -> Result<Vec<T>, sqlx::Error>
where
    F: FnMut(RawLogEntry<'_>) -> T + Send,
    T: Send + Unpin,
{
    const SQL: &str = concat!(
        "SELECT ",
        raw_columns!(),
        " FROM events
         WHERE (transaction_id, global_position) > ($1::bigint::text::xid8, $2)
           AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY transaction_id, global_position
         LIMIT $3"
    );
    sqlx::query(SQL)
        .bind(after.txid_i64())
        .bind(after.gpos)
        .bind(limit)
        .try_map(move |row: PgRow| Ok(map(decode_raw(&row)?)))
        .fetch_all(executor)
        .await
}

/// Every committed event in `(after, upto]`, streamed (constant memory) in log order.
pub fn stream_committed(
    pool: &PgPool,
    after: LogPosition,
    upto: LogPosition,
) -> impl Stream<Item = Result<LogEntry, sqlx::Error>> + Send + '_ {
    stream_committed_raw(pool, after, upto, |raw| raw.to_entry())
        .map(|row| row.and_then(std::convert::identity))
}

/// [`stream_committed`] with each row handed to `map` as a [`RawLogEntry`] (rebuilds decode the
/// JSON text straight into their own types).
pub fn stream_committed_raw<'p, T, F>(
    pool: &'p PgPool,
    after: LogPosition,
    upto: LogPosition,
    mut map: F,
) -> impl Stream<Item = Result<T, sqlx::Error>> + Send + 'p
where
    F: FnMut(RawLogEntry<'_>) -> T + Send + 'p,
    T: Send + Unpin + 'p,
{
    const SQL: &str = concat!(
        "SELECT ",
        raw_columns!(),
        " FROM events
         WHERE (transaction_id, global_position) > ($1::bigint::text::xid8, $2)
           AND (transaction_id, global_position) <= ($3::bigint::text::xid8, $4)
         ORDER BY transaction_id, global_position"
    );
    sqlx::query(SQL)
        .bind(after.txid_i64())
        .bind(after.gpos)
        .bind(upto.txid_i64())
        .bind(upto.gpos)
        .try_map(move |row: PgRow| Ok(map(decode_raw(&row)?)))
        .fetch(pool)
}

/// The last committed event's key that no in-flight transaction can precede (the commit-safe
/// head), or `None` for an empty log. On a pool, or on a connection that holds locks.
pub async fn committed_head<'c, E>(executor: E) -> Result<Option<LogPosition>, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = Postgres>,
{
    // Qualified in ORDER BY: the bare name means the select list's bigint cast, which no index
    // serves, so every call sorted the whole log.
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, global_position FROM events
         WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY events.transaction_id DESC, events.global_position DESC LIMIT 1",
    )
    .fetch_optional(executor)
    .await?;
    Ok(row.map(|(t, g)| LogPosition::from_db(t, g)))
}

/// The key of the last event visible now (committed), commit-safe or not: everything a reader
/// has seen committed is at or below it. `None` for an empty log.
pub async fn latest(pool: &PgPool) -> Result<Option<LogPosition>, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, global_position FROM events
         ORDER BY events.transaction_id DESC, events.global_position DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(t, g)| LogPosition::from_db(t, g)))
}

/// Number of committed events after `after` (for lag and progress).
pub async fn count_after(pool: &PgPool, after: LogPosition) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE (transaction_id, global_position) > ($1::bigint::text::xid8, $2)",
    )
    .bind(after.txid_i64())
    .bind(after.gpos)
    .fetch_one(pool)
    .await
}

/// By column index, in the order of `raw_columns!`: a name lookup per
/// column and row is measurable at the relay's rate.
fn decode_raw(row: &PgRow) -> Result<RawLogEntry<'_>, sqlx::Error> {
    let partition_key: i64 = row.try_get(9)?;
    Ok(RawLogEntry {
        position: LogPosition::from_db(row.try_get(0)?, row.try_get(1)?),
        aggregate_type: row.try_get(2)?,
        aggregate_id: row.try_get(3)?,
        sequence: row.try_get(4)?,
        event_type: row.try_get(5)?,
        event_version: row.try_get(6)?,
        payload: row.try_get(7)?,
        metadata: row.try_get(8)?,
        partition_key: u32::try_from(partition_key).unwrap_or(0),
        recorded_at: row.try_get(10)?,
    })
}
