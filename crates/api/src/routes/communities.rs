//! `/v1/communities`: create, read, update, platform servers, archive.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use rookery_domain::{Community, CommunityCommand, Membership, MembershipCommand};
use rookery_events::membership::membership_id;
use rookery_events::{JoinMode, Platform};
use rookery_projections::models::members;
use rookery_store::Loaded;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::access::CommunityAccess;
use crate::auth::AuthUser;
use crate::commands::{execute_loaded, timed, Change, CommandResult, Ctx, Tx};
use crate::error::ApiError;
use crate::extract::{ConsistencyParams, Json, JsonOrEmpty, MinPosition, Path, RequestMeta};
use crate::openapi::{
    BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, PreconditionFailed, Unavailable,
    Unprocessable,
};
use crate::read;
use crate::routes::{created_or_ok, parse_platform};
use crate::state::AppState;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

fn default_true() -> bool {
    true
}

fn default_join_mode() -> JoinMode {
    JoinMode::Open
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCommunityRequest {
    /// Unique URL-safe name: `^[a-z0-9][a-z0-9-]{2,62}$`.
    #[schema(example = "rustaceans")]
    pub name: String,
    /// 1 to 100 characters.
    #[schema(example = "Rustaceans")]
    pub display_name: String,
    /// The platform the community mainly lives on.
    pub platform: Platform,
    /// Public communities are visible to every signed-in user; private ones only to members.
    #[serde(default = "default_true")]
    #[schema(default = true)]
    pub is_public: bool,
    #[serde(default = "default_join_mode")]
    #[schema(default = "open")]
    pub join_mode: JoinMode,
}

/// Absent fields keep their value; an empty `description` clears it.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateCommunityRequest {
    pub display_name: Option<String>,
    /// At most 2000 characters.
    pub description: Option<String>,
    pub is_public: Option<bool>,
    pub join_mode: Option<JoinMode>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkPlatformRequest {
    pub platform: Platform,
    /// The guild, channel or workspace id: 1 to 128 of `[A-Za-z0-9_.:-]`. One community per
    /// server.
    #[schema(example = "80351110224678912")]
    pub server_id: String,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ArchiveRequest {
    /// At most 500 characters.
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CommunityResponse {
    pub id: Uuid,
    pub name: String,
    pub display_name: String,
    pub description: Option<String>,
    pub platform: Option<Platform>,
    pub is_public: bool,
    pub join_mode: JoinMode,
    pub owner_id: Option<Uuid>,
    pub platform_servers: Vec<PlatformServer>,
    pub archived: bool,
    /// The community aggregate's version (also sent as `ETag`; use it for `If-Match`).
    pub version: i64,
    /// Active members, from the members read model (may lag the write by milliseconds).
    pub member_count: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PlatformServer {
    pub platform: Platform,
    pub server_id: String,
}

/// Creates a community; the caller becomes its owner (both in one commit).
#[utoipa::path(post, path = "/v1/communities", tag = "communities",
    request_body = CreateCommunityRequest,
    responses(
        (status = 201, description = "Created", body = CommandResult),
        BadRequest, Forbidden, Conflict, PayloadTooLarge, Unprocessable,
    ))]
#[tracing::instrument(skip_all, fields(user_id = %auth.user_id, community_id = tracing::field::Empty))]
pub(crate) async fn create(
    State(state): State<AppState>,
    auth: AuthUser,
    meta: RequestMeta,
    Json(body): Json<CreateCommunityRequest>,
) -> Result<(StatusCode, Json<CommandResult>), ApiError> {
    if auth.community_scope.is_some() {
        return Err(ApiError::Forbidden(
            "a token scoped to one community cannot create communities".into(),
        ));
    }
    let community_id = Uuid::new_v4();
    tracing::Span::current().record("community_id", tracing::field::display(community_id));
    let ctx = Ctx::new(&auth, meta);
    let result = timed("community.create", async {
        let community = Change::decide(
            community_id.to_string(),
            Loaded {
                aggregate: Community::default(),
                version: 0,
            },
            vec![CommunityCommand::Create {
                community_id,
                name: body.name,
                display_name: body.display_name,
                platform: body.platform,
                is_public: body.is_public,
                join_mode: body.join_mode,
                owner_id: auth.user_id,
            }],
        )?;
        let owner = Change::decide(
            membership_id(community_id, auth.user_id).to_string(),
            Loaded {
                aggregate: Membership::default(),
                version: 0,
            },
            vec![MembershipCommand::Found {
                community_id,
                owner_id: auth.user_id,
            }],
        )?;
        let mut tx = Tx::new(&ctx);
        tx.stage(&community)?;
        tx.stage(&owner)?;
        let position = tx.commit(&state).await?;
        Ok(CommandResult {
            version: community.version(),
            id: community.id,
            position,
        })
    })
    .await?;
    Ok((StatusCode::CREATED, Json(result)))
}

/// A community as its events say now. Public communities are visible to every signed-in user,
/// private ones only to their members (others get 404). `min_position` waits for
/// `member_count` (a read model); the rest is read from the community's events, always current.
#[utoipa::path(get, path = "/v1/communities/{id}", tag = "communities",
    params(("id" = Uuid, Path, description = "Community id"), ConsistencyParams),
    responses(
        (status = 200, description = "The community", body = CommunityResponse,
            headers(("ETag" = String, description = "The version, quoted"))),
        BadRequest, NotFound, Unavailable,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %id))]
