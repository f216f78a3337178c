//! Each projection's state row: the version of the live tables, running/rebuilding/failed,
//! paused, the last error, and a rebuild's resumable cursor.

use chrono::{DateTime, Utc};
use rookery_events::LogPosition;
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row};

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
/// Everything at or below `head` is now the rebuild's work, not the live worker's (reactors act
/// only above it).
pub async fn finish_rebuild(
    conn: &mut PgConnection,
    projection: &str,
    version: i32,
    head: LogPosition,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_state
         SET state = 'running', version = $2, rebuild_version = NULL, rebuild_txid = NULL,
             rebuild_gpos = NULL, rebuild_done = NULL, rebuild_total = NULL,
             rebuild_started_at = NULL, last_error = NULL, last_error_at = NULL,
             rebuilt_through_txid = $3, rebuilt_through_gpos = $4, updated_at = now()
         WHERE projection = $1",
    )
    .bind(projection)
    .bind(version)
    .bind(head.txid_i64())
    .bind(head.gpos)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Where `projection`'s last rebuild switched in (zero when it never was rebuilt): rows it
/// holds for keys at or below this were produced by a rebuild, not live.
pub async fn rebuilt_through(pool: &PgPool, projection: &str) -> Result<LogPosition, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT rebuilt_through_txid, rebuilt_through_gpos FROM projection_state
         WHERE projection = $1",
    )
    .bind(projection)
    .fetch_optional(pool)
    .await?;
    Ok(row.map_or(LogPosition::ZERO, |(t, g)| LogPosition::from_db(t, g)))
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
