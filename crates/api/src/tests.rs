//! Router-level tests that need no database: the OpenAPI document, the docs page, and requests
//! refused before any I/O (auth, body shape and size). End-to-end behaviour against Postgres and
//! NATS is tested in the workspace's `tests/` crate.

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt;

use super::*;

fn state() -> AppState {
    // Never connects: these requests are answered before any query.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_millis(300))
        .connect_lazy("postgres://nobody@127.0.0.1:1/none")
        .expect("lazy pool");
    let mut config = ApiConfig::new(AuthConfig::new("unit-test-secret"), "rookery-test", 4);
    config.body_limit = 1024;
    AppState::new(pool, None, config, crate::metrics::Metrics::detached())
}

async fn send(request: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let response = router(state()).oneshot(request).await.expect("infallible");
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 8 << 20).await.expect("body");
    (parts.status, parts.headers, bytes.to_vec())
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("json")
}

fn post_json(uri: &str, body: &str) -> Request<Body> {
    Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("request")
}

#[test]
fn openapi_documents_every_route() {
    let doc = serde_json::to_value(openapi()).expect("serializes");
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc["openapi"]
    );
    let routes = [
        ("post", "/v1/auth/register"),
        ("post", "/v1/auth/login"),
        ("post", "/v1/auth/refresh"),
        ("get", "/v1/users/me"),
        ("post", "/v1/users/me/identities"),
        (
            "delete",
            "/v1/users/me/identities/{platform}/{platform_user_id}",
        ),
        ("post", "/v1/communities"),
        ("get", "/v1/communities/{id}"),
        ("patch", "/v1/communities/{id}"),
        ("post", "/v1/communities/{id}/platforms"),
        (
            "delete",
            "/v1/communities/{id}/platforms/{platform}/{server_id}",
        ),
        ("post", "/v1/communities/{id}/members"),
        ("get", "/v1/communities/{id}/members"),
        ("get", "/v1/communities/{id}/members/{user_id}"),
        ("put", "/v1/communities/{id}/members/{user_id}/role"),
        ("delete", "/v1/communities/{id}/members/{user_id}"),
        ("post", "/v1/communities/{id}/members/{user_id}/ban"),
        ("delete", "/v1/communities/{id}/members/{user_id}/ban"),
        ("get", "/health"),
        ("get", "/ready"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
        ("get", "/docs"),
    ];
    for (method, path) in routes {
        let op = &doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} is not documented");
        assert!(
            op["responses"]["500"].is_object(),
            "{method} {path} lacks the 500 problem"
        );
        let authenticated = path.starts_with("/v1/") && !path.starts_with("/v1/auth/");
        assert_eq!(
            op["security"].is_array(),
            authenticated,
            "{method} {path} security"
        );
        if authenticated {
            let unauthorized = &op["responses"]["401"]["content"]["application/problem+json"];
            assert!(
                unauthorized.is_object(),
                "{method} {path} lacks 401 problem+json"
            );
        }
    }
    // Request bodies and problem responses carry schemas.
    let create = &doc["paths"]["/v1/communities"]["post"];
    assert!(create["requestBody"]["content"]["application/json"]["schema"].is_object());
    assert!(
        create["responses"]["422"]["content"]["application/problem+json"]["schema"].is_object()
    );
    assert!(doc["components"]["schemas"]["Problem"].is_object());
    assert!(doc["components"]["schemas"]["CreateCommunityRequest"].is_object());
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    // Every schema reference resolves.
    let text = doc.to_string();
    for reference in text.split("\"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap_or_default();
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "dangling reference to {name}"
        );
    }
    let list_params = doc["paths"]["/v1/communities/{id}/members"]["get"]["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect::<Vec<_>>();
    for name in [
        "id",
        "role",
        "status",
        "sort",
        "limit",
        "cursor",
        "min_position",
    ] {
        assert!(
            list_params.contains(&name),
            "member list lacks `{name}`: {list_params:?}"
        );
    }
}

