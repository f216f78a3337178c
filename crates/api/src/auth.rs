//! Authentication: access tokens (JWT, HS256), password hashes (argon2id) and rotating refresh
//! tokens with reuse detection.

use std::sync::{Arc, OnceLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::{FromRef, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::config::AuthConfig;
use crate::error::ApiError;

/// The claims of an access token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The hub user's id.
    pub sub: String,
    pub iss: String,
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    /// Unique per token (for audit and future revocation lists).
    pub jti: String,
    /// A token scoped to one community can neither read nor change another (service tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub community_id: Option<Uuid>,
    /// Free-form scope of a service token, carried for the services that check it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// Signing and verification keys with the validation rules pinned: HS256 only, `exp`, `iss` and
/// `aud` required and checked.
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    audience: String,
    access_ttl: chrono::Duration,
}

impl JwtKeys {
    pub fn new(config: &AuthConfig) -> Self {
        let secret = config.jwt_secret.as_bytes();
        // `Validation::new` accepts exactly the one algorithm: a token whose header names another
        // (HS384, RS256 with our secret as a "public key", none) fails before its signature is read.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 30;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            access_ttl: chrono::Duration::from_std(config.access_ttl)
                .unwrap_or(chrono::Duration::minutes(15)),
        }
    }

    /// Claims of a fresh access token for `user_id`, valid from `now` for the access TTL.
    pub fn claims_for(&self, user_id: Uuid, now: DateTime<Utc>) -> Claims {
        Claims {
            sub: user_id.to_string(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            exp: (now + self.access_ttl).timestamp(),
            iat: now.timestamp(),
            jti: Uuid::new_v4().to_string(),
            community_id: None,
            scope: None,
        }
    }

    pub fn access_ttl_secs(&self) -> i64 {
        self.access_ttl.num_seconds()
    }

    pub fn sign(&self, claims: &Claims) -> Result<String, ApiError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("signing a token")))
    }

    pub fn verify(&self, token: &str) -> Result<Claims, jsonwebtoken::errors::Error> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map(|t| t.claims)
    }
}

/// The authenticated caller of a request.
#[derive(Clone, Debug)]
pub struct AuthUser {
    pub user_id: Uuid,
    /// Set for tokens scoped to one community.
    pub community_scope: Option<Uuid>,
    /// The token's scopes (space-separated in its `scope` claim); none for a user's own token.
    pub scopes: Vec<String>,
}

/// The scope of a service token: it acts for a platform integration (posting platform users'
/// messages and activities) in the one community it is scoped to.
pub const SERVICE_SCOPE: &str = "service";

impl AuthUser {
    /// `actor` of the events this caller's commands write.
    pub fn actor(&self) -> String {
        format!("user:{}", self.user_id)
    }

    /// Whether this caller's token reaches `community_id` at all.
    pub fn reaches(&self, community_id: Uuid) -> bool {
        self.community_scope.is_none_or(|c| c == community_id)
    }

    /// Whether this is a service token of `community_id` (see [`SERVICE_SCOPE`]).
    pub fn is_service_for(&self, community_id: Uuid) -> bool {
        self.community_scope == Some(community_id) && self.scopes.iter().any(|s| s == SERVICE_SCOPE)
    }
}

impl<S> FromRequestParts<S> for AuthUser
where
    S: Send + Sync,
    Arc<JwtKeys>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let keys = Arc::<JwtKeys>::from_ref(state);
        let value = parts.headers.get(header::AUTHORIZATION).ok_or_else(|| {
            ApiError::Unauthorized("missing `Authorization: Bearer <token>`".into())
        })?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or_else(|| {
                ApiError::Unauthorized("expected `Authorization: Bearer <token>`".into())
            })?;
        let claims = keys.verify(token).map_err(|e| {
            ApiError::Unauthorized(match e.kind() {
                ErrorKind::ExpiredSignature => "the access token has expired; refresh it".into(),
                _ => "the access token is not valid".into(),
            })
        })?;
        let user_id = Uuid::parse_str(&claims.sub)
            .map_err(|_| ApiError::Unauthorized("the access token names no user".into()))?;
        tracing::Span::current().record("user_id", tracing::field::display(user_id));
        Ok(AuthUser {
            user_id,
            community_scope: claims.community_id,
            scopes: claims
                .scope
                .as_deref()
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string)
                .collect(),
        })
    }
}

// ---- passwords ----

fn argon2() -> Argon2<'static> {
    // argon2id v19 with the crate's defaults (19 MiB, 2 passes, 1 lane): OWASP's minimum.
    Argon2::default()
}

