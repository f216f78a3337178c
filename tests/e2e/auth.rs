use reqwest::{Method, StatusCode};
use rookery_tests::{spawn_app, PASSWORD};
use serde_json::json;

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_family() {
    let app = spawn_app().await;
    let user = app.user("rotator").await;
    let (status, first) = app.login(&user.email, PASSWORD).await;
    assert_eq!(status, StatusCode::OK);
    assert!(first["expires_in"].as_u64().unwrap() <= 900);
    let r1 = first["refresh_token"].as_str().unwrap().to_string();

    let (status, second) = app
        .send(
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": r1})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{second}");
    let r2 = second["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(r1, r2);
    let access = second["access_token"].as_str().unwrap();
    let (status, me) = app
        .send(Method::GET, "/v1/users/me", Some(access), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["username"], "rotator");

    // Replaying r1 (stolen?) revokes the family, so r2 stops working too.
    let (status, _) = app
        .send(
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": r1})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = app
        .send(
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": r2})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn wrong_password_is_unauthorized_and_secrets_never_reach_events() {
    let app = spawn_app().await;
    let user = app.user("secretive").await;
    let (status, problem) = app.login(&user.email, "wrong one!").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{problem}");
    let leaked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE payload::text LIKE '%correct horse%' OR payload::text LIKE '%argon2%'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(leaked, 0);
}
