//! `/v1/communities/{id}/members/{user_id}/warn|timeout|kick|reputation`: moderators warn, time
//! out and kick members ranked below them; owners and admins change reputation by hand.

use axum::extract::State;
use axum::http::StatusCode;
use rookery_domain::{Membership, MembershipCommand};
use rookery_events::membership::membership_id;
use rookery_events::Decimal4;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::CommunityAccess;
use crate::auth::AuthUser;
use crate::commands::{execute, CommandResult, Ctx};
use crate::error::ApiError;
use crate::extract::{Json, JsonOrEmpty, Path, RequestMeta};
use crate::openapi::{
    BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, PreconditionFailed, Unprocessable,
};
use crate::routes::created_or_ok;
use crate::routes::members::MemberPath;
use crate::state::AppState;

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModerationRequest {
    /// At most 500 characters.
    pub reason: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeoutRequest {
    /// 1 second to 14 days.
    #[schema(example = 600)]
    pub duration_secs: u64,
    /// At most 500 characters.
    pub reason: Option<String>,
}

/// Exactly one of `delta` and `score`, with a reason.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReputationRequest {
    /// Move the score by this much (within ±1000); the community's range still applies.
    #[schema(value_type = Option<f64>, example = -12.5)]
    pub delta: Option<Decimal4>,
    /// Set the score (clamped to the community's range).
    #[schema(value_type = Option<f64>, example = 700)]
    pub score: Option<Decimal4>,
    /// Required: 1 to 500 characters.
    pub reason: String,
}

/// Runs a moderation command on the member, for a caller who is an active member themselves.
async fn moderate(
    state: &AppState,
    auth: &AuthUser,
    meta: RequestMeta,
    path: &MemberPath,
    name: &'static str,
    command: impl FnOnce(rookery_events::Role) -> MembershipCommand,
) -> Result<CommandResult, ApiError> {
    let access = CommunityAccess::load(state.communities(), auth, path.id).await?;
    let actor_role = access.require_member()?;
    let ctx = Ctx::new(auth, meta);
    let membership = membership_id(path.id, path.user_id).to_string();
    execute::<Membership>(state, &ctx, name, membership, |_| {
        Ok(vec![command(actor_role)])
    })
    .await
}

/// Warns a member (moderators and above, for members ranked below them).
#[utoipa::path(post, path = "/v1/communities/{id}/members/{user_id}/warn", tag = "members",
    request_body(content = Option<ModerationRequest>, description = "Optional reason"),
    params(
        ("id" = Uuid, Path, description = "Community id"),
        ("user_id" = Uuid, Path, description = "The member's hub user id"),
        ("If-Match" = Option<String>, Header, description = "Expected membership version"),
    ),
    responses(
        (status = 201, description = "Warned", body = CommandResult),
        BadRequest, Forbidden, NotFound, Conflict, PreconditionFailed, PayloadTooLarge, Unprocessable,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %path.id, target_user_id = %path.user_id))]
pub(crate) async fn warn(
    State(state): State<AppState>,
    auth: AuthUser,
    meta: RequestMeta,
    Path(path): Path<MemberPath>,
    JsonOrEmpty(body): JsonOrEmpty<ModerationRequest>,
) -> Result<(StatusCode, Json<CommandResult>), ApiError> {
    let actor_id = auth.user_id;
    let result = moderate(&state, &auth, meta, &path, "member.warn", |actor_role| {
        MembershipCommand::Warn {
            actor_id,
            actor_role,
            reason: body.reason,
        }
    })
    .await?;
    Ok(created_or_ok(result))
}

/// Times a member out for `duration_secs` (moderators and above, for members ranked below them).
#[utoipa::path(post, path = "/v1/communities/{id}/members/{user_id}/timeout", tag = "members",
    request_body = TimeoutRequest,
    params(
        ("id" = Uuid, Path, description = "Community id"),
        ("user_id" = Uuid, Path, description = "The member's hub user id"),
        ("If-Match" = Option<String>, Header, description = "Expected membership version"),
    ),
    responses(
        (status = 201, description = "Timed out", body = CommandResult),
        BadRequest, Forbidden, NotFound, Conflict, PreconditionFailed, PayloadTooLarge, Unprocessable,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %path.id, target_user_id = %path.user_id))]
