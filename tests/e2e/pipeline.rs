//! `rookery up`: the relay and the projection workers run on threads of their own, beside the
//! API's runtime and behind it in CPU priority.

use rookery_events::membership::membership_id;
use rookery_events::{MembershipEvent, Role};
use rookery_tests::spawn_app_with;
use std::time::Duration;
use uuid::Uuid;

/// From an OS thread of its own: stores a `MemberJoined` of `user` in `community` straight into
/// the log (as the event store would), then polls the members read model until the row
/// appears or `deadline` passes. Returns whether it appeared.
fn join_and_watch(database_url: String, community: Uuid, user: Uuid, deadline: Duration) -> bool {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("watcher runtime");
        rt.block_on(async move {
            let pool = sqlx::PgPool::connect(&database_url)
                .await
                .expect("watcher connects");
            let joined = MembershipEvent::MemberJoined {
                community_id: community,
                user_id: user,
                role: Role::Member,
                via: None,
            };
            sqlx::query(
                "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                     event_version, payload, metadata)
                 VALUES ('membership', $1, 1, 'MemberJoined', '1.0', $2, $3)",
            )
            .bind(membership_id(community, user).to_string())
            .bind(serde_json::to_value(&joined).expect("event json"))
            .bind(serde_json::json!({ "occurred_at": chrono::Utc::now() }))
            .execute(&pool)
            .await
            .expect("store the join");
            let until = tokio::time::Instant::now() + deadline;
            loop {
                let seen: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM members WHERE community_id = $1 AND user_id = $2)",
                )
                .bind(community)
                .bind(user)
                .fetch_one(&pool)
                .await
                .expect("read members");
                if seen || tokio::time::Instant::now() >= until {
                    return seen;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    })
    .join()
    .expect("watcher thread")
}

/// The test's runtime has one thread, which also runs the API. The join is stored only once
/// that thread is blocked (inside `join_and_watch`), so the relay and the projection worker can
/// only bring it to the read model on the pipeline's own threads.
#[tokio::test]
async fn the_pipeline_projects_while_the_api_runtime_is_blocked() {
    let app = spawn_app_with(|_| {}).await;
    let owner = app.user("owner").await;
    let (community, _) = app.community(&owner, "pipeline-fans", true).await;

    // Blocks this thread: nothing on the test's runtime runs until the watcher returns.
    let seen = join_and_watch(
        app.db.url.clone(),
        community,
        Uuid::new_v4(),
        Duration::from_secs(15),
    );
    assert!(
        seen,
        "a join stored while the API's runtime was blocked reached the read model"
    );
}

/// The pipeline's threads run `ROOKERY_PIPELINE_NICE` steps below the rest of the process (the
/// suite may itself run under `nice`) — also the blocking-pool threads its own threads start
/// (a host name to resolve makes the pipeline's pool start one while connecting).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_pipeline_threads_run_at_the_configured_nice_value() {
    let app = spawn_app_with(|c| {
        c.pipeline_nice = 7;
        c.database_url = c.database_url.replace("127.0.0.1", "localhost");
    })
    .await;
    let threads = threads_by_name();
    let base = threads
        .iter()
        .find(|(name, _)| name != rookery_app::pipeline::THREAD_NAME)
        .map(|(_, nice)| *nice)
        .expect("the test's own thread");
    let pipeline: Vec<i64> = threads
        .iter()
        .filter(|(name, _)| name == rookery_app::pipeline::THREAD_NAME)
        .map(|(_, nice)| *nice)
        .collect();
    assert!(!pipeline.is_empty(), "pipeline threads: {threads:?}");
    assert!(
        pipeline.iter().all(|&n| n == (base + 7).min(19)),
        "{threads:?}"
    );
    assert!(
        threads
            .iter()
            .filter(|(name, _)| name != rookery_app::pipeline::THREAD_NAME)
            .all(|(_, nice)| *nice == base),
        "only the pipeline's threads are lowered: {threads:?}"
    );
    app.stop().await.expect("stops cleanly");
}

/// (thread name, nice value) of every thread of this process.
#[cfg(target_os = "linux")]
fn threads_by_name() -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let path = task.expect("task entry").path();
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("stat")),
        ) else {
            continue; // the thread ended meanwhile
        };
        // Fields after the name's closing parenthesis start with field 3; nice is field 19.
        let nice = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(16))
            .and_then(|n| n.parse().ok())
            .expect("nice field");
        out.push((name.trim().to_string(), nice));
    }
    out
}
