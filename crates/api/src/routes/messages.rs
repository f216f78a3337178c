//! `/v1/communities/{id}/messages`: posting chat (hub chat, or a platform's messages through a
//! service token), the history (from the messages read model), moderators' deletes.

use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, SecondsFormat, Utc};
use rookery_domain::{Message, MessageCommand, PlatformOrigin, User};
use rookery_events::message::message_id;
use rookery_events::Platform;
use rookery_projections::models::messages::{self, MessageQuery, MessageView, MessagesProjection};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::access::CommunityAccess;
use crate::auth::AuthUser;
use crate::commands::{execute, CommandResult, Ctx};
use crate::error::ApiError;
use crate::extract::{ConsistencyParams, Json, JsonOrEmpty, MinPosition, Path, Query, RequestMeta};
use crate::ingest::{self, PlatformSender};
use crate::openapi::{
    BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, Unavailable, Unprocessable,
};
use crate::read;
use crate::routes::created_or_ok;
use crate::state::AppState;

/// A platform account that sent something, as the platform names it.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SenderRequest {
    /// The account's id on the platform: 1 to 128 of `[A-Za-z0-9_.:-]`.
    #[schema(example = "141981764")]
    pub platform_user_id: String,
    /// Its display name there.
    #[schema(example = "ferris_tv")]
    pub username: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostMessageRequest {
    /// 1 to 100 characters.
    #[schema(example = "general")]
    pub channel: String,
    /// 1 to 10,000 characters; newlines and tabs are kept.
    pub text: String,
    /// The platform it was sent on; required with `sender` or `external_id`.
    pub platform: Option<Platform>,
    /// The platform's id of the message: posting the same one again is a no-op (200).
    pub external_id: Option<String>,
    /// The platform user who sent it (owners, admins and service tokens): a hub user is made for
    /// an account the hub does not know, and becomes a member. Absent: the caller sent it.
    pub sender: Option<SenderRequest>,
    /// When the platform says it was sent; now when absent.
    pub sent_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteMessageRequest {
    /// At most 500 characters.
    pub reason: Option<String>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MessagesQuery {
    /// Only this channel.
    pub channel: Option<String>,
    /// Only this hub user's messages (also those sent from a platform account before they
    /// claimed it).
    #[param(value_type = Option<Uuid>)]
    pub sender: Option<String>,
    /// Words the text contains, in any order (full-text).
    pub q: Option<String>,
    /// `next_cursor` of the previous page: older messages.
    pub before: Option<String>,
    /// Page size, 1 to 200 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 200)]
    pub limit: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MessageSender {
    pub user_id: String,
    pub username: String,
    pub platform: Option<Platform>,
    pub platform_user_id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MessageResponse {
    pub id: String,
    pub channel: String,
    /// `[deleted]` once a moderator deleted it.
    pub text: String,
    pub sender: MessageSender,
    pub sent_at: String,
    pub edited_at: Option<String>,
    pub deleted: bool,
}

fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl From<MessageView> for MessageResponse {
    fn from(m: MessageView) -> Self {
        MessageResponse {
            id: m.message_id.to_string(),
            channel: m.channel,
            text: m.text,
            sender: MessageSender {
                user_id: m.sender_id.to_string(),
                username: m.sender_username,
                platform: m.platform,
                platform_user_id: m.platform_user_id,
            },
            sent_at: timestamp(m.sent_at),
            edited_at: m.edited_at.map(timestamp),
            deleted: m.deleted,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MessagePageResponse {
    pub items: Vec<MessageResponse>,
    /// Pass as `before` for older messages; `null` on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct MessagePath {
    id: Uuid,
    message_id: Uuid,
}

/// Whether the caller may post for platform users in `community_id`: a service token of it, or
/// an owner or admin.
pub(crate) async fn require_platform_poster(
    state: &AppState,
    auth: &AuthUser,
    community_id: Uuid,
) -> Result<(), ApiError> {
    if auth.is_service_for(community_id) {
        return Ok(());
    }
    let access = CommunityAccess::load(state.communities(), auth, community_id).await?;
    if access.require_member()?.can_manage() {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "only owners, admins and service tokens can post for platform users".into(),
        ))
    }
}

/// Posts a chat message: hub chat by the caller, or a platform user's message (`sender`).
#[utoipa::path(post, path = "/v1/communities/{id}/messages", tag = "messages",
    request_body = PostMessageRequest,
    params(("id" = Uuid, Path, description = "Community id")),
    responses(
        (status = 201, description = "Posted", body = CommandResult),
        (status = 200, description = "Posted before (same `external_id`): the original", body = CommandResult),
        BadRequest, Forbidden, NotFound, Conflict, PayloadTooLarge, Unprocessable,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %id))]
pub(crate) async fn post(
    State(state): State<AppState>,
    auth: AuthUser,
    meta: RequestMeta,
    Path(id): Path<Uuid>,
    Json(body): Json<PostMessageRequest>,
) -> Result<(StatusCode, Json<CommandResult>), ApiError> {
    if !auth.reaches(id) {
        return Err(crate::access::community_not_found());
    }
    let ctx = Ctx::new(&auth, meta);
    let sent_at = body.sent_at.unwrap_or_else(Utc::now);
    let platform = match (&body.platform, &body.sender, &body.external_id) {
        (Some(p), _, _) => Some(*p),
        (None, Some(_), _) => return Err(ApiError::invalid("platform", "required with `sender`")),
        (None, None, Some(_)) => {
            return Err(ApiError::invalid("platform", "required with `external_id`"))
        }
        (None, None, None) => None,
    };
    let message = match (platform, &body.external_id) {
        (Some(p), Some(external)) => message_id(id, p, external),
        _ => Uuid::new_v4(),
    };
    let (channel, text) = (body.channel, body.text);
    let result = match (body.sender, platform) {
        (Some(sender), Some(platform)) => {
            require_platform_poster(&state, &auth, id).await?;
            let sender = PlatformSender {
                platform,
                platform_user_id: sender.platform_user_id,
                username: sender.username,
            };
            let external_id = body
                .external_id
                .unwrap_or_else(|| message.simple().to_string());
            ingest::record::<Message>(
                &state,
                &ctx,
                "message.post",
                id,
                message.to_string(),
                &sender,
                |sender_id| MessageCommand::Post {
                    message_id: message,
                    community_id: id,
                    channel: channel.clone(),
                    sender_id,
                    sender_username: sender.username.clone(),
                    origin: Some(PlatformOrigin {
                        platform,
                        external_id: external_id.clone(),
                        platform_user_id: sender.platform_user_id.clone(),
                    }),
                    text: text.clone(),
                    sent_at,
                },
            )
            .await?
        }
        _ => {
            // Hub chat, or a message the caller sent from their own linked account.
            let access = CommunityAccess::load(state.communities(), &auth, id).await?;
            access.require_member()?;
            let user = state
                .store()
                .load::<User>(&auth.user_id.to_string())
                .await?;
            let origin = match (platform, body.external_id) {
                (Some(platform), external_id) => {
                    let Some(identity) = user.aggregate.identity(platform) else {
                        return Err(ApiError::invalid(
                            "platform",
                            format!("you have no {platform} account linked; send `sender`"),
                        ));
                    };
                    Some(PlatformOrigin {
                        platform,
                        external_id: external_id.unwrap_or_else(|| message.simple().to_string()),
                        platform_user_id: identity.platform_user_id.clone(),
                    })
                }
                (None, _) => None,
            };
            let username = user.aggregate.username.clone();
            execute::<Message>(&state, &ctx, "message.post", message.to_string(), |_| {
                Ok(vec![MessageCommand::Post {
                    message_id: message,
                    community_id: id,
                    channel,
                    sender_id: auth.user_id,
                    sender_username: username,
                    origin,
                    text,
                    sent_at,
                }])
            })
            .await?
        }
    };
    Ok(created_or_ok(result))
}

impl MessagesQuery {
    fn to_query(&self) -> Result<MessageQuery, ApiError> {
        let sender = match self
            .sender
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            Some(s) => Some(
                Uuid::parse_str(s).map_err(|_| ApiError::invalid("sender", "must be a UUID"))?,
            ),
            None => None,
        };
        let limit = match self
            .limit
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
        {
            None => None,
            Some(v) => Some(
                v.parse::<u32>()
                    .map_err(|_| ApiError::invalid("limit", "must be an integer from 1 to 200"))?,
            ),
        };
        Ok(MessageQuery {
            channel: self.channel.clone().filter(|c| !c.is_empty()),
            sender,
            text: self.q.clone(),
            before: self.before.clone().filter(|c| !c.is_empty()),
            limit,
        })
    }
}

/// The community's messages, newest first (members only).
#[utoipa::path(get, path = "/v1/communities/{id}/messages", tag = "messages",
    params(("id" = Uuid, Path, description = "Community id"), MessagesQuery, ConsistencyParams),
    responses(
        (status = 200, description = "A page of messages", body = MessagePageResponse),
        BadRequest, Forbidden, NotFound, Unprocessable, Unavailable,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %id))]
