//! The OpenAPI document (generated from the handlers' `#[utoipa::path]` annotations through
//! utoipa-axum's router, so a route cannot exist without being documented) and the offline docs
//! page: Swagger UI from the npm package `swagger-ui-dist`, embedded in the binary.

use std::sync::OnceLock;

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{IntoResponses, Modify, OpenApi};

use crate::error::{FieldError, Problem, PROBLEM_JSON};
use axum::routing::get;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Rookery API",
        description = "Event-sourced backend for multi-platform chat communities. Commands return \
            `{id, version, position}`; pass `position` as `min_position` to a query to read your own \
            write, and `version` as `If-Match` to change an aggregate only if nobody else did. \
            Errors are `application/problem+json`.",
        license(name = "Apache-2.0")
    ),
    components(schemas(Problem, FieldError)),
    tags(
        (name = "auth", description = "Registration, sign-in, token refresh"),
        (name = "users", description = "The signed-in hub user"),
        (name = "communities", description = "Communities and their platform servers"),
        (name = "members", description = "Memberships, roles, moderation"),
        (name = "messages", description = "Chat history, hub chat and platforms' messages"),
        (name = "activities", description = "Platform activity: follows, subscriptions, cheers, …"),
        (name = "reputation", description = "Scores, history, leaderboards, the policy"),
        (name = "operations", description = "Health, readiness, metrics, this document"),
    ),
    modifiers(&Conventions)
)]
pub(crate) struct ApiDoc;

pub const BEARER: &str = "bearer";

/// Declares the bearer security scheme; [`finish`] attaches it to the operations.
struct Conventions;

impl Modify for Conventions {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "An access token from `POST /v1/auth/login` or `/v1/auth/refresh`.",
                    ))
                    .build(),
            ),
        );
    }
}

fn problem_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                PROBLEM_JSON,
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build(),
    )
}

/// Adds what every operation shares instead of repeating it in each annotation: the bearer
/// requirement and its 401 on every authenticated `/v1` route, and the opaque 500 everywhere.
/// Runs on the finished document because operations only exist once the router collected them.
pub(crate) fn finish(mut openapi: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    for (path, item) in openapi.paths.paths.iter_mut() {
        let public = !path.starts_with("/v1/") || path.starts_with("/v1/auth/");
        let operations: [Option<&mut Operation>; 5] = [
            item.get.as_mut(),
            item.post.as_mut(),
            item.put.as_mut(),
            item.patch.as_mut(),
            item.delete.as_mut(),
        ];
        for op in operations.into_iter().flatten() {
            if !public {
                op.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
                op.responses.responses.entry("401".into()).or_insert_with(|| {
                    problem_response("Missing, expired or invalid access token (`WWW-Authenticate: Bearer`).")
                });
            }
            op.responses
                .responses
                .entry("500".into())
                .or_insert_with(|| {
                    problem_response("Unexpected error; logged on the server, opaque here.")
                });
        }
    }
    openapi
}

// Reusable problem responses for `responses(...)` in the handlers' annotations.

/// Malformed request: bad JSON, or a path or query value that does not parse.
#[derive(IntoResponses)]
#[response(status = 400, content_type = "application/problem+json")]
#[allow(dead_code)]
pub(crate) struct BadRequest(Problem);

/// The caller's role does not allow this.
#[derive(IntoResponses)]
#[response(status = 403, content_type = "application/problem+json")]
#[allow(dead_code)]
pub(crate) struct Forbidden(Problem);

/// No such resource, or one the caller may not know about (private communities).
#[derive(IntoResponses)]
#[response(status = 404, content_type = "application/problem+json")]
#[allow(dead_code)]
pub(crate) struct NotFound(Problem);

/// Collides with the current state: a taken name or id (the field is named), a concurrent
/// writer, or a business rule.
#[derive(IntoResponses)]
#[response(status = 409, content_type = "application/problem+json")]
#[allow(dead_code)]
pub(crate) struct Conflict(Problem);