pub(crate) async fn timeout(
    State(state): State<AppState>,
    auth: AuthUser,
    meta: RequestMeta,
    Path(path): Path<MemberPath>,
    Json(body): Json<TimeoutRequest>,
) -> Result<(StatusCode, Json<CommandResult>), ApiError> {
    let actor_id = auth.user_id;
    let result = moderate(&state, &auth, meta, &path, "member.timeout", |actor_role| {
        MembershipCommand::Timeout {
            actor_id,
            actor_role,
            duration_secs: body.duration_secs,
            reason: body.reason,
        }
    })
    .await?;
    Ok(created_or_ok(result))
}

/// Kicks a member out; unlike a ban they may join again (moderators and above, for members
/// ranked below them).
#[utoipa::path(post, path = "/v1/communities/{id}/members/{user_id}/kick", tag = "members",
    request_body(content = Option<ModerationRequest>, description = "Optional reason"),
    params(
        ("id" = Uuid, Path, description = "Community id"),
        ("user_id" = Uuid, Path, description = "The member's hub user id"),
        ("If-Match" = Option<String>, Header, description = "Expected membership version"),
    ),
    responses(
        (status = 201, description = "Kicked", body = CommandResult),
        BadRequest, Forbidden, NotFound, Conflict, PreconditionFailed, PayloadTooLarge, Unprocessable,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %path.id, target_user_id = %path.user_id))]
pub(crate) async fn kick(
    State(state): State<AppState>,
    auth: AuthUser,
    meta: RequestMeta,
    Path(path): Path<MemberPath>,
    JsonOrEmpty(body): JsonOrEmpty<ModerationRequest>,
) -> Result<(StatusCode, Json<CommandResult>), ApiError> {
    let actor_id = auth.user_id;
    let result = moderate(&state, &auth, meta, &path, "member.kick", |actor_role| {
        MembershipCommand::Kick {
            actor_id,
            actor_role,
            reason: body.reason,
        }
    })
    .await?;
    Ok(created_or_ok(result))
}

/// Moves a member's reputation by `delta`, or sets it to `score` (owners and admins, for members
/// ranked below them), with a reason kept in the history.
#[utoipa::path(post, path = "/v1/communities/{id}/members/{user_id}/reputation", tag = "reputation",
    request_body = ReputationRequest,
    params(
        ("id" = Uuid, Path, description = "Community id"),
        ("user_id" = Uuid, Path, description = "The member's hub user id"),
        ("If-Match" = Option<String>, Header, description = "Expected membership version"),
    ),
    responses(
        (status = 201, description = "Changed", body = CommandResult),
        BadRequest, Forbidden, NotFound, Conflict, PreconditionFailed, PayloadTooLarge, Unprocessable,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %path.id, target_user_id = %path.user_id))]
pub(crate) async fn change_reputation(
    State(state): State<AppState>,
    auth: AuthUser,
    meta: RequestMeta,
    Path(path): Path<MemberPath>,
    Json(body): Json<ReputationRequest>,
) -> Result<(StatusCode, Json<CommandResult>), ApiError> {
    let actor_id = auth.user_id;
    let reason = body.reason;
    let make = match (body.delta, body.score) {
        (Some(delta), None) => Ok(move |actor_role| MembershipCommand::AdjustReputation {
            actor_id,
            actor_role,
            delta,
            reason,
        }),
        (None, Some(score)) => Err(move |actor_role| MembershipCommand::SetReputation {
            actor_id,
            actor_role,
            score,
            reason,
        }),
        _ => {
            return Err(ApiError::invalid(
                "delta",
                "send exactly one of `delta` and `score`",
            ))
        }
    };
    let result = match make {
        Ok(adjust) => moderate(&state, &auth, meta, &path, "member.reputation", adjust).await?,
        Err(set) => moderate(&state, &auth, meta, &path, "member.reputation", set).await?,
    };
    Ok(created_or_ok(result))
}

/// This resource's routes (`change_reputation` shares its path with the reputation routes, so
/// it is mounted there). One `routes!` per path.
pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(warn))
        .routes(routes!(timeout))
        .routes(routes!(kick))
}
