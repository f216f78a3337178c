//! Authorization and bad input: each rejected request gets a clear 4xx problem and stores nothing.

use reqwest::{Method, StatusCode};
use rookery_tests::{spawn_app, TestApp};
use serde_json::{json, Value};

async fn rejected_without_events(
    app: &TestApp,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
    expected: StatusCode,
) -> Value {
    let before = app.event_count().await;
    let (status, problem) = app.send(method.clone(), path, token, body).await;
    assert_eq!(status, expected, "{method} {path}: {problem}");
    assert_eq!(
        problem["status"],
        expected.as_u16(),
        "problem+json body: {problem}"
    );
    assert_eq!(
        app.event_count().await,
        before,
        "{method} {path} stored an event"
    );
    problem
}

/// A token scoped to one community reaches nothing of another, even where its user is the
/// owner: every request is the 404 of a community that does not exist, and stores nothing.
/// The same token works on its own community.
#[tokio::test]
async fn a_token_scoped_to_one_community_cannot_touch_another() {
    let app = spawn_app().await;
    let owner = app.user("scoped-owner").await;
    let (private_a, _) = app.community(&owner, "scoped-private-a", false).await;
    let (public_b, _) = app.community(&owner, "scoped-public-b", true).await;
    let (scope, _) = app.community(&owner, "scoped-home", true).await;
    let token = app.scoped_token(&owner, scope);
    let t = Some(token.as_str());

    for c in [private_a, public_b] {
        for (method, path, body) in [
            (Method::GET, format!("/v1/communities/{c}"), None),
            (Method::GET, format!("/v1/communities/{c}/members"), None),
            (
                Method::GET,
                format!("/v1/communities/{c}/members/{}", owner.id),
                None,
            ),
            (
                Method::PATCH,
                format!("/v1/communities/{c}"),
                Some(json!({"display_name": "pwned"})),
            ),
            (
                Method::POST,
                format!("/v1/communities/{c}/platforms"),
                Some(json!({"platform": "twitch", "server_id": "x1"})),
            ),
            (Method::POST, format!("/v1/communities/{c}/members"), None),
            (
                Method::POST,
                format!("/v1/communities/{c}/archive"),
                Some(json!({})),
            ),
        ] {
            rejected_without_events(&app, method, &path, t, body, StatusCode::NOT_FOUND).await;
        }
    }
    // Its own community: the owner's rights hold.
    let (s, body) = app
        .send(
            Method::PATCH,
            &format!("/v1/communities/{scope}"),
            t,
            Some(json!({"display_name": "Scoped home"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = app
        .send(Method::GET, &format!("/v1/communities/{scope}"), t, None)
        .await;
    assert_eq!(
        (s, body["display_name"].as_str()),
        (StatusCode::OK, Some("Scoped home"))
    );
}

/// An ordinary token of someone who is not a member: a private community does not exist for
/// them, a public one is visible but not manageable.
#[tokio::test]
async fn an_outsider_sees_no_private_community_and_manages_no_public_one() {
    let app = spawn_app().await;
    let owner_a = app.user("owner-a").await;
    let owner_b = app.user("owner-b").await;
    let (private_a, _) = app.community(&owner_a, "private-a", false).await;
    let (public_a, _) = app.community(&owner_a, "public-a", true).await;
    app.community(&owner_b, "community-b", true).await;
    let b = Some(owner_b.token.as_str());

    // A private community does not even exist for outsiders.
    for (method, path, body) in [
        (Method::GET, format!("/v1/communities/{private_a}"), None),
        (
            Method::GET,
            format!("/v1/communities/{private_a}/members"),
            None,
        ),
        (
            Method::PATCH,
            format!("/v1/communities/{private_a}"),
            Some(json!({"display_name": "pwned"})),
        ),
        (
            Method::POST,
            format!("/v1/communities/{private_a}/platforms"),
            Some(json!({"platform": "twitch", "server_id": "x1"})),
        ),
        (
            Method::PUT,
            format!("/v1/communities/{private_a}/members/{}/role", owner_a.id),
            Some(json!({"role": "member"})),
        ),
    ] {
        rejected_without_events(&app, method, &path, b, body, StatusCode::NOT_FOUND).await;
    }
    // A public one is visible but not manageable.
    for (method, path, body) in [
        (
            Method::PATCH,
            format!("/v1/communities/{public_a}"),
            Some(json!({"display_name": "pwned"})),
        ),
        (
            Method::GET,
            format!("/v1/communities/{public_a}/members"),
            None,
        ),
        (
            Method::POST,
            format!("/v1/communities/{public_a}/members/{}/ban", owner_a.id),
            None,
        ),
    ] {
        rejected_without_events(&app, method, &path, b, body, StatusCode::FORBIDDEN).await;
    }
}

#[tokio::test]
async fn roles_limit_what_members_may_do() {
    let app = spawn_app().await;
    let owner = app.user("boss").await;
    let member = app.user("pleb").await;
    let other = app.user("victim").await;
    let (c, _) = app.community(&owner, "roles-test", true).await;
    for u in [&member, &other] {
        let (s, b) = app
            .send(
                Method::POST,
                &format!("/v1/communities/{c}/members"),
                Some(&u.token),
                None,
            )
            .await;
        assert!(s.is_success(), "{b}");
    }
    let t = Some(member.token.as_str());
    rejected_without_events(
        &app,
        Method::PUT,
        &format!("/v1/communities/{c}/members/{}/role", other.id),
        t,
        Some(json!({"role": "admin"})),
        StatusCode::FORBIDDEN,
    )
    .await;
    rejected_without_events(
        &app,
        Method::POST,
        &format!("/v1/communities/{c}/members/{}/ban", other.id),
        t,
        Some(json!({"reason": "spite"})),
        StatusCode::FORBIDDEN,
    )
    .await;
    // The owner cannot leave.
    let problem = rejected_without_events(
        &app,
        Method::DELETE,
        &format!("/v1/communities/{c}/members/{}", owner.id),
        Some(&owner.token),
        None,
        StatusCode::CONFLICT,
    )
    .await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("owner"),
        "{problem}"
    );

    // A moderator can ban a member, and the ban shows in the read model.
    let (s, b) = app
        .send(
            Method::PUT,
            &format!("/v1/communities/{c}/members/{}/role", member.id),
            Some(&owner.token),
            Some(json!({"role": "moderator"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, banned) = app
        .send(
            Method::POST,
            &format!("/v1/communities/{c}/members/{}/ban", other.id),
            t,
            Some(json!({"reason": "spam"})),
        )
        .await;
    assert!(s.is_success(), "{banned}");
    let pos = banned["position"].as_str().unwrap();
    let (s, page) = app
        .send(
            Method::GET,
            &format!("/v1/communities/{c}/members?status=banned&min_position={pos}"),
            t,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert_eq!(page["items"][0]["user_id"], other.id.to_string());
    // A banned user cannot rejoin.
    rejected_without_events(
        &app,
        Method::POST,
        &format!("/v1/communities/{c}/members"),
        Some(&other.token),
        None,
        StatusCode::FORBIDDEN,
    )
    .await;
}

#[tokio::test]
async fn bad_input_is_a_problem_naming_the_field_and_stores_nothing() {
    let app = spawn_app().await;
    let owner = app.user("careful").await;
    let (c, _) = app.community(&owner, "inputs", true).await;
    let t = Some(owner.token.as_str());
    let good = json!({"name": "valid-name", "display_name": "Valid", "platform": "twitch",
                      "is_public": true, "join_mode": "open"});

    let mut bad_name = good.clone();
    bad_name["name"] = json!("Bad Slug!");
    let p = rejected_without_events(
        &app,
        Method::POST,
        "/v1/communities",
        t,
        Some(bad_name),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(p["errors"][0]["field"], "name", "{p}");

    let mut bad_platform = good.clone();
    bad_platform["platform"] = json!("myspace");
    let p = rejected_without_events(
        &app,
        Method::POST,
        "/v1/communities",
        t,
        Some(bad_platform),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(p["errors"][0]["field"], "platform", "{p}");

    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("display_name");
    let p = rejected_without_events(
        &app,
        Method::POST,
        "/v1/communities",
        t,
        Some(missing),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(p["errors"][0]["field"], "display_name", "{p}");

    let p = rejected_without_events(
        &app,
        Method::PUT,
        &format!("/v1/communities/{c}/members/{}/role", owner.id),
        t,
        Some(json!({"role": "king"})),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(p["errors"][0]["field"], "role", "{p}");

    // Malformed JSON.
    let before = app.event_count().await;
    let resp = app
        .request(Method::POST, "/v1/communities", t)
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    assert_eq!(app.event_count().await, before);

    // Over the 256 KiB body limit.
    let mut huge = good.clone();
    huge["display_name"] = json!("x".repeat(300 * 1024));
    rejected_without_events(
        &app,
        Method::POST,
        "/v1/communities",
        t,
        Some(huge),
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;

    // No token, and a forged one.
    rejected_without_events(
        &app,
        Method::POST,
        "/v1/communities",
        None,
        Some(good.clone()),
        StatusCode::UNAUTHORIZED,
    )
    .await;
    rejected_without_events(
        &app,
        Method::POST,
        "/v1/communities",
        Some("not.a.jwt"),
        Some(good.clone()),
        StatusCode::UNAUTHORIZED,
    )
    .await;

    // A stale If-Match is refused with 412.
    let before = app.event_count().await;
    let resp = app
        .request(Method::PATCH, &format!("/v1/communities/{c}"), t)
        .header("if-match", "41")
        .json(&json!({"display_name": "Renamed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(app.event_count().await, before);
    // And the right one is accepted.
    let resp = app
        .request(Method::PATCH, &format!("/v1/communities/{c}"), t)
        .header("if-match", "1")
        .json(&json!({"display_name": "Renamed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["version"], 2);
}
