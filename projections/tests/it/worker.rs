//! The live worker against real NATS and Postgres: redelivery, crashes, poison, read-your-writes.

use crate::support::{
    eventually, joined, registered, test_worker_config, uuids, Env, RawEvent, Scenario,
};
use futures::future::BoxFuture;
use rookery_events::{LogPosition, RecordedEvent, Role};
use rookery_nats::{Delivery, PartitionConsumer, Relay, RelayConfig};
use rookery_projections::engine::checkpoints;
use rookery_projections::models::members::MembersProjection;
use rookery_projections::models::members::{self, NAME};
use rookery_projections::{
    run_projection, run_until_idle, status, wait_for_position, Projection, ProjectionState,
    ProjectionWorker, TableNames,
};
use sqlx::PgConnection;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn members_projection() -> Arc<dyn Projection> {
    Arc::new(MembersProjection)
}

/// Fetches until `expected` deliveries arrived: a fetch returns what has arrived so far.
async fn fetch_n(consumer: &mut PartitionConsumer, expected: usize) -> Vec<Delivery> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    while out.len() < expected {
        assert!(Instant::now() < deadline, "got {} of {expected}", out.len());
        let more = consumer
            .fetch(expected - out.len(), Duration::from_millis(500))
            .await
            .expect("fetch");
        out.extend(more);
    }
    out
}

