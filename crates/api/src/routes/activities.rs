//! `/v1/communities/{id}/activities`: platform activity (follows, subscriptions, gifts, cheers,
//! raids, donations, boosts, stream events) from service tokens, owners and admins.

use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use rookery_domain::{ActivityCommand, ActivityRecord};
use rookery_events::activity::activity_id;
use rookery_events::{Activity, Decimal4, Platform, SubTier};
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::commands::{CommandResult, Ctx};
use crate::error::ApiError;
use crate::extract::{Json, Path, RequestMeta};
use crate::ingest::{self, PlatformSender};
use crate::openapi::{BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, Unprocessable};
use crate::routes::created_or_ok;
use crate::routes::messages::{require_platform_poster, SenderRequest};
use crate::state::AppState;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostActivityRequest {
    /// `follow`, `subscription`, `gift_subscription`, `cheer`, `raid`, `donation`, `boost`,
    /// `stream_online` or `stream_offline`.
    #[serde(rename = "type")]
    #[schema(example = "cheer")]
    pub kind: String,
    pub platform: Platform,
    /// The platform's id of the activity: recording the same one again is a no-op (200).
    pub external_id: String,
    pub sender: SenderRequest,
    /// By type: `subscription {tier: "1000"|"2000"|"3000"}`, `gift_subscription {count ≥ 1}`,
    /// `cheer {bits ≥ 1}`, `raid {viewers ≥ 0}`, `donation {amount > 0, currency}`; nothing
    /// (or `{}`) for the others.
    #[schema(value_type = Option<Object>, example = json!({"bits": 300}))]
    pub data: Option<Value>,
    /// When the platform says it happened; now when absent.
    pub occurred_at: Option<DateTime<Utc>>,
}

/// The activity `kind` with `data`, each refusal naming its field.
fn parse_activity(kind: &str, data: Option<&Value>) -> Result<Activity, ApiError> {
    let empty = serde_json::Map::new();
    let fields = match data {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(fields)) => fields,
        Some(_) => return Err(ApiError::invalid("data", "must be an object")),
    };
    let field = |name: &str| fields.get(name);
    let unsigned = |name: &'static str| -> Result<u64, ApiError> {
        field(name)
            .and_then(Value::as_u64)
            .ok_or_else(|| ApiError::invalid(format!("data.{name}"), "must be a whole number ≥ 0"))
    };
    let no_data = |activity: Activity| {
        if fields.is_empty() {
            Ok(activity)
        } else {
            Err(ApiError::invalid("data", format!("`{kind}` takes no data")))
        }
    };
    let activity = match kind {
        "follow" => no_data(Activity::Follow)?,
        "boost" => no_data(Activity::Boost)?,
        "stream_online" => no_data(Activity::StreamOnline)?,
        "stream_offline" => no_data(Activity::StreamOffline)?,
        "subscription" => {
            let tier = match field("tier").and_then(Value::as_str) {
                Some("1000") => SubTier::Tier1,
                Some("2000") => SubTier::Tier2,
                Some("3000") => SubTier::Tier3,
                _ => {
                    return Err(ApiError::invalid(
                        "data.tier",
                        "must be one of: \"1000\", \"2000\", \"3000\"",
                    ))
                }
            };
            Activity::Subscription { tier }
        }
        "gift_subscription" => Activity::GiftSubscription {
            count: u32::try_from(unsigned("count")?)
                .map_err(|_| ApiError::invalid("data.count", "is too large"))?,
        },
        "cheer" => Activity::Cheer {
            bits: unsigned("bits")?,
        },
        "raid" => Activity::Raid {
            viewers: unsigned("viewers")?,
        },
        "donation" => {
            let amount = field("amount")
                .and_then(Value::as_f64)
                .and_then(Decimal4::from_f64)
                .ok_or_else(|| ApiError::invalid("data.amount", "must be a number"))?;
            let currency = field("currency")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::invalid("data.currency", "must be a currency code"))?;
            Activity::Donation {
                amount,
                currency: currency.to_string(),
            }
        }
        other => {
            return Err(ApiError::invalid(
                "type",
                format!(
                    "unknown activity type `{other}`; expected one of: {}",
                    Activity::KINDS.join(", ")
                ),
            ))
        }
    };
    rookery_domain::validate_activity(&activity)?;
    Ok(activity)
}

