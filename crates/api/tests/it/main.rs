//! The command paths against a real Postgres (a fresh migrated database per test), driven
//! through the router in-process: what is stored, what is refused, and that a refusal stores
//! nothing. Read-model queries against the bus are covered by the workspace's end-to-end suite.

mod auth;
mod communities;
mod members;
mod ops;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use rookery_api::{router, ApiConfig, AppState, AuthConfig, Metrics};
use rookery_store::testing::TestDb;
use serde_json::{json, Value};
use tower::ServiceExt;

pub struct App {
    router: Router,
    db: TestDb,
}

pub struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

impl App {
    async fn new() -> App {
        let db = TestDb::create().await.expect("test database");
        let mut config = ApiConfig::new(AuthConfig::new("db-test-secret"), "rookery-db-test", 4);
        config.read_wait = std::time::Duration::from_millis(300);
        let router = router(AppState::new(
            db.pool.clone(),
            None,
            config,
            Metrics::install(),
        ));
        App { router, db }
    }

    async fn call(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        self.call_with(method, uri, token, body, &[]).await
    }

    async fn call_with(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let request = match body {
            Some(body) => request
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string())),
            None => request.body(Body::empty()),
        }
        .expect("request");
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("infallible");
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("json")
        };
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// Registers and signs in `name`; returns `(user_id, access_token)`.
    async fn user(&self, name: &str) -> (String, String) {
        let email = format!("{name}@example.com");
        let r = self
            .call(
                Method::POST,
                "/v1/auth/register",
                None,
                Some(json!({"email": email, "username": name, "password": "correct horse"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        let user_id = text(&r.body["user_id"]).expect("user id");
        let r = self
            .call(
                Method::POST,
                "/v1/auth/login",
                None,
                Some(json!({"email": email, "password": "correct horse"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        (user_id, token(&r.body))
    }

    async fn user_id(&self, token: &str) -> String {
        let r = self
            .call(Method::GET, "/v1/users/me", Some(token), None)
            .await;
        text(&r.body["id"]).expect("id")
    }

    async fn community(&self, token: &str, name: &str, is_public: bool) -> String {
        let r = self
            .call(
                Method::POST,
                "/v1/communities",
                Some(token),
                Some(json!({"name": name, "display_name": "Test", "platform": "discord", "is_public": is_public})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        text(&r.body["id"]).expect("id")
    }

    async fn event_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.db.pool)
            .await
            .expect("count")
    }
}

fn text(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string)
}

fn token(body: &Value) -> String {
    text(&body["access_token"]).expect("access token")
}

fn field(body: &Value) -> &str {
    body["errors"][0]["field"].as_str().unwrap_or_default()
}
