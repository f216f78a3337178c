//! The command paths against a real Postgres (a fresh migrated database per test), driven through
//! the router in-process: what is stored, what is refused, and that a refusal stores nothing.
//! Read-model queries and the bus are covered by the workspace's end-to-end suite.

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use rookery_store::testing::TestDb;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::*;

struct App {
    router: Router,
    db: TestDb,
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

impl App {
    async fn new() -> App {
        let db = TestDb::create().await.expect("test database");
        let mut config = ApiConfig::new(AuthConfig::new("db-test-secret"), "rookery-db-test", 4);
        config.read_wait = std::time::Duration::from_millis(300);
        let router = router(AppState::new(db.pool.clone(), None, config));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_stores_a_hash_never_the_password() {
    let app = App::new().await;
    let r = app
        .call(
            Method::POST,
            "/v1/auth/register",
            None,
            Some(json!({"email": " Ada@Example.com ", "username": "ada", "password": "correct horse"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert!(r.body["user_id"].is_string() && r.body["position"].is_string());

    let (email, hash): (String, String) =
        sqlx::query_as("SELECT email, password_hash FROM credentials")
            .fetch_one(&app.db.pool)
            .await
            .expect("credentials");
    assert_eq!(email, "ada@example.com");
    assert!(hash.starts_with("$argon2id$"));
    let events: Vec<String> =
        sqlx::query_scalar("SELECT payload::text || metadata::text FROM events")
            .fetch_all(&app.db.pool)
            .await
            .expect("events");
    assert_eq!(events.len(), 1);
    assert!(!events[0].contains("correct horse"));

    // The email is claimed case-insensitively; the refused registration stores nothing.
    let r = app
        .call(
            Method::POST,
            "/v1/auth/register",
            None,
            Some(json!({"email": "ADA@example.com", "username": "ada2", "password": "correct horse"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(field(&r.body), "email");
    assert_eq!(app.event_count().await, 1);

    let r = app
        .call(
            Method::POST,
            "/v1/auth/register",
            None,
            Some(json!({"email": "bob@example.com", "username": "b", "password": "correct horse"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(field(&r.body), "username");
    assert_eq!(app.event_count().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_and_refresh_rotation_with_reuse_detection() {
    let app = App::new().await;
    app.user("ada").await;

    for (email, password) in [
        ("ada@example.com", "wrong horse"),
        ("nobody@example.com", "correct horse"),
    ] {
        let r = app
            .call(
                Method::POST,
                "/v1/auth/login",
                None,
                Some(json!({"email": email, "password": password})),
            )
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.body["detail"], "invalid email or password");
    }

    let r = app
        .call(
            Method::POST,
            "/v1/auth/login",
            None,
            Some(json!({"email": "ada@example.com", "password": "correct horse"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["token_type"], "Bearer");
    assert_eq!(r.body["expires_in"], 900);
    let first = text(&r.body["refresh_token"]).expect("refresh token");

    let me = app
        .call(Method::GET, "/v1/users/me", Some(&token(&r.body)), None)
        .await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.body["username"], "ada");

    let r = app
        .call(
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": first})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let second = text(&r.body["refresh_token"]).expect("rotated");
    assert_ne!(first, second);

    // Reusing the first token revokes the family: the second stops working too.
    let r = app
        .call(
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": first})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = app
        .call(
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": second})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    let stored: Vec<Vec<u8>> = sqlx::query_scalar("SELECT token_hash FROM refresh_tokens")
        .fetch_all(&app.db.pool)
        .await
        .expect("tokens");
    assert!(stored
        .iter()
        .all(|h| h.len() == 32 && *h != first.as_bytes()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_a_community_makes_the_owner_a_member_in_one_commit() {
    let app = App::new().await;
    let (_, owner) = app.user("owner").await;
    let r = app
        .call_with(
            Method::POST,
            "/v1/communities",
            Some(&owner),
            Some(
                json!({"name": "rustaceans", "display_name": "Rustaceans", "platform": "discord"}),
            ),
            &[("x-request-id", "req-1"), ("x-correlation-id", "conv-1")],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["version"], 1);
    assert!(text(&r.body["position"]).is_some_and(|p| p.contains('.')));
    assert_eq!(r.headers["x-request-id"], "req-1");

    let rows: Vec<(String, i64, Value)> = sqlx::query_as(
        "SELECT event_type, transaction_id::text::bigint, metadata FROM events
         WHERE aggregate_type IN ('community', 'membership') ORDER BY global_position",
    )
    .fetch_all(&app.db.pool)
    .await
    .expect("events");
    assert_eq!(
        rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        ["CommunityCreated", "MemberJoined"]
    );
    assert_eq!(rows[0].1, rows[1].1, "one transaction");
    let owner_id = app.user_id(&owner).await;
    assert_eq!(rows[0].2["actor"], format!("user:{owner_id}"));
    assert_eq!(rows[0].2["request_id"], "req-1");
    assert_eq!(rows[0].2["correlation_id"], "conv-1");

    let before = app.event_count().await;
    let taken = app
        .call(
            Method::POST,
            "/v1/communities",
            Some(&owner),
            Some(json!({"name": "rustaceans", "display_name": "Again", "platform": "twitch"})),
        )
        .await;
    assert_eq!(taken.status, StatusCode::CONFLICT);
    assert_eq!(field(&taken.body), "name");
    let invalid = app
        .call(
            Method::POST,
            "/v1/communities",
            Some(&owner),
            Some(json!({"name": "No Spaces", "display_name": "x", "platform": "discord"})),
        )
        .await;
    assert_eq!(invalid.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(field(&invalid.body), "name");
    let unknown = app
        .call(
            Method::POST,
            "/v1/communities",
            Some(&owner),
            Some(json!({"name": "valid-name", "display_name": "x", "platform": "myspace"})),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(field(&unknown.body), "platform");
    assert_eq!(app.event_count().await, before, "refusals store nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_honour_if_match_and_roles() {
    let app = App::new().await;
    let (_, owner) = app.user("owner").await;
    let (_, other) = app.user("other").await;
    let id = app.community(&owner, "crabs", true).await;
    let uri = format!("/v1/communities/{id}");

    let stale = app
        .call_with(
            Method::PATCH,
            &uri,
            Some(&owner),
            Some(json!({"display_name": "Crabs"})),
            &[("if-match", "\"7\"")],
        )
        .await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);

    let r = app
        .call_with(
            Method::PATCH,
            &uri,
            Some(&owner),
            Some(json!({"display_name": "Crabs", "join_mode": "approval"})),
            &[("if-match", "1")],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["version"], 3);
    let noop = app
        .call(
            Method::PATCH,
            &uri,
            Some(&owner),
            Some(json!({"display_name": "Crabs"})),
        )
        .await;
    assert_eq!(
        (
            noop.body["version"].as_i64(),
            noop.body["position"].is_null()
        ),
        (Some(3), true)
    );

    let got = app.call(Method::GET, &uri, Some(&other), None).await;
    assert_eq!(got.status, StatusCode::OK, "public communities are visible");
    assert_eq!(got.headers[header::ETAG], "\"3\"");
    assert_eq!(
        (
            got.body["display_name"].as_str(),
            got.body["join_mode"].as_str()
        ),
        (Some("Crabs"), Some("approval"))
    );

    // An outsider may not change a public community (403) ...
    let r = app
        .call(
            Method::PATCH,
            &uri,
            Some(&other),
            Some(json!({"display_name": "Mine"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // ... and learns nothing about a private one (404).
    app.call(
        Method::PATCH,
        &uri,
        Some(&owner),
        Some(json!({"is_public": false})),
    )
    .await;
    for (method, body) in [
        (Method::GET, None),
        (Method::PATCH, Some(json!({"display_name": "Mine"}))),
    ] {
        let r = app.call(method, &uri, Some(&other), body).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    }
    let bad = app
        .call(
            Method::GET,
            "/v1/communities/not-a-uuid",
            Some(&owner),
            None,
        )
        .await;
    assert_eq!(
        (bad.status, field(&bad.body)),
        (StatusCode::BAD_REQUEST, "id"),
        "{}",
        bad.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_commands_follow_the_domain_rules() {
    let app = App::new().await;
    let (_, owner) = app.user("owner").await;
    let (alice_id, alice) = app.user("alice").await;
    let owner_id = app.user_id(&owner).await;
    let id = app.community(&owner, "members-test", true).await;
    let members = format!("/v1/communities/{id}/members");

    let r = app.call(Method::POST, &members, Some(&alice), None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let again = app
        .call(Method::POST, &members, Some(&alice), Some(json!({})))
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT);

    // Members cannot promote; the owner can.
    let role = format!("{members}/{owner_id}/role");
    let r = app
        .call(
            Method::PUT,
            &role,
            Some(&alice),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let role = format!("{members}/{alice_id}/role");
    let r = app
        .call(
            Method::PUT,
            &role,
            Some(&owner),
            Some(json!({"role": "king"})),
        )
        .await;
    assert_eq!(
        (r.status, field(&r.body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "role")
    );
    let r = app
        .call(
            Method::PUT,
            &role,
            Some(&owner),
            Some(json!({"role": "moderator"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // A moderator cannot ban the owner; adding an unknown user is 404.
    let r = app
        .call(
            Method::POST,
            &format!("{members}/{owner_id}/ban"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let ghost = uuid::Uuid::new_v4();
    let r = app
        .call(
            Method::POST,
            &members,
            Some(&owner),
            Some(json!({"user_id": ghost})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // The owner bans alice (with a reason), twice is a no-op, then unbans; she leaves nothing behind.
    let ban = format!("{members}/{alice_id}/ban");
    let r = app
        .call(
            Method::POST,
            &ban,
            Some(&owner),
            Some(json!({"reason": "spam"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = app.call(Method::POST, &ban, Some(&owner), None).await;
    assert_eq!(
        (r.status, r.body["position"].is_null()),
        (StatusCode::OK, true)
    );
    let r = app.call(Method::POST, &members, Some(&alice), None).await;
    assert_eq!(
        r.status,
        StatusCode::FORBIDDEN,
        "banned users cannot rejoin"
    );
    let r = app.call(Method::DELETE, &ban, Some(&owner), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // The owner cannot leave; a member can.
    let r = app
        .call(
            Method::DELETE,
            &format!("{members}/{owner_id}"),
            Some(&owner),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    app.call(Method::POST, &members, Some(&alice), None).await;
    let r = app
        .call(
            Method::DELETE,
            &format!("{members}/{alice_id}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

/// The membership events stored for `user` in `community`, in order.
async fn membership_events(app: &App, community: &str, user: &str) -> Vec<String> {
    let parse = |s: &str| s.parse::<uuid::Uuid>().expect("uuid");
    let id = rookery_events::membership::membership_id(parse(community), parse(user));
    sqlx::query_scalar(
        "SELECT event_type FROM events WHERE aggregate_type = 'membership' AND aggregate_id = $1
         ORDER BY sequence",
    )
    .bind(id.to_string())
    .fetch_all(&app.db.pool)
    .await
    .expect("events")
}

#[tokio::test]
async fn joins_decided_without_a_load_follow_the_stored_state() {
    let app = App::new().await;
    let (_, owner) = app.user("owner").await;
    let (alice_id, alice) = app.user("alice").await;
    let (bob_id, bob) = app.user("bob").await;
    let (carol_id, carol) = app.user("carol").await;
    let id = app.community(&owner, "cached-joins", true).await;
    let members = format!("/v1/communities/{id}/members");

    // Alice's join loads the community (and caches it); then the owner switches to approval,
    // which leaves this process's cached copy one version behind.
    let r = app.call(Method::POST, &members, Some(&alice), None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = app
        .call(
            Method::PATCH,
            &format!("/v1/communities/{id}"),
            Some(&owner),
            Some(json!({"join_mode": "approval"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // Bob's join must see approval mode, not the cached open one; Carol's (cache refreshed) too.
    for (user, token) in [(&bob_id, &bob), (&carol_id, &carol)] {
        let r = app.call(Method::POST, &members, Some(token), None).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        assert_eq!(membership_events(&app, &id, user).await, ["JoinRequested"]);
    }

    // A member who left is no first joiner: her rejoin continues her membership's sequence.
    let r = app
        .call(
            Method::DELETE,
            &format!("{members}/{alice_id}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = app.call(Method::POST, &members, Some(&alice), None).await;
    assert_eq!(
        (r.status, &r.body["version"]),
        (StatusCode::CREATED, &json!(3)),
        "{}",
        r.body
    );
    assert_eq!(
        membership_events(&app, &id, &alice_id).await,
        ["MemberJoined", "MemberLeft", "JoinRequested"]
    );

    // Tenant isolation holds on the cached path too: a token scoped to another community does
    // not reach this one, cached or not.
    let keys = crate::auth::JwtKeys::new(&AuthConfig::new("db-test-secret"));
    let mut claims = keys.claims_for(uuid::Uuid::new_v4(), chrono::Utc::now());
    claims.community_id = Some(uuid::Uuid::new_v4());
    let scoped = keys.sign(&claims).expect("scoped token");
    let before = app.event_count().await;
    let r = app.call(Method::POST, &members, Some(&scoped), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert_eq!(
        app.event_count().await,
        before,
        "the scoped join stored nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_servers_and_identities_are_unique() {
    let app = App::new().await;
    let (_, owner) = app.user("owner").await;
    let (_, rival) = app.user("rival").await;
    let first = app.community(&owner, "first-one", true).await;
    let second = app.community(&rival, "second-one", true).await;
    let link = json!({"platform": "discord", "server_id": "80351110224678912"});

    let r = app
        .call(
            Method::POST,
            &format!("/v1/communities/{first}/platforms"),
            Some(&owner),
            Some(link.clone()),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = app
        .call(
            Method::POST,
            &format!("/v1/communities/{second}/platforms"),
            Some(&rival),
            Some(link.clone()),
        )
        .await;
    assert_eq!(
        (r.status, field(&r.body)),
        (StatusCode::CONFLICT, "server_id")
    );
    let r = app
        .call(
            Method::DELETE,
            &format!("/v1/communities/{first}/platforms/discord/80351110224678912"),
            Some(&owner),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = app
        .call(
            Method::POST,
            &format!("/v1/communities/{second}/platforms"),
            Some(&rival),
            Some(link),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "released servers can be linked elsewhere"
    );

    let identity =
        json!({"platform": "twitch", "platform_user_id": "12345", "username": "ferris_tv"});
    let r = app
        .call(
            Method::POST,
            "/v1/users/me/identities",
            Some(&owner),
            Some(identity.clone()),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = app
        .call(
            Method::POST,
            "/v1/users/me/identities",
            Some(&rival),
            Some(identity),
        )
        .await;
    assert_eq!(
        (r.status, field(&r.body)),
        (StatusCode::CONFLICT, "platform_user_id")
    );
    let r = app
        .call(
            Method::DELETE,
            "/v1/users/me/identities/myspace/12345",
            Some(&owner),
            None,
        )
        .await;
    assert_eq!(
        (r.status, field(&r.body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "platform")
    );
    let r = app
        .call(
            Method::DELETE,
            "/v1/users/me/identities/twitch/12345",
            Some(&owner),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let me = app
        .call(Method::GET, "/v1/users/me", Some(&owner), None)
        .await;
    assert_eq!(me.body["identities"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_checks_postgres_and_migrations() {
    let app = App::new().await;
    let r = app.call(Method::GET, "/ready", None, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["checks"]["migrations"], "ok");
    sqlx::query(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)",
    )
    .execute(&app.db.pool)
    .await
    .expect("forget a migration");
    let r = app.call(Method::GET, "/ready", None, None).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(field(&r.body), "migrations");
}

/// Brings the members read model up to `position` without a bus (rebuilds from Postgres). The
/// commit-safe head trails open transactions anywhere on the server (other tests'), so one pass
/// may stop short: repeat until the position is applied.
async fn catch_up_members(app: &App, position: &str) {
    let position: rookery_events::LogPosition = position.parse().expect("position token");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        rookery_projections::rebuild(
            &app.db.pool,
            std::sync::Arc::new(rookery_projections::MembersProjection),
            4,
            |_| {},
        )
        .await
        .expect("members rebuild");
        let applied = rookery_projections::is_applied(&app.db.pool, "members", 4, position)
            .await
            .expect("applied check");
        if applied {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "members never reached {position}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_queries_read_the_model_and_wait_for_positions() {
    let app = App::new().await;
    let (owner_id, owner) = app.user("owner").await;
    let (alice_id, alice) = app.user("alice").await;
    let (_, bob) = app.user("bob").await;
    let (_, outsider) = app.user("outsider").await;
    let id = app.community(&owner, "readers", true).await;
    let members = format!("/v1/communities/{id}/members");
    let joined = app.call(Method::POST, &members, Some(&alice), None).await;
    let position = text(&joined.body["position"]).expect("position");
    catch_up_members(&app, &position).await;

    let r = app
        .call(
            Method::GET,
            &format!("{members}?min_position={position}&sort=username"),
            Some(&owner),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let names: Vec<&str> = r.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|m| m["username"].as_str())
        .collect();
    assert_eq!(names, ["alice", "owner"]);
    assert_eq!(r.body["items"][0]["user_id"], alice_id.as_str());
    assert_eq!(r.body["items"][1]["role"], "owner");
    assert!(r.body["next_cursor"].is_null());

    let page = app
        .call(
            Method::GET,
            &format!("{members}?limit=1"),
            Some(&owner),
            None,
        )
        .await;
    assert_eq!(
        page.body["items"][0]["user_id"],
        owner_id.as_str(),
        "oldest first"
    );
    let cursor = text(&page.body["next_cursor"]).expect("more pages");
    let next = app
        .call(
            Method::GET,
            &format!("{members}?limit=1&cursor={cursor}"),
            Some(&owner),
            None,
        )
        .await;
    assert_eq!(next.body["items"][0]["user_id"], alice_id.as_str());

    let one = app
        .call(
            Method::GET,
            &format!("{members}/{alice_id}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(
        (one.status, one.body["status"].as_str()),
        (StatusCode::OK, Some("active"))
    );
    let got = app
        .call(
            Method::GET,
            &format!("/v1/communities/{id}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(got.body["member_count"], 2);

    for (query, status, name) in [
        ("min_position=soon", StatusCode::BAD_REQUEST, "min_position"),
        ("cursor=garbage", StatusCode::BAD_REQUEST, "cursor"),
        ("role=king", StatusCode::UNPROCESSABLE_ENTITY, "role"),
    ] {
        let r = app
            .call(
                Method::GET,
                &format!("{members}?{query}"),
                Some(&owner),
                None,
            )
            .await;
        assert_eq!((r.status, field(&r.body)), (status, name), "{query}");
    }
    let r = app.call(Method::GET, &members, Some(&outsider), None).await;
    assert_eq!(
        r.status,
        StatusCode::FORBIDDEN,
        "outsiders cannot list a public community's members"
    );

    // Nothing applies bob's join (no worker runs here): the read times out with 503.
    let joined = app.call(Method::POST, &members, Some(&bob), None).await;
    let position = text(&joined.body["position"]).expect("position");
    let r = app
        .call(
            Method::GET,
            &format!("{members}?min_position={position}"),
            Some(&owner),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(r.headers[header::RETRY_AFTER], "1");
}