/// Records a platform user's activity in the community (owners, admins and service tokens).
/// A hub user is made for an account the hub does not know, and becomes a member.
#[utoipa::path(post, path = "/v1/communities/{id}/activities", tag = "activities",
    request_body = PostActivityRequest,
    params(("id" = Uuid, Path, description = "Community id")),
    responses(
        (status = 201, description = "Recorded", body = CommandResult),
        (status = 200, description = "Recorded before (same `external_id`): the original", body = CommandResult),
        BadRequest, Forbidden, NotFound, Conflict, PayloadTooLarge, Unprocessable,
    ))]
#[tracing::instrument(skip_all, fields(community_id = %id))]
pub(crate) async fn post(
    State(state): State<AppState>,
    auth: AuthUser,
    meta: RequestMeta,
    Path(id): Path<Uuid>,
    Json(body): Json<PostActivityRequest>,
) -> Result<(StatusCode, Json<CommandResult>), ApiError> {
    if !auth.reaches(id) {
        return Err(crate::access::community_not_found());
    }
    let activity = parse_activity(body.kind.trim(), body.data.as_ref())?;
    require_platform_poster(&state, &auth, id).await?;
    let ctx = Ctx::new(&auth, meta);
    let occurred_at = body.occurred_at.unwrap_or_else(Utc::now);
    let activity_id = activity_id(id, body.platform, &body.external_id);
    let sender = PlatformSender {
        platform: body.platform,
        platform_user_id: body.sender.platform_user_id,
        username: body.sender.username,
    };
    let result = ingest::record::<ActivityRecord>(
        &state,
        &ctx,
        "activity.record",
        id,
        activity_id.to_string(),
        &sender,
        |user_id| ActivityCommand::Record {
            activity_id,
            community_id: id,
            user_id,
            platform: body.platform,
            external_id: body.external_id.clone(),
            platform_user_id: sender.platform_user_id.clone(),
            username: sender.username.clone(),
            activity: activity.clone(),
            occurred_at,
        },
    )
    .await?;
    Ok(created_or_ok(result))
}

/// This resource's routes.
pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(post))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field(kind: &str, data: Value) -> String {
        match parse_activity(kind, Some(&data)) {
            Err(e) => e
                .problem()
                .errors
                .map(|f| f[0].field.clone())
                .unwrap_or_default(),
            Ok(a) => format!("ok: {a:?}"),
        }
    }

    #[test]
    fn every_kind_parses_with_its_data() {
        assert_eq!(
            parse_activity("subscription", Some(&json!({"tier": "3000"}))).ok(),
            Some(Activity::Subscription {
                tier: SubTier::Tier3
            })
        );
        assert_eq!(
            parse_activity("cheer", Some(&json!({"bits": 300}))).ok(),
            Some(Activity::Cheer { bits: 300 })
        );
        assert_eq!(parse_activity("follow", None).ok(), Some(Activity::Follow));
        assert_eq!(
            parse_activity("follow", Some(&json!({}))).ok(),
            Some(Activity::Follow)
        );
    }

    #[test]
    fn bad_data_is_refused_naming_the_field() {
        assert_eq!(field("dance", json!({})), "type");
        assert_eq!(field("cheer", json!({"bits": -5})), "data.bits");
        assert_eq!(field("cheer", json!({"bits": 0})), "data.bits");
        assert_eq!(field("subscription", json!({"tier": "4000"})), "data.tier");
        assert_eq!(
            field("gift_subscription", json!({"count": 0})),
            "data.count"
        );
        assert_eq!(
            field("donation", json!({"amount": 0, "currency": "USD"})),
            "data.amount"
        );
        assert_eq!(field("donation", json!({"amount": 5})), "data.currency");
        assert_eq!(field("follow", json!({"x": 1})), "data");
    }
}
