//! `/v1/auth`: register, log in, refresh.

use axum::extract::State;
use axum::http::StatusCode;
use chrono::Utc;
use rookery_domain::validation::{normalize_email, validate_password};
use rookery_domain::{User, UserCommand};
use rookery_store::Loaded;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::{self, RefreshRefused};
use crate::commands::{timed, Change, Ctx, Tx};
use crate::error::ApiError;
use crate::extract::{Json, RequestMeta};
use crate::openapi::{BadRequest, Conflict, PayloadTooLarge, Unauthorized, Unprocessable};
use crate::state::AppState;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    #[schema(example = "ferris@example.com")]
    pub email: String,
    /// 3 to 32 letters, digits, `_`, `.` or `-`.
    #[schema(example = "ferris")]
    pub username: String,
    /// 8 to 256 characters.
    #[schema(example = "correct horse battery")]
    pub password: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RegisterResponse {
    pub user_id: Uuid,
    /// Consistency token of the registration (see `min_position`).
    pub position: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenPair {
    /// JWT for `Authorization: Bearer`.
    pub access_token: String,
    /// Single use: `POST /v1/auth/refresh` exchanges it for a new pair. Presenting a used one
    /// again revokes every token descended from the same login.
    pub refresh_token: String,
    /// Seconds until the access token expires.
    pub expires_in: i64,
    #[schema(example = "Bearer")]
    pub token_type: String,
}

/// Registers a hub user. The password is stored only as an argon2id hash, in the same commit as
/// the `UserRegistered` event and the email's uniqueness claim.
#[utoipa::path(post, path = "/v1/auth/register", tag = "auth",
    request_body = RegisterRequest,
    responses(
        (status = 201, description = "Registered", body = RegisterResponse),
        BadRequest, Conflict, PayloadTooLarge, Unprocessable,
    ))]
#[tracing::instrument(skip_all, fields(user_id = tracing::field::Empty))]
pub(crate) async fn register(
    State(state): State<AppState>,
    meta: RequestMeta,
    Json(body): Json<RegisterRequest>,
) -> Result<(StatusCode, Json<RegisterResponse>), ApiError> {
    let user_id = Uuid::new_v4();
    tracing::Span::current().record("user_id", tracing::field::display(user_id));
    let response = timed("user.register", async {
        // Everything that can refuse the request runs before the (deliberately slow) hash.
        validate_password(&body.password)?;
        let change = Change::decide(
            user_id.to_string(),
            Loaded {
                aggregate: User::default(),
                version: 0,
            },
            vec![UserCommand::Register {
                user_id,
                username: body.username,
                email: body.email,
            }],
        )?;
        let email = change.after.email.clone();
        let hash = auth::hash_password(body.password).await?;

        let ctx = Ctx {
            actor: format!("user:{user_id}"),
            meta,
        };
        let mut tx = Tx::new(&ctx);
        tx.stage(&change)?;
        let mut uow = tx.begin(&state).await?;
        sqlx::query("INSERT INTO credentials (user_id, email, password_hash) VALUES ($1, $2, $3)")
            .bind(user_id)
            .bind(&email)
            .bind(&hash)
            .execute(uow.tx())
            .await
            .map_err(|e| match &e {
                // The email claim normally refuses first; this is the table's own guard.
                sqlx::Error::Database(db) if db.is_unique_violation() => ApiError::Conflict {
                    detail: "this email is already registered".into(),
                    field: Some("email".into()),
                },
                _ => ApiError::from(e),
            })?;
        let position = uow.commit().await?.position.map(|p| p.to_string());
        Ok(RegisterResponse { user_id, position })
    })
    .await?;
    Ok((StatusCode::CREATED, Json(response)))
}

/// Exchanges email and password for an access token and a refresh token.
#[utoipa::path(post, path = "/v1/auth/login", tag = "auth",
    request_body = LoginRequest,
    responses((status = 200, description = "Signed in", body = TokenPair), BadRequest, Unauthorized, Unprocessable))]
