//! `/v1/communities/{id}/members`: joining, adding, roles, leaving, removing, bans, and the
//! member list (from the members read model, with read-your-writes via `min_position`).

use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use rookery_domain::{Community, Membership, MembershipCommand, User};
use rookery_events::membership::membership_id;
use rookery_events::Tier;
use rookery_events::{JoinMode, MemberStatus, Role};
use rookery_projections::models::members::{self, MemberQuery, MemberSort, MemberView};
use rookery_projections::models::reputation::ReputationProjection;
use rookery_projections::support::{DEFAULT_LIMIT, MAX_LIMIT};
use rookery_store::{Loaded, StoreError};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::access::{community_not_found, CommunityAccess};
use crate::auth::AuthUser;
use crate::commands::{execute, execute_loaded, Change, CommandResult, Ctx, Tx};
use crate::error::ApiError;
use crate::extract::{ConsistencyParams, Json, JsonOrEmpty, MinPosition, Path, Query, RequestMeta};
use crate::openapi::{
    BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, PreconditionFailed, Unavailable,
    Unprocessable,
};
use crate::read;
use crate::routes::created_or_ok;
use crate::routes::users::IdentityResponse;
use crate::state::AppState;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMemberRequest {
    /// Whom to add (owners and admins; also approves a pending request). Absent, or the
    /// caller's own id: the caller joins (or asks to, in approval mode).
    pub user_id: Option<Uuid>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeRoleRequest {
    /// The new role; `owner` cannot be granted (ownership is transferred, not assigned).
    pub role: Role,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BanRequest {
    /// At most 500 characters.
    pub reason: Option<String>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MembersQuery {
    /// Only members with this role.
    #[param(value_type = Option<Role>)]
    pub role: Option<String>,
    /// Only memberships in this status (default `active`).
    #[param(value_type = Option<MemberStatus>)]
    pub status: Option<String>,
    /// `joined_at` (default, oldest first), `username`, or `reputation` (highest first).
    #[param(value_type = Option<MemberSortParam>, inline)]
    pub sort: Option<String>,
    /// Page size, 1 to 200 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 200)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Member list orders, as the OpenAPI document names them (parsed by [`MembersQuery`]).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum MemberSortParam {
    /// Longest-standing members first.
    JoinedAt,
    Username,
    /// Highest reputation first.
    Reputation,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MemberResponse {
    pub community_id: String,
    pub user_id: String,
    pub username: String,
    pub role: Role,
    pub status: MemberStatus,
    /// When the user (last) joined, from the event's metadata.
    pub joined_at: String,
    /// When the membership last changed.
    pub updated_at: String,
    /// The user's linked platform accounts.
    pub identities: Vec<IdentityResponse>,
    /// Reputation in this community, rounded (`null` until the reputation model has scored them).
    pub reputation: Option<i64>,
    pub tier: Option<Tier>,
}

impl From<MemberView> for MemberResponse {
    fn from(m: MemberView) -> Self {
        MemberResponse {
            community_id: m.community_id.to_string(),
            user_id: m.user_id.to_string(),
            username: m.username,
            role: m.role,
            status: m.status,
            joined_at: m
                .joined_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            updated_at: m
                .updated_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            identities: m
                .identities
                .into_iter()
                .map(|i| IdentityResponse {
                    platform: i.platform,
                    platform_user_id: i.platform_user_id,
                    username: i.username,
                })
                .collect(),
            reputation: m.reputation.map(|r| r.round()),
            tier: m.reputation.map(Tier::of),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MemberPageResponse {
    pub items: Vec<MemberResponse>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// The read models a member is shown from.
const SHOWN_FROM: [&dyn rookery_projections::Projection; 2] =
    [&members::MembersProjection, &ReputationProjection];

#[derive(Debug, Deserialize)]
pub(crate) struct MemberPath {
    pub(crate) id: Uuid,
    pub(crate) user_id: Uuid,
}

fn parse_query_enum<T: std::str::FromStr>(
    field: &str,
    value: Option<&str>,
) -> Result<Option<T>, ApiError>
where
    T::Err: std::fmt::Display,
{
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse::<T>()
            .map(Some)
            .map_err(|e| ApiError::invalid(field, e.to_string())),
    }
}

impl MembersQuery {
    fn to_query(&self) -> Result<MemberQuery, ApiError> {
        let sort = match self.sort.as_deref().map(str::trim) {
            None | Some("") | Some("joined_at") => MemberSort::JoinedAt,
            Some("username") => MemberSort::Username,
            Some("reputation") => MemberSort::Reputation,
            Some(other) => {
                return Err(ApiError::invalid(
                    "sort",
                    format!(
                        "unknown sort `{other}`; expected one of: joined_at, username, reputation"
                    ),
                ))
            }
        };
        let limit = match self
            .limit
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
        {
            None => DEFAULT_LIMIT,
            Some(v) => match v.parse::<u32>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                _ => {
                    return Err(ApiError::invalid(
                        "limit",
                        format!("must be an integer from 1 to {MAX_LIMIT}"),
                    ))
                }
            },
        };
        Ok(MemberQuery {
            role: parse_query_enum::<Role>("role", self.role.as_deref())?,
            status: parse_query_enum::<MemberStatus>("status", self.status.as_deref())?,
            sort,
            limit: Some(limit),
            cursor: self.cursor.clone().filter(|c| !c.is_empty()),
        })
    }
}

/// Joins the community (no body, `{}` or the caller's own `user_id`), or adds another user /
/// approves their join request (`{"user_id"}`, owners and admins).
#[utoipa::path(post, path = "/v1/communities/{id}/members", tag = "members",
    request_body(content = Option<AddMemberRequest>, description = "Absent or `{}` to join yourself"),
    params(("id" = Uuid, Path, description = "Community id")),
    responses(
        (status = 201, description = "Joined, added, approved, or join requested (approval mode)", body = CommandResult),
        BadRequest, Forbidden, NotFound, Conflict, PayloadTooLarge, Unprocessable,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %id, target_user_id = tracing::field::Empty))]
pub(crate) async fn add(
    State(state): State<AppState>,
    auth: AuthUser,
    meta: RequestMeta,
    Path(id): Path<Uuid>,
    JsonOrEmpty(body): JsonOrEmpty<AddMemberRequest>,
) -> Result<(StatusCode, Json<CommandResult>), ApiError> {
    let ctx = Ctx::new(&auth, meta);
    let target = body.user_id.filter(|u| *u != auth.user_id);
    if target.is_none() {
        if let Some(result) = join_without_load(&state, &auth, &ctx, id).await? {
            return Ok(created_or_ok(result));
        }
    }
    let access = CommunityAccess::load(state.communities(), &auth, id).await?;
    let context = access.community.aggregate.context();
    let result = match target {
        None => {
            // The community id works as an invite link for open and approval communities, even
            // private ones; an invite-only private community stays invisible to outsiders.
            if !access.is_public()
                && access.role().is_none()
                && context.join_mode == JoinMode::Invite
            {
                return Err(community_not_found());
            }
            let membership = membership_id(id, auth.user_id).to_string();
            execute_loaded(
                &state,
                &ctx,
                "member.join",
                membership,
                access.caller,
                |_| {
                    Ok(vec![MembershipCommand::Join {
                        community_id: id,
                        user_id: auth.user_id,
                        context,
                    }])
                },
            )
            .await?
        }
        Some(user_id) => {
            tracing::Span::current().record("target_user_id", tracing::field::display(user_id));
            let actor_role = access.require_member()?;
            require_user(&state, user_id).await?;
            execute::<Membership>(
                &state,
                &ctx,
                "member.add",
                membership_id(id, user_id).to_string(),
                |_| {
                    Ok(vec![MembershipCommand::Add {
                        community_id: id,
                        user_id,
                        actor_role,
                        context,
                    }])
                },
            )
            .await?
        }
    };
    Ok(created_or_ok(result))
}

/// A join decided without loading anything: on the community as this process last loaded it,
/// and on the caller never having been a member (true of every first join). The insert's guards
/// confirm both — the community still at that version, the membership still without events — or
/// it writes nothing. `None` whenever the shortcut does not apply or its premise was wrong: the
/// caller then takes the loading path, whose answer (a refusal included) is the authoritative one.
#[tracing::instrument(skip_all)]
async fn join_without_load(
    state: &AppState,
    auth: &AuthUser,
    ctx: &Ctx,
    id: Uuid,
) -> Result<Option<CommandResult>, ApiError> {
    if !auth.reaches(id) || ctx.meta.if_match.is_some() {
        return Ok(None);
    }
    let Some(community) = state.communities().cached(id) else {
        return Ok(None);
    };
    let context = community.aggregate.context();
    // The premise makes the caller an outsider, whom an invite-only private community refuses.
    if !community.aggregate.is_public && context.join_mode == JoinMode::Invite {
        return Ok(None);
    }
    let started = Instant::now();
    let never_joined = Loaded {
        aggregate: Membership::default(),
        version: 0,
    };
    let join = MembershipCommand::Join {
        community_id: id,
        user_id: auth.user_id,
        context,
    };
    let membership = membership_id(id, auth.user_id).to_string();
    let Ok(change) = Change::decide(membership, never_joined, vec![join]) else {
        return Ok(None);
    };
    if change.is_empty() {
        return Ok(None);
    }
    let mut tx = Tx::new(ctx);
    tx.stage(&change)?;
    tx.guard::<Community>(&id.to_string(), community.version);
    tx.guard::<Membership>(&change.id, 0);
    match tx.commit_change(state, change).await {
        // Not a command outcome: the loading path decides, and is timed, next.
        Err(StoreError::Stale { .. }) => Ok(None),
        outcome => {
            let elapsed = started.elapsed().as_secs_f64();
            crate::metrics::observe_command("member.join", elapsed, outcome.is_ok());
            Ok(Some(outcome?))
        }
    }
}

pub(crate) async fn require_user(state: &AppState, user_id: Uuid) -> Result<(), ApiError> {
    let user = state.store().load::<User>(&user_id.to_string()).await?;
    if user.aggregate.exists() {
        Ok(())
    } else {
        Err(ApiError::not_found("user"))
    }
}

/// Lists members (active members of the community only), filtered and paged.
#[utoipa::path(get, path = "/v1/communities/{id}/members", tag = "members",
    params(("id" = Uuid, Path, description = "Community id"), MembersQuery, ConsistencyParams),
    responses(
        (status = 200, description = "A page of members", body = MemberPageResponse),
        BadRequest, Forbidden, NotFound, Unprocessable, Unavailable,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %id))]
pub(crate) async fn list(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<Uuid>,
    Query(params): Query<MembersQuery>,
    min: MinPosition,
) -> Result<Json<MemberPageResponse>, ApiError> {
    let query = params.to_query()?;
    let access = CommunityAccess::load(state.communities(), &auth, id).await?;
    access.require_member()?;
    let list = members::list_members(state.pool(), id, &query);
    let page = read::after(&state, &SHOWN_FROM, min, list).await?;
    let page = page.map(MemberResponse::from);
    Ok(Json(MemberPageResponse {
        items: page.items,
        next_cursor: page.next_cursor,
    }))
}

/// One member of the community (active members of the community only).
#[utoipa::path(get, path = "/v1/communities/{id}/members/{user_id}", tag = "members",
    params(
        ("id" = Uuid, Path, description = "Community id"),
        ("user_id" = Uuid, Path, description = "The member's hub user id"),
        ConsistencyParams,
    ),
    responses(
        (status = 200, description = "The member", body = MemberResponse),
        BadRequest, Forbidden, NotFound, Unavailable,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %path.id, target_user_id = %path.user_id))]
