//! Dead letters: poison events a projection could not apply, parked in the transaction that
//! moves the checkpoint past them, and what operators do with them (list, retry, skip).
//!
//! Parking moved the checkpoint past the event, so the read model does not contain it until an
//! operator retries it (after fixing the cause) or skips it for good. A rebuild leaves out parked
//! and skipped events and includes retried ones, so it still matches the live model.

use super::checkpoints::{self, partition_i32, seq_i64};
use super::projection::{Projection, TableNames};
use anyhow::{bail, Context as _};
use chrono::{DateTime, Utc};
use rookery_events::{LogPosition, RecordedEvent};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row};

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

/// Parked events, oldest first (all projections when `projection` is `None`).
pub async fn list(
    pool: &PgPool,
    projection: Option<&str>,
    include_resolved: bool,
) -> anyhow::Result<Vec<DeadLetter>> {
    Ok(list_dead_letters(pool, projection, include_resolved).await?)
}

/// Marks a parked event as skipped for good. Returns false when it was not open.
pub async fn skip(pool: &PgPool, id: i64) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    let done = resolve_dead_letter(&mut tx, id, "skipped").await?;
    tx.commit().await?;
    Ok(done)
}

/// Applies a parked event to the live tables now (after the cause was fixed) and marks it
/// retried, in one transaction that holds its partition's checkpoint row, so it does not
/// interleave with that partition's batches. Fails, changing nothing, if it still fails.
///
/// The event is applied out of its original order; for the members model that is what an
/// operator wants (the late fact takes effect), and a rebuild applies it in log order.
pub async fn retry(pool: &PgPool, projection: &dyn Projection, id: i64) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let Some(letter) = lock_dead_letter(&mut tx, id).await? else {
        bail!("dead letter {id} does not exist");
    };
    if letter.projection != projection.name() {
        bail!(
            "dead letter {id} belongs to projection {}",
            letter.projection
        );
    }
    if letter.resolved_at.is_some() {
        bail!(
            "dead letter {id} was already {}",
            letter.resolution.as_deref().unwrap_or("resolved")
        );
    }
    let Some(event) = letter.event.clone() else {
        bail!("dead letter {id} is a bus message that could not be decoded; skip it: the event is still in the log, and a rebuild of the projection applies it");
    };
    let event: RecordedEvent =
        serde_json::from_value(event).context("the parked event no longer decodes")?;
    checkpoints::lock(&mut tx, projection.name(), letter.partition).await?;
    let tables = TableNames::live(projection.tables());
    projection
        .apply(&mut tx, &tables, std::slice::from_ref(&event))
        .await
        .with_context(|| format!("retrying dead letter {id}"))?;
    resolve_dead_letter(&mut tx, id, "retried").await?;
    tx.commit().await?;
    Ok(())
}
