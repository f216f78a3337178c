//! Extractors whose rejections are [`ApiError`]s, so a malformed request gets a problem document
//! naming the offending field instead of axum's plain text.

use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRef, FromRequest, FromRequestParts, RawPathParams, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use rookery_events::LogPosition;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, FieldError};
use crate::state::AppState;

/// A JSON body. Rejections: 400 for malformed JSON, 413 over the body limit, 415 without a JSON
/// content type, 422 naming the field for a missing field or a value of the wrong type or outside
/// its set (e.g. an unknown role).
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

/// A JSON body that may be absent: an empty body reads as `T::default()`.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonOrEmpty<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
    AppState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = AppState::from_ref(state).config().body_limit;
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Json(value)),
            Err(rejection) => Err(json_rejection(rejection, limit)),
        }
    }
}

impl<T, S> FromRequest<S> for JsonOrEmpty<T>
where
    T: DeserializeOwned + Default,
    S: Send + Sync,
    AppState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = AppState::from_ref(state).config().body_limit;
        let json_type = is_json(req.headers());
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|rejection| json_rejection(JsonRejection::BytesRejection(rejection), limit))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonOrEmpty(T::default()));
        }
        if !json_type {
            return Err(ApiError::UnsupportedMediaType(
                "expected `Content-Type: application/json`".into(),
            ));
        }
        axum::Json::<T>::from_bytes(&bytes)
            .map(|axum::Json(value)| JsonOrEmpty(value))
            .map_err(|rejection| json_rejection(rejection, limit))
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| mime.trim().to_ascii_lowercase())
        .is_some_and(|mime| mime == "application/json" || mime.ends_with("+json"))
}

/// Maps axum's JSON rejection to our error. axum 0.8 runs serde through `serde_path_to_error`,
/// so a data error's text is `<constant>: [<path>: ]<serde message> at line L column C`; the path,
/// or the field serde names in "missing field `x`", becomes the problem's field.
pub(crate) fn json_rejection(rejection: JsonRejection, limit: usize) -> ApiError {
    match rejection {
        JsonRejection::JsonDataError(e) => {
            let text = e.body_text();
            let (field, message) = data_error_field(after_prefix(&text));
            ApiError::Unprocessable {
                detail: format!("invalid {field}: {message}"),
                errors: vec![FieldError { field, message }],
            }
        }
        JsonRejection::JsonSyntaxError(e) => ApiError::BadRequest {
            detail: format!("malformed JSON: {}", after_prefix(&e.body_text())),
            field: None,
        },
        JsonRejection::MissingJsonContentType(_) => {
            ApiError::UnsupportedMediaType("expected `Content-Type: application/json`".into())
        }
        JsonRejection::BytesRejection(e)
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE =>
        {
            ApiError::PayloadTooLarge { limit }
        }
        other => ApiError::BadRequest {
            detail: other.body_text(),
            field: None,
        },
    }
}

/// The part of a rejection text after axum's constant sentence.
fn after_prefix(text: &str) -> &str {
    text.split_once(": ").map_or(text, |(_, rest)| rest)
}

/// `(field, message)` from `[<path>: ]<serde message>[ at line L column C]`.
fn data_error_field(text: &str) -> (String, String) {
    let text = match text.rfind(" at line ") {
        Some(i) => &text[..i],
        None => text,
    };
    // A path is a dotted list of keys and indexes; serde's messages all contain spaces first.
    let (path, message) = match text.split_once(": ") {
        Some((path, message))
            if !path.is_empty()
                && path
                    .chars()
                    .all(|c| c.is_alphanumeric() || "_.[]?-".contains(c)) =>
        {
            (Some(path), message)
        }
        _ => (None, text),
    };
    let join = |name: &str| match path {
        Some(p) => format!("{p}.{name}"),
        None => name.to_string(),
    };
    if let Some(name) = backticked(message, "missing field `") {
        return (join(name), "is required".to_string());
    }
    if let Some(name) = backticked(message, "unknown field `") {
        // Here the path already ends at the unknown key.
        let field = path.map_or_else(|| name.to_string(), str::to_string);
        return (field, "is not a known field".to_string());
    }
    (path.unwrap_or("body").to_string(), message.to_string())
}

fn backticked<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    message.strip_prefix(prefix)?.split('`').next()
}