pub(crate) async fn get(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(path): Path<MemberPath>,
    min: MinPosition,
) -> Result<Json<MemberResponse>, ApiError> {
    let access = CommunityAccess::load(state.communities(), &auth, path.id).await?;
    access.require_member()?;
    let member = members::get_member(state.pool(), path.id, path.user_id);
    match read::after(&state, &SHOWN_FROM, min, member).await? {
        Some(member) => Ok(Json(member.into())),
        None => Err(ApiError::not_found("member")),
    }
}

/// Changes a member's role (owners and admins, for members ranked below them).
#[utoipa::path(put, path = "/v1/communities/{id}/members/{user_id}/role", tag = "members",
    request_body = ChangeRoleRequest,
    params(
        ("id" = Uuid, Path, description = "Community id"),
        ("user_id" = Uuid, Path, description = "The member's hub user id"),
        ("If-Match" = Option<String>, Header, description = "Expected membership version"),
    ),
    responses(
        (status = 200, description = "Role changed (or already that role: `position` is null)", body = CommandResult),
        BadRequest, Forbidden, NotFound, Conflict, PreconditionFailed, PayloadTooLarge, Unprocessable,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %path.id, target_user_id = %path.user_id))]
pub(crate) async fn change_role(
    State(state): State<AppState>,
    auth: AuthUser,
    meta: RequestMeta,
    Path(path): Path<MemberPath>,
    Json(body): Json<ChangeRoleRequest>,
) -> Result<Json<CommandResult>, ApiError> {
    let access = CommunityAccess::load(state.communities(), &auth, path.id).await?;
    let actor_role = access.require_member()?;
    let ctx = Ctx::new(&auth, meta);
    let membership = membership_id(path.id, path.user_id).to_string();
    let result = execute::<Membership>(&state, &ctx, "member.change_role", membership, |_| {
        Ok(vec![MembershipCommand::ChangeRole {
            actor_id: auth.user_id,
            actor_role,
            role: body.role,
        }])
    })
    .await?;
    Ok(Json(result))
}