pub(crate) async fn get(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<Uuid>,
    min: MinPosition,
) -> Result<(HeaderMap, Json<CommunityResponse>), ApiError> {
    let access = CommunityAccess::load(state.communities(), &auth, id).await?;
    access.require_visible()?;
    let count = members::member_count(state.pool(), id);
    let member_count = read::after(&state, &[&members::MembersProjection], min, count).await?;
    let version = access.community.version;
    let c = access.community.aggregate;
    let mut headers = HeaderMap::new();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{version}\"")) {
        headers.insert(header::ETAG, etag);
    }
    Ok((
        headers,
        Json(CommunityResponse {
            id,
            name: c.name,
            display_name: c.display_name,
            description: c.description,
            platform: c.platform,
            is_public: c.is_public,
            join_mode: c.join_mode,
            owner_id: c.owner_id,
            platform_servers: c
                .platform_servers
                .into_iter()
                .map(|s| PlatformServer {
                    platform: s.platform,
                    server_id: s.server_id,
                })
                .collect(),
            archived: c.archived,
            version,
            member_count,
        }),
    ))
}

/// Updates profile fields and the join mode in one commit (owners and admins).
#[utoipa::path(patch, path = "/v1/communities/{id}", tag = "communities",
    request_body = UpdateCommunityRequest,
    params(
        ("id" = Uuid, Path, description = "Community id"),
        ("If-Match" = Option<String>, Header, description = "Expected community version"),
    ),
    responses(
        (status = 200, description = "Updated (or nothing to change: `position` is null)", body = CommandResult),
        BadRequest, Forbidden, NotFound, Conflict, PreconditionFailed, PayloadTooLarge, Unprocessable,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %id))]
pub(crate) async fn update(
    State(state): State<AppState>,
    auth: AuthUser,
    meta: RequestMeta,
    Path(id): Path<Uuid>,
    JsonOrEmpty(body): JsonOrEmpty<UpdateCommunityRequest>,
) -> Result<Json<CommandResult>, ApiError> {
    let access = CommunityAccess::load(state.communities(), &auth, id).await?;
    let actor_role = access.require_member()?;
    let ctx = Ctx::new(&auth, meta);
    let result = execute_loaded(
        &state,
        &ctx,
        "community.update",
        id.to_string(),
        access.community,
        |_| {
            let mut commands = Vec::new();
            if body.display_name.is_some() || body.description.is_some() || body.is_public.is_some()
            {
                commands.push(CommunityCommand::UpdateProfile {
                    actor_role,
                    display_name: body.display_name,
                    description: body.description,
                    is_public: body.is_public,
                });
            }
            if let Some(join_mode) = body.join_mode {
                commands.push(CommunityCommand::SetJoinMode {
                    actor_role,
                    join_mode,
                });
            }
            Ok(commands)
        },
    )
    .await?;
    Ok(Json(result))
}