/// Path parameters; a value that does not parse (e.g. a malformed UUID) is a 400 naming it.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::path::ErrorKind;
        let e = match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => return Ok(Path(value)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => e,
            Err(other) => {
                return Err(ApiError::BadRequest {
                    detail: other.body_text(),
                    field: None,
                })
            }
        };
        // A single value (`Path<Uuid>`) or a tuple reports no key: find it among the raw params.
        let raw = RawPathParams::from_request_parts(parts, state).await.ok();
        let nth_key = |index: usize| {
            raw.as_ref()
                .and_then(|raw| raw.iter().nth(index).map(|(k, _)| k.to_string()))
        };
        let (key, expected) = match e.kind() {
            ErrorKind::ParseErrorAtKey {
                key, expected_type, ..
            } => (Some(key.clone()), *expected_type),
            ErrorKind::ParseErrorAtIndex {
                index,
                expected_type,
                ..
            } => (nth_key(*index), *expected_type),
            ErrorKind::ParseError { expected_type, .. } => (nth_key(0), *expected_type),
            // Types with their own `Deserialize` (Uuid) fail here, with serde's message.
            ErrorKind::DeserializeError { key, message, .. } => {
                let expected = if message.contains("UUID") {
                    "Uuid"
                } else {
                    "value"
                };
                (Some(key.clone()), expected)
            }
            _ => {
                return Err(ApiError::BadRequest {
                    detail: e.body_text(),
                    field: None,
                })
            }
        };
        let message = if expected.contains("Uuid") {
            "must be a UUID".to_string()
        } else {
            format!("must be a valid {expected}")
        };
        let key = key.unwrap_or_else(|| "path".to_string());
        Err(ApiError::BadRequest {
            detail: format!("invalid {key}: {message}"),
            field: Some(key),
        })
    }
}

/// Query parameters. Handlers take them as strings and parse each one themselves, so a bad
/// value is refused naming its parameter; this only fails on a malformed query string.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Query(value))
            .map_err(|rejection| ApiError::BadRequest {
                detail: rejection.body_text(),
                field: None,
            })
    }
}

/// Who sent the request, for event metadata: the request id (set by the request-id layer when
/// the client sent none) and the conversation it belongs to.
#[derive(Clone, Debug, Default)]
pub struct RequestMeta {
    pub request_id: Option<String>,
    pub correlation_id: Option<String>,
    /// `If-Match`: the version the client expects the addressed aggregate to be at.
    pub if_match: Option<i64>,
}

pub const REQUEST_ID: &str = "x-request-id";
pub const CORRELATION_ID: &str = "x-correlation-id";

impl<S: Send + Sync> FromRequestParts<S> for RequestMeta {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let headers = &parts.headers;
        let request_id = header_text(headers, REQUEST_ID);
        let correlation_id = header_text(headers, CORRELATION_ID).or_else(|| request_id.clone());
        let if_match = match headers.get(header::IF_MATCH) {
            None => None,
            Some(v) => parse_if_match(v.to_str().unwrap_or("\u{0}"))?,
        };
        Ok(RequestMeta {
            request_id,
            correlation_id,
            if_match,
        })
    }
}

/// A header as text, cut to a sane length: it is stored with every event of the request.
fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    let value = headers.get(name)?.to_str().ok()?.trim();
    (!value.is_empty()).then(|| value.chars().take(128).collect())
}

/// `If-Match: <version>`; quotes (an ETag) and a weak `W/` prefix are tolerated, `*` matches any
/// version.
pub fn parse_if_match(value: &str) -> Result<Option<i64>, ApiError> {
    let v = value.trim();
    if v == "*" {
        return Ok(None);
    }
    let v = v.strip_prefix("W/").unwrap_or(v);
    let v = v
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v);
    match v.trim().parse::<i64>() {
        Ok(version) if version >= 0 => Ok(Some(version)),
        _ => Err(ApiError::bad_request(
            "If-Match",
            "If-Match must be the aggregate version (a non-negative integer) the change expects",
        )),
    }
}

/// `?min_position=<position>`: the `position` a command returned, which the query's answer must
/// reflect (read-your-writes; see `read::after`). Absent or empty: answer from the read model as
/// it is. A value that is not a position token is a 400 naming `min_position`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MinPosition(pub Option<LogPosition>);

/// The query parameter [`MinPosition`] reads, for handlers' OpenAPI `params(...)`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConsistencyParams {
    /// A command's `position`: wait (briefly) until the answer reflects it; 503 with
    /// `Retry-After` if the read model does not get there in time.
    pub min_position: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for MinPosition {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Query(params) = Query::<ConsistencyParams>::from_request_parts(parts, state).await?;
        Ok(MinPosition(parse_min_position(
            params.min_position.as_deref(),
        )?))
    }
}