/// `If-Match` named another version than the current one.
#[derive(IntoResponses)]
#[response(status = 412, content_type = "application/problem+json")]
#[allow(dead_code)]
pub(crate) struct PreconditionFailed(Problem);

/// The body is larger than the limit.
#[derive(IntoResponses)]
#[response(status = 413, content_type = "application/problem+json")]
#[allow(dead_code)]
pub(crate) struct PayloadTooLarge(Problem);

/// A field is missing, of the wrong type, outside its set of values or breaks its rule; `errors`
/// names it.
#[derive(IntoResponses)]
#[response(status = 422, content_type = "application/problem+json")]
#[allow(dead_code)]
pub(crate) struct Unprocessable(Problem);

/// The read model did not reach `min_position` in time (`Retry-After: 1`), or a dependency is down.
#[derive(IntoResponses)]
#[response(status = 503, content_type = "application/problem+json")]
#[allow(dead_code)]
pub(crate) struct Unavailable(Problem);

/// Invalid credentials or refresh token.
#[derive(IntoResponses)]
#[response(status = 401, content_type = "application/problem+json")]
#[allow(dead_code)]
pub(crate) struct Unauthorized(Problem);

// ---- serving ----

/// The document as served at `/openapi.json`, rendered once.
pub(crate) fn openapi_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        crate::openapi()
            .to_pretty_json()
            .unwrap_or_else(|_| "{}".into())
    })
}

const DOCS_HTML: &str = r#"<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>Rookery API</title>
  <link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script src="/docs/swagger-initializer.js"></script>
</body>
</html>
"#;

// A separate file rather than an inline script, so a strict Content-Security-Policy can forbid
// inline scripts.
const DOCS_INIT_JS: &str = r##"window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    persistAuthorization: true,
    tryItOutEnabled: true,
  });
};
"##;

// swagger-ui-dist 5.35.0 from the npm registry (Apache-2.0, see assets/swagger-ui/LICENSE).
const BUNDLE_JS: &[u8] = include_bytes!("../assets/swagger-ui/swagger-ui-bundle.js");
const UI_CSS: &[u8] = include_bytes!("../assets/swagger-ui/swagger-ui.css");
const UI_LICENSE: &str = include_str!("../assets/swagger-ui/LICENSE");

fn asset(content_type: &'static str, body: impl Into<axum::body::Body>) -> Response {
    let mut response = body.into().into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Assets change only with the binary.
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400"),
    );
    response
}

/// The OpenAPI 3.1 document of this API.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object)))]
pub(crate) async fn openapi_document() -> Response {
    let mut response = openapi_json().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Interactive API docs (Swagger UI, served from the binary: works offline).
#[utoipa::path(get, path = "/docs", tag = "operations",
    responses((status = 200, description = "The docs page", content_type = "text/html", body = String)))]
pub(crate) async fn docs_page() -> Response {
    asset("text/html; charset=utf-8", DOCS_HTML)
}

pub(crate) async fn docs_init() -> Response {
    asset("text/javascript; charset=utf-8", DOCS_INIT_JS)
}

pub(crate) async fn docs_bundle() -> Response {
    asset("text/javascript; charset=utf-8", BUNDLE_JS)
}

pub(crate) async fn docs_css() -> Response {
    asset("text/css; charset=utf-8", UI_CSS)
}

pub(crate) async fn docs_license() -> Response {
    asset("text/plain; charset=utf-8", UI_LICENSE)
}

/// This resource's routes. One `routes!` per path: utoipa-axum mounts each handler of a group on
/// every path of the group.
pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(openapi_document))
        .routes(routes!(docs_page))
        // The page's assets: served, not documented.
        .route("/docs/swagger-initializer.js", get(docs_init))
        .route("/docs/swagger-ui-bundle.js", get(docs_bundle))
        .route("/docs/swagger-ui.css", get(docs_css))
        .route("/docs/LICENSE", get(docs_license))
}