async fn applied_total(env: &Env) -> i64 {
    checkpoints::load_all(&env.pool, NAME)
        .await
        .expect("checkpoints")
        .iter()
        .map(|c| c.applied)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_message_changes_the_read_model_once() {
    let env = Env::new(1).await;
    let c = Uuid::new_v4();
    for u in uuids(5) {
        env.writer.write(&[joined(c, u, Role::Member)]).await;
    }
    env.relay_all().await;
    let worker = ProjectionWorker::new(
        env.pool.clone(),
        env.bus.clone(),
        members_projection(),
        test_worker_config(),
    );

    let mut consumer = env
        .bus
        .partition_consumer("redelivery_probe", 0, 0)
        .await
        .expect("consumer");
    let deliveries = fetch_n(&mut consumer, 5).await;
    let first = worker
        .apply_deliveries(0, &deliveries)
        .await
        .expect("first delivery");
    assert_eq!((first.applied, first.skipped), (5, 0));
    // The very same messages again (a crash after commit, before the ack).
    let again = worker
        .apply_deliveries(0, &deliveries)
        .await
        .expect("redelivery");
    assert_eq!((again.applied, again.skipped), (0, 5));

    // A consumer recreated from the start redelivers them with the same stream sequences.
    let mut fresh = env
        .bus
        .partition_consumer("redelivery_probe", 0, 0)
        .await
        .expect("consumer");
    let replayed = fetch_n(&mut fresh, 5).await;
    assert_eq!(
        worker
            .apply_deliveries(0, &replayed)
            .await
            .expect("replay")
            .applied,
        0
    );

    // The same event re-published under another message id (e.g. a re-seed after the duplicate
    // window) is a new stream message with an old log key: still applied once.
    let entries = rookery_store::log::read_committed(&env.pool, LogPosition::ZERO, 10)
        .await
        .expect("log");
    let js = async_nats::jetstream::new(env.bus.client().clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "republished-1");
    let body = serde_json::to_vec(&entries[0].event).expect("json");
    js.publish_with_headers(env.bus.subject_for(&entries[0]), headers, body.into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let n = run_until_idle(
        &env.pool,
        &env.bus,
        members_projection(),
        test_worker_config(),
    )
    .await
    .expect("idle");
    assert_eq!(n, 0, "nothing new to apply");

    assert_eq!(members::member_count(&env.pool, c).await.expect("count"), 5);
    assert_eq!(applied_total(&env).await, 5);
}

/// The members projection, but it pauses inside its transaction after writing, so a test can
/// kill the worker in the middle of a batch.
struct StallingMembers {
    in_batch: Arc<Notify>,
}

impl Projection for StallingMembers {
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
        conn: &'a mut PgConnection,
        tables: &'a TableNames,
        events: &'a [RecordedEvent],
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            MembersProjection.apply(conn, tables, events).await?;
            self.in_batch.notify_one();
            tokio::time::sleep(Duration::from_millis(40)).await;
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_batch_loses_and_duplicates_nothing() {
    let env = Env::new(2).await;
    let stop = CancellationToken::new();
    let relay = Relay::new(env.pool.clone(), env.bus.clone(), RelayConfig::default());
    let relay_task = tokio::spawn(relay.run(stop.clone().cancelled_owned()));

    let communities = uuids(3);
    let writing = CancellationToken::new();
    let writer = {
        let (w, writing, communities) = (env.writer.clone(), writing.clone(), communities.clone());
        tokio::spawn(async move {
            let mut scenario = Scenario::new(7, communities, uuids(25));
            let mut last = LogPosition::ZERO;
            while !writing.is_cancelled() || scenario.events < 150 {
                last = last.max(w.write(&scenario.step()).await);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (scenario, last)
        })
    };

    let in_batch = Arc::new(Notify::new());
    for _ in 0..4 {
        let projection: Arc<dyn Projection> = Arc::new(StallingMembers {
            in_batch: in_batch.clone(),
        });
        let (pool, bus) = (env.pool.clone(), env.bus.clone());
        let worker = tokio::spawn(run_projection(
            pool,
            bus,
            projection,
            test_worker_config(),
            futures::future::pending(),
        ));
        tokio::time::timeout(Duration::from_secs(10), in_batch.notified())
            .await
            .expect("a batch started");
        // Killed while its transaction holds written but uncommitted rows.
        worker.abort();
        assert!(worker.await.expect_err("aborted").is_cancelled());
    }
    writing.cancel();
    let (scenario, last) = writer.await.expect("writer");

    let (pool, bus) = (env.pool.clone(), env.bus.clone());
    let worker = tokio::spawn(run_projection(
        pool,
        bus,
        members_projection(),
        test_worker_config(),
        stop.clone().cancelled_owned(),
    ));
    let applied = wait_for_position(
        &env.pool,
        NAME,
        env.partitions(),
        last,
        Duration::from_secs(20),
    )
    .await
    .expect("wait");
    assert!(applied, "the restarted worker caught up");

    for c in &scenario.communities {
        assert_eq!(
            members::member_count(&env.pool, *c).await.expect("count"),
            scenario.active_count(*c),
            "count of {c}"
        );
    }
    for ((c, u), expected) in &scenario.state {
        let row = members::get_member(&env.pool, *c, *u)
            .await
            .expect("get")
            .expect("row exists");
        assert_eq!(row.status, *expected, "status of {u} in {c}");
        let name = scenario.registered.get(u).cloned().unwrap_or_default();
        assert_eq!(row.username, name, "username of {u}");
    }
    // Every event passed through `apply` exactly once, across all the crashes.
    assert_eq!(applied_total(&env).await, scenario.events as i64);

    stop.cancel();
    worker.await.expect("worker task").expect("worker");
    relay_task.await.expect("relay task").expect("relay");
}

/// Fails (not as poison) on one event, as a bug or a constraint would.
struct FailsOn {
    position: std::sync::Mutex<Option<LogPosition>>,
}

impl Projection for FailsOn {
    fn name(&self) -> &'static str {
        NAME
    }
    fn version(&self) -> i32 {
        1
    }
    fn tables(&self) -> &'static [&'static str] {
        MembersProjection.tables()
    }
    fn aggregate_types(&self) -> &'static [&'static str] {
        MembersProjection.aggregate_types()
    }
    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        tables: &'a TableNames,
        events: &'a [RecordedEvent],
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let bad = *self.position.lock().expect("lock");
            if events.iter().any(|e| Some(e.position) == bad) {
                anyhow::bail!("simulated failure");
            }
            MembersProjection.apply(conn, tables, events).await
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_are_parked_and_visible_in_status() {
    let env = Env::new(1).await;
    let c = Uuid::new_v4();
    let [a, b, d] = [(); 3].map(|_| Uuid::new_v4());
    env.writer.write(&[joined(c, a, Role::Member)]).await;
    // Decodes as JSON but not as a membership event.
    let poison = env
        .writer
        .write_raw(vec![RawEvent {
            aggregate_type: "membership".into(),
            aggregate_id: Uuid::new_v4().to_string(),
            event_type: "MemberJoined".into(),
            payload: serde_json::json!({"MemberJoined": {"community_id": "not-a-uuid"}}),
            metadata: crate::support::metadata(crate::support::at(0)),
        }])
        .await;
    env.writer.write(&[joined(c, b, Role::Member)]).await;
    env.relay_all().await;
    // A message that is not an event at all, on partition 0's subjects.
    let subject = format!(
        "{}.0.membership.MemberJoined",
        env.bus.config().subject_prefix
    );
    let js = async_nats::jetstream::new(env.bus.client().clone());
    js.publish(subject, "definitely not json".into())
        .await
        .expect("publish")
        .await
        .expect("ack");

    let n = run_until_idle(
        &env.pool,
        &env.bus,
        members_projection(),
        test_worker_config(),
    )
    .await
    .expect("idle");
    assert_eq!(n, 2, "the good events around the poison were applied");
    assert_eq!(members::member_count(&env.pool, c).await.expect("count"), 2);

    let letters = rookery_projections::dead_letters::list(&env.pool, Some(NAME), false)
        .await
        .expect("list");
    assert_eq!(letters.len(), 2);
    assert_eq!(letters[0].position, Some(poison));
    assert!(
        letters[0].error.contains("does not decode"),
        "{}",
        letters[0].error
    );
    assert_eq!(
        letters[1].position, None,
        "the undecodable message has no log key"
    );
    let s = status(&env.pool, env.partitions()).await.expect("status");
    let members_status = s.iter().find(|p| p.name == NAME).expect("members status");
    assert_eq!(members_status.dead_letters, 2);
    assert_eq!(members_status.lag_events, 0, "parked events are not lag");

    // An event that keeps failing for another reason is retried, then parked after
    // `max_attempts`; the events after it still get applied.
    let bad = env.writer.write(&[joined(c, d, Role::Member)]).await;
    let e = Uuid::new_v4();
    env.writer.write(&[joined(c, e, Role::Member)]).await;
    env.relay_all().await;
    let failing = Arc::new(FailsOn {
        position: std::sync::Mutex::new(Some(bad)),
    });
    let n = run_until_idle(&env.pool, &env.bus, failing, test_worker_config())
        .await
        .expect("idle");
    assert_eq!(n, 1);
    let letters = rookery_projections::dead_letters::list(&env.pool, Some(NAME), false)
        .await
        .expect("list");
    let parked = letters
        .iter()
        .find(|l| l.position == Some(bad))
        .expect("parked after retries");
    assert_eq!(parked.attempts, 3);
    assert!(parked.error.contains("simulated failure"));
    assert!(members::get_member(&env.pool, c, d)
        .await
        .expect("get")
        .is_none());
    assert!(members::get_member(&env.pool, c, e)
        .await
        .expect("get")
        .is_some());

    // Once the cause is fixed an operator retries it into the live model.
    rookery_projections::dead_letters::retry(&env.pool, &MembersProjection, parked.id)
        .await
        .expect("retry");
    assert!(members::get_member(&env.pool, c, d)
        .await
        .expect("get")
        .is_some());
    assert_eq!(members::member_count(&env.pool, c).await.expect("count"), 4);
    let s = status(&env.pool, env.partitions()).await.expect("status");
    let members_status = s.iter().find(|p| p.name == NAME).expect("members status");
    assert_eq!(
        (members_status.dead_letters, members_status.state),
        (2, ProjectionState::Running)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_position_returns_promptly_once_applied() {
    let env = Env::new(3).await;
    let c = Uuid::new_v4();
    let u = Uuid::new_v4();
    let first = env
        .writer
        .write(&[registered(u, "ada"), joined(c, u, Role::Owner)])
        .await;
    env.relay_all().await;
    let applied = wait_for_position(
        &env.pool,
        NAME,
        env.partitions(),
        first,
        Duration::from_millis(50),
    )
    .await
    .expect("wait");
    assert!(!applied, "no worker has run");

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
    assert!(wait_for_position(
        &env.pool,
        NAME,
        env.partitions(),
        first,
        Duration::from_secs(10)
    )
    .await
    .expect("wait"));

    // With everything running, a new write is visible quickly.
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let v = Uuid::new_v4();
        let started = Instant::now();
        let position = env.writer.write(&[joined(c, v, Role::Member)]).await;
        assert!(wait_for_position(
            &env.pool,
            NAME,
            env.partitions(),
            position,
            Duration::from_secs(5)
        )
        .await
        .expect("wait"));
        slowest = slowest.max(started.elapsed());
        assert!(
            members::get_member(&env.pool, c, v)
                .await
                .expect("get")
                .is_some(),
            "visible once applied"
        );
    }
    assert!(
        slowest < Duration::from_secs(1),
        "slowest write became visible after {slowest:?}"
    );

    // Idle partitions raise their floor to the relay cursor, so they stop holding back checks.
    let cursor = rookery_store::relay::load_cursor(&env.pool, &env.bus.config().stream)
        .await
        .expect("cursor");
    eventually(
        Duration::from_secs(5),
        "every partition's floor to reach the relay cursor",
        || async {
            let cps = checkpoints::load_all(&env.pool, NAME)
                .await
                .expect("checkpoints");
            cps.len() == 3 && cps.iter().all(|c| c.applied_through() >= cursor)
        },
    )
    .await;
    let s = status(&env.pool, env.partitions()).await.expect("status");
    let m = s.iter().find(|p| p.name == NAME).expect("members");
    assert_eq!(
        (m.lag_events, m.lag_seconds, m.state),
        (0, 0.0, ProjectionState::Running)
    );
    assert!(m.position >= Some(cursor));

    // Pausing stops the workers from applying; resuming catches up.
    assert!(rookery_projections::pause(&env.pool, NAME)
        .await
        .expect("pause"));
    let paused_write = env
        .writer
        .write(&[joined(c, Uuid::new_v4(), Role::Member)])
        .await;
    assert!(!wait_for_position(
        &env.pool,
        NAME,
        env.partitions(),
        paused_write,
        Duration::from_millis(300)
    )
    .await
    .expect("wait"));
    let s = status(&env.pool, env.partitions()).await.expect("status");
    assert_eq!(
        s.iter().find(|p| p.name == NAME).map(|m| m.state),
        Some(ProjectionState::Paused)
    );
    assert!(rookery_projections::resume(&env.pool, NAME)
        .await
        .expect("resume"));
    assert!(wait_for_position(
        &env.pool,
        NAME,
        env.partitions(),
        paused_write,
        Duration::from_secs(5)
    )
    .await
    .expect("wait"));

    stop.cancel();
    worker.await.expect("worker task").expect("worker");
    relay_task.await.expect("relay task").expect("relay");
}

/// Runs `projection`'s worker with `config` while ten joins reach the bus one by one (each on
/// the stream before the next is written); returns the community, the batches committed, and
/// the most batches `interval` allows for how long the writes took (a slow machine spreads
/// them over more intervals).
async fn batches_for_joins_one_by_one(
    env: &Env,
    projection: Arc<dyn Projection>,
    config: rookery_projections::WorkerConfig,
    interval: Duration,
) -> (Uuid, u64, u64) {
    let worker = ProjectionWorker::new(
        env.pool.clone(),
        env.bus.clone(),
        projection.clone(),
        config,
    );
    let stats = worker.stats();
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone().cancelled_owned()));
    let c = Uuid::new_v4();
    let mut last = LogPosition::ZERO;
    let started = Instant::now();
    for u in uuids(10) {
        last = env.writer.write(&[joined(c, u, Role::Member)]).await;
        env.relay_all().await;
    }
    let allowed = 2 + (started.elapsed().as_millis() / interval.as_millis().max(1)) as u64;
    let behind = rookery_projections::wait_for_models(
        &env.pool,
        &[projection.as_ref()],
        env.partitions(),
        last,
        Duration::from_secs(20),
    )
    .await
    .expect("wait");
    assert_eq!(behind, None, "{} did not catch up", projection.name());
    stop.cancel();
    running.await.expect("join").expect("worker");
    let batches = stats
        .batches_total
        .load(std::sync::atomic::Ordering::Relaxed);
    (c, batches, allowed)
}

/// Events that reach a busy partition one by one are applied together: a batch starts at
/// most every `min_batch_interval`, and takes everything that arrived meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arriving_one_by_one_share_batches() {
    let env = Env::new(1).await;
    let config = rookery_projections::WorkerConfig {
        min_batch_interval: Duration::from_millis(500),
        ..test_worker_config()
    };
    let (c, batches, allowed) = batches_for_joins_one_by_one(
        &env,
        members_projection(),
        config,
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(
        members::member_count(&env.pool, c).await.expect("count"),
        10
    );
    assert!(
        batches <= allowed.min(9),
        "10 events in {batches} batches (at most {allowed} for the writes' time)"
    );
}

/// A relaxed model (reputation) batches at its own, longer interval while the live ones keep
/// theirs: the same one-by-one joins cost it a few transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relaxed_model_batches_at_its_own_interval() {
    use rookery_projections::models::reputation::ReputationProjection;
    use rookery_projections::Freshness;
    assert_eq!(ReputationProjection.freshness(), Freshness::Relaxed);
    let env = Env::new(1).await;
    let config = rookery_projections::WorkerConfig {
        min_batch_interval: Duration::from_millis(1),
        relaxed_batch_interval: Duration::from_millis(500),
        ..test_worker_config()
    };
    let (_, batches, allowed) = batches_for_joins_one_by_one(
        &env,
        Arc::new(ReputationProjection),
        config,
        Duration::from_millis(500),
    )
    .await;
    assert!(
        batches <= allowed.min(9),
        "10 events in {batches} batches (at most {allowed} for the writes' time)"
    );
}

