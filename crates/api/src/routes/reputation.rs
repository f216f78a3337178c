//! Reputation: a member's score and its history, a community's leaderboard, a hub user's global
//! score (from the reputation read model), and the community's policy (from its events).

use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, SecondsFormat, Utc};
use rookery_domain::{Community, CommunityCommand};
use rookery_events::{ReputationPolicy, Tier};
use rookery_projections::models::members::MembersProjection;
use rookery_projections::models::reputation::{self, ReputationProjection};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::access::CommunityAccess;
use crate::auth::AuthUser;
use crate::commands::{execute_loaded, CommandResult, Ctx};
use crate::error::ApiError;
use crate::extract::{ConsistencyParams, Json, MinPosition, Path, Query, RequestMeta};
use crate::openapi::{
    BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, PreconditionFailed, Unavailable,
    Unprocessable,
};
use crate::read;
use crate::routes::members::MemberPath;
use crate::routes::moderation;
use crate::state::AppState;

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Page size, 1 to 200 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 200)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl PageParams {
    fn limit(&self) -> Result<Option<u32>, ApiError> {
        match self
            .limit
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
        {
            None => Ok(None),
            Some(v) => v
                .parse::<u32>()
                .map(Some)
                .map_err(|_| ApiError::invalid("limit", "must be an integer from 1 to 200")),
        }
    }

    fn cursor(&self) -> Option<&str> {
        self.cursor.as_deref().filter(|c| !c.is_empty())
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HistoryItemResponse {
    pub seq: i64,
    /// `chat_message`, `command_message`, `follow`, `subscription`, `gift_subscription`,
    /// `donation`, `cheer`, `raid`, `boost`, `warn`, `timeout`, `kick`, `ban`, `adjust`, `set`.
    pub kind: String,
    /// The moderator's or admin's reason; the kind when none was given (earned points).
    pub reason: String,
    /// What it was worth under the policy then (for `set`: the score asked for).
    pub points: f64,
    /// What it changed after clamping to the community's range.
    pub delta: f64,
    /// The score after it.
    pub score: f64,
    /// The event that made it: `aggregate_type/aggregate_id/sequence`.
    pub source_event_id: String,
    pub at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HistoryPage {
    pub items: Vec<HistoryItemResponse>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MemberReputationResponse {
    pub user_id: String,
    /// Rounded (halves away from zero).
    pub score: i64,
    /// Exact, to four places.
    pub score_exact: f64,
    pub tier: Tier,
    /// Newest first.
    pub history: HistoryPage,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LeaderboardItemResponse {
    pub user_id: String,
    pub username: String,
    pub score: i64,
    pub tier: Tier,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LeaderboardResponse {
    /// Highest first; active members only.
    pub items: Vec<LeaderboardItemResponse>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GlobalReputationResponse {
    pub user_id: String,
    pub score: i64,
    pub score_exact: f64,
    pub tier: Tier,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PolicyResponse {
    pub policy: ReputationPolicy,
    /// The community aggregate's version (send it as `If-Match` to change the policy).
    pub version: i64,
}

fn at(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// A member's reputation in the community and its history, newest first (members only).
#[utoipa::path(get, path = "/v1/communities/{id}/members/{user_id}/reputation", tag = "reputation",
    params(
        ("id" = Uuid, Path, description = "Community id"),
        ("user_id" = Uuid, Path, description = "The member's hub user id"),
        PageParams, ConsistencyParams,
    ),
    responses(
        (status = 200, description = "The score and a page of its history", body = MemberReputationResponse),
        BadRequest, Forbidden, NotFound, Unprocessable, Unavailable,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %path.id, target_user_id = %path.user_id))]
pub(crate) async fn member(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(path): Path<MemberPath>,
    Query(page): Query<PageParams>,
    min: MinPosition,
) -> Result<Json<MemberReputationResponse>, ApiError> {
    let limit = page.limit()?;
    if !auth.is_service_for(path.id) {
        CommunityAccess::load(state.communities(), &auth, path.id)
            .await?
            .require_member()?;
    }
    let query =
        reputation::member_reputation(state.pool(), path.id, path.user_id, limit, page.cursor());
    let Some(r) = read::after(&state, &[&ReputationProjection], min, query).await? else {
        return Err(ApiError::not_found("member"));
    };
    Ok(Json(MemberReputationResponse {
        user_id: r.user_id.to_string(),
        score: r.score.round(),
        score_exact: r.score.to_f64(),
        tier: Tier::of(r.score),
        history: HistoryPage {
            items: r
                .history
                .items
                .into_iter()
                .map(|h| HistoryItemResponse {
                    seq: h.seq,
                    kind: h.kind,
                    reason: h.reason,
                    points: h.points.to_f64(),
                    delta: h.delta.to_f64(),
                    score: h.score.to_f64(),
                    source_event_id: h.source_event,
                    at: at(h.at),
                })
                .collect(),
            next_cursor: r.history.next_cursor,
        },
    }))
}

/// The community's active members by reputation, highest first (members only).
#[utoipa::path(get, path = "/v1/communities/{id}/reputation/leaderboard", tag = "reputation",
    params(("id" = Uuid, Path, description = "Community id"), PageParams, ConsistencyParams),
    responses(
        (status = 200, description = "A page of the leaderboard", body = LeaderboardResponse),
        BadRequest, Forbidden, NotFound, Unprocessable, Unavailable,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %id))]
pub(crate) async fn leaderboard(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<Uuid>,
    Query(page): Query<PageParams>,
    min: MinPosition,
) -> Result<Json<LeaderboardResponse>, ApiError> {
    let limit = page.limit()?;
    if !auth.is_service_for(id) {
        CommunityAccess::load(state.communities(), &auth, id)
            .await?
            .require_member()?;
    }
    let query = reputation::leaderboard(state.pool(), id, limit, page.cursor());
    let models: [&dyn rookery_projections::Projection; 2] =
        [&ReputationProjection, &MembersProjection];
    let board = read::after(&state, &models, min, query).await?;
    Ok(Json(LeaderboardResponse {
        items: board
            .items
            .into_iter()
            .map(|i| LeaderboardItemResponse {
                user_id: i.user_id.to_string(),
                username: i.username,
                score: i.score.round(),
                tier: Tier::of(i.score),
            })
            .collect(),
        next_cursor: board.next_cursor,
    }))
}

/// A hub user's global reputation: every community's changes with the default weights and range.
#[utoipa::path(get, path = "/v1/users/{user_id}/reputation", tag = "reputation",
    params(("user_id" = Uuid, Path, description = "Hub user id"), ConsistencyParams),
    responses(
        (status = 200, description = "The global score", body = GlobalReputationResponse),
        BadRequest, NotFound, Unavailable,
    ))]
#[tracing::instrument(skip_all, fields(target_user_id = %user_id))]
pub(crate) async fn global(
    State(state): State<AppState>,
    _auth: AuthUser,
    Path(user_id): Path<Uuid>,
    min: MinPosition,
) -> Result<Json<GlobalReputationResponse>, ApiError> {
    let query = reputation::global_score(state.pool(), user_id);
    let Some(g) = read::after(&state, &[&ReputationProjection], min, query).await? else {
        return Err(ApiError::not_found("user"));
    };
    Ok(Json(GlobalReputationResponse {
        user_id: g.user_id.to_string(),
        score: g.score.round(),
        score_exact: g.score.to_f64(),
        tier: Tier::of(g.score),
    }))
}

/// The community's reputation policy in force (members; the defaults until one is set).
#[utoipa::path(get, path = "/v1/communities/{id}/reputation-policy", tag = "reputation",
    params(("id" = Uuid, Path, description = "Community id")),
    responses(
        (status = 200, description = "The policy", body = PolicyResponse),
        BadRequest, Forbidden, NotFound,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %id))]
pub(crate) async fn get_policy(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<Uuid>,
) -> Result<Json<PolicyResponse>, ApiError> {
    let access = CommunityAccess::load(state.communities(), &auth, id).await?;
    access.require_visible()?;
    Ok(Json(PolicyResponse {
        policy: access.community.aggregate.reputation_policy.clone(),
        version: access.community.version,
    }))
}

/// Sets the community's reputation policy (owners and admins): absent fields take the
/// defaults. It applies to events from now on; those before keep the rules they had.
#[utoipa::path(put, path = "/v1/communities/{id}/reputation-policy", tag = "reputation",
    request_body = ReputationPolicy,
    params(
        ("id" = Uuid, Path, description = "Community id"),
        ("If-Match" = Option<String>, Header, description = "Expected community version"),
    ),
    responses(
        (status = 200, description = "Set (or unchanged: `position` is null)", body = CommandResult),
        BadRequest, Forbidden, NotFound, Conflict, PreconditionFailed, PayloadTooLarge, Unprocessable,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %id))]
pub(crate) async fn put_policy(
    State(state): State<AppState>,
    auth: AuthUser,
    meta: RequestMeta,
    Path(id): Path<Uuid>,
    Json(policy): Json<ReputationPolicy>,
) -> Result<(StatusCode, Json<CommandResult>), ApiError> {
    let access = CommunityAccess::load(state.communities(), &auth, id).await?;
    let actor_role = access.require_member()?;
    let ctx = Ctx::new(&auth, meta);
    let result = execute_loaded::<Community>(
        &state,
        &ctx,
        "community.reputation_policy",
        id.to_string(),
        access.community,
        |_| {
            Ok(vec![CommunityCommand::SetReputationPolicy {
                actor_role,
                policy,
            }])
        },
    )
    .await?;
    Ok((StatusCode::OK, Json(result)))
}

/// This resource's routes. One `routes!` per path.
pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(member, moderation::change_reputation))
        .routes(routes!(leaderboard))
        .routes(routes!(global))
        .routes(routes!(get_policy, put_policy))
}
