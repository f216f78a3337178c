//! `/v1/users/me`: the signed-in hub user and their linked platform accounts.

use axum::extract::State;
use axum::http::StatusCode;
use rookery_domain::claims::{kinds, platform_key};
use rookery_domain::{User, UserCommand};
use rookery_events::Platform;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::commands::{execute, timed, CommandResult, Ctx};
use crate::error::ApiError;
use crate::extract::{Json, Path, RequestMeta};
use crate::openapi::{
    BadRequest, Conflict, NotFound, PayloadTooLarge, PreconditionFailed, Unprocessable,
};
use crate::routes::{created_or_ok, parse_platform};
use crate::state::AppState;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UserResponse {
    pub id: Uuid,
    pub username: String,
    pub email: String,
    pub identities: Vec<IdentityResponse>,
    /// The user aggregate's version (for `If-Match`).
    pub version: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IdentityResponse {
    pub platform: Platform,
    pub platform_user_id: String,
    pub username: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkIdentityRequest {
    pub platform: Platform,
    /// The account's id on the platform: 1 to 128 of `[A-Za-z0-9_.:-]`.
    #[schema(example = "141981764")]
    pub platform_user_id: String,
    /// The account's display name on the platform.
    #[schema(example = "ferris_tv")]
    pub username: String,
}

/// The signed-in user, folded from their event stream.
#[utoipa::path(get, path = "/v1/users/me", tag = "users",
    responses((status = 200, description = "The signed-in user", body = UserResponse), NotFound))]
#[tracing::instrument(skip_all, fields(user_id = %auth.user_id))]
pub(crate) async fn me(
    State(state): State<AppState>,
    auth: AuthUser,
) -> Result<Json<UserResponse>, ApiError> {
    let loaded = state
        .store()
        .load::<User>(&auth.user_id.to_string())
        .await?;
    let user = loaded.aggregate;
    if !user.exists() {
        return Err(ApiError::not_found("user"));
    }
    Ok(Json(UserResponse {
        id: auth.user_id,
        username: user.username,
        email: user.email,
        identities: user
            .identities
            .into_iter()
            .map(|i| IdentityResponse {
                platform: i.platform,
                platform_user_id: i.platform_user_id,
                username: i.username,
            })
            .collect(),
        version: loaded.version,
    }))
}

/// Links a platform account to the signed-in user. One hub user per platform account, one
/// account per platform per user; linking the same account again changes nothing (200). An
/// account the hub knew only from the platform (a shadow user) is claimed: its memberships and
/// reputation history move to the signed-in user.
#[utoipa::path(post, path = "/v1/users/me/identities", tag = "users",
    request_body = LinkIdentityRequest,
    params(("If-Match" = Option<String>, Header, description = "Expected user version")),
    responses(
        (status = 201, description = "Linked", body = CommandResult),
        (status = 200, description = "Already linked; nothing changed", body = CommandResult),
        BadRequest, NotFound, Conflict, PreconditionFailed, PayloadTooLarge, Unprocessable,
    ))]
#[tracing::instrument(skip_all, fields(user_id = %auth.user_id))]
pub(crate) async fn link_identity(
    State(state): State<AppState>,
    auth: AuthUser,
    meta: RequestMeta,
    Json(body): Json<LinkIdentityRequest>,
) -> Result<(StatusCode, Json<CommandResult>), ApiError> {
    let ctx = Ctx::new(&auth, meta);
    let key = platform_key(body.platform, &body.platform_user_id);
    let holder = state
        .store()
        .claim_holder(kinds::PLATFORM_IDENTITY, &key)
        .await?;
    if let Some(holder) = holder.filter(|h| *h != auth.user_id.to_string()) {
        let held_by = state.store().load::<User>(&holder).await?;
        if held_by.aggregate.shadow && held_by.aggregate.merged_into.is_none() {
            let result = timed(
                "user.link_identity",
                crate::merge::claim_shadow(
                    &state,
                    &ctx,
                    auth.user_id,
                    held_by,
                    crate::directory::PlatformSender {
                        platform: body.platform,
                        platform_user_id: body.platform_user_id,
                        username: body.username,
                    },
                ),
            )
            .await?;
            return Ok(created_or_ok(result));
        }
        // Held by a registered user: the link below is refused as a taken claim (409).
    }
    let result = execute::<User>(
        &state,
        &ctx,
        "user.link_identity",
        auth.user_id.to_string(),
        |_| {
            Ok(vec![UserCommand::LinkIdentity {
                platform: body.platform,
                platform_user_id: body.platform_user_id,
                username: body.username,
            }])
        },
    )
    .await?;
    Ok(created_or_ok(result))
}

/// Unlinks a platform account from the signed-in user (its claim is released).
#[utoipa::path(delete, path = "/v1/users/me/identities/{platform}/{platform_user_id}", tag = "users",
    params(
        ("platform" = Platform, Path, description = "Platform of the account"),
        ("platform_user_id" = String, Path, description = "The account's id on the platform"),
        ("If-Match" = Option<String>, Header, description = "Expected user version"),
    ),
    responses((status = 200, description = "Unlinked", body = CommandResult), NotFound, PreconditionFailed, Unprocessable))]
#[tracing::instrument(skip_all, fields(user_id = %auth.user_id, platform = %platform))]
pub(crate) async fn unlink_identity(
    State(state): State<AppState>,
    auth: AuthUser,
    meta: RequestMeta,
    Path((platform, platform_user_id)): Path<(String, String)>,
) -> Result<Json<CommandResult>, ApiError> {
    let platform = parse_platform(&platform)?;
    let ctx = Ctx::new(&auth, meta);
    let result = execute::<User>(
        &state,
        &ctx,
        "user.unlink_identity",
        auth.user_id.to_string(),
        |_| {
            Ok(vec![UserCommand::UnlinkIdentity {
                platform,
                platform_user_id,
            }])
        },
    )
    .await?;
    Ok(Json(result))
}

/// This resource's routes. One `routes!` per path: utoipa-axum mounts each handler of a group on
/// every path of the group.
pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(me))
        .routes(routes!(link_identity))
        .routes(routes!(unlink_identity))
}
