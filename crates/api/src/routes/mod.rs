//! The handlers, one module per resource; each module's `router()` holds its routes, and
//! `api_router` merges them (with the operations and the OpenAPI document's own).

use axum::http::StatusCode;
use rookery_events::Platform;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::commands::CommandResult;
use crate::error::ApiError;
use crate::extract::Json;
use crate::openapi::{self, ApiDoc};
use crate::state::AppState;

pub mod activities;
pub mod auth;
pub mod communities;
pub mod members;
pub mod messages;
pub mod moderation;
pub mod ops;
pub mod reputation;
pub mod users;

/// Every route, each documented in the OpenAPI document.
pub(crate) fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(auth::router())
        .merge(users::router())
        .merge(communities::router())
        .merge(members::router())
        .merge(messages::router())
        .merge(activities::router())
        .merge(moderation::router())
        .merge(reputation::router())
        .merge(ops::router())
        .merge(openapi::router())
}

/// 201 when a POST wrote something, 200 when it was already so (idempotent repeat).
pub(crate) fn created_or_ok(result: CommandResult) -> (StatusCode, Json<CommandResult>) {
    let status = if result.position.is_some() {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(result))
}

/// A platform named in a path; unknown values are refused like unknown body values (422).
pub(crate) fn parse_platform(value: &str) -> Result<Platform, ApiError> {
    value
        .parse::<Platform>()
        .map_err(|e| ApiError::invalid("platform", e.to_string()))
}