/// `min_position` of a query: the `position` token a command returned.
pub fn parse_min_position(value: Option<&str>) -> Result<Option<LogPosition>, ApiError> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse::<LogPosition>()
            .map(Some)
            .map_err(|e| ApiError::bad_request("min_position", e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use rookery_events::{JoinMode, Role};
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        role: Role,
        join_mode: Option<JoinMode>,
        is_public: Option<bool>,
        nested: Option<Nested>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Nested {
        count: u32,
    }

    fn reject(json: &str) -> ApiError {
        match axum::Json::<Body>::from_bytes(json.as_bytes()) {
            Ok(body) => panic!("expected a rejection, got {:?}", body.0),
            Err(rejection) => json_rejection(rejection, 1024),
        }
    }

    fn field_error(err: &ApiError) -> (u16, String, String) {
        let problem = err.problem();
        let e = problem
            .errors
            .and_then(|e| e.into_iter().next())
            .expect("a field error");
        (problem.status, e.field, e.message)
    }

    #[test]
    fn missing_field_is_422_naming_it() {
        let (status, field, message) = field_error(&reject(r#"{"role": "admin"}"#));
        assert_eq!(
            (status, field.as_str(), message.as_str()),
            (422, "name", "is required")
        );
    }

    #[test]
    fn unknown_enum_value_is_422_naming_the_field() {
        let (status, field, message) = field_error(&reject(r#"{"name": "x", "role": "king"}"#));
        assert_eq!((status, field.as_str()), (422, "role"));
        assert!(message.contains("unknown variant `king`"), "{message}");
        assert!(message.contains("owner"), "{message}");
        assert!(!message.contains("line 1"), "{message}");
        let err = reject(r#"{"name": "x", "role": "admin", "join_mode": "sometimes"}"#);
        assert_eq!(field_error(&err).1, "join_mode");
    }

    #[test]
    fn wrong_type_is_422_naming_the_field() {
        let err = reject(r#"{"name": "x", "role": "admin", "is_public": "yes"}"#);
        let (status, field, message) = field_error(&err);
        assert_eq!((status, field.as_str()), (422, "is_public"));
        assert!(message.contains("expected a boolean"), "{message}");
    }

    #[test]
    fn nested_fields_are_dotted_paths() {
        let err = reject(r#"{"name": "x", "role": "admin", "nested": {"count": -1}}"#);
        assert_eq!(field_error(&err).1, "nested.count");
        let err = reject(r#"{"name": "x", "role": "admin", "nested": {}}"#);
        assert_eq!(field_error(&err).1, "nested.count");
        let err = reject(r#"{"name": "x", "role": "admin", "nested": {"count": 1, "extra": 2}}"#);
        assert_eq!(field_error(&err).1, "nested.extra");
    }

    #[test]
    fn malformed_json_is_400() {
        let err = reject(r#"{"name": "#);
        assert_eq!(err.status().as_u16(), 400);
        assert!(err.to_string().starts_with("malformed JSON"), "{err}");
        assert_eq!(reject(r#"{"name": "x" "role": 1}"#).status().as_u16(), 400);
    }

    #[test]
    fn a_body_that_is_not_an_object_is_422_about_the_body() {
        let (status, field, _) = field_error(&reject("[]"));
        assert_eq!((status, field.as_str()), (422, "body"));
    }

    #[test]
    fn if_match_accepts_plain_and_quoted_versions() {
        assert_eq!(parse_if_match("3").ok(), Some(Some(3)));
        assert_eq!(parse_if_match(" \"12\" ").ok(), Some(Some(12)));
        assert_eq!(parse_if_match("W/\"7\"").ok(), Some(Some(7)));
        assert_eq!(parse_if_match("*").ok(), Some(None));
        for bad in ["", "abc", "-1", "\"1", "1.5"] {
            let err = parse_if_match(bad).expect_err(bad);
            assert_eq!(err.status().as_u16(), 400, "{bad}");
            assert_eq!(err.problem().errors.expect("field")[0].field, "If-Match");
        }
    }

    #[test]
    fn min_position_must_be_a_position_token() {
        assert_eq!(parse_min_position(None).ok(), Some(None));
        assert_eq!(parse_min_position(Some("")).ok(), Some(None));
        assert_eq!(
            parse_min_position(Some("12.3")).ok(),
            Some(Some(LogPosition::new(12, 3)))
        );
        let err = parse_min_position(Some("yesterday")).expect_err("garbage");
        assert_eq!(err.status().as_u16(), 400);
        assert_eq!(
            err.problem().errors.expect("field")[0].field,
            "min_position"
        );
    }
}
