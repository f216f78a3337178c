//! Read-your-writes: has a projection applied everything up to a log position?
//!
//! A position is applied when, for every partition `p`, either `p` has applied up to it
//! (`max(checkpoint, floor) >= position`) or `p` holds no event between what it has applied and
//! the position. The second half is what lets a client's write be visible without waiting for
//! partitions that never saw anything relevant; idle workers raise their floor to keep that scan
//! short.

use super::projection::{partitions_of, Projection};
use rookery_events::LogPosition;
use sqlx::PgPool;
use std::time::Duration;
use tokio::time::Instant;

/// One partition's applied key as SQL: `max((txid, gpos), (floor_txid, floor_gpos))` for each of
/// `generate_series(0, $2 - 1)` (zero for partitions without a checkpoint row).
pub(crate) const APPLIED_CTE: &str = "
    cp AS (
        SELECT g.p,
               COALESCE(c.txid, 0) AS t, COALESCE(c.gpos, 0) AS g,
               COALESCE(c.floor_txid, 0) AS ft, COALESCE(c.floor_gpos, 0) AS fg
        FROM generate_series(0, $2::int - 1) AS g(p)
        LEFT JOIN projection_checkpoints c ON c.projection = $1 AND c.partition = g.p
    ),
    applied AS (
        SELECT p,
               CASE WHEN (t, g) >= (ft, fg) THEN t ELSE ft END AS t,
               CASE WHEN (t, g) >= (ft, fg) THEN g ELSE fg END AS g
        FROM cp
    )";

/// Whether `projection` has applied every event up to `position` (one query).
pub async fn is_applied(
    pool: &PgPool,
    projection: &str,
    partitions: u32,
    position: LogPosition,
) -> Result<bool, sqlx::Error> {
    applied_of(pool, projection, None, partitions, position).await
}

/// [`is_applied`], counting only events of `aggregate_types` when given: a worker moves past
/// the others without writing its checkpoint every time (see `worker`), so only the events a
/// model folds say whether it is behind.
async fn applied_of(
    pool: &PgPool,
    projection: &str,
    aggregate_types: Option<&[&str]>,
    partitions: u32,
    position: LogPosition,
) -> Result<bool, sqlx::Error> {
    let sql = format!(
        "WITH {APPLIED_CTE}
         SELECT NOT EXISTS (
             SELECT 1 FROM applied a
             WHERE (a.t, a.g) < ($3, $4)
               AND EXISTS (
                   SELECT 1 FROM events e
                   WHERE (e.transaction_id, e.global_position) > (a.t::text::xid8, a.g)
                     AND (e.transaction_id, e.global_position) <= ($3::bigint::text::xid8, $4)
                     AND e.partition_key % $2::int = a.p
                     AND ($5::text[] IS NULL OR e.aggregate_type = ANY($5))))"
    );
    sqlx::query_scalar(&sql)
        .bind(projection)
        .bind(i32::try_from(partitions.max(1)).unwrap_or(i32::MAX))
        .bind(position.txid_i64())
        .bind(position.gpos)
        .bind(aggregate_types)
        .fetch_one(pool)
        .await
}

/// Waits until `projection` has applied `position`, polling with a short backoff (1 ms doubling
/// to 25 ms). Returns false when `timeout` passes first.
pub async fn wait_for_position(
    pool: &PgPool,
    projection: &str,
    partitions: u32,
    position: LogPosition,
    timeout: Duration,
) -> anyhow::Result<bool> {
    wait_until_applied(pool, projection, None, partitions, position, timeout).await
}

async fn wait_until_applied(
    pool: &PgPool,
    projection: &str,
    aggregate_types: Option<&[&str]>,
    partitions: u32,
    position: LogPosition,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if applied_of(pool, projection, aggregate_types, partitions, position).await? {
            return Ok(true);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

/// Waits until each of `models` has applied `position`, within `timeout` in all (each model
/// read with its own partitioning, and only the events it folds counted). Returns the name of
/// the first that did not get there.
pub async fn wait_for_models(
    pool: &PgPool,
    models: &[&dyn Projection],
    bus_partitions: u32,
    position: LogPosition,
    timeout: Duration,
) -> anyhow::Result<Option<&'static str>> {
    let deadline = Instant::now() + timeout;
    for model in models {
        let left = deadline.saturating_duration_since(Instant::now());
        let partitions = partitions_of(*model, bus_partitions);
        let types = Some(model.aggregate_types());
        if !wait_until_applied(pool, model.name(), types, partitions, position, left).await? {
            return Ok(Some(model.name()));
        }
    }
    Ok(None)
}