/// Links a platform server (guild, channel, workspace) to the community (owners and admins). A
/// server belongs to at most one community.
#[utoipa::path(post, path = "/v1/communities/{id}/platforms", tag = "communities",
    request_body = LinkPlatformRequest,
    params(
        ("id" = Uuid, Path, description = "Community id"),
        ("If-Match" = Option<String>, Header, description = "Expected community version"),
    ),
    responses(
        (status = 201, description = "Linked", body = CommandResult),
        (status = 200, description = "Already linked; nothing changed", body = CommandResult),
        BadRequest, Forbidden, NotFound, Conflict, PreconditionFailed, PayloadTooLarge, Unprocessable,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %id))]
pub(crate) async fn link_platform(
    State(state): State<AppState>,
    auth: AuthUser,
    meta: RequestMeta,
    Path(id): Path<Uuid>,
    Json(body): Json<LinkPlatformRequest>,
) -> Result<(StatusCode, Json<CommandResult>), ApiError> {
    let access = CommunityAccess::load(state.communities(), &auth, id).await?;
    let actor_role = access.require_member()?;
    let ctx = Ctx::new(&auth, meta);
    let result = execute_loaded(
        &state,
        &ctx,
        "community.link_platform",
        id.to_string(),
        access.community,
        |_| {
            Ok(vec![CommunityCommand::LinkPlatform {
                actor_role,
                platform: body.platform,
                server_id: body.server_id,
            }])
        },
    )
    .await?;
    Ok(created_or_ok(result))
}

#[derive(Debug, Deserialize)]
pub(crate) struct PlatformPath {
    id: Uuid,
    platform: String,
    server_id: String,
}

/// Unlinks a platform server (owners and admins); the server can then join another community.
#[utoipa::path(delete, path = "/v1/communities/{id}/platforms/{platform}/{server_id}", tag = "communities",
    params(
        ("id" = Uuid, Path, description = "Community id"),
        ("platform" = Platform, Path, description = "Platform of the server"),
        ("server_id" = String, Path, description = "The server's id on the platform"),
        ("If-Match" = Option<String>, Header, description = "Expected community version"),
    ),
    responses(
        (status = 200, description = "Unlinked", body = CommandResult),
        BadRequest, Forbidden, NotFound, Conflict, PreconditionFailed, Unprocessable,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %path.id))]
pub(crate) async fn unlink_platform(
    State(state): State<AppState>,
    auth: AuthUser,
    meta: RequestMeta,
    Path(path): Path<PlatformPath>,
) -> Result<Json<CommandResult>, ApiError> {
    let platform = parse_platform(&path.platform)?;
    let access = CommunityAccess::load(state.communities(), &auth, path.id).await?;
    let actor_role = access.require_member()?;
    let ctx = Ctx::new(&auth, meta);
    let server_id = path.server_id;
    let result = execute_loaded(
        &state,
        &ctx,
        "community.unlink_platform",
        path.id.to_string(),
        access.community,
        |_| {
            Ok(vec![CommunityCommand::UnlinkPlatform {
                actor_role,
                platform,
                server_id,
            }])
        },
    )
    .await?;
    Ok(Json(result))
}

/// Archives the community (owner only): it accepts no further commands and its platform
/// servers are released.
#[utoipa::path(post, path = "/v1/communities/{id}/archive", tag = "communities",
    request_body(content = Option<ArchiveRequest>, description = "Optional reason"),
    params(
        ("id" = Uuid, Path, description = "Community id"),
        ("If-Match" = Option<String>, Header, description = "Expected community version"),
    ),
    responses(
        (status = 200, description = "Archived", body = CommandResult),
        BadRequest, Forbidden, NotFound, Conflict, PreconditionFailed, PayloadTooLarge, Unprocessable,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %id))]
pub(crate) async fn archive(
    State(state): State<AppState>,
    auth: AuthUser,
    meta: RequestMeta,
    Path(id): Path<Uuid>,
    JsonOrEmpty(body): JsonOrEmpty<ArchiveRequest>,
) -> Result<Json<CommandResult>, ApiError> {
    let access = CommunityAccess::load(state.communities(), &auth, id).await?;
    let actor_role = access.require_member()?;
    let ctx = Ctx::new(&auth, meta);
    let result = execute_loaded(
        &state,
        &ctx,
        "community.archive",
        id.to_string(),
        access.community,
        |_| {
            Ok(vec![CommunityCommand::Archive {
                actor_role,
                reason: body.reason,
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
        .routes(routes!(create))
        .routes(routes!(get, update))
        .routes(routes!(link_platform))
        .routes(routes!(unlink_platform))
        .routes(routes!(archive))
}
