//! Rebuilds: under live writes, against a fresh incremental build, resumed after a crash
//! (also while the shadow tables still lack their keys), and parking poison events.

use crate::support::{
    joined, registered, test_worker_config, uuids, Env, Ev, ModelCopy, RawEvent, Scenario,
};
use rookery_events::{LogPosition, MembershipEvent, Role};
use rookery_nats::{Relay, RelayConfig};
use rookery_projections::models::members::MembersProjection;
use rookery_projections::models::members::{self, MemberQuery, NAME};
use rookery_projections::{
    rebuild_with, run_projection, run_until_idle, status, wait_for_position, Projection,
    ProjectionState, RebuildConfig,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn members_projection() -> Arc<dyn Projection> {
    Arc::new(MembersProjection)
}

async fn index_names(env: &Env, table: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT indexname::text FROM pg_indexes WHERE tablename = $1 ORDER BY 1")
        .bind(table)
        .fetch_all(&env.pool)
        .await
        .expect("indexes")
}

/// `name:kind` of every constraint on `table` (none when it does not exist).
async fn constraints(env: &Env, table: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT conname::text || ':' || contype::text FROM pg_constraint
         WHERE conrelid = to_regclass($1) ORDER BY 1",
    )
    .bind(format!("\"{table}\""))
    .fetch_all(&env.pool)
    .await
    .expect("constraints")
}

/// Every model table's indexes and constraints.
async fn schema(env: &Env) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for t in ["members", "member_counts", "member_users"] {
        out.push(index_names(env, t).await);
        out.push(constraints(env, t).await);
    }
    out
}

