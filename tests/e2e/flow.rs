use reqwest::{Method, StatusCode};
use rookery_tests::spawn_app;
use serde_json::json;

#[tokio::test]
async fn join_and_promote_is_visible_with_min_position_immediately() {
    let app = spawn_app().await;
    let owner = app.user("owner").await;
    let alice = app.user("alice").await;
    let (community, created) = app.community(&owner, "rookery-fans", true).await;
    assert_eq!(created["version"], 1);
    assert!(created["position"].is_string(), "position token: {created}");

    let path = format!("/v1/communities/{community}/members");
    let (status, joined) = app
        .send(Method::POST, &path, Some(&alice.token), Some(json!({})))
        .await;
    assert!(status.is_success(), "join: {status} {joined}");

    let role_path = format!("/v1/communities/{community}/members/{}/role", alice.id);
    let (status, promoted) = app
        .send(
            Method::PUT,
            &role_path,
            Some(&owner.token),
            Some(json!({"role": "moderator"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "promote: {promoted}");
    let position = promoted["position"]
        .as_str()
        .expect("position token")
        .to_string();

    // Read-your-writes: the query waits until the members projection applied the position.
    let (status, page) = app
        .send(
            Method::GET,
            &format!("{path}?min_position={position}"),
            Some(&owner.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let items = page["items"].as_array().expect("items");
    assert_eq!(items.len(), 2, "{page}");
    let by_user = |id: uuid::Uuid| {
        items
            .iter()
            .find(|m| m["user_id"] == id.to_string())
            .cloned()
            .expect("member listed")
    };
    assert_eq!(by_user(owner.id)["role"], "owner");
    assert_eq!(by_user(alice.id)["role"], "moderator");
    assert_eq!(by_user(alice.id)["username"], "alice");
    assert_eq!(by_user(alice.id)["status"], "active");
    assert!(page["next_cursor"].is_null());

    let (status, one) = app
        .send(
            Method::GET,
            &format!("{path}/{}?min_position={position}", alice.id),
            Some(&alice.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["role"], "moderator");

    let (status, c) = app
        .send(
            Method::GET,
            &format!("/v1/communities/{community}"),
            Some(&alice.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(c["name"], "rookery-fans");
    assert_eq!(c["member_count"], 2);

    app.stop().await.expect("graceful shutdown");
}

#[tokio::test]
async fn events_carry_actor_request_and_correlation_ids() {
    let app = spawn_app().await;
    let owner = app.user("auditor").await;
    let resp = app
        .request(Method::POST, "/v1/communities", Some(&owner.token))
        .header("x-correlation-id", "conversation-42")
        .json(
            &json!({"name": "audited", "display_name": "Audited", "platform": "slack",
                      "is_public": false, "join_mode": "invite"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let rows: Vec<(String, serde_json::Value)> = sqlx::query_as(
        "SELECT aggregate_type, metadata FROM events WHERE aggregate_type IN ('community', 'membership')",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    // The community and the owner's membership, committed together with one metadata.
    assert_eq!(rows.len(), 2);
    for (_, meta) in rows {
        assert_eq!(meta["actor"], format!("user:{}", owner.id));
        assert_eq!(meta["request_id"], request_id);
        assert_eq!(meta["correlation_id"], "conversation-42");
        assert!(meta["occurred_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));
    }
}

#[tokio::test]
async fn members_list_filters_sorts_and_paginates() {
    let app = spawn_app().await;
    let owner = app.user("zed").await;
    let (community, _) = app.community(&owner, "paging", true).await;
    let path = format!("/v1/communities/{community}/members");
    let mut last = String::new();
    for name in ["carol", "bob", "dave", "amy"] {
        let u = app.user(name).await;
        let (status, body) = app.send(Method::POST, &path, Some(&u.token), None).await;
        assert!(status.is_success(), "{body}");
        last = body["position"].as_str().unwrap().to_string();
    }
    let mut names = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut q = format!("{path}?sort=username&limit=2&min_position={last}");
        if let Some(c) = &cursor {
            q.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = app.send(Method::GET, &q, Some(&owner.token), None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for m in page["items"].as_array().unwrap() {
            names.push(m["username"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(names, ["amy", "bob", "carol", "dave", "zed"]);

    let (status, page) = app
        .send(
            Method::GET,
            &format!("{path}?role=owner"),
            Some(&owner.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["items"].as_array().unwrap().len(), 1);

    let (status, problem) = app
        .send(
            Method::GET,
            &format!("{path}?cursor=garbage"),
            Some(&owner.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
}
