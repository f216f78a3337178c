//! The one API error type and its `application/problem+json` form (RFC 9457).
//!
//! Every failure a client can see goes through [`ApiError`], including axum's own rejections
//! (see [`crate::extract`]) and plain-text errors produced outside handlers (the
//! `problem_for_plain_errors` middleware), so clients parse one error shape everywhere.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use rookery_domain::{claim_conflict, claim_field, DomainError};
use rookery_projections::QueryError;
use rookery_store::StoreError;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "type": "urn:rookery:problem:validation",
    "title": "Unprocessable Entity",
    "status": 422,
    "detail": "invalid name: must be 3 to 63 lowercase letters, digits or hyphens",
    "errors": [{"field": "name", "message": "must be 3 to 63 lowercase letters, digits or hyphens"}]
}))]
pub struct Problem {
    /// A URI naming the kind of problem (`urn:rookery:problem:<kind>`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The HTTP status' reason phrase.
    pub title: String,
    pub status: u16,
    /// What went wrong with this request, for a person.
    pub detail: String,
    /// Per-field errors, when the problem is about request fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
}

/// One field of the request and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldError {
    /// The field's name as sent (`role`, `min_position`, or a dotted path into the body).
    pub field: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed (bad JSON, bad path or query value). Return 400 Bad Request.
    #[error("{detail}")]
    BadRequest {
        detail: String,
        field: Option<String>,
    },
    /// No valid credentials. Return 401 Unauthorized with `WWW-Authenticate: Bearer`.
    #[error("{0}")]
    Unauthorized(String),
    /// Authenticated but not allowed. Return 403 Forbidden.
    #[error("{0}")]
    Forbidden(String),
    /// The resource does not exist, or the caller may not know it does. Return 404 Not Found.
    #[error("{0}")]
    NotFound(String),
    /// The method is not allowed on this path. Return 405 Method Not Allowed.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Collides with the current state (duplicate, concurrent writer, business rule). Return 409
    /// Conflict, naming the field when one is to blame.
    #[error("{detail}")]
    Conflict {
        detail: String,
        field: Option<String>,
    },
    /// `If-Match` named another version than the current one. Return 412 Precondition Failed.
    #[error("If-Match expected version {expected} but the current version is {actual}")]
    PreconditionFailed { expected: i64, actual: i64 },
    /// The body is larger than the configured limit. Return 413 Content Too Large.
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The body is not JSON (`Content-Type`). Return 415 Unsupported Media Type.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Well-formed but invalid fields. Return 422 Unprocessable Entity naming the fields.
    #[error("{detail}")]
    Unprocessable {
        detail: String,
        errors: Vec<FieldError>,
    },
    /// A dependency is not ready, or a read model did not catch up in time. Return 503 Service
    /// Unavailable, with `Retry-After` when retrying soon can help.
    #[error("{detail}")]
    Unavailable {
        detail: String,
        retry_after: Option<u64>,
        errors: Vec<FieldError>,
    },
    /// Anything unexpected. Logged with its cause chain; return an opaque 500 Internal Server
    /// Error.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn bad_request(field: impl Into<String>, detail: impl Into<String>) -> Self {
        ApiError::BadRequest {
            detail: detail.into(),
            field: Some(field.into()),
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        let (field, message) = (field.into(), message.into());
        ApiError::Unprocessable {
            detail: format!("invalid {field}: {message}"),
            errors: vec![FieldError { field, message }],
        }
    }

    pub fn not_found(what: &str) -> Self {
        ApiError::NotFound(format!("{what} not found"))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The problem document this error is answered with.
    pub fn problem(&self) -> Problem {
        let one = |field: &Option<String>, detail: &str| {
            field.as_ref().map(|f| {
                vec![FieldError {
                    field: f.clone(),
                    message: detail.to_string(),
                }]
            })
        };
        let (kind, detail, errors) = match self {
            ApiError::BadRequest { detail, field } => {
                ("bad-request", detail.clone(), one(field, detail))
            }
            ApiError::Unauthorized(d) => ("unauthorized", d.clone(), None),
            ApiError::Forbidden(d) => ("forbidden", d.clone(), None),
            ApiError::NotFound(d) => ("not-found", d.clone(), None),
            ApiError::MethodNotAllowed => ("method-not-allowed", self.to_string(), None),
            ApiError::Conflict { detail, field } => {
                ("conflict", detail.clone(), one(field, detail))
            }
            ApiError::PreconditionFailed { .. } => ("precondition-failed", self.to_string(), None),
            ApiError::PayloadTooLarge { .. } => ("payload-too-large", self.to_string(), None),
            ApiError::UnsupportedMediaType(d) => ("unsupported-media-type", d.clone(), None),
            ApiError::Unprocessable { detail, errors } => {
                ("validation", detail.clone(), Some(errors.clone()))
            }
            ApiError::Unavailable { detail, errors, .. } => (
                "unavailable",
                detail.clone(),
                Some(errors.clone()).filter(|e| !e.is_empty()),
            ),
            // Opaque on purpose: causes can name tables, hosts or internals.
            ApiError::Internal(_) => (
                "internal",
                "an unexpected error occurred; it has been logged".to_string(),
                None,
            ),
        };
        problem(self.status(), kind, detail, errors)
    }
}