/// Folds the whole log into a copy of the model through the live path (relay, bus, `apply`
/// batch by batch) and asserts the rebuilt model equals it row for row.
async fn assert_matches_incremental_build(env: &Env) {
    let copy = Arc::new(ModelCopy::of(members_projection(), "fresh_"));
    copy.create_tables(&env.pool).await;
    env.relay_all().await;
    run_until_idle(&env.pool, &env.bus, copy.clone(), test_worker_config())
        .await
        .expect("fresh build");
    copy.assert_same(&env.pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_under_live_writes_matches_a_fresh_incremental_build() {
    let env = Env::new(2).await;
    let schema_before = schema(&env).await;
    // A founder who never leaves: readers must always see at least them.
    let (home, founder) = (Uuid::new_v4(), Uuid::new_v4());
    let founded = env
        .writer
        .write(&[
            registered(founder, "founder"),
            joined(home, founder, Role::Owner),
        ])
        .await;

    let stop = CancellationToken::new();
    let relay = Relay::new(env.pool.clone(), env.bus.clone(), RelayConfig::default());
    let relay_task = tokio::spawn(relay.run(stop.clone().cancelled_owned()));
    let worker = tokio::spawn(run_projection(
        env.pool.clone(),
        env.bus.clone(),
        members_projection(),
        test_worker_config(),
        stop.clone().cancelled_owned(),
    ));

    // Two concurrent writers on disjoint users, so transactions commit out of order.
    let writing = CancellationToken::new();
    let mut writers = Vec::new();
    for seed in [11u64, 12] {
        let (w, writing) = (env.writer.clone(), writing.clone());
        let communities = vec![home, Uuid::new_v4()];
        writers.push(tokio::spawn(async move {
            let mut scenario = Scenario::new(seed, communities, uuids(30));
            let mut last = LogPosition::ZERO;
            while !writing.is_cancelled() {
                last = last.max(w.write(&scenario.step()).await);
            }
            (scenario.events, last)
        }));
    }

    assert!(wait_for_position(
        &env.pool,
        NAME,
        env.partitions(),
        founded,
        Duration::from_secs(10)
    )
    .await
    .expect("wait"));
    // From here on readers must never see an error or an empty model, before, during or after
    // the switch.
    let reading = CancellationToken::new();
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (pool, reading, reads) = (env.pool.clone(), reading.clone(), reads.clone());
        tokio::spawn(async move {
            let mut failures = Vec::new();
            while !reading.is_cancelled() {
                match members::list_members(&pool, home, &MemberQuery::default()).await {
                    Ok(page) if page.items.is_empty() => failures.push("empty page".to_string()),
                    Ok(_) => {}
                    Err(e) => failures.push(format!("{e:#}")),
                }
                match members::member_count(&pool, home).await {
                    Ok(n) if n < 1 => failures.push(format!("count {n}")),
                    Ok(_) => {}
                    Err(e) => failures.push(format!("{e:#}")),
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
            failures
        })
    };

    crate::support::eventually(Duration::from_secs(10), "some live progress", || async {
        members::member_count(&env.pool, home).await.unwrap_or(0) > 3
    })
    .await;
    // Several chunks, each of several batches: rows carry over between batches in memory and
    // between chunks through the tables.
    let config = RebuildConfig {
        batch_size: 150,
        chunk_size: 400,
        switch_gap: 40,
        max_passes: 5,
        ..RebuildConfig::default()
    };
    let mut updates = 0u32;
    let report = rebuild_with(
        &env.pool,
        members_projection(),
        env.partitions(),
        &config,
        |p| {
            assert!(p.done <= p.total, "{p:?}");
            updates += 1;
        },
    )
    .await
    .expect("rebuild");
    assert!(updates > 0, "progress was reported");
    assert!(!report.resumed);
    assert!(report.events > 0);

    // Writes go on after the switch, into the new tables: stop the writers only once one has
    // committed past the switch's head.
    crate::support::eventually(
        Duration::from_secs(10),
        "a write after the switch",
        || async {
            rookery_store::log::committed_head(&env.pool)
                .await
                .ok()
                .flatten()
                .is_some_and(|head| head > report.head)
        },
    )
    .await;
    writing.cancel();
    let mut last = LogPosition::ZERO;
    let mut written = 1u64;
    for w in writers {
        let (events, position) = w.await.expect("writer");
        written += events;
        last = last.max(position);
    }
    assert!(
        wait_for_position(
            &env.pool,
            NAME,
            env.partitions(),
            last,
            Duration::from_secs(20)
        )
        .await
        .expect("wait"),
        "live worker caught up after the switch"
    );
    reading.cancel();
    let failures = reader.await.expect("reader");
    assert!(
        failures.is_empty(),
        "readers saw: {:?}",
        &failures[..failures.len().min(5)]
    );
    assert!(reads.load(Ordering::Relaxed) > 10);
    assert!(
        written > report.events,
        "writes continued during and after the rebuild"
    );
    eprintln!(
        "rebuild: {report}; {written} events written, {} reads",
        reads.load(Ordering::Relaxed)
    );

    // A fresh incremental build of the same log, through the bus, batch by batch.
    let copy = Arc::new(ModelCopy::of(members_projection(), "fresh_"));
    copy.create_tables(&env.pool).await;
    run_until_idle(&env.pool, &env.bus, copy.clone(), test_worker_config())
        .await
        .expect("fresh build");
    copy.assert_same(&env.pool).await;

    let s = status(&env.pool, env.partitions()).await.expect("status");
    let m = s.iter().find(|p| p.name == NAME).expect("members");
    assert_eq!(m.state, ProjectionState::Running);
    assert!(m.rebuild.is_none());
    assert_eq!(
        schema(&env).await,
        schema_before,
        "index and constraint names survive the swap"
    );
    let leftovers: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename LIKE '%\\_\\_rebuild' OR tablename LIKE '%\\_\\_old'")
        .fetch_one(&env.pool)
        .await
        .expect("tables");
    assert_eq!(leftovers, 0);

    stop.cancel();
    worker.await.expect("worker task").expect("worker");
    relay_task.await.expect("relay task").expect("relay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_rebuild_resumes_from_its_cursor() {
    let env = Env::new(1).await;
    let mut scenario = Scenario::new(5, uuids(3), uuids(40));
    let mut last = LogPosition::ZERO;
    for _ in 0..300 {
        last = last.max(env.writer.write(&scenario.step()).await);
    }
    let total = scenario.events;
    env.wait_for_head(last).await;

    // Crash a rebuild part-way (the task is aborted, as a killed process would be).
    let config = RebuildConfig {
        batch_size: 50,
        chunk_size: 100,
        switch_gap: 0,
        max_passes: 5,
        ..RebuildConfig::default()
    };
    let reached = Arc::new(tokio::sync::Notify::new());
    let task = {
        let (pool, config, reached) = (env.pool.clone(), config.clone(), reached.clone());
        tokio::spawn(async move {
            rebuild_with(&pool, members_projection(), 1, &config, move |p| {
                if p.done >= 200 {
                    reached.notify_one();
                }
            })
            .await
        })
    };
    tokio::time::timeout(Duration::from_secs(20), reached.notified())
        .await
        .expect("progress");
    task.abort();
    assert!(task.await.is_err(), "aborted");
    // Operators see the stopped rebuild and how far it got (once its session is gone).
    crate::support::eventually(
        Duration::from_secs(5),
        "status to show the stopped rebuild",
        || async {
            let s = status(&env.pool, 1).await.expect("status");
            let m = s.iter().find(|p| p.name == NAME).expect("members");
            m.state == ProjectionState::Failed
                && m.rebuild
                    .as_ref()
                    .is_some_and(|r| !r.running && r.done >= 200)
                && m.last_error.is_some()
        },
    )
    .await;

    let report = crate::support::retry_until_lock_free(|| {
        rebuild_with(&env.pool, members_projection(), 1, &config, |_| {})
    })
    .await;
    assert!(report.resumed, "{report}");
    assert!(report.events < total, "only the rest was folded: {report}");
    assert_eq!(report.total, total);

    // Identical to folding the whole log straight through.
    let copy = Arc::new(ModelCopy::of(members_projection(), "fresh_"));
    copy.create_tables(&env.pool).await;
    env.relay_all().await;
    run_until_idle(&env.pool, &env.bus, copy.clone(), test_worker_config())
        .await
        .expect("fresh build");
    copy.assert_same(&env.pool).await;
    for c in &scenario.communities {
        assert_eq!(
            members::member_count(&env.pool, *c).await.expect("count"),
            scenario.active_count(*c)
        );
    }
}

/// A log of new rows only (as a first rebuild of a long log mostly sees) is folded into shadow
/// tables without their primary keys, built once at the end. A crash in that state resumes:
/// the keys are built before anything is looked up, and later events that change stored rows
/// (leaving, role changes, registrations after joining) fold as live workers fold them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_without_keys_resumes_after_a_crash_and_matches_live_fold() {
    let env = Env::new(2).await;
    let schema_before = schema(&env).await;
    let communities = uuids(3);
    let users = uuids(240);
    let mut last = LogPosition::ZERO;
    let mut written = 0u64;
    for (i, u) in users.iter().enumerate() {
        let c = communities[i % communities.len()];
        let mut events = Vec::new();
        // Half register before joining, the others only in the second part.
        if i % 2 == 0 {
            events.push(registered(*u, &format!("user-{i}")));
        }
        events.push(joined(c, *u, Role::Member));
        written += events.len() as u64;
        last = last.max(env.writer.write(&events).await);
    }
    env.wait_for_head(last).await;

    let config = RebuildConfig {
        batch_size: 30,
        chunk_size: 60,
        switch_gap: 0,
        max_passes: 5,
        ..RebuildConfig::default()
    };
    // The rebuild stops dead once 120 events are committed to the shadow tables, as a killed
    // process would (its task unwinds; its locks go with its sessions).
    let crashed = {
        let (pool, config) = (env.pool.clone(), config.clone());
        tokio::spawn(async move {
            rebuild_with(&pool, members_projection(), 2, &config, |p| {
                assert!(p.done < 120, "crash");
            })
            .await
        })
    };
    assert!(crashed.await.is_err(), "the rebuild crashed");
    assert!(
        constraints(&env, "members__rebuild").await.is_empty()
            && constraints(&env, "member_users__rebuild").await.is_empty(),
        "the crash left shadow tables without keys"
    );

    // More events, changing rows the first part stored.
    for (i, u) in users.iter().enumerate() {
        let c = communities[i % communities.len()];
        let mut events = Vec::new();
        if i % 2 == 1 {
            events.push(registered(*u, &format!("late-{i}")));
        }
        match i % 3 {
            0 => events.push(Ev::M(MembershipEvent::MemberLeft {
                community_id: c,
                user_id: *u,
            })),
            1 => events.push(Ev::M(MembershipEvent::MemberRoleChanged {
                community_id: c,
                user_id: *u,
                from: Role::Member,
                to: Role::Moderator,
            })),
            _ => {}
        }
        if events.is_empty() {
            continue;
        }
        written += events.len() as u64;
        last = last.max(env.writer.write(&events).await);
    }
    env.wait_for_head(last).await;

    let report = crate::support::retry_until_lock_free(|| {
        rebuild_with(&env.pool, members_projection(), 2, &config, |_| {})
    })
    .await;
    assert!(report.resumed, "{report}");
    assert_eq!(report.total, written, "{report}");
    assert!(
        report.events < written,
        "only the rest was folded: {report}"
    );
    assert_eq!(
        schema(&env).await,
        schema_before,
        "the keys are back, named as before"
    );
    assert_matches_incremental_build(&env).await;
}

/// Events that cannot be folded are parked by the rebuild, visibly, and the rest folds as the
/// live path folds it (which parks the same events).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_parks_poison_events_and_folds_the_rest() {
    let env = Env::new(2).await;
    let mut scenario = Scenario::new(7, uuids(2), uuids(25));
    let mut poison = Vec::new();
    for i in 0..120 {
        env.writer.write(&scenario.step()).await;
        if i % 40 == 20 {
            // Decodes as JSON but not as a membership event.
            poison.push(
                env.writer
                    .write_raw(vec![RawEvent {
                        aggregate_type: "membership".into(),
                        aggregate_id: Uuid::new_v4().to_string(),
                        event_type: "MemberJoined".into(),
                        payload: serde_json::json!({"MemberJoined": {"community_id": i}}),
                        metadata: crate::support::metadata(crate::support::at(i)),
                    }])
                    .await,
            );
        }
    }
    let last = env.writer.write(&scenario.step()).await;
    env.wait_for_head(last).await;

    let config = RebuildConfig {
        batch_size: 25,
        chunk_size: 50,
        switch_gap: 0,
        ..RebuildConfig::default()
    };
    let report = rebuild_with(&env.pool, members_projection(), 2, &config, |_| {})
        .await
        .expect("rebuild");
    assert_eq!(report.parked, poison.len() as u64, "{report}");
    let letters = rookery_projections::dead_letters::list(&env.pool, Some(NAME), false)
        .await
        .expect("dead letters");
    let mut parked: Vec<_> = letters.iter().filter_map(|l| l.position).collect();
    parked.sort();
    assert_eq!(parked, poison);
    assert!(letters
        .iter()
        .all(|l| l.parked_by == "rebuild" && l.event.is_some() && l.error.contains("decode")));
    let s = status(&env.pool, env.partitions()).await.expect("status");
    let m = s.iter().find(|p| p.name == NAME).expect("members");
    assert_eq!(m.dead_letters, poison.len() as i64);
    assert_matches_incremental_build(&env).await;
}

/// The members projection without its bulk fold: what any projection gets by default.
struct BatchByBatch;

impl Projection for BatchByBatch {
    fn name(&self) -> &'static str {
        NAME
    }
    fn version(&self) -> i32 {
        MembersProjection.version()
    }
    fn tables(&self) -> &'static [&'static str] {
        MembersProjection.tables()
    }
    fn aggregate_types(&self) -> &'static [&'static str] {
        MembersProjection.aggregate_types()
    }
    fn apply<'a>(
        &'a self,
        conn: &'a mut sqlx::PgConnection,
        tables: &'a rookery_projections::TableNames,
        events: &'a [rookery_events::RecordedEvent],
    ) -> futures::future::BoxFuture<'a, anyhow::Result<()>> {
        MembersProjection.apply(conn, tables, events)
    }
}