/// Leaves the community (your own id; also withdraws a join request) or removes a member / rejects
/// a join request (owners and admins).
#[utoipa::path(delete, path = "/v1/communities/{id}/members/{user_id}", tag = "members",
    params(
        ("id" = Uuid, Path, description = "Community id"),
        ("user_id" = Uuid, Path, description = "The member's hub user id"),
        ("If-Match" = Option<String>, Header, description = "Expected membership version"),
    ),
    responses(
        (status = 200, description = "Left or removed", body = CommandResult),
        BadRequest, Forbidden, NotFound, Conflict, PreconditionFailed,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %path.id, target_user_id = %path.user_id))]
pub(crate) async fn remove(
    State(state): State<AppState>,
    auth: AuthUser,
    meta: RequestMeta,
    Path(path): Path<MemberPath>,
) -> Result<Json<CommandResult>, ApiError> {
    let access = CommunityAccess::load(state.communities(), &auth, path.id).await?;
    let ctx = Ctx::new(&auth, meta);
    let membership = membership_id(path.id, path.user_id).to_string();
    let result = if path.user_id == auth.user_id {
        // Pending members may withdraw; anyone else outside a private community learns nothing.
        let in_it = matches!(
            access.caller_status(),
            Some(MemberStatus::Active | MemberStatus::Pending)
        );
        if !in_it && !access.is_public() {
            return Err(community_not_found());
        }
        execute_loaded(
            &state,
            &ctx,
            "member.leave",
            membership,
            access.caller,
            |_| Ok(vec![MembershipCommand::Leave]),
        )
        .await?
    } else {
        let actor_role = access.require_member()?;
        execute::<Membership>(&state, &ctx, "member.remove", membership, |_| {
            Ok(vec![MembershipCommand::Remove {
                actor_id: auth.user_id,
                actor_role,
                reason: None,
            }])
        })
        .await?
    };
    Ok(Json(result))
}

