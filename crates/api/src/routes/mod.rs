//! The handlers, one module per resource, and the route table.

use axum::http::StatusCode;
use rookery_events::Platform;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::commands::CommandResult;
use crate::error::ApiError;
use crate::extract::Json;
use crate::openapi::{self, ApiDoc};
use crate::state::AppState;

pub mod auth;
pub mod communities;
pub mod members;
pub mod ops;
pub mod users;

/// Every documented route. One `routes!` per path: utoipa-axum mounts each handler of a
/// `routes!` group on every path of the group, so mixing paths would mount handlers twice.
pub(crate) fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(auth::register))
        .routes(routes!(auth::login))
        .routes(routes!(auth::refresh))
        .routes(routes!(auth::logout))
        .routes(routes!(users::me))
        .routes(routes!(users::link_identity))
        .routes(routes!(users::unlink_identity))
        .routes(routes!(communities::create))
        .routes(routes!(communities::get, communities::update))
        .routes(routes!(communities::link_platform))
        .routes(routes!(communities::unlink_platform))
        .routes(routes!(communities::archive))
        .routes(routes!(members::add, members::list))
        .routes(routes!(members::get, members::remove))
        .routes(routes!(members::change_role))
        .routes(routes!(members::ban, members::unban))
        .routes(routes!(ops::health))
        .routes(routes!(ops::ready))
        .routes(routes!(ops::metrics))
        .routes(routes!(openapi::openapi_document))
        .routes(routes!(openapi::docs_page))
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
