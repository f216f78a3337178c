//! What operators see: each projection's state, position, lag, errors and parked events.

use super::consistency::APPLIED_CTE;
use super::state::{self, ProjectionStateRow};
use super::{checkpoints, dead_letters, locks, partitions_of, Projection};
use chrono::{DateTime, Utc};
use rookery_events::LogPosition;
use serde::Serialize;
use sqlx::PgPool;
use std::fmt;
use std::sync::Arc;

/// A projection's state as shown to operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjectionState {
    Running,
    Paused,
    /// A rebuild is filling the shadow tables (the live ones keep serving).
    Rebuilding,
    /// A partition keeps failing, or the last rebuild stopped on an error.
    Failed,
}

impl fmt::Display for ProjectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProjectionState::Running => "running",
            ProjectionState::Paused => "paused",
            ProjectionState::Rebuilding => "rebuilding",
            ProjectionState::Failed => "failed",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PartitionStatus {
    pub partition: u32,
    /// Last applied log key (`"txid.gpos"`).
    pub position: LogPosition,
    /// Every event of the partition at or below this key is applied.
    pub floor: LogPosition,
    pub stream_seq: u64,
    pub applied: i64,
    /// Consecutive failed attempts on the next event (0 when healthy).
    pub attempts: i32,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RebuildStatus {
    pub version: i32,
    /// The shadow tables hold everything up to here.
    pub position: LogPosition,
    pub done: i64,
    pub total: i64,
    pub started_at: Option<DateTime<Utc>>,
    /// Whether a rebuild process is working on it right now (else it stopped and can resume).
    pub running: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProjectionStatus {
    pub name: String,
    /// Version of the code that built the live tables.
    pub version: i32,
    pub state: ProjectionState,
    pub paused: bool,
    /// Every event at or below this key is applied in every partition (`None`: nothing yet).
    pub position: Option<LogPosition>,
    pub partitions: Vec<PartitionStatus>,
    /// Committed events not applied yet.
    pub lag_events: i64,
    /// Age of the oldest committed event not applied yet (by `recorded_at`); 0 when none.
    pub lag_seconds: f64,
    pub last_error: Option<String>,
    /// Parked events not yet retried or skipped.
    pub dead_letters: i64,
    pub rebuild: Option<RebuildStatus>,
}

/// Status of each of `known` (the projections this build runs) plus any other registered in the
/// database.
pub async fn status(
    pool: &PgPool,
    partitions: u32,
    known: &[Arc<dyn Projection>],
) -> anyhow::Result<Vec<ProjectionStatus>> {
    let states = state::list_states(pool).await?;
    let dead = dead_letters::count_dead_letters(pool).await?;
    let mut names: Vec<(String, i32)> = states
        .iter()
        .map(|s| (s.projection.clone(), s.version))
        .collect();
    for p in known {
        if !names.iter().any(|(n, _)| n == p.name()) {
            names.push((p.name().to_string(), p.version()));
        }
    }
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for (name, version) in names {
        let state = states.iter().find(|s| s.projection == name);
        let dead_letters = dead.iter().find(|(n, _)| *n == name).map_or(0, |(_, c)| *c);
        let model = known.iter().find(|p| p.name() == name);
        let partitions = model.map_or(partitions, |p| partitions_of(p.as_ref(), partitions));
        let types = model.map(|p| p.aggregate_types());
        out.push(
            one(
                pool,
                &name,
                version,
                state,
                (partitions, types),
                dead_letters,
            )
            .await?,
        );
    }
    Ok(out)
}

async fn one(
    pool: &PgPool,
    name: &str,
    version: i32,
    state: Option<&ProjectionStateRow>,
    (partitions, aggregate_types): (u32, Option<&[&str]>),
    dead_letters: i64,
) -> anyhow::Result<ProjectionStatus> {
    let checkpoints = checkpoints::load_all(pool, name).await?;
    let failing = checkpoints::failing_partitions(pool, name).await?;
    let parts: Vec<PartitionStatus> = (0..partitions.max(1))
        .map(|p| {
            let cp = checkpoints
                .iter()
                .find(|c| c.partition == p)
                .copied()
                .unwrap_or_default();
            let failure = failing.iter().find(|f| f.partition == p);
            PartitionStatus {
                partition: p,
                position: cp.position,
                floor: cp.floor,
                stream_seq: cp.stream_seq,
                applied: cp.applied,
                attempts: cp.attempts,
                last_error: failure.map(|f| f.last_error.clone()),
            }
        })
        .collect();
    let position = parts
        .iter()
        .map(|p| p.position.max(p.floor))
        .min()
        .filter(|p| *p > LogPosition::ZERO);

    let sql = format!(
        "WITH {APPLIED_CTE}
         SELECT count(*)::bigint,
                GREATEST(0, COALESCE(EXTRACT(EPOCH FROM now() - min(e.recorded_at)), 0))::float8
         FROM applied a
         JOIN events e ON e.partition_key % $2::int = a.p
                      AND (e.transaction_id, e.global_position) > (a.t::text::xid8, a.g)
         WHERE e.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
           AND ($3::text[] IS NULL OR e.aggregate_type = ANY($3))"
    );
    // Lag counts the events the model folds (a worker moves past others without writing its
    // checkpoint every time).
    let (lag_events, lag_seconds): (i64, f64) = sqlx::query_as(&sql)
        .bind(name)
        .bind(i32::try_from(partitions.max(1)).unwrap_or(i32::MAX))
        .bind(aggregate_types)
        .fetch_one(pool)
        .await?;

    let rebuild = match state.and_then(|s| s.rebuild.clone()) {
        Some(r) => Some(RebuildStatus {
            version: r.version,
            position: r.position,
            done: r.done,
            total: r.total,
            started_at: r.started_at,
            running: locks::rebuild_running(pool, name).await?,
        }),
        None => None,
    };
    let paused = state.is_some_and(|s| s.paused);
    let partition_error = failing
        .iter()
        .filter(|f| f.attempts > 0)
        .max_by_key(|f| f.last_error_at)
        .map(|f| format!("partition {}: {}", f.partition, f.last_error));
    let state_error = state.and_then(|s| s.last_error.clone());
    let projection_state = match state.map(|s| s.state.as_str()) {
        Some("rebuilding") if rebuild.as_ref().is_some_and(|r| r.running) => {
            ProjectionState::Rebuilding
        }
        // A rebuild that is no longer running stopped without recording why (killed).
        Some("rebuilding") | Some("failed") => ProjectionState::Failed,
        _ if partition_error.is_some() => ProjectionState::Failed,
        _ if paused => ProjectionState::Paused,
        _ => ProjectionState::Running,
    };
    let last_error = partition_error.or(state_error).or_else(|| {
        (projection_state == ProjectionState::Failed && rebuild.is_some())
            .then(|| "a rebuild stopped before finishing; run it again to resume".to_string())
    });
    Ok(ProjectionStatus {
        name: name.to_string(),
        version: state.map_or(version, |s| s.version),
        state: projection_state,
        paused,
        position,
        partitions: parts,
        lag_events,
        lag_seconds,
        last_error,
        dead_letters,
        rebuild,
    })
}
