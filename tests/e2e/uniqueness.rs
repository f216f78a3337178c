use reqwest::{Method, StatusCode};
use rookery_tests::spawn_app;
use serde_json::json;

#[tokio::test]
async fn ten_simultaneous_creates_of_one_name_yield_one_community() {
    let app = spawn_app().await;
    let mut users = Vec::new();
    for i in 0..10 {
        users.push(app.user(&format!("racer{i}")).await);
    }
    let before = app.event_count().await;
    let attempts = users.iter().map(|u| {
        app.send(
            Method::POST,
            "/v1/communities",
            Some(&u.token),
            Some(
                json!({"name": "the-one", "display_name": "The One", "platform": "discord",
                        "is_public": true, "join_mode": "open"}),
            ),
        )
    });
    let results = futures::future::join_all(attempts).await;
    let created = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .count();
    let conflicts: Vec<_> = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::CONFLICT)
        .collect();
    assert_eq!(created, 1, "{results:?}");
    assert_eq!(conflicts.len(), 9, "{results:?}");
    for (_, problem) in conflicts {
        assert_eq!(problem["errors"][0]["field"], "name", "{problem}");
    }
    // One community: its creation event plus the owner's membership.
    assert_eq!(app.event_count().await - before, 2);
    let claims: i64 =
        sqlx::query_scalar("SELECT count(*) FROM claims WHERE kind = 'community_name'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(claims, 1);
}

#[tokio::test]
async fn a_platform_server_belongs_to_one_community_and_is_released_on_unlink() {
    let app = spawn_app().await;
    let owner = app.user("own").await;
    let (a, _) = app.community(&owner, "first-community", true).await;
    let (b, _) = app.community(&owner, "second-community", true).await;
    let link = json!({"platform": "discord", "server_id": "guild-42"});
    let (status, body) = app
        .send(
            Method::POST,
            &format!("/v1/communities/{a}/platforms"),
            Some(&owner.token),
            Some(link.clone()),
        )
        .await;
    assert!(status.is_success(), "{body}");
    let (status, problem) = app
        .send(
            Method::POST,
            &format!("/v1/communities/{b}/platforms"),
            Some(&owner.token),
            Some(link.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "server_id");

    let (status, body) = app
        .send(
            Method::DELETE,
            &format!("/v1/communities/{a}/platforms/discord/guild-42"),
            Some(&owner.token),
            None,
        )
        .await;
    assert!(status.is_success(), "{body}");
    let (status, body) = app
        .send(
            Method::POST,
            &format!("/v1/communities/{b}/platforms"),
            Some(&owner.token),
            Some(link),
        )
        .await;
    assert!(status.is_success(), "{body}");
}

#[tokio::test]
async fn an_email_registers_once() {
    let app = spawn_app().await;
    app.user("first").await;
    let (status, problem) = app
        .send(
            Method::POST,
            "/v1/auth/register",
            None,
            Some(json!({"email": "FIRST@example.com", "username": "other", "password": "long enough pw"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "email");
}