fn hash_blocking(password: &[u8]) -> Result<String, argon2::password_hash::Error> {
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt)?;
    Ok(argon2().hash_password(password, &salt)?.to_string())
}

/// Hashes `password` off the async runtime (argon2 takes tens of milliseconds by design).
pub(crate) async fn hash_password(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || hash_blocking(password.as_bytes()))
        .await
        .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("password hashing task")))?
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("hashing a password: {e}")))
}

/// Checks `password` against `stored`; with no stored hash (unknown email) it checks against a
/// dummy hash instead, so both answers take about as long and timing does not reveal accounts.
pub(crate) async fn verify_password(
    password: String,
    stored: Option<String>,
) -> Result<bool, ApiError> {
    static DUMMY: OnceLock<String> = OnceLock::new();
    tokio::task::spawn_blocking(move || {
        let hash = match &stored {
            Some(hash) => hash.as_str(),
            None => {
                DUMMY.get_or_init(|| hash_blocking(b"rookery-dummy-password").unwrap_or_default())
            }
        };
        let ok = PasswordHash::new(hash)
            .map(|parsed| {
                argon2()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false);
        ok && stored.is_some()
    })
    .await
    .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("password verification task")))
}

// ---- refresh tokens ----

/// A new refresh token: 32 random bytes, base64url without padding (43 characters).
pub fn new_refresh_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// What the database keeps of a refresh token: its SHA-256, so a leaked table grants nothing.
/// A token is 256 random bits, so an unsalted fast hash is enough (no dictionary to attack).
pub fn hash_refresh_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Whether `token` has the shape of one we issued (spares the database obvious garbage).
pub fn looks_like_refresh_token(token: &str) -> bool {
    token.len() == 43 && URL_SAFE_NO_PAD.decode(token).is_ok_and(|b| b.len() == 32)
}

/// Stores a new refresh token for `user_id` in `family_id`; returns the token.
pub(crate) async fn store_refresh_token(
    conn: &mut PgConnection,
    user_id: Uuid,
    family_id: Uuid,
    ttl: chrono::Duration,
) -> Result<String, sqlx::Error> {
    let token = new_refresh_token();
    sqlx::query(
        "INSERT INTO refresh_tokens (id, family_id, user_id, token_hash, expires_at)
         VALUES ($1, $2, $3, $4, now() + $5 * interval '1 second')",
    )
    .bind(Uuid::new_v4())
    .bind(family_id)
    .bind(user_id)
    .bind(hash_refresh_token(&token))
    .bind(ttl.num_seconds() as f64)
    .execute(conn)
    .await?;
    Ok(token)
}

/// Why a refresh token was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RefreshRefused {
    Unknown,
    Expired,
    /// Presented again after use, or after its family was revoked: the whole family is revoked,
    /// since either the client or a thief holds a copy.
    Reused,
}

