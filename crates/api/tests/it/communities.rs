use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::*;

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
