//! Operations: liveness, readiness and Prometheus metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, FieldError};
use crate::extract::Json;
use crate::openapi::Unavailable;
use crate::state::AppState;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// How long a readiness probe waits for Postgres.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    #[schema(example = "ok")]
    pub status: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReadyResponse {
    #[schema(example = "ready")]
    pub status: String,
    /// Each dependency and its state (`ok`, or `not configured` for an absent bus).
    pub checks: BTreeMap<String, String>,
}

/// Liveness: the process answers. Never checks dependencies (a restart would not fix them).
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "Alive", body = HealthResponse)))]
pub(crate) async fn health() -> Json<HealthResponse> {
    Json(HealthResponse {
        status: "ok".into(),
    })
}

/// Readiness: Postgres answers, every embedded migration is applied, and NATS is connected when
/// a bus is configured. 503 lists what failed.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses((status = 200, description = "Ready to serve", body = ReadyResponse), Unavailable))]
pub(crate) async fn ready(State(state): State<AppState>) -> Result<Json<ReadyResponse>, ApiError> {
    let mut checks = BTreeMap::new();
    let mut failures = Vec::new();
    let mut fail = |field: &str, message: String| {
        failures.push(FieldError {
            field: field.into(),
            message,
        });
    };

    let pool = state.pool();
    let probe = tokio::time::timeout(
        PROBE_TIMEOUT,
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(pool),
    );
    match probe.await {
        Ok(Ok(_)) => {
            checks.insert("postgres".into(), "ok".into());
            match pending_migrations(pool).await {
                Ok(pending) if pending.is_empty() => {
                    checks.insert("migrations".into(), "ok".into());
                }
                Ok(pending) => fail(
                    "migrations",
                    format!(
                        "not applied: {}",
                        pending
                            .iter()
                            .map(i64::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
                Err(e) => fail("migrations", format!("cannot read _sqlx_migrations: {e}")),
            }
        }
        Ok(Err(e)) => {
            fail("postgres", format!("unreachable: {e}"));
            fail("migrations", "unknown: Postgres is unreachable".into());
        }
        Err(_) => {
            fail(
                "postgres",
                format!("no answer within {}s", PROBE_TIMEOUT.as_secs()),
            );
            fail("migrations", "unknown: Postgres is unreachable".into());
        }
    }

    match state.bus() {
        None => {
            checks.insert("nats".into(), "not configured".into());
        }
        Some(bus) if bus.is_connected() => {
            checks.insert("nats".into(), "ok".into());
        }
        Some(_) => fail("nats", "not connected".into()),
    }

    if failures.is_empty() {
        Ok(Json(ReadyResponse {
            status: "ready".into(),
            checks,
        }))
    } else {
        let names: Vec<&str> = failures.iter().map(|f| f.field.as_str()).collect();
        tracing::warn!(failed = ?names, "not ready");
        Err(ApiError::Unavailable {
            detail: format!("not ready: {}", names.join(", ")),
            retry_after: Some(5),
            errors: failures,
        })
    }
}

/// Versions of the embedded migrations not (successfully) applied to the database.
async fn pending_migrations(pool: &sqlx::PgPool) -> Result<Vec<i64>, sqlx::Error> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await?;
    let applied: BTreeSet<i64> = applied.into_iter().collect();
    Ok(rookery_store::MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| m.version)
        .filter(|v| !applied.contains(v))
        .collect())
}

/// Prometheus metrics: what every part of the process recorded (commands, HTTP requests, relay
/// and projection batches, events, cursor), plus gauges computed now from Postgres (relay lag,
/// projection lag, state and dead letters per projection).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String)))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    if let Err(e) = system_gauges(&state).await {
        // Still serve the recorded series: a scrape is most useful when things go wrong.
        tracing::warn!(error = %format!("{e:#}"), "metrics: cannot compute lag gauges");
    }
    let mut response = state.metrics().render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Sets the gauges that describe the whole system, read from Postgres and the bus now.
async fn system_gauges(state: &AppState) -> anyhow::Result<()> {
    use anyhow::Context;
    use metrics::gauge;
    use rookery_projections::ProjectionState::{Failed, Paused, Rebuilding, Running};

    let stream = state.config().stream.clone();
    if let Some(bus) = state.bus() {
        gauge!("rookery_nats_connected", "stream" => stream.clone()).set(if bus.is_connected() {
            1.0
        } else {
            0.0
        });
    }

    let pool = state.pool();
    let cursor = rookery_store::relay::load_cursor(pool, &stream)
        .await
        .context("loading the relay cursor")?;
    // The events table's log-key index makes this a range scan over the unrelayed tail.
    let (events, seconds): (i64, f64) = sqlx::query_as(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(recorded_at)), 0)::float8
         FROM events WHERE (transaction_id, global_position) > ($1::bigint::text::xid8, $2)",
    )
    .bind(cursor.txid_i64())
    .bind(cursor.gpos)
    .fetch_one(pool)
    .await
    .context("measuring relay lag")?;
    gauge!("rookery_relay_lag_events", "stream" => stream.clone()).set(events as f64);
    gauge!("rookery_relay_lag_seconds", "stream" => stream).set(seconds);

    let projections = rookery_projections::status(pool, state.config().partitions)
        .await
        .context("reading projection status")?;
    for p in &projections {
        let name = p.name.clone();
        gauge!("rookery_projection_lag_events", "projection" => name.clone())
            .set(p.lag_events as f64);
        gauge!("rookery_projection_lag_seconds", "projection" => name.clone()).set(p.lag_seconds);
        gauge!("rookery_projection_dead_letters", "projection" => name.clone())
            .set(p.dead_letters as f64);
        // One series per state, 1 for the current one: alerts can match `state="failed"`.
        for s in [Running, Paused, Rebuilding, Failed] {
            gauge!("rookery_projection_state", "projection" => name.clone(), "state" => s.to_string())
                .set(if p.state == s { 1.0 } else { 0.0 });
        }
    }
    Ok(())
}

/// This resource's routes. One `routes!` per path: utoipa-axum mounts each handler of a group on
/// every path of the group.
pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(metrics))
}