#[tokio::test]
async fn health_is_always_ok() {
    let (status, headers, body) =
        send(Request::get("/health").body(Body::empty()).expect("req")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["status"], "ok");
    assert!(
        headers.contains_key("x-request-id"),
        "the request id is propagated"
    );
}

#[tokio::test]
async fn docs_are_served_from_the_binary() {
    let (status, headers, body) =
        send(Request::get("/docs").body(Body::empty()).expect("req")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers[header::CONTENT_TYPE]
        .to_str()
        .is_ok_and(|v| v.starts_with("text/html")));
    let page = String::from_utf8(body).expect("utf8");
    assert!(page.contains("/docs/swagger-ui-bundle.js") && !page.contains("https://"));

    let (status, _, body) = send(
        Request::get("/docs/swagger-ui-bundle.js")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&body).contains("SwaggerUIBundle"));
    let (status, _, _) = send(
        Request::get("/docs/swagger-ui.css")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let (status, headers, body) = send(
        Request::get("/openapi.json")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    assert!(json(&body)["paths"]["/v1/communities"].is_object());
}

#[tokio::test]
async fn v1_routes_need_a_bearer_token() {
    let (status, headers, body) = send(
        Request::get("/v1/users/me")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    assert_eq!(json(&body)["status"], 401);

    let request = Request::get("/v1/users/me")
        .header(header::AUTHORIZATION, "Bearer not.a.token")
        .body(Body::empty())
        .expect("req");
    let (status, _, _) = send(request).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn malformed_and_invalid_bodies_are_refused_before_any_io() {
    let (status, headers, body) = send(post_json("/v1/auth/register", "{\"email\": ")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    assert_eq!(json(&body)["status"], 400);

    let (status, _, body) = send(post_json(
        "/v1/auth/register",
        r#"{"email": "a@b.co", "username": "ferris"}"#,
    ))
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(json(&body)["errors"][0]["field"], "password");

    // Domain validation runs before the database is touched.
    let (status, _, body) = send(post_json(
        "/v1/auth/register",
        r#"{"email": "a@b.co", "username": "ferris", "password": "short"}"#,
    ))
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(json(&body)["errors"][0]["field"], "password");
}

#[tokio::test]
async fn oversized_bodies_are_413_problems() {
    let big = format!(r#"{{"email": "{}"}}"#, "a".repeat(4096));
    let (status, headers, body) = send(post_json("/v1/auth/login", &big)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    assert_eq!(json(&body)["status"], 413);
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems() {
    let (status, headers, _) = send(Request::get("/nope").body(Body::empty()).expect("req")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");

    let request = Request::builder()
        .method(Method::DELETE)
        .uri("/health")
        .body(Body::empty())
        .expect("req");
    let (status, headers, body) = send(request).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    assert_eq!(json(&body)["status"], 405);
}

/// With Postgres unreachable `/metrics` still answers with everything recorded so far (here:
/// the request before it, under its route template), rendered by the installed recorder.
#[tokio::test]
async fn metrics_render_without_a_database() {
    let mut state = state();
    state = AppState::new(
        state.pool().clone(),
        None,
        state.config().clone(),
        crate::metrics::Metrics::install(),
    );
    let call = |uri: &str| {
        router(state.clone()).oneshot(Request::get(uri).body(Body::empty()).expect("req"))
    };
    assert_eq!(
        call("/health").await.expect("infallible").status(),
        StatusCode::OK
    );
    let response = call("/metrics").await.expect("infallible");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()[header::CONTENT_TYPE]
        .to_str()
        .is_ok_and(|v| v.starts_with("text/plain")));
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains(
            "rookery_http_requests_total{method=\"GET\",route=\"/health\",status=\"200\"}"
        ),
        "{text}"
    );
    assert!(text.contains("# TYPE rookery_http_request_duration_seconds histogram"));
}