pub(crate) fn problem(
    status: StatusCode,
    kind: &str,
    detail: String,
    errors: Option<Vec<FieldError>>,
) -> Problem {
    Problem {
        kind: format!("urn:rookery:problem:{kind}"),
        title: status.canonical_reason().unwrap_or("Error").to_string(),
        status: status.as_u16(),
        detail,
        errors,
    }
}

impl Problem {
    pub fn into_response_with(self, status: StatusCode) -> Response {
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Internal(e) = &self {
            tracing::error!(error = ?e, "request failed: {e:#}");
        }
        let mut response = self.problem().into_response_with(status);
        let headers = response.headers_mut();
        match &self {
            ApiError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::Unavailable {
                retry_after: Some(secs),
                ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*secs));
            }
            _ => {}
        }
        response
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        match e {
            DomainError::Validation { field, ref message } => ApiError::Unprocessable {
                detail: e.to_string(),
                errors: vec![FieldError {
                    field: field.to_string(),
                    message: message.clone(),
                }],
            },
            DomainError::Forbidden(m) => ApiError::Forbidden(m),
            DomainError::NotFound(what) => ApiError::not_found(what),
            DomainError::Conflict(m) | DomainError::InvalidState(m) => ApiError::Conflict {
                detail: m,
                field: None,
            },
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            // A stale guard reaching a client means the command raced another writer, as a
            // conflict does.
            StoreError::Conflict { .. } | StoreError::Stale { .. } => ApiError::Conflict {
                detail: e.to_string(),
                field: None,
            },
            StoreError::ClaimTaken { kind, .. } => ApiError::Conflict {
                detail: claim_conflict(&kind).to_string(),
                field: Some(claim_field(&kind).to_string()),
            },
            StoreError::Closed => ApiError::Unavailable {
                detail: e.to_string(),
                retry_after: Some(1),
                errors: Vec::new(),
            },
            other => ApiError::Internal(anyhow::Error::new(other).context("event store")),
        }
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::BadCursor => ApiError::bad_request("cursor", e.to_string()),
            QueryError::BadLimit => ApiError::invalid("limit", e.to_string()),
            QueryError::Db(_) => ApiError::Internal(anyhow::Error::new(e)),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(anyhow::Error::new(e).context("database"))
    }
}

/// Middleware: rewrites error responses that are not problem documents yet (axum's 405, a plain
/// text rejection from a layer, a panic) into one, keeping status and headers.
pub(crate) async fn problem_for_plain_errors(response: Response) -> Response {
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // Rejection texts are short; a large body here is not ours to echo.
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let detail = if text.is_empty() || status.is_server_error() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let kind = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload-too-large",
        StatusCode::NOT_FOUND => "not-found",
        s if s.is_server_error() => "internal",
        _ => "bad-request",
    };
    let problem = problem(status, kind, detail, None);
    let fresh = problem.into_response_with(status);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    Response::from_parts(parts, fresh.into_body())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_json(response: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        serde_json::from_slice(&bytes).expect("json body")
    }

    #[tokio::test]
    async fn validation_errors_are_problem_json_naming_the_field() {
        let err: ApiError = rookery_domain::validation::validate_community_name("A")
            .expect_err("invalid")
            .into();
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        let body = body_json(response).await;
        assert_eq!(body["type"], "urn:rookery:problem:validation");
        assert_eq!(body["title"], "Unprocessable Entity");
        assert_eq!(body["status"], 422);
        assert!(body["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("invalid name")));
        assert_eq!(body["errors"][0]["field"], "name");
        assert!(body["errors"][0]["message"].is_string());
    }

    #[tokio::test]
    async fn claim_conflicts_name_the_request_field() {
        let err: ApiError = StoreError::ClaimTaken {
            kind: "email".into(),
            key: "a@b.c".into(),
        }
        .into();
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        let body = body_json(response).await;
        assert_eq!(body["errors"][0]["field"], "email");
        assert_eq!(body["detail"], "this email is already registered");
    }

    #[tokio::test]
    async fn internal_errors_are_opaque() {
        let err = ApiError::Internal(anyhow::anyhow!("password=hunter2").context("connecting"));
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = body_json(response).await;
        assert!(!body.to_string().contains("hunter2"));
        assert!(body.get("errors").is_none());
    }

    #[tokio::test]
    async fn unauthorized_carries_www_authenticate_and_unavailable_retry_after() {
        let response = ApiError::Unauthorized("no token".into()).into_response();
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let response = ApiError::Unavailable {
            detail: "read model behind".into(),
            retry_after: Some(1),
            errors: vec![],
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }

    #[tokio::test]
    async fn plain_error_responses_become_problems() {
        let plain = (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET")],
            "nope",
        )
            .into_response();
        let response = problem_for_plain_errors(plain).await;
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(response.headers()[header::ALLOW], "GET");
        let body = body_json(response).await;
        assert_eq!(body["status"], 405);
        assert_eq!(body["detail"], "nope");
    }
}
