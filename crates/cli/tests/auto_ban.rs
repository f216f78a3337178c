//! The auto-ban reactor in the real process: one ban for one crossing across live processing, a
//! `kill -9` right after the crossing, another after the ban was lifted by hand, and a rebuild of
//! reputation.
#![allow(clippy::unwrap_used)]

use rookery_events::membership::membership_id;
use rookery_events::user::shadow_user_id;
use rookery_events::Platform;
use rookery_store::testing::TestDb;
use rookery_tests::{free_port, StreamGuard, JWT_SECRET, PASSWORD};
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_rookery");

struct Node {
    env: Vec<(&'static str, String)>,
    base: String,
}

impl Node {
    fn new(db: &TestDb, stream: &str) -> Node {
        let port = free_port();
        Node {
            env: vec![
                ("DATABASE_URL", db.url.clone()),
                ("NATS_URL", rookery_tests::nats_url()),
                ("ROOKERY_HTTP_ADDR", format!("127.0.0.1:{port}")),
                ("ROOKERY_STREAM", stream.to_string()),
                ("ROOKERY_SUBJECT_PREFIX", stream.to_string()),
                ("ROOKERY_JWT_SECRET", JWT_SECRET.to_string()),
                ("RUST_LOG", "warn".to_string()),
            ],
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args).stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    async fn start(&self) -> Child {
        let mut child = self
            .command(&["up"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = reqwest::get(format!("{}/ready", self.base)).await {
                if r.status().is_success() {
                    return child;
                }
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("rookery exited early: {status}");
            }
            assert!(Instant::now() < deadline, "rookery never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn send(&self, method: reqwest::Method, path: &str, token: &str, body: Value) -> Value {
        let r = reqwest::Client::new()
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {body}");
        body
    }
}

/// `kill -9`: no shutdown, nothing flushed.
fn kill9(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

async fn auto_bans(db: &TestDb, community: Uuid, user: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'MemberBanned'
           AND payload->'MemberBanned'->>'reason' = 'auto_ban'",
    )
    .bind(membership_id(community, user).to_string())
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

async fn await_bans(db: &TestDb, community: Uuid, user: Uuid, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while auto_bans(db, community, user).await < n {
        assert!(Instant::now() < deadline, "no auto-ban within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn one_crossing_is_one_ban_across_kill_9_and_a_rebuild() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(TestDb::create()).unwrap();
    let stream = format!("autoban_{}", Uuid::new_v4().simple());
    let _guard = StreamGuard {
        stream: stream.clone(),
    };
    let node = Node::new(&db, &stream);
    rt.block_on(async {
        use reqwest::Method;
        let child = node.start().await;
        let anon = reqwest::Client::new();
        anon.post(format!("{}/v1/auth/register", node.base))
            .json(&json!({"email": "o@example.com", "username": "owner", "password": PASSWORD}))
            .send()
            .await
            .unwrap();
        let login: Value = anon
            .post(format!("{}/v1/auth/login", node.base))
            .json(&json!({"email": "o@example.com", "password": PASSWORD}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = login["access_token"].as_str().unwrap().to_string();
        let c = node
            .send(Method::POST, "/v1/communities", &token, json!({"name": "autoban",
                "display_name": "Autoban", "platform": "twitch", "is_public": true, "join_mode": "open"}))
            .await;
        let community: Uuid = c["id"].as_str().unwrap().parse().unwrap();
        let path = |rest: &str| format!("/v1/communities/{community}{rest}");
        node.send(
            Method::PUT,
            &path("/reputation-policy"),
            &token,
            json!({"auto_ban": {"enabled": true, "threshold": 450}}),
        )
        .await;
        // A platform user's first message makes them a member at 600; -200 takes them below
        // the threshold.
        let cross = |who: &'static str| {
            let (node, token, path) = (&node, &token, &path);
            async move {
                let message = json!({"channel": "general", "text": "hello", "platform": "twitch",
                    "external_id": format!("{who}-1"),
                    "sender": {"platform_user_id": who, "username": who}});
                node.send(Method::POST, &path("/messages"), token, message)
                    .await;
                let user = shadow_user_id(Platform::Twitch, who);
                let adjust = json!({"delta": -200, "reason": "abuse"});
                node.send(
                    Method::POST,
                    &path(&format!("/members/{user}/reputation")),
                    token,
                    adjust,
                )
                .await;
                user
            }
        };

        let mallory = cross("mallory").await;
        // Killed right after the crossing was committed: the reactor may not have acted yet.
        kill9(child);
        let child = node.start().await;
        await_bans(&db, community, mallory, 1).await;

        // An operator lifts the ban, and the process is killed again. Neither the restart nor
        // the rebuild below (which folds the old crossing again) may ban them anew; the bans of
        // later crossings show the reactor has run past the old one each time.
        node.send(
            Method::DELETE,
            &path(&format!("/members/{mallory}/ban")),
            &token,
            json!({}),
        )
        .await;
        kill9(child);
        let child = node.start().await;
        let eve = cross("eve").await;
        await_bans(&db, community, eve, 1).await;

        let out = node
            .command(&["projections", "rebuild", "reputation"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let trudy = cross("trudy").await;
        await_bans(&db, community, trudy, 1).await;

        assert_eq!(
            auto_bans(&db, community, mallory).await,
            1,
            "one crossing, one ban"
        );
        assert_eq!(auto_bans(&db, community, eve).await, 1);
        assert_eq!(auto_bans(&db, community, trudy).await, 1);
        kill9(child);
    });
    drop(db);
}
