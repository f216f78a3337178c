//! The conformance suite: what every read model must satisfy, run for each model of the build's
//! registry (`rookery_projections::all()`) and for the test-only models below. A new model is
//! covered by registering it; a model whose events the scenario does not write fails here too,
//! so the scenario grows with the event contract.
//!
//! 1. A rebuild from the log, while writes go on and the live worker applies them, ends equal
//!    row for row to an independent incremental build of the same log through the bus.
//! 2. Replaying every event again (a consumer from the stream's start) changes nothing.
//! 3. A poisoned event is parked as a dead letter, the rest is applied, `min_position` of a
//!    later write waits for it and then answers, and a rebuild leaves it out as the live
//!    worker did.
//! 4. A live worker killed again and again, at any point of its work (also while it moves past
//!    other aggregates' events with its checkpoint deferred), neither loses nor repeats an event:
//!    the tables end equal to an incremental build that was never interrupted.

mod event_counts;

use crate::support::{
    at, dump_model, joined, metadata, test_worker_config, uuids, Env, ModelCopy, RawEvent, Scenario,
};
use rookery_events::{LogPosition, Role};
use rookery_projections::engine::checkpoints;
use rookery_projections::engine::partitions_of;
use rookery_projections::{
    dead_letters, is_applied, rebuild_with, run_projection, run_until_idle, wait_for_position,
    Projection, ProjectionWorker, RebuildConfig,
};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Partitions of every world: live batches of different partitions interleave differently
/// from the log order a rebuild folds in.
const PARTITIONS: u32 = 3;

/// A model under test, with the tables a test-only model brings itself (real models get
/// theirs from `migrations/`).
struct Model {
    projection: Arc<dyn Projection>,
    setup: &'static [&'static str],
}

/// Every model the suite covers.
fn models() -> Vec<Model> {
    let mut models: Vec<Model> = rookery_projections::all()
        .into_iter()
        .map(|projection| Model {
            projection,
            setup: &[],
        })
        .collect();
    models.push(Model {
        projection: Arc::new(event_counts::EventCounts),
        setup: &[event_counts::DDL],
    });
    models
}

impl Model {
    fn name(&self) -> &'static str {
        self.projection.name()
    }

    /// A fresh database and stream with the model's tables.
    async fn world(&self) -> Env {
        let env = Env::new(PARTITIONS).await;
        for ddl in self.setup {
            sqlx::query(ddl)
                .execute(&env.pool)
                .await
                .expect("model DDL");
        }
        env
    }

    async fn catch_up(&self, env: &Env, projection: Arc<dyn Projection>) -> u64 {
        run_until_idle(&env.pool, &env.bus, projection, test_worker_config())
            .await
            .unwrap_or_else(|e| panic!("{}: live build: {e:#}", self.name()))
    }

    /// The model's tables hold something: the scenario reached it.
    async fn assert_not_empty(&self, env: &Env) {
        let tables = dump_model(&env.pool, self.projection.as_ref()).await;
        assert!(
            tables.iter().any(|(_, rows)| !rows.is_empty()),
            "{}: the scenario wrote no event this model folds; extend support::Scenario",
            self.name()
        );
    }
}

fn scenario(seed: u64) -> Scenario {
    Scenario::mixed(seed, uuids(4), uuids(40))
}

/// Writes `steps` transactions of the scenario; returns the last key written.
async fn write(env: &Env, scenario: &mut Scenario, steps: usize) -> LogPosition {
    let mut last = LogPosition::ZERO;
    for _ in 0..steps {
        last = last.max(env.writer.write(&scenario.step()).await);
    }
    last
}