/// Rotates `token`: marks it used and issues its successor in the same family. Row-locks the
/// token so two concurrent uses are serialised and the second counts as reuse.
pub(crate) async fn rotate_refresh_token(
    pool: &sqlx::PgPool,
    token: &str,
    ttl: chrono::Duration,
) -> Result<Result<(Uuid, String), RefreshRefused>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let row: Option<(Uuid, Uuid, Uuid, bool, bool)> = sqlx::query_as(
        "SELECT id, family_id, user_id, expires_at <= now(), used_at IS NOT NULL OR revoked_at IS NOT NULL
         FROM refresh_tokens WHERE token_hash = $1 FOR UPDATE",
    )
    .bind(hash_refresh_token(token))
    .fetch_optional(&mut *tx)
    .await?;
    let Some((id, family_id, user_id, expired, spent)) = row else {
        return Ok(Err(RefreshRefused::Unknown));
    };
    if spent {
        sqlx::query("UPDATE refresh_tokens SET revoked_at = now() WHERE family_id = $1 AND revoked_at IS NULL")
            .bind(family_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::warn!(%user_id, %family_id, "refresh token reused; family revoked");
        return Ok(Err(RefreshRefused::Reused));
    }
    if expired {
        return Ok(Err(RefreshRefused::Expired));
    }
    sqlx::query("UPDATE refresh_tokens SET used_at = now() WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let next = store_refresh_token(&mut tx, user_id, family_id, ttl).await?;
    tx.commit().await?;
    Ok(Ok((user_id, next)))
}

/// Revokes every token of `token`'s family (sign-out).
pub(crate) async fn revoke_refresh_family(
    pool: &sqlx::PgPool,
    token: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE refresh_tokens SET revoked_at = now()
         WHERE revoked_at IS NULL
           AND family_id = (SELECT family_id FROM refresh_tokens WHERE token_hash = $1)",
    )
    .bind(hash_refresh_token(token))
    .execute(pool)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn config() -> AuthConfig {
        AuthConfig::new("test-secret-that-is-long-enough-for-hs256")
    }

    #[test]
    fn access_tokens_round_trip() {
        let keys = JwtKeys::new(&config());
        let user = Uuid::new_v4();
        let claims = keys.claims_for(user, Utc::now());
        let token = keys.sign(&claims).expect("signs");
        let back = keys.verify(&token).expect("verifies");
        assert_eq!(back, claims);
        assert_eq!(back.sub, user.to_string());
        assert_eq!(
            (back.iss.as_str(), back.aud.as_str()),
            ("rookery", "rookery-api")
        );
        assert_eq!(back.exp - back.iat, 15 * 60);
    }

    #[test]
    fn expired_tokens_are_refused() {
        let keys = JwtKeys::new(&config());
        let claims = keys.claims_for(Uuid::new_v4(), Utc::now() - chrono::Duration::hours(1));
        let token = keys.sign(&claims).expect("signs");
        let err = keys.verify(&token).expect_err("expired");
        assert_eq!(err.kind(), &ErrorKind::ExpiredSignature);
    }

    #[test]
    fn wrong_audience_or_issuer_is_refused() {
        let keys = JwtKeys::new(&config());
        let mut claims = keys.claims_for(Uuid::new_v4(), Utc::now());
        claims.aud = "someone-else".into();
        let token = keys.sign(&claims).expect("signs");
        assert_eq!(
            keys.verify(&token).expect_err("aud").kind(),
            &ErrorKind::InvalidAudience
        );

        let mut claims = keys.claims_for(Uuid::new_v4(), Utc::now());
        claims.iss = "mallory".into();
        let token = keys.sign(&claims).expect("signs");
        assert_eq!(
            keys.verify(&token).expect_err("iss").kind(),
            &ErrorKind::InvalidIssuer
        );
    }

    #[test]
    fn another_secret_is_refused() {
        let keys = JwtKeys::new(&config());
        let other = JwtKeys::new(&AuthConfig::new("a-different-secret"));
        let token = other
            .sign(&other.claims_for(Uuid::new_v4(), Utc::now()))
            .expect("signs");
        assert_eq!(
            keys.verify(&token).expect_err("secret").kind(),
            &ErrorKind::InvalidSignature
        );
    }

    #[test]
    fn algorithm_is_pinned_to_hs256() {
        let cfg = config();
        let keys = JwtKeys::new(&cfg);
        let claims = keys.claims_for(Uuid::new_v4(), Utc::now());
        // Same secret, another HMAC: must still be refused.
        let hs384 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &claims,
            &EncodingKey::from_secret(cfg.jwt_secret.as_bytes()),
        )
        .expect("signs");
        assert_eq!(
            keys.verify(&hs384).expect_err("hs384").kind(),
            &ErrorKind::InvalidAlgorithm
        );
        // An unsigned token (`alg: none`) never verifies.
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("claims"));
        assert!(keys.verify(&format!("{header}.{payload}.")).is_err());
    }

    #[test]
    fn refresh_tokens_are_random_and_only_their_hash_is_kept() {
        let a = new_refresh_token();
        let b = new_refresh_token();
        assert_ne!(a, b);
        assert!(looks_like_refresh_token(&a));
        assert!(!looks_like_refresh_token("not-a-token"));
        assert!(!a.contains(['+', '/', '=']));
        let hash = hash_refresh_token(&a);
        assert_eq!(hash.len(), 32);
        assert_eq!(hash, hash_refresh_token(&a));
        assert_ne!(hash, hash_refresh_token(&b));
        // SHA-256 of the token text, as stored in refresh_tokens.token_hash.
        assert_eq!(
            hex(&hash_refresh_token("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[tokio::test]
    async fn passwords_verify_only_against_their_hash() {
        let hash = hash_password("correct horse".into()).await.expect("hashes");
        assert!(hash.starts_with("$argon2id$v=19$"));
        assert!(verify_password("correct horse".into(), Some(hash.clone()))
            .await
            .expect("runs"));
        assert!(!verify_password("wrong horse".into(), Some(hash))
            .await
            .expect("runs"));
        // Unknown account: runs the dummy check and says no, even for the dummy's own password.
        assert!(!verify_password("rookery-dummy-password".into(), None)
            .await
            .expect("runs"));
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let mut cfg = config();
        cfg.access_ttl = Duration::from_secs(60);
        assert!(!format!("{cfg:?}").contains("test-secret"));
    }
}
