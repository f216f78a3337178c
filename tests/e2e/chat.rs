//! Chat, platform activity, moderation and reputation through HTTP: platform users the hub never
//! knew become shadow users and members on first sight, earn exact scores, and show up in the
//! leaderboard and the message history; repeats are stored once; bad input stores nothing;
//! claiming a shadow's account moves what it had; rebuilt models equal the live ones.

use futures::future::join_all;
use reqwest::{Method, StatusCode};
use rookery_tests::{spawn_app, TestApp, TestUser};
use serde_json::{json, Value};
use uuid::Uuid;

/// A community with its owner and a service token acting for the owner's platform integration.
struct Chat {
    app: TestApp,
    owner: TestUser,
    community: Uuid,
    service: String,
}

impl Chat {
    async fn new(name: &str) -> Chat {
        let app = spawn_app().await;
        let owner = app.user(&format!("{name}-owner")).await;
        let (community, _) = app.community(&owner, name, true).await;
        let service = app.service_token(&owner, community);
        Chat {
            app,
            owner,
            community,
            service,
        }
    }

    fn path(&self, rest: &str) -> String {
        format!("/v1/communities/{}{rest}", self.community)
    }

    /// A platform message from `sender` (`external_id` names it on the platform).
    async fn say(&self, sender: &str, external_id: &str, text: &str) -> (StatusCode, Value) {
        self.app
            .send(
                Method::POST,
                &self.path("/messages"),
                Some(&self.service),
                Some(json!({
                    "channel": "general", "text": text, "platform": "twitch",
                    "external_id": external_id,
                    "sender": {"platform_user_id": sender, "username": format!("{sender}_tv")},
                })),
            )
            .await
    }