/// Bans a user from the community (moderators and above, for users ranked below them); works
/// for users who never joined. Banning a banned user changes nothing.
#[utoipa::path(post, path = "/v1/communities/{id}/members/{user_id}/ban", tag = "members",
    request_body(content = Option<BanRequest>, description = "Optional reason"),
    params(
        ("id" = Uuid, Path, description = "Community id"),
        ("user_id" = Uuid, Path, description = "The user's hub id"),
        ("If-Match" = Option<String>, Header, description = "Expected membership version"),
    ),
    responses(
        (status = 201, description = "Banned", body = CommandResult),
        (status = 200, description = "Already banned; nothing changed", body = CommandResult),
        BadRequest, Forbidden, NotFound, Conflict, PreconditionFailed, PayloadTooLarge, Unprocessable,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %path.id, target_user_id = %path.user_id))]
pub(crate) async fn ban(
    State(state): State<AppState>,
    auth: AuthUser,
    meta: RequestMeta,
    Path(path): Path<MemberPath>,
    JsonOrEmpty(body): JsonOrEmpty<BanRequest>,
) -> Result<(StatusCode, Json<CommandResult>), ApiError> {
    let access = CommunityAccess::load(state.communities(), &auth, path.id).await?;
    let actor_role = access.require_member()?;
    if path.user_id != auth.user_id {
        require_user(&state, path.user_id).await?;
    }
    let ctx = Ctx::new(&auth, meta);
    let membership = membership_id(path.id, path.user_id).to_string();
    let (community_id, user_id) = (path.id, path.user_id);
    let result = execute::<Membership>(&state, &ctx, "member.ban", membership, |_| {
        Ok(vec![MembershipCommand::Ban {
            community_id,
            user_id,
            actor_id: auth.user_id,
            actor_role,
            reason: body.reason,
        }])
    })
    .await?;
    Ok(created_or_ok(result))
}