/// A projection without a bulk fold is rebuilt through its `apply`, batch by batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_without_a_bulk_fold_applies_batch_by_batch() {
    let env = Env::new(2).await;
    let schema_before = schema(&env).await;
    let mut scenario = Scenario::new(3, uuids(2), uuids(30));
    let mut last = LogPosition::ZERO;
    for _ in 0..150 {
        last = last.max(env.writer.write(&scenario.step()).await);
    }
    env.wait_for_head(last).await;
    let config = RebuildConfig {
        batch_size: 40,
        switch_gap: 0,
        ..RebuildConfig::default()
    };
    let report = rebuild_with(&env.pool, Arc::new(BatchByBatch), 2, &config, |_| {})
        .await
        .expect("rebuild");
    assert_eq!(report.total, scenario.events, "{report}");
    assert_eq!(schema(&env).await, schema_before);
    assert_matches_incremental_build(&env).await;
}

/// The message text index is maintained without GIN's pending list, live and after a rebuild
/// (whose shadow table builds it from the live definition): with the list, the insert that
/// finds it full merges all of it while the messages worker's batch waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_message_text_index_keeps_no_pending_list_live_or_rebuilt() {
    use rookery_projections::models::messages::MessagesProjection;
    async fn options(env: &Env) -> Option<Vec<String>> {
        sqlx::query_scalar(
            "SELECT reloptions::text[] FROM pg_class WHERE relname = 'messages_text'",
        )
        .fetch_one(&env.pool)
        .await
        .expect("reloptions")
    }
    let env = Env::new(1).await;
    let off = Some(vec!["fastupdate=off".to_string()]);
    assert_eq!(options(&env).await, off, "live");
    let mut scenario = Scenario::new(3, uuids(2), uuids(10));
    let mut last = LogPosition::ZERO;
    for _ in 0..20 {
        last = last.max(env.writer.write(&scenario.step()).await);
    }
    env.wait_for_head(last).await;
    rebuild_with(
        &env.pool,
        Arc::new(MessagesProjection),
        1,
        &RebuildConfig::default(),
        |_| {},
    )
    .await
    .expect("rebuild");
    assert_eq!(options(&env).await, off, "rebuilt");
}