/// A batch of only other aggregates' events costs no transaction: the messages model moves past
/// 100 joins without committing a batch, reads of it do not wait for them, and its checkpoint
/// passes them once the partition is idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_aggregates_events_are_moved_past_without_a_transaction() {
    use rookery_projections::models::messages::{MessagesProjection, NAME as MESSAGES};
    use std::sync::atomic::Ordering;
    let env = Env::new(1).await;
    let c = Uuid::new_v4();
    let mut last = LogPosition::ZERO;
    for u in uuids(100) {
        last = env.writer.write(&[joined(c, u, Role::Member)]).await;
    }
    env.relay_all().await;
    let worker = ProjectionWorker::new(
        env.pool.clone(),
        env.bus.clone(),
        Arc::new(MessagesProjection),
        test_worker_config(),
    );
    let stats = worker.stats();
    let stop = CancellationToken::new();
    let task = tokio::spawn(worker.run(stop.clone().cancelled_owned()));

    let behind = rookery_projections::wait_for_models(
        &env.pool,
        &[&MessagesProjection],
        env.partitions(),
        last,
        Duration::from_millis(100),
    )
    .await
    .expect("wait");
    assert_eq!(behind, None, "no event of the model's is behind");
    eventually(Duration::from_secs(10), "the joins moved past", || {
        let stats = stats.clone();
        async move { stats.applied_total.load(Ordering::Relaxed) == 100 }
    })
    .await;
    assert_eq!(
        stats.batches_total.load(Ordering::Relaxed),
        0,
        "no batch transaction for other aggregates' events"
    );
    eventually(Duration::from_secs(10), "the checkpoint written", || {
        let pool = env.pool.clone();
        async move {
            let cps = checkpoints::load_all(&pool, MESSAGES)
                .await
                .expect("checkpoints");
            cps.iter().map(|c| c.position).max() == Some(last) && cps[0].stream_seq == 100
        }
    })
    .await;
    stop.cancel();
    task.await.expect("worker task").expect("worker");
}