/// Lifts a ban (moderators and above). The user is not restored as a member: they may join again.
#[utoipa::path(delete, path = "/v1/communities/{id}/members/{user_id}/ban", tag = "members",
    params(
        ("id" = Uuid, Path, description = "Community id"),
        ("user_id" = Uuid, Path, description = "The user's hub id"),
        ("If-Match" = Option<String>, Header, description = "Expected membership version"),
    ),
    responses(
        (status = 200, description = "Unbanned", body = CommandResult),
        BadRequest, Forbidden, NotFound, Conflict, PreconditionFailed,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %path.id, target_user_id = %path.user_id))]
pub(crate) async fn unban(
    State(state): State<AppState>,
    auth: AuthUser,
    meta: RequestMeta,
    Path(path): Path<MemberPath>,
) -> Result<Json<CommandResult>, ApiError> {
    let access = CommunityAccess::load(state.communities(), &auth, path.id).await?;
    let actor_role = access.require_member()?;
    let ctx = Ctx::new(&auth, meta);
    let membership = membership_id(path.id, path.user_id).to_string();
    let result = execute::<Membership>(&state, &ctx, "member.unban", membership, |_| {
        Ok(vec![MembershipCommand::Unban { actor_role }])
    })
    .await?;
    Ok(Json(result))
}

/// This resource's routes. One `routes!` per path: utoipa-axum mounts each handler of a group on
/// every path of the group.
pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(add, list))
        .routes(routes!(get, remove))
        .routes(routes!(change_role))
        .routes(routes!(ban, unban))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> MembersQuery {
        let text: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        serde_urlencoded_like(&text.join("&"))
    }

    // axum's own Query parsing, as the handler sees it.
    fn serde_urlencoded_like(q: &str) -> MembersQuery {
        let uri: axum::http::Uri = format!("/?{q}").parse().expect("uri");
        axum::extract::Query::<MembersQuery>::try_from_uri(&uri)
            .expect("query")
            .0
    }

    fn field(err: ApiError) -> (u16, String) {
        let p = err.problem();
        (p.status, p.errors.expect("field errors")[0].field.clone())
    }

    #[test]
    fn query_values_parse_into_the_read_model_query() {
        let q = query(&[
            ("role", "moderator"),
            ("status", "active"),
            ("sort", "username"),
            ("limit", "10"),
        ])
        .to_query()
        .expect("valid");
        assert_eq!(q.role, Some(Role::Moderator));
        assert_eq!(q.status, Some(MemberStatus::Active));
        assert!(matches!(q.sort, MemberSort::Username));
        assert_eq!(q.limit, Some(10));
        let q = query(&[]).to_query().expect("defaults");
        assert!(matches!(q.sort, MemberSort::JoinedAt));
        assert_eq!(q.limit, Some(DEFAULT_LIMIT));
    }

    #[test]
    fn bad_query_values_are_422_naming_the_parameter() {
        for (k, v) in [
            ("role", "king"),
            ("status", "asleep"),
            ("sort", "age"),
            ("limit", "0"),
            ("limit", "x"),
        ] {
            let err = query(&[(k, v)]).to_query().expect_err("invalid");
            assert_eq!(field(err), (422, k.to_string()), "{k}={v}");
        }
    }
}