    async fn activity(
        &self,
        sender: &str,
        external_id: &str,
        kind: &str,
        data: Value,
    ) -> (StatusCode, Value) {
        self.app
            .send(
                Method::POST,
                &self.path("/activities"),
                Some(&self.service),
                Some(json!({
                    "type": kind, "platform": "twitch", "external_id": external_id,
                    "sender": {"platform_user_id": sender, "username": format!("{sender}_tv")},
                    "data": data,
                })),
            )
            .await
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self
            .app
            .send(Method::GET, path, Some(&self.owner.token), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        body
    }
}

fn position(body: &Value) -> String {
    body["position"].as_str().expect("a position").to_string()
}

/// 1,000 messages, a follow, a tier-3000 sub, a 5-gift bundle, a 300-bit cheer, a warn and a
/// ban for three platform users who never registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_users_become_members_and_earn_exact_scores() {
    let chat = Chat::new("rook-chat").await;
    // alice 500 (20 of them bot commands), bob 300, carol 200.
    let plan: Vec<(&str, usize)> = vec![("alice", 500), ("bob", 300), ("carol", 200)];
    let mut sends = Vec::new();
    for (sender, n) in &plan {
        for i in 0..*n {
            let text = if *sender == "alice" && i < 20 {
                "!uptime".to_string()
            } else {
                format!("hello number {i} from {sender}")
            };
            sends.push((*sender, format!("{sender}-{i}"), text));
        }
    }
    for chunk in sends.chunks(50) {
        let replies = join_all(chunk.iter().map(|(s, id, text)| chat.say(s, id, text))).await;
        for (status, body) in replies {
            assert_eq!(status, StatusCode::CREATED, "{body}");
        }
    }
    let mut recorded = String::new();
    for (sender, id, kind, data) in [
        ("alice", "f-1", "follow", json!({})),
        ("bob", "s-1", "subscription", json!({"tier": "3000"})),
        ("carol", "g-1", "gift_subscription", json!({"count": 5})),
        ("alice", "c-1", "cheer", json!({"bits": 300})),
    ] {
        let (status, body) = chat.activity(sender, id, kind, data).await;
        assert_eq!(status, StatusCode::CREATED, "{kind}: {body}");
        recorded = position(&body);
    }
    let app = &chat.app;
    let members = chat
        .get(&chat.path(&format!("/members?limit=10&min_position={recorded}")))
        .await;
    let id_of = |name: &str| -> String {
        members["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|m| m["username"] == format!("{name}_tv"))
            .map(|m| m["user_id"].as_str().expect("id").to_string())
            .unwrap_or_else(|| panic!("{name} is a member: {members}"))
    };
    let (bob, carol) = (id_of("bob"), id_of("carol"));
    let (status, body) = app
        .send(
            Method::POST,
            &chat.path(&format!("/members/{bob}/warn")),
            Some(&chat.owner.token),
            Some(json!({"reason": "caps"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, banned) = app
        .send(
            Method::POST,
            &chat.path(&format!("/members/{carol}/ban")),
            Some(&chat.owner.token),
            Some(json!({"reason": "spam"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{banned}");
    let last = position(&banned);

    // Three shadow users, each a member via their first message.
    assert_eq!(app.count_events("ShadowUserCreated").await, 3);
    let members = chat
        .get(&chat.path(&format!("/members?min_position={last}&sort=reputation")))
        .await;
    let listed: Vec<(String, i64, String)> = members["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|m| {
            (
                m["username"].as_str().unwrap_or_default().to_string(),
                m["reputation"].as_i64().unwrap_or(-1),
                m["tier"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let owner = chat.owner.username.clone();
    assert_eq!(
        listed,
        vec![
            ("alice_tv".to_string(), 607, "fair".to_string()),
            (owner.clone(), 600, "fair".to_string()),
            ("bob_tv".to_string(), 598, "fair".to_string()),
        ],
        "active members by reputation (carol is banned)"
    );

    // Exact scores: alice 600 + 480·0.01 − 20·0.1 + 1 + 3 = 606.8; bob 600 + 3 + 20 − 25 = 598;
    // carol 600 + 2 + 15 − 200 = 417.
    let alice = id_of("alice");
    for (user, exact, tier) in [
        (&alice, 606.8, "fair"),
        (&bob, 598.0, "fair"),
        (&carol, 417.0, "poor"),
    ] {
        let r = chat
            .get(&chat.path(&format!(
                "/members/{user}/reputation?min_position={last}&limit=3"
            )))
            .await;
        assert_eq!(r["score_exact"].as_f64(), Some(exact), "{r}");
        assert_eq!(r["tier"], tier, "{r}");
        assert_eq!(r["history"]["items"].as_array().map(Vec::len), Some(3));
        assert!(r["history"]["next_cursor"].is_string());
    }
    let carol_history = chat
        .get(&chat.path(&format!("/members/{carol}/reputation?limit=1")))
        .await;
    let ban = &carol_history["history"]["items"][0];
    assert_eq!(
        (
            ban["kind"].as_str(),
            ban["reason"].as_str(),
            ban["delta"].as_f64()
        ),
        (Some("ban"), Some("spam"), Some(-200.0)),
        "a moderation's history row carries the moderator's reason"
    );
    assert!(ban["source_event_id"]
        .as_str()
        .is_some_and(|s| s.starts_with("membership/")));

    let board = chat
        .get(&chat.path(&format!(
            "/reputation/leaderboard?min_position={last}&limit=2"
        )))
        .await;
    let names: Vec<&str> = board["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["username"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(names, vec!["alice_tv", owner.as_str()]);
    let rest = chat
        .get(&chat.path(&format!(
            "/reputation/leaderboard?limit=2&cursor={}",
            board["next_cursor"].as_str().expect("a next page")
        )))
        .await;
    assert_eq!(rest["items"][0]["username"], "bob_tv");
    assert!(rest["next_cursor"].is_null());

    // The history, newest first, in pages of 100: every message once.
    let mut seen = std::collections::HashSet::new();
    let mut before: Option<String> = None;
    let mut last_sent: Option<String> = None;
    loop {
        let mut path = chat.path(&format!("/messages?limit=100&min_position={last}"));
        if let Some(b) = &before {
            path.push_str(&format!("&before={b}"));
        }
        let page = chat.get(&path).await;
        for item in page["items"].as_array().expect("items") {
            let sent = item["sent_at"].as_str().expect("sent_at").to_string();
            if let Some(previous) = &last_sent {
                assert!(sent <= *previous, "newest first");
            }
            last_sent = Some(sent);
            assert!(seen.insert(item["id"].as_str().expect("id").to_string()));
        }
        match page["next_cursor"].as_str() {
            Some(c) => before = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 1000);
    let alices = chat
        .get(&chat.path(&format!("/messages?sender={alice}&limit=200")))
        .await;
    assert_eq!(alices["items"].as_array().map(Vec::len), Some(200));
    assert!(alices["items"]
        .as_array()
        .expect("items")
        .iter()
        .all(|m| m["sender"]["user_id"] == alice.as_str() && m["sender"]["platform"] == "twitch"));
    let found = chat
        .get(&chat.path("/messages?q=number%2042%20bob&limit=10"))
        .await;
    assert_eq!(
        found["items"][0]["text"], "hello number 42 from bob",
        "{found}"
    );
    assert_eq!(found["items"].as_array().map(Vec::len), Some(1));

    // Determinism: rebuilding the models from the log gives the rows the live workers wrote.
    for name in ["reputation", "messages"] {
        let projection = rookery_projections::by_name(name).expect("registered");
        let before = dump(app, projection.tables()).await;
        rookery_projections::rebuild(&app.db.pool, projection, app.config.partitions, |_| {})
            .await
            .unwrap_or_else(|e| panic!("rebuild {name}: {e:#}"));
        assert!(
            dump(
                app,
                rookery_projections::by_name(name)
                    .expect("registered")
                    .tables()
            )
            .await
                == before,
            "{name} rebuilt differs"
        );
    }
}

async fn dump(app: &TestApp, tables: &[&str]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for t in tables {
        out.push(
            sqlx::query_scalar(&format!(
                "SELECT row_to_json(t)::text AS r FROM \"{t}\" t ORDER BY r"
            ))
            .fetch_all(&app.db.pool)
            .await
            .expect("dump"),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_are_stored_once_also_concurrently() {
    let chat = Chat::new("rook-repeats").await;
    let app = &chat.app;
    let (status, first) = chat.say("dave", "m-1", "first!").await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let (status, again) = chat.say("dave", "m-1", "first!").await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(
        (again["id"].clone(), again["position"].clone()),
        (first["id"].clone(), Value::Null)
    );

    // Ten copies of one new message at once: one is stored, all answer its id.
    let replies = join_all((0..10).map(|_| chat.say("dave", "m-2", "again"))).await;
    let created = replies
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .count();
    assert_eq!(created, 1, "{replies:?}");
    assert!(replies
        .iter()
        .all(|(s, b)| s.is_success() && b["id"] == replies[0].1["id"]));
    let id = replies[0].1["id"].as_str().expect("id").to_string();
    assert_eq!(app.events_of("message", &id).await, vec!["MessagePosted"]);

    // An activity twice, concurrently.
    let replies =
        join_all((0..4).map(|_| chat.activity("dave", "a-1", "raid", json!({"viewers": 40}))))
            .await;
    assert_eq!(
        replies
            .iter()
            .filter(|(s, _)| *s == StatusCode::CREATED)
            .count(),
        1,
        "{replies:?}"
    );
    assert_eq!(app.count_events("ActivityRecorded").await, 1);

    // Fifty first messages of one new sender at once: one shadow user, one membership.
    let ids: Vec<String> = (0..50).map(|i| format!("e-{i}")).collect();
    let replies = join_all(ids.iter().map(|id| chat.say("erin", id, "hi"))).await;
    for (status, body) in &replies {
        assert_eq!(*status, StatusCode::CREATED, "{body}");
    }
    let shadow = rookery_events::user::shadow_user_id(rookery_events::Platform::Twitch, "erin");
    assert_eq!(
        app.events_of("user", &shadow.to_string()).await,
        vec!["ShadowUserCreated"]
    );
    let membership = rookery_events::membership::membership_id(chat.community, shadow);
    assert_eq!(
        app.events_of("membership", &membership.to_string()).await,
        vec!["MemberJoined"]
    );
    assert_eq!(app.count_events("ShadowUserCreated").await, 2);
}

#[tokio::test]
async fn bad_chat_input_is_refused_naming_the_field_and_stores_nothing() {
    let chat = Chat::new("rook-refusals").await;
    let app = &chat.app;
    let moderator = app.user("rook-mod").await;
    let member = app.user("rook-member").await;
    for u in [&moderator, &member] {
        let (s, b) = app
            .send(Method::POST, &chat.path("/members"), Some(&u.token), None)
            .await;
        assert!(s.is_success(), "{b}");
    }
    let (s, b) = app
        .send(
            Method::PUT,
            &chat.path(&format!("/members/{}/role", moderator.id)),
            Some(&chat.owner.token),
            Some(json!({"role": "moderator"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");

    let message = |text: Value, channel: Value| {
        json!({"channel": channel, "text": text, "platform": "twitch", "external_id": "x",
               "sender": {"platform_user_id": "frank", "username": "frank"}})
    };
    let long = "x".repeat(10_001);
    let cases: Vec<(Method, String, String, Value, StatusCode, &str)> = vec![
        (
            Method::POST,
            chat.path("/messages"),
            chat.service.clone(),
            message(json!(long), json!("general")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "text",
        ),
        (
            Method::POST,
            chat.path("/messages"),
            chat.service.clone(),
            message(json!(""), json!("general")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "text",
        ),
        (
            Method::POST,
            chat.path("/messages"),
            chat.service.clone(),
            json!({"text": "hi", "platform": "twitch", "sender": {"platform_user_id": "frank", "username": "frank"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "channel",
        ),
        (
            Method::POST,
            chat.path("/activities"),
            chat.service.clone(),
            json!({"type": "dance", "platform": "twitch", "external_id": "a", "sender": {"platform_user_id": "frank", "username": "frank"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "type",
        ),
        (
            Method::POST,
            chat.path("/activities"),
            chat.service.clone(),
            json!({"type": "cheer", "platform": "twitch", "external_id": "a", "data": {"bits": -5}, "sender": {"platform_user_id": "frank", "username": "frank"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "data.bits",
        ),
        // A member posting for a platform user, and a member moderating a moderator.
        (
            Method::POST,
            chat.path("/messages"),
            member.token.clone(),
            message(json!("hi"), json!("general")),
            StatusCode::FORBIDDEN,
            "",
        ),
        (
            Method::POST,
            chat.path(&format!("/members/{}/warn", moderator.id)),
            member.token.clone(),
            json!({}),
            StatusCode::FORBIDDEN,
            "",
        ),
        (
            Method::POST,
            chat.path(&format!("/members/{}/timeout", member.id)),
            moderator.token.clone(),
            json!({"duration_secs": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "duration_secs",
        ),
        (
            Method::POST,
            chat.path(&format!("/members/{}/reputation", member.id)),
            chat.owner.token.clone(),
            json!({"delta": 5, "score": 700, "reason": "both"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "delta",
        ),
        (
            Method::POST,
            chat.path(&format!("/members/{}/reputation", member.id)),
            moderator.token.clone(),
            json!({"delta": 5, "reason": "nice"}),
            StatusCode::FORBIDDEN,
            "",
        ),
    ];
    for (method, path, token, body, expected, field) in cases {
        let before = app.event_count().await;
        let (status, problem) = app
            .send(method.clone(), &path, Some(&token), Some(body))
            .await;
        assert_eq!(status, expected, "{method} {path}: {problem}");
        assert_eq!(
            problem["status"],
            expected.as_u16(),
            "problem+json: {problem}"
        );
        if !field.is_empty() {
            assert_eq!(problem["errors"][0]["field"], field, "{problem}");
        }
        assert_eq!(
            app.event_count().await,
            before,
            "{method} {path} stored an event"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claiming_a_platform_account_moves_memberships_reputation_and_messages() {
    let chat = Chat::new("rook-claims").await;
    let app = &chat.app;
    for i in 0..5 {
        let (s, b) = chat.say("gina", &format!("g-{i}"), "hello").await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
    }
    let (s, b) = chat
        .activity("gina", "sub-1", "subscription", json!({"tier": "1000"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let shadow = rookery_events::user::shadow_user_id(rookery_events::Platform::Twitch, "gina");

    let gina = app.user("gina").await;
    let (status, linked) = app
        .send(
            Method::POST,
            "/v1/users/me/identities",
            Some(&gina.token),
            Some(json!({"platform": "twitch", "platform_user_id": "gina", "username": "gina_tv"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{linked}");
    let last = position(&linked);

    // Her membership, her score (600 + 5·0.01 + 5) and her messages are the registered user's.
    let member = chat
        .get(&chat.path(&format!("/members/{}?min_position={last}", gina.id)))
        .await;
    assert_eq!(member["status"], "active", "{member}");
    let r = chat
        .get(&chat.path(&format!(
            "/members/{}/reputation?min_position={last}",
            gina.id
        )))
        .await;
    assert_eq!(r["score_exact"].as_f64(), Some(605.05), "{r}");
    assert_eq!(r["history"]["items"].as_array().map(Vec::len), Some(6));
    let (status, _) = app
        .send(
            Method::GET,
            &chat.path(&format!("/members/{shadow}/reputation")),
            Some(&chat.owner.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the shadow's score moved");
    let messages = chat
        .get(&chat.path(&format!("/messages?sender={}&min_position={last}", gina.id)))
        .await;
    assert_eq!(messages["items"].as_array().map(Vec::len), Some(5));
    let global = chat
        .get(&format!(
            "/v1/users/{}/reputation?min_position={last}",
            gina.id
        ))
        .await;
    assert_eq!(global["score_exact"].as_f64(), Some(605.05), "{global}");

    // Her next message from the platform is hers, and the account is held once.
    let (s, b) = chat.say("gina", "g-9", "I'm back").await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(app.count_events("ShadowUserCreated").await, 1);
    let messages = chat
        .get(&chat.path(&format!(
            "/messages?sender={}&min_position={}",
            gina.id,
            position(&b)
        )))
        .await;
    assert_eq!(
        messages["items"][0]["sender"]["user_id"],
        gina.id.to_string()
    );
    assert_eq!(messages["items"].as_array().map(Vec::len), Some(6));
}

#[tokio::test]
async fn a_reputation_policy_applies_from_where_it_was_set() {
    let chat = Chat::new("rook-policy").await;
    let app = &chat.app;
    let (s, b) = chat.activity("hank", "f-1", "follow", json!({})).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, policy) = app
        .send(
            Method::PUT,
            &chat.path("/reputation-policy"),
            Some(&chat.owner.token),
            Some(json!({"weights": {"follow": 10}, "max": 1000})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{policy}");
    let shown = chat.get(&chat.path("/reputation-policy")).await;
    assert_eq!(shown["policy"]["weights"]["follow"].as_f64(), Some(10.0));
    assert_eq!(
        shown["policy"]["weights"]["chat_message"].as_f64(),
        Some(0.01)
    );
    let (s, b) = chat.activity("hank", "f-2", "follow", json!({})).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let hank = rookery_events::user::shadow_user_id(rookery_events::Platform::Twitch, "hank");
    let r = chat
        .get(&chat.path(&format!(
            "/members/{hank}/reputation?min_position={}",
            position(&b)
        )))
        .await;
    assert_eq!(
        r["score_exact"].as_f64(),
        Some(611.0),
        "1 before the policy, 10 after: {r}"
    );
    let (s, refused) = app
        .send(
            Method::PUT,
            &chat.path("/reputation-policy"),
            Some(&chat.owner.token),
            Some(json!({"start": 100})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    assert_eq!(refused["errors"][0]["field"], "start");
}

/// With auto-ban on, a member whose score falls below the threshold is banned by the system,
/// once, with reason `auto_ban`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_ban_bans_a_member_below_the_threshold_once() {
    let chat = Chat::new("rook-autoban").await;
    let app = &chat.app;
    let (s, b) = app
        .send(
            Method::PUT,
            &chat.path("/reputation-policy"),
            Some(&chat.owner.token),
            Some(json!({"auto_ban": {"enabled": true, "threshold": 450}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = chat.say("ivan", "i-1", "hi").await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let ivan = rookery_events::user::shadow_user_id(rookery_events::Platform::Twitch, "ivan");
    let (s, b) = app
        .send(
            Method::POST,
            &chat.path(&format!("/members/{ivan}/reputation")),
            Some(&chat.owner.token),
            Some(json!({"delta": -200, "reason": "abuse"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");

    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    let membership = rookery_events::membership::membership_id(chat.community, ivan).to_string();
    loop {
        let events = app.events_of("membership", &membership).await;
        if events.iter().any(|e| e == "MemberBanned") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never banned: {events:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let reason: String = sqlx::query_scalar(
        "SELECT payload->'MemberBanned'->>'reason' FROM events
         WHERE aggregate_id = $1 AND event_type = 'MemberBanned'",
    )
    .bind(&membership)
    .fetch_one(&app.db.pool)
    .await
    .expect("the ban");
    assert_eq!(reason, "auto_ban");
    let actor: String = sqlx::query_scalar(
        "SELECT metadata->>'actor' FROM events WHERE aggregate_id = $1 AND event_type = 'MemberBanned'",
    )
    .bind(&membership)
    .fetch_one(&app.db.pool)
    .await
    .expect("the ban's actor");
    assert_eq!(actor, "system:auto_ban");
}