/// Small batches and chunks, so a rebuild of a small log still takes several of each and
/// catch-up passes while writes go on.
fn rebuild_config() -> RebuildConfig {
    RebuildConfig {
        batch_size: 40,
        chunk_size: 100,
        switch_gap: 10,
        max_passes: 5,
        ..RebuildConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_under_writes_equals_an_incremental_build() {
    for model in models() {
        let env = model.world().await;
        let p = model.projection.clone();
        let copy = Arc::new(ModelCopy::of(p.clone(), "incremental_"));
        copy.create_tables(&env.pool).await;
        let mut scenario = scenario(7);

        write(&env, &mut scenario, 80).await;
        env.relay_all().await;
        model.catch_up(&env, p.clone()).await;
        model.catch_up(&env, copy.clone()).await;

        // The rebuild runs while transactions keep committing and the live worker applies
        // them to the tables being replaced.
        let rebuild = {
            let (pool, p) = (env.pool.clone(), p.clone());
            tokio::spawn(async move {
                rebuild_with(&pool, p, PARTITIONS, &rebuild_config(), |_| {}).await
            })
        };
        for _ in 0..15 {
            write(&env, &mut scenario, 2).await;
            env.relay_all().await;
            model.catch_up(&env, p.clone()).await;
        }
        let report = rebuild
            .await
            .expect("rebuild task")
            .unwrap_or_else(|e| panic!("{}: rebuild: {e:#}", model.name()));
        assert!(report.events > 0, "{}: {report}", model.name());

        // Writes after the switch go into the rebuilt tables.
        write(&env, &mut scenario, 20).await;
        env.relay_all().await;
        model.catch_up(&env, p.clone()).await;
        model.catch_up(&env, copy.clone()).await;

        model.assert_not_empty(&env).await;
        copy.assert_same(&env.pool).await;
    }
}

#[tokio::test]
async fn a_worker_killed_again_and_again_loses_and_repeats_nothing() {
    for model in models() {
        let env = model.world().await;
        let p = model.projection.clone();
        let copy = Arc::new(ModelCopy::of(p.clone(), "incremental_"));
        copy.create_tables(&env.pool).await;
        let mut scenario = scenario(11);
        for round in 0..12u64 {
            write(&env, &mut scenario, 10).await;
            // A run of joins alone: batches of only other aggregates' events for a model that
            // does not fold memberships, which it moves past with its checkpoint deferred.
            for user in uuids(20) {
                env.writer
                    .write(&[joined(scenario.communities[0], user, Role::Member)])
                    .await;
            }
            env.relay_all().await;
            let worker = tokio::spawn(run_projection(
                env.pool.clone(),
                env.bus.clone(),
                p.clone(),
                test_worker_config(),
                futures::future::pending(),
            ));
            // Not a wait for anything: the point in its work where this round's worker dies
            // moves from round to round (before its first batch, inside one, between them).
            tokio::time::sleep(Duration::from_millis(2 + 9 * (round % 5))).await;
            worker.abort();
            assert!(
                worker.await.is_err_and(|e| e.is_cancelled()),
                "{}: the worker stopped on its own",
                model.name()
            );
        }
        model.catch_up(&env, p.clone()).await;
        model.catch_up(&env, copy.clone()).await;
        model.assert_not_empty(&env).await;
        copy.assert_same(&env.pool).await;
    }
}

/// Every delivery of `partition` from the stream's start (of the whole stream, for a
/// projection in log order).
async fn replay(env: &Env, p: &dyn Projection, partition: u32) -> Vec<rookery_nats::Delivery> {
    let mut consumer = if p.in_log_order() {
        env.bus.log_consumer("conformance_replay", 0).await
    } else {
        env.bus
            .partition_consumer("conformance_replay", partition, 0)
            .await
    }
    .expect("consumer");
    let mut out = Vec::new();
    loop {
        let more = consumer
            .fetch(500, Duration::from_millis(300))
            .await
            .expect("fetch");
        if more.is_empty() {
            return out;
        }
        out.extend(more);
    }
}

async fn applied(env: &Env, name: &str) -> i64 {
    checkpoints::load_all(&env.pool, name)
        .await
        .expect("checkpoints")
        .iter()
        .map(|c| c.applied)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_same_events_changes_nothing() {
    for model in models() {
        let env = model.world().await;
        let p = model.projection.clone();
        let mut scenario = scenario(11);
        write(&env, &mut scenario, 60).await;
        env.relay_all().await;
        model.catch_up(&env, p.clone()).await;
        model.assert_not_empty(&env).await;
        let before = dump_model(&env.pool, p.as_ref()).await;
        let applied_before = applied(&env, model.name()).await;

        let worker = ProjectionWorker::new(
            env.pool.clone(),
            env.bus.clone(),
            p.clone(),
            test_worker_config(),
        );
        let mut replayed = 0u64;
        for partition in 0..partitions_of(p.as_ref(), PARTITIONS) {
            let deliveries = replay(&env, p.as_ref(), partition).await;
            let n = deliveries.len() as u64;
            let again = worker
                .apply_deliveries(partition, &deliveries)
                .await
                .unwrap_or_else(|e| panic!("{}: replay: {e:#}", model.name()));
            assert_eq!(
                (again.applied, again.skipped),
                (0, n),
                "{}: partition {partition}",
                model.name()
            );
            replayed += n;
        }
        assert_eq!(
            replayed,
            scenario.events,
            "{}: every event replayed",
            model.name()
        );
        assert_eq!(
            dump_model(&env.pool, p.as_ref()).await,
            before,
            "{}: a replay changed the read model",
            model.name()
        );
        assert_eq!(applied(&env, model.name()).await, applied_before);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_event_is_parked_and_min_position_waits_for_it() {
    for model in models() {
        let env = model.world().await;
        let (p, name) = (model.projection.clone(), model.name());
        let partitions = partitions_of(p.as_ref(), PARTITIONS);
        let mut scenario = scenario(13);
        write(&env, &mut scenario, 30).await;
        env.relay_all().await;
        model.catch_up(&env, p.clone()).await;

        // An event of the model's own aggregate type that no version of the contract decodes.
        let poison = env
            .writer
            .write_raw(vec![RawEvent {
                aggregate_type: p.aggregate_types()[0].to_string(),
                aggregate_id: Uuid::new_v4().to_string(),
                event_type: "Garbled".into(),
                payload: serde_json::json!({"Garbled": {"nonsense": true}}),
                metadata: metadata(at(1_000)),
            }])
            .await;
        let later = write(&env, &mut scenario, 5).await;
        env.relay_all().await;
        assert!(
            !is_applied(&env.pool, name, partitions, later)
                .await
                .expect("is_applied"),
            "{name}: nothing has applied the new events yet"
        );

        model.catch_up(&env, p.clone()).await;
        let letters = dead_letters::list(&env.pool, Some(name), false)
            .await
            .expect("dead letters");
        assert_eq!(
            letters.iter().map(|l| l.position).collect::<Vec<_>>(),
            vec![Some(poison)],
            "{name}: exactly the poisoned event is parked"
        );
        assert!(
            wait_for_position(&env.pool, name, partitions, later, Duration::from_secs(5))
                .await
                .expect("wait"),
            "{name}: min_position of a write after the poison is reached"
        );
        let status = rookery_projections::engine::status::status(
            &env.pool,
            PARTITIONS,
            std::slice::from_ref(&p),
        )
        .await
        .expect("status");
        let s = status.iter().find(|s| s.name == name).expect("status row");
        assert_eq!((s.dead_letters, s.lag_events), (1, 0), "{name}");

        // A rebuild leaves the parked event out, as the live worker did.
        let live = dump_model(&env.pool, p.as_ref()).await;
        rebuild_with(&env.pool, p.clone(), PARTITIONS, &rebuild_config(), |_| {})
            .await
            .unwrap_or_else(|e| panic!("{name}: rebuild: {e:#}"));
        assert_eq!(
            dump_model(&env.pool, p.as_ref()).await,
            live,
            "{name}: the rebuild differs from the live model"
        );
    }
}
