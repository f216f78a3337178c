//! The end-to-end harness: [`spawn_app`] starts the real application (API, relay, projection
//! workers) on port 0 against its own fresh database and its own NATS stream and subject prefix,
//! so tests run in parallel and leave nothing behind (both are removed on drop, even on panic).
//!
//! The suite itself is `tests/e2e/`: one module per concern (auth, authz, flow, ops, pipeline,
//! recovery, store, uniqueness, migrations) and `layout`, which checks the workspace's shape.

use anyhow::Context;
use reqwest::{Method, RequestBuilder, StatusCode};
pub use rookery_app::{Application, Config, Mode};
use rookery_store::testing::TestDb;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The password [`TestApp::user`] registers every user with.
pub const PASSWORD: &str = "correct horse battery";

pub const JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123";

pub fn nats_url() -> String {
    rookery_store::testing::nats_url()
}

/// A port nothing listens on, for a child process to bind a moment later. Taken below Linux's
/// ephemeral range (32768–60999): a port the OS hands out for `bind(0)` or as an outgoing
/// connection's source port could be taken again, by another test running in parallel, before
/// the child binds it.
pub fn free_port() -> u16 {
    const LOW: u16 = 20_000;
    const SPAN: u16 = 12_000;
    let start = (Uuid::new_v4().as_u128() % u128::from(SPAN)) as u16;
    (0..SPAN)
        .map(|i| LOW + (start + i) % SPAN)
        .find(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .expect("a free port below the ephemeral range")
}

/// Deletes a JetStream stream when dropped, over a connection of its own (the test's runtime may
/// be unable to drive the app's connection while this blocks).
pub struct StreamGuard {
    pub stream: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let stream = self.stream.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(client) = async_nats::connect(nats_url()).await {
                    let js = async_nats::jetstream::new(client);
                    let _ = js.delete_stream(&stream).await;
                }
            });
        })
        .join();
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    pub config: Config,
    stop: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    // Field order matters: the app stops before its stream and database go away.
    _stream: StreamGuard,
    pub db: TestDb,
}

/// A registered, logged-in user.
#[derive(Clone, Debug)]
pub struct TestUser {
    pub id: Uuid,
    pub token: String,
    pub email: String,
    pub username: String,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_in(Mode::Up, tweak).await
}

/// Starts the app in `mode` (e.g. [`Mode::Serve`] for an API without workers).
pub async fn spawn_app_in(mode: Mode, tweak: impl FnOnce(&mut Config)) -> TestApp {
    rookery_app::telemetry::init_for_tests();
    let db = TestDb::create().await.expect("create test database");
    let id = Uuid::new_v4().simple().to_string();
    let mut config = Config {
        database_url: db.url.clone(),
        db_max_connections: 8,
        nats_url: nats_url(),
        http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        stream: format!("test_{id}"),
        subject_prefix: format!("t{id}"),
        partitions: 4,
        jwt_secret: Some(JWT_SECRET.to_string()),
        read_wait: Duration::from_secs(5),
        ack_wait: Duration::from_secs(5),
        database_url_explicit: true,
        nats_url_explicit: true,
        ..Config::default()
    };
    tweak(&mut config);
    let stream = StreamGuard {
        stream: config.stream.clone(),
    };
    let app = Application::build(config.clone(), mode)
        .await
        .expect("build application");
    let addr = app.local_addr().expect("app listens");
    let stop = CancellationToken::new();
    let handle = tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
    TestApp {
        addr,
        http: reqwest::Client::new(),
        config,
        stop,
        handle: Some(handle),
        _stream: stream,
        db,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn request(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let rb = self.http.request(method, self.url(path));
        match token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// Sends a JSON request and returns the status and the parsed body (Null when empty).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut rb = self.request(method, path, token);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().await.expect("request sent");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// `POST /v1/auth/login`; returns the status and the token (or problem) body.
    pub async fn login(&self, email: &str, password: &str) -> (StatusCode, Value) {
        self.send(
            Method::POST,
            "/v1/auth/login",
            None,
            Some(json!({"email": email, "password": password})),
        )
        .await
    }

    /// Registers and logs in a user named `name` (unique email per app) with [`PASSWORD`].
    pub async fn user(&self, name: &str) -> TestUser {
        let email = format!("{name}@example.com");
        let (status, body) = self
            .send(
                Method::POST,
                "/v1/auth/register",
                None,
                Some(json!({"email": email, "username": name, "password": PASSWORD})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "register {name}: {body}");
        let id: Uuid = body["user_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("user_id");
        let (status, body) = self.login(&email, PASSWORD).await;
        assert_eq!(status, StatusCode::OK, "login {name}: {body}");
        let token = body["access_token"]
            .as_str()
            .expect("access_token")
            .to_string();
        TestUser {
            id,
            token,
            email,
            username: name.to_string(),
        }
    }

    /// Creates a community owned by `owner`; returns its id and the command response.
    pub async fn community(&self, owner: &TestUser, name: &str, is_public: bool) -> (Uuid, Value) {
        let (status, body) = self
            .send(
                Method::POST,
                "/v1/communities",
                Some(&owner.token),
                Some(json!({
                    "name": name, "display_name": format!("The {name}"), "platform": "twitch",
                    "is_public": is_public, "join_mode": "open"
                })),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::CREATED,
            "create community {name}: {body}"
        );
        let id = body["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("community id");
        (id, body)
    }

    /// An access token of `user` scoped to `community`: signed with the app's secret, valid
    /// for the usual access TTL.
    pub fn scoped_token(&self, user: &TestUser, community: Uuid) -> String {
        self.token_with(user, community, None)
    }

    /// A service token of `community` (scope `service`), acting as `user`: what a platform
    /// integration posts messages and activities with.
    pub fn service_token(&self, user: &TestUser, community: Uuid) -> String {
        self.token_with(user, community, Some("service"))
    }

    fn token_with(&self, user: &TestUser, community: Uuid, scope: Option<&str>) -> String {
        let keys = rookery_api::auth::JwtKeys::new(&rookery_api::AuthConfig::new(JWT_SECRET));
        let mut claims = keys.claims_for(user.id, chrono::Utc::now());
        claims.community_id = Some(community);
        claims.scope = scope.map(str::to_string);
        keys.sign(&claims).expect("sign a scoped token")
    }

    /// Events of one aggregate type and id, as `event_type`s in order.
    pub async fn events_of(&self, aggregate_type: &str, aggregate_id: &str) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT event_type FROM events WHERE aggregate_type = $1 AND aggregate_id = $2
             ORDER BY sequence",
        )
        .bind(aggregate_type)
        .bind(aggregate_id)
        .fetch_all(&self.db.pool)
        .await
        .expect("events of an aggregate")
    }

    /// How many events of `event_type` the log holds.
    pub async fn count_events(&self, event_type: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = $1")
            .bind(event_type)
            .fetch_one(&self.db.pool)
            .await
            .expect("count events")
    }

    pub async fn event_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.db.pool)
            .await
            .expect("count events")
    }

    /// Stops the application gracefully and returns how it ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        match self.handle.take() {
            Some(h) => h.await.context("app task")?,
            None => Ok(()),
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}
