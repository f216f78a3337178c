//! Rookery's HTTP API: axum routers, authentication, problem+json errors and the OpenAPI document.
//!
//! Commands take one path ([`commands`]): load the aggregates from the event store, let them
//! decide, append events, claims and side rows in one unit of work, commit, and answer
//! `{id, version, position}`. Who may do what is resolved from the write side (`access`) so it
//! is never stale; queries read the read models (rookery-projections) and can wait for a
//! `position` (read-your-writes). Every error is `application/problem+json`.
//!
//! The composition root calls [`AppState::new`], [`router()`] and, for tooling, [`openapi()`].
//!
//! # Layout
//! - [`config`]: [`ApiConfig`] and [`AuthConfig`].
//! - [`state`]: [`AppState`], shared by every handler, and its sub-states (JWT keys, communities).
//! - [`error`]: [`ApiError`] (one variant per status) and its problem document.
//! - [`extract`]: JSON, path and query extractors that reject with field-naming problems;
//!   request metadata, `If-Match`, and [`MinPosition`](extract::MinPosition).
//! - [`auth`]: JWTs (HS256, pinned), argon2id passwords, rotating refresh tokens.
//! - [`commands`]: the application service every command goes through.
//! - `access`: community visibility and the caller's role, loaded from the event store.
//! - `directory`: platform accounts' hub users and known memberships, as last seen.
//! - `merge`: a registered user claiming a shadow user's platform account.
//! - `ingest`: messages and activities from the platforms: who sent them (shadow users), and
//!   their write without loads in the common case.
//! - `read`: wait until a read model applied `min_position`, then query it (`read::after`).
//! - [`routes`]: one module per resource (`auth`, `users`, `communities`, `members`, `ops`), each
//!   with its handlers, wire types and `router()`; `api_router` merges them.
//! - [`metrics`]: the Prometheus recorder behind the `metrics` facade, and what the API records.
//! - [`mod@openapi`]: the generated OpenAPI 3.1 document and the embedded Swagger UI.

mod access;
pub mod auth;
pub mod commands;
pub mod config;
mod directory;
pub mod error;
pub mod extract;
mod ingest;
mod merge;
pub mod metrics;
pub mod openapi;
mod read;
pub mod routes;
pub mod state;

use std::any::Any;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

pub use config::{ApiConfig, AuthConfig};
pub use error::{ApiError, Problem};
pub use metrics::Metrics;
pub use state::AppState;

/// The whole HTTP surface: `/v1`, `/health`, `/ready`, `/metrics`, `/openapi.json`, `/docs`.
pub fn router(state: AppState) -> Router {
    let (api, _) = routes::api_router().split_for_parts();
    let body_limit = state.config().body_limit;
    api.route("/docs/", get(openapi::docs_page))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::map_response(error::problem_for_plain_errors))
        .layer(middleware::from_fn(observe_http))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request<Body>| {
                let request_id = req
                    .headers()
                    .get(extract::REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                tracing::info_span!(
                    "http",
                    method = %req.method(),
                    path = %req.uri().path(),
                    request_id,
                    user_id = tracing::field::Empty,
                )
            }),
        )
        // Outermost, so the trace span and every handler see the id.
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

/// The OpenAPI 3.1 document, generated from the handlers' annotations.
pub fn openapi() -> utoipa::openapi::OpenApi {
    openapi::finish(routes::api_router().into_openapi())
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    tracing::error!(panic = message, "handler panicked");
    error::problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "an unexpected error occurred; it has been logged".into(),
        None,
    )
    .into_response_with(StatusCode::INTERNAL_SERVER_ERROR)
}

/// Records every request under its route template (bounded label values).
async fn observe_http(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    metrics::observe_http(
        method.as_str(),
        &route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response.into_response()
}

#[cfg(test)]
mod tests;
