use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::*;

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
    let keys = rookery_api::auth::JwtKeys::new(&AuthConfig::new("db-test-secret"));
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

/// Brings every read model up to `position` without a bus (rebuilds from Postgres). The
/// commit-safe head trails open transactions anywhere on the server (other tests'), so one pass
/// may stop short: repeat until the position is applied.
async fn catch_up_members(app: &App, position: &str) {
    let position: rookery_events::LogPosition = position.parse().expect("position token");
    for projection in rookery_projections::all() {
        let partitions = rookery_projections::engine::partitions_of(projection.as_ref(), 4);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            rookery_projections::rebuild(&app.db.pool, projection.clone(), 4, |_| {})
                .await
                .expect("rebuild");
            let applied = rookery_projections::is_applied(
                &app.db.pool,
                projection.name(),
                partitions,
                position,
            )
            .await
            .expect("applied check");
            if applied {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} never reached {position}",
                projection.name()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
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
