use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::*;

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
