//! `rookery projections status|rebuild` as an operator runs them against a live database.
#![allow(clippy::unwrap_used)]

use rookery_store::testing::TestDb;
use std::process::{Command, Stdio};

fn rookery(args: &[&str], database_url: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rookery"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn rebuild_shows_progress_and_status_shows_position_and_lag() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(TestDb::create()).unwrap();
    let community = uuid::Uuid::new_v4();
    rt.block_on(async {
        // 300 members join, written straight into the log (no API or bus needed for a rebuild).
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             SELECT 'membership', gen_random_uuid()::text, 1, 'MemberJoined', '1.0',
                    jsonb_build_object('MemberJoined', jsonb_build_object(
                        'community_id', $1::text, 'user_id', gen_random_uuid()::text, 'role', 'member')),
                    jsonb_build_object('occurred_at', '2026-01-01T00:00:00.000000Z')
             FROM generate_series(1, 300)",
        )
        .bind(community.to_string())
        .execute(&db.pool)
        .await
        .unwrap();
    });

    // Lag counts committed-safe events only, and that horizon is server-wide: another test's
    // open transaction can hold the 300 back for a moment, so poll with a deadline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let out = rookery(&["projections", "status"], &db.url);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout
            .lines()
            .find(|l| l.starts_with("members"))
            .expect("members row")
            .to_string();
        if line.contains(" 300 ") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "300 events not yet applied: {stdout}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    let out = rookery(&["projections", "rebuild", "members"], &db.url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("rebuilding members"),
        "progress line: {stderr}"
    );
    let count: i64 = rt
        .block_on(
            sqlx::query_scalar("SELECT member_count FROM member_counts WHERE community_id = $1")
                .bind(community)
                .fetch_one(&db.pool),
        )
        .unwrap();
    assert_eq!(count, 300);

    let out = rookery(&["projections", "status"], &db.url);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("members"))
        .expect("members row");
    assert!(line.contains("running"), "{stdout}");
    assert!(
        line.split_whitespace().nth(3) == Some("0"),
        "no lag after the rebuild: {stdout}"
    );

    let out = rookery(&["projections", "rebuild", "nonsense"], &db.url);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("unknown projection `nonsense`; known: members"));
    drop(db);
}