pub(crate) async fn list(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<Uuid>,
    Query(params): Query<MessagesQuery>,
    min: MinPosition,
) -> Result<Json<MessagePageResponse>, ApiError> {
    let query = params.to_query()?;
    if !auth.is_service_for(id) {
        let access = CommunityAccess::load(state.communities(), &auth, id).await?;
        access.require_member()?;
    }
    let page = messages::list_messages(state.pool(), id, &query);
    let page = read::after(&state, &[&MessagesProjection], min, page).await?;
    let page = page.map(MessageResponse::from);
    Ok(Json(MessagePageResponse {
        items: page.items,
        next_cursor: page.next_cursor,
    }))
}

/// Deletes a message (moderators and above): the history shows `[deleted]`, the log keeps it.
#[utoipa::path(delete, path = "/v1/communities/{id}/messages/{message_id}", tag = "messages",
    request_body(content = Option<DeleteMessageRequest>, description = "Optional reason"),
    params(
        ("id" = Uuid, Path, description = "Community id"),
        ("message_id" = Uuid, Path, description = "Message id"),
    ),
    responses(
        (status = 200, description = "Deleted (or deleted already: `position` is null)", body = CommandResult),
        BadRequest, Forbidden, NotFound, Conflict, PayloadTooLarge, Unprocessable,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %path.id, message_id = %path.message_id))]
pub(crate) async fn delete(
    State(state): State<AppState>,
    auth: AuthUser,
    meta: RequestMeta,
    Path(path): Path<MessagePath>,
    JsonOrEmpty(body): JsonOrEmpty<DeleteMessageRequest>,
) -> Result<Json<CommandResult>, ApiError> {
    let access = CommunityAccess::load(state.communities(), &auth, path.id).await?;
    let actor_role = access.require_member()?;
    let ctx = Ctx::new(&auth, meta);
    let result = execute::<Message>(
        &state,
        &ctx,
        "message.delete",
        path.message_id.to_string(),
        |message| {
            if message.community_id != Some(path.id) {
                return Err(ApiError::not_found("message"));
            }
            Ok(vec![MessageCommand::Delete {
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
        .routes(routes!(post, list))
        .routes(routes!(delete))
}