#[tracing::instrument(skip_all, fields(user_id = tracing::field::Empty))]
pub(crate) async fn login(
    State(state): State<AppState>,
    Json(body): Json<LoginRequest>,
) -> Result<Json<TokenPair>, ApiError> {
    let stored: Option<(Uuid, String)> = match normalize_email(&body.email) {
        Ok(email) => {
            sqlx::query_as("SELECT user_id, password_hash FROM credentials WHERE email = $1")
                .bind(email)
                .fetch_optional(state.pool())
                .await?
        }
        Err(_) => None,
    };
    let (user_id, hash) = match stored {
        Some((user_id, hash)) => (Some(user_id), Some(hash)),
        None => (None, None),
    };
    // Unknown emails still pay for one verification (against a dummy hash): same timing.
    let verified = auth::verify_password(body.password, hash).await?;
    let Some(user_id) = user_id.filter(|_| verified) else {
        return Err(ApiError::Unauthorized("invalid email or password".into()));
    };
    tracing::Span::current().record("user_id", tracing::field::display(user_id));
    let mut conn = state.pool().acquire().await?;
    let refresh =
        auth::store_refresh_token(&mut conn, user_id, Uuid::new_v4(), refresh_ttl(&state)).await?;
    Ok(Json(token_pair(&state, user_id, refresh)?))
}

/// Exchanges a refresh token for a new pair. Each refresh token works once; reusing one revokes
/// its whole family (every token descended from the same login) and answers 401.
#[utoipa::path(post, path = "/v1/auth/refresh", tag = "auth",
    request_body = RefreshRequest,
    responses((status = 200, description = "A new token pair", body = TokenPair), BadRequest, Unauthorized, Unprocessable))]
#[tracing::instrument(skip_all, fields(user_id = tracing::field::Empty))]
pub(crate) async fn refresh(
    State(state): State<AppState>,
    Json(body): Json<RefreshRequest>,
) -> Result<Json<TokenPair>, ApiError> {
    let token = body.refresh_token.trim();
    if !auth::looks_like_refresh_token(token) {
        return Err(ApiError::Unauthorized(
            "the refresh token is not valid".into(),
        ));
    }
    match auth::rotate_refresh_token(state.pool(), token, refresh_ttl(&state)).await? {
        Ok((user_id, next)) => {
            tracing::Span::current().record("user_id", tracing::field::display(user_id));
            Ok(Json(token_pair(&state, user_id, next)?))
        }
        Err(RefreshRefused::Unknown) => Err(ApiError::Unauthorized("the refresh token is not valid".into())),
        Err(RefreshRefused::Expired) => {
            Err(ApiError::Unauthorized("the refresh token has expired; sign in again".into()))
        }
        Err(RefreshRefused::Reused) => Err(ApiError::Unauthorized(
            "the refresh token was already used; every session of this sign-in has been revoked, sign in again"
                .into(),
        )),
    }
}

/// Signs out: revokes the refresh token's whole family (every token descended from the same
/// sign-in). Access tokens already issued stay valid until they expire (at most the access TTL).
/// Answers 204 whether or not the token was known, so it reveals nothing.
#[utoipa::path(post, path = "/v1/auth/logout", tag = "auth",
    request_body = RefreshRequest,
    responses((status = 204, description = "Signed out"), BadRequest, Unprocessable))]
#[tracing::instrument(skip_all)]
pub(crate) async fn logout(
    State(state): State<AppState>,
    Json(body): Json<RefreshRequest>,
) -> Result<StatusCode, ApiError> {
    let token = body.refresh_token.trim();
    if auth::looks_like_refresh_token(token) {
        auth::revoke_refresh_family(state.pool(), token).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

fn refresh_ttl(state: &AppState) -> chrono::Duration {
    chrono::Duration::from_std(state.config().auth.refresh_ttl).unwrap_or(chrono::Duration::days(7))
}

fn token_pair(
    state: &AppState,
    user_id: Uuid,
    refresh_token: String,
) -> Result<TokenPair, ApiError> {
    let keys = state.keys();
    let access_token = keys.sign(&keys.claims_for(user_id, Utc::now()))?;
    Ok(TokenPair {
        access_token,
        refresh_token,
        expires_in: keys.access_ttl_secs(),
        token_type: "Bearer".into(),
    })
}

/// This resource's routes. One `routes!` per path: utoipa-axum mounts each handler of a group on
/// every path of the group.
pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(routes!(logout))
}
