use crate::helpers::*;
use rookery_nats::{Relay, RelayConfig, RelayStats};
use rookery_store::testing::TestDb;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const WRITERS: Writers = Writers {
    tasks: 8,
    aggregates_per_task: 5,
    events_per_aggregate: 50,
    max_pause_ms: 3,
};

/// A spawned relay and the switch that stops it.
struct Running {
    stop: oneshot::Sender<()>,
    handle: JoinHandle<anyhow::Result<()>>,
    stats: Arc<RelayStats>,
}

fn spawn_relay(relay: Relay) -> Running {
    let (stop, stopped) = oneshot::channel::<()>();
    let stats = relay.stats();
    let handle = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    Running {
        stop,
        handle,
        stats,
    }
}

/// Waits until the relay reports `position` as its saved cursor.
async fn wait_for_saved_cursor(stats: &Arc<RelayStats>, position: rookery_events::LogPosition) {
    eventually("the saved cursor", Duration::from_secs(30), || {
        let stats = stats.clone();
        async move { (stats.cursor() == position).then_some(()) }
    })
    .await;
}

impl Running {
    async fn shutdown(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("relay stops promptly")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_publishes_every_event_once_and_in_aggregate_order_despite_out_of_order_commits() {
    let db = TestDb::create().await.unwrap();
    let bus = TestBus::new().await;
    let writers_pool = writer_pool(&db.url).await;
    let relay = spawn_relay(Relay::new(
        db.pool.clone(),
        bus.bus.clone(),
        RelayConfig::default(),
    ));

    let started = Instant::now();
    join_all(WRITERS.spawn(writers_pool.clone())).await;
    let written = started.elapsed();
    let total = event_count(&db.pool).await;
    assert_eq!(total, WRITERS.total());
    wait_for_stream(&bus, total, Duration::from_secs(30)).await;
    let relayed = started.elapsed();

    let out_of_order = out_of_order_commits(&db.pool).await;
    assert!(
        out_of_order > 0,
        "the writers must commit out of global_position order"
    );
    assert!(relay.stats.active.load(Ordering::SeqCst));
    assert_stream_matches_log(&bus, &db.pool).await;
    let head = rookery_store::log::committed_head(&db.pool)
        .await
        .unwrap()
        .unwrap();
    let (pool, stream) = (&db.pool, bus.config().stream.as_str());
    eventually(
        "the stored cursor at the head",
        Duration::from_secs(10),
        || async move {
            let cursor = rookery_store::relay::load_cursor(pool, stream)
                .await
                .unwrap();
            (cursor == head).then_some(())
        },
    )
    .await;
    // The saver records what it stored just after Postgres confirms it.
    wait_for_saved_cursor(&relay.stats, head).await;
    assert_eq!(relay.stats.published_total.load(Ordering::Relaxed), total);
    relay.shutdown().await;
    eprintln!(
        "out-of-order commits: {total} events ({out_of_order} commits behind a later position) \
         written in {written:?}, all on the stream after {relayed:?} \
         ({:.0} events/s end to end)",
        total as f64 / relayed.as_secs_f64()
    );
    writers_pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_killed_mid_run_loses_and_duplicates_nothing() {
    let db = TestDb::create().await.unwrap();
    let bus = TestBus::new().await;
    let writers_pool = writer_pool(&db.url).await;
    let writers = WRITERS.spawn(writers_pool.clone());

    // The first relay gets a pool of its own, like a process of its own: closing that pool
    // after the abort ends its session and so frees the advisory lock, as a crash would.
    let first_pool = writer_pool(&db.url).await;
    let first = spawn_relay(Relay::new(
        first_pool.clone(),
        bus.bus.clone(),
        RelayConfig::default(),
    ));
    let bus_ref = &bus.bus;
    eventually(
        "the first relay to publish",
        Duration::from_secs(20),
        || async move { (bus_ref.stream_state().await.unwrap().messages >= 200).then_some(()) },
    )
    .await;
    first.handle.abort();
    assert!(first.handle.await.unwrap_err().is_cancelled());
    assert!(
        writers.iter().any(|w| !w.is_finished()),
        "the relay must die while writers are still writing"
    );
    first_pool.close().await;
    let before = bus.stream_state().await.unwrap().messages;

    join_all(writers).await;
    let total = event_count(&db.pool).await;

    // The backlog the second relay finds is also a clean throughput measurement.
    let started = Instant::now();
    let second = spawn_relay(Relay::new(
        db.pool.clone(),
        bus.bus.clone(),
        RelayConfig::default(),
    ));
    wait_for_stream(&bus, total, Duration::from_secs(30)).await;
    let catch_up = started.elapsed();
    assert_stream_matches_log(&bus, &db.pool).await;
    second.shutdown().await;
    eprintln!(
        "crash: first relay aborted after {before} of {total} events; the second relayed the \
         remaining {} in {catch_up:?} ({:.0} events/s)",
        total - before,
        (total - before) as f64 / catch_up.as_secs_f64()
    );
    writers_pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_one_relay_is_active_and_the_standby_takes_over() {
    let db = TestDb::create().await.unwrap();
    let bus = TestBus::new().await;
    let writers_pool = writer_pool(&db.url).await;
    let config = RelayConfig {
        standby_retry: Duration::from_millis(50),
        ..RelayConfig::default()
    };
    let a = spawn_relay(Relay::new(db.pool.clone(), bus.bus.clone(), config.clone()));
    let b = spawn_relay(Relay::new(db.pool.clone(), bus.bus.clone(), config));
    let (a_stats, b_stats) = (a.stats.clone(), b.stats.clone());

    // Sample the flags throughout: A, B, A again, so a hand-over between two reads is not
    // mistaken for both being active.
    let (stop_sampling, mut sampling_stopped) = oneshot::channel::<()>();
    let sampler = tokio::spawn(async move {
        let mut samples = 0u64;
        let mut seen_active = [false, false];
        loop {
            let a1 = a_stats.active.load(Ordering::SeqCst);
            let b1 = b_stats.active.load(Ordering::SeqCst);
            let a2 = a_stats.active.load(Ordering::SeqCst);
            assert!(!(a1 && b1 && a2), "both relays active at once");
            seen_active[0] |= a1;
            seen_active[1] |= b1;
            samples += 1;
            if sampling_stopped.try_recv().is_ok() {
                return (samples, seen_active);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });

    let writers = WRITERS.spawn(writers_pool.clone());
    let first_active = eventually(
        "one relay to become active",
        Duration::from_secs(10),
        || {
            let (a, b) = (a.stats.clone(), b.stats.clone());
            async move {
                match (
                    a.active.load(Ordering::SeqCst),
                    b.active.load(Ordering::SeqCst),
                ) {
                    (true, _) => Some('a'),
                    (_, true) => Some('b'),
                    _ => None,
                }
            }
        },
    )
    .await;
    let bus_ref = &bus.bus;
    eventually(
        "some events on the stream",
        Duration::from_secs(20),
        || async move { (bus_ref.stream_state().await.unwrap().messages >= 200).then_some(()) },
    )
    .await;

    // Stop the active one gracefully while writers still write; the standby must take over.
    let (stopped, standby) = if first_active == 'a' { (a, b) } else { (b, a) };
    assert!(!standby.stats.active.load(Ordering::SeqCst));
    stopped.shutdown().await;
    eventually("the standby to take over", Duration::from_secs(10), || {
        let s = standby.stats.clone();
        async move { s.active.load(Ordering::SeqCst).then_some(()) }
    })
    .await;

    join_all(writers).await;
    let total = event_count(&db.pool).await;
    wait_for_stream(&bus, total, Duration::from_secs(30)).await;
    assert_stream_matches_log(&bus, &db.pool).await;
    standby.shutdown().await;
    let _ = stop_sampling.send(());
    let (samples, seen_active) = sampler.await.unwrap();
    assert_eq!(
        seen_active,
        [true, true],
        "each relay was active at some point"
    );
    eprintln!("single active relay: {samples} samples of the active flags, never both");
    writers_pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stream_keeps_log_order_when_another_publisher_interleaves() {
    let db = TestDb::create().await.unwrap();
    let bus = TestBus::new().await;
    let writers_pool = writer_pool(&db.url).await;
    let relay = spawn_relay(Relay::new(
        db.pool.clone(),
        bus.bus.clone(),
        RelayConfig {
            batch_size: 200,
            ..RelayConfig::default()
        },
    ));

    // Messages without a message id break the relay's publish chain wherever they land.
    let (stop_foreign, mut foreign_stopped) = oneshot::channel::<()>();
    let foreign = {
        let js = async_nats::jetstream::new(bus.client().clone());
        let subject = format!("{}.0.foreign.Interloped", bus.config().subject_prefix);
        tokio::spawn(async move {
            let body = serde_json::to_vec(&rookery_events::RecordedEvent {
                position: rookery_events::LogPosition::ZERO,
                aggregate_type: "foreign".to_string(),
                aggregate_id: "x".to_string(),
                sequence: 1,
                event_type: "Interloped".to_string(),
                event_version: "1.0".to_string(),
                payload: serde_json::json!({}),
                metadata: serde_json::json!({}),
            })
            .unwrap();
            let mut sent = 0u64;
            while foreign_stopped.try_recv().is_err() {
                js.publish(subject.clone(), body.clone().into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                sent += 1;
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            sent
        })
    };
    let writers = Writers {
        tasks: 4,
        aggregates_per_task: 5,
        events_per_aggregate: 40,
        max_pause_ms: 2,
    };
    join_all(writers.spawn(writers_pool.clone())).await;
    let total = event_count(&db.pool).await;
    let bus_ref = &bus.bus;
    let stats = relay.stats.clone();
    eventually("the relay to catch up", Duration::from_secs(30), || {
        let stats = stats.clone();
        async move { (stats.relayed_total.load(Ordering::Relaxed) >= total).then_some(()) }
    })
    .await;
    let _ = stop_foreign.send(());
    let foreign_sent = foreign.await.unwrap();
    wait_for_stream(bus_ref, total + foreign_sent, Duration::from_secs(10)).await;

    let messages = bus.fetch_all(Duration::from_secs(30)).await.unwrap();
    let ours: Vec<_> = messages
        .iter()
        .filter(|(_, e, _)| e.aggregate_type == "test")
        .collect();
    assert_eq!(ours.len() as u64, total);
    for pair in ours.windows(2) {
        assert!(
            pair[0].1.position < pair[1].1.position,
            "stream seq {} ({}) before {} ({})",
            pair[0].0,
            pair[0].1.position,
            pair[1].0,
            pair[1].1.position
        );
    }
    let interleaved = ours.windows(2).filter(|p| p[1].0 != p[0].0 + 1).count();
    assert!(
        interleaved > 0,
        "the foreign publisher must have landed between relayed messages"
    );
    let broken = relay.stats.failed_batches.load(Ordering::Relaxed);
    relay.shutdown().await;
    eprintln!(
        "interleaving: {total} events in log order among {foreign_sent} foreign messages; \
         {interleaved} interleavings, {broken} batches cut short and resumed"
    );
    writers_pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_relay_lock_reports_itself_held() {
    let db = rookery_store::testing::TestDb::create()
        .await
        .expect("test database");
    let mut lock = rookery_store::relay::RelayLock::try_acquire(&db.pool, "held")
        .await
        .expect("lock query")
        .expect("lock free");
    // A false "lost" here makes the active relay give up its lock every second.
    assert!(lock.is_held().await);
    assert!(
        rookery_store::relay::RelayLock::try_acquire(&db.pool, "held")
            .await
            .expect("lock query")
            .is_none()
    );
    lock.release("held").await;
}

/// The relay stores its cursor behind the acks, so a crash can leave it anywhere before what
/// the stream holds, also in the middle of a batch. The next relay re-publishes from there: the
/// stream takes the repeats as duplicates, and the first new event, chained to the last
/// duplicate, matches the stream's last message id, so nothing is refused or stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cursor_left_behind_the_acks_re_publishes_as_duplicates_and_the_chain_holds() {
    let db = TestDb::create().await.unwrap();
    let bus = TestBus::new().await;
    let aggregates: Vec<String> = (0..3).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    for id in &aggregates {
        append(&db.pool, id, 1, 10).await;
    }
    let first = read_all(&db.pool, 30).await;
    let config = RelayConfig {
        batch_size: 10,
        ..RelayConfig::default()
    };
    let relay = Relay::new(db.pool.clone(), bus.bus.clone(), config.clone());
    while relay.relay_once().await.unwrap() > 0 {}
    wait_for_stream(&bus, 30, Duration::from_secs(10)).await;

    // As if the relay died after the acks for all 30 but before saving past the 13th.
    let stream = bus.config().stream.clone();
    rookery_store::relay::reset_cursor(&db.pool, &stream, first[12].event.position)
        .await
        .unwrap();
    for id in &aggregates {
        append(&db.pool, id, 11, 5).await;
    }
    append(&db.pool, &uuid::Uuid::new_v4().to_string(), 1, 5).await;
    wait_committed(&db.pool, 50).await;

    let relay = spawn_relay(Relay::new(db.pool.clone(), bus.bus.clone(), config));
    wait_for_stream(&bus, 50, Duration::from_secs(30)).await;
    let stats = relay.stats.clone();
    eventually(
        "the relay to confirm 37 events",
        Duration::from_secs(10),
        || {
            let stats = stats.clone();
            async move { (stats.relayed_total.load(Ordering::Relaxed) >= 37).then_some(()) }
        },
    )
    .await;
    assert_eq!(relay.stats.relayed_total.load(Ordering::Relaxed), 37);
    assert_eq!(relay.stats.published_total.load(Ordering::Relaxed), 20);
    assert_eq!(
        relay.stats.failed_batches.load(Ordering::Relaxed),
        0,
        "a re-published duplicate must not break the chain"
    );
    relay.shutdown().await;
    assert_stream_matches_log(&bus, &db.pool).await;
}

/// Killed at many arbitrary instants (mid-read, mid-window, mid-save), each successor finds a
/// cursor at or behind what the stream holds, and the stream ends up holding the log exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_killed_again_and_again_loses_and_duplicates_nothing() {
    let db = TestDb::create().await.unwrap();
    let bus = TestBus::new().await;
    let writers_pool = writer_pool(&db.url).await;
    let writers = WRITERS.spawn(writers_pool.clone());
    let config = RelayConfig {
        batch_size: 50,
        ..RelayConfig::default()
    };
    let mut kills = 0;
    for step in 1..=6u64 {
        let pool = writer_pool(&db.url).await;
        let relay = spawn_relay(Relay::new(pool.clone(), bus.bus.clone(), config.clone()));
        let (bus_ref, pool_ref, writers_ref) = (&bus.bus, &db.pool, &writers);
        let stats = relay.stats.clone();
        // Let each one get a little further than the last before killing it, unless it has
        // already caught up with finished writers.
        eventually(
            "the relay to make progress",
            Duration::from_secs(30),
            || {
                let stats = stats.clone();
                async move {
                    let confirmed = stats.relayed_total.load(Ordering::Relaxed);
                    if confirmed >= step * 25 {
                        return Some(());
                    }
                    let done = writers_ref.iter().all(|w| w.is_finished());
                    let messages = bus_ref.stream_state().await.unwrap().messages;
                    (done && messages == event_count(pool_ref).await).then_some(())
                }
            },
        )
        .await;
        relay.handle.abort();
        assert!(relay.handle.await.unwrap_err().is_cancelled());
        pool.close().await;
        kills += 1;
    }
    join_all(writers).await;
    let total = event_count(&db.pool).await;
    let last = spawn_relay(Relay::new(db.pool.clone(), bus.bus.clone(), config));
    wait_for_stream(&bus, total, Duration::from_secs(30)).await;
    assert_stream_matches_log(&bus, &db.pool).await;
    last.shutdown().await;
    eprintln!("repeated kills: {kills} relays aborted mid-run; {total} events, each once");
    writers_pool.close().await;
}

/// A relay that stops gracefully stores the cursor of everything it had confirmed, so its
/// successor starts there instead of re-publishing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_relay_leaves_its_cursor_at_what_it_confirmed() {
    let db = TestDb::create().await.unwrap();
    let bus = TestBus::new().await;
    for _ in 0..4 {
        append(&db.pool, &uuid::Uuid::new_v4().to_string(), 1, 5).await;
    }
    wait_committed(&db.pool, 20).await;
    let head = rookery_store::log::committed_head(&db.pool)
        .await
        .unwrap()
        .unwrap();
    let relay = spawn_relay(Relay::new(
        db.pool.clone(),
        bus.bus.clone(),
        RelayConfig {
            batch_size: 7,
            ..RelayConfig::default()
        },
    ));
    let stats = relay.stats.clone();
    eventually("all 20 confirmed", Duration::from_secs(10), || {
        let stats = stats.clone();
        async move { (stats.relayed_total.load(Ordering::Relaxed) == 20).then_some(()) }
    })
    .await;
    relay.shutdown().await;
    let stored = rookery_store::relay::load_cursor(&db.pool, &bus.config().stream)
        .await
        .unwrap();
    assert_eq!(stored, head);
}

/// `relay_once` moves one batch from the stored cursor. It reads the following batch ahead, but
/// a cursor moved in between (an operator re-seeding the bus) wins over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_once_moves_one_batch_from_the_stored_cursor_not_its_read_ahead() {
    let db = TestDb::create().await.unwrap();
    let bus = TestBus::new().await;
    for _ in 0..5 {
        append(&db.pool, &uuid::Uuid::new_v4().to_string(), 1, 3).await;
    }
    wait_committed(&db.pool, 15).await;
    let relay = Relay::new(
        db.pool.clone(),
        bus.bus.clone(),
        RelayConfig {
            batch_size: 10,
            ..RelayConfig::default()
        },
    );
    assert_eq!(relay.relay_once().await.unwrap(), 10);
    let stream = bus.config().stream.clone();
    rookery_store::relay::reset_cursor(&db.pool, &stream, rookery_events::LogPosition::ZERO)
        .await
        .unwrap();
    assert_eq!(relay.relay_once().await.unwrap(), 10);
    assert_eq!(relay.relay_once().await.unwrap(), 5);
    assert_eq!(relay.relay_once().await.unwrap(), 0);
    assert_eq!(relay.stats().published_total.load(Ordering::Relaxed), 15);
    assert_stream_matches_log(&bus, &db.pool).await;
}

/// The cursor only ever moves over confirmed events, however far the reader got: an event the
/// stream refuses (here, one over the server's payload limit) stops the relay right before it,
/// retrying visibly, with the cursor and the stream both ending at the event before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cursor_never_passes_an_event_the_stream_did_not_confirm() {
    let db = TestDb::create().await.unwrap();
    let bus = TestBus::new().await;
    append(&db.pool, &uuid::Uuid::new_v4().to_string(), 1, 30).await;
    let too_big = bus.client().server_info().max_payload + 1024;
    sqlx::query(
        "INSERT INTO events
             (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('test', $1, 1, 'TestHappened', '1.0',
                 jsonb_build_object('TestHappened', jsonb_build_object('blob', repeat('x', $2))),
                 '{}')",
    )
    .bind(uuid::Uuid::new_v4().to_string())
    .bind(i32::try_from(too_big).unwrap())
    .execute(&db.pool)
    .await
    .unwrap();
    append(&db.pool, &uuid::Uuid::new_v4().to_string(), 1, 10).await;
    let log = read_all(&db.pool, 41).await;
    let before_refused = log[29].event.position;

    let relay = spawn_relay(Relay::new(
        db.pool.clone(),
        bus.bus.clone(),
        RelayConfig {
            batch_size: 100,
            ..RelayConfig::default()
        },
    ));
    let stats = relay.stats.clone();
    eventually("the relay to retry", Duration::from_secs(20), || {
        let stats = stats.clone();
        async move { (stats.failed_batches.load(Ordering::Relaxed) >= 2).then_some(()) }
    })
    .await;
    let (pool, stream) = (&db.pool, bus.config().stream.clone());
    let stream = stream.as_str();
    eventually("the cursor saved", Duration::from_secs(10), || async move {
        let cursor = rookery_store::relay::load_cursor(pool, stream)
            .await
            .unwrap();
        (cursor == before_refused).then_some(())
    })
    .await;
    assert_eq!(bus.stream_state().await.unwrap().messages, 30);
    assert_eq!(relay.stats.relayed_total.load(Ordering::Relaxed), 30);
    relay.shutdown().await;
    let cursor = rookery_store::relay::load_cursor(&db.pool, stream)
        .await
        .unwrap();
    assert_eq!(cursor, before_refused);
}

/// A relay kept busy by one commit after another saves its cursor at most once per
/// `min_save_interval`, not after every read, and still ends with the cursor at the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_relay_saves_its_cursor_at_most_once_per_interval() {
    let db = TestDb::create().await.unwrap();
    let bus = TestBus::new().await;
    let every = Duration::from_millis(300);
    let relay = spawn_relay(Relay::new(
        db.pool.clone(),
        bus.bus.clone(),
        RelayConfig {
            min_read_interval: Duration::ZERO,
            min_save_interval: every,
            ..RelayConfig::default()
        },
    ));
    let stats = relay.stats.clone();
    let started = Instant::now();
    for _ in 0..30 {
        append(&db.pool, &uuid::Uuid::new_v4().to_string(), 1, 1).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Once all 30 are readable, the committed head is the last of them (a parallel test's open
    // transaction can hold the server-wide horizon back for a moment).
    wait_committed(&db.pool, 30).await;
    let head = rookery_store::log::committed_head(&db.pool)
        .await
        .unwrap()
        .unwrap();
    wait_for_saved_cursor(&stats, head).await;
    let elapsed = started.elapsed();
    let saves = stats.cursor_saves_total.load(Ordering::Relaxed);
    // One right away, then at most one per interval.
    let allowed = 1 + (elapsed.as_millis() / every.as_millis()) as u64;
    assert!(
        saves <= allowed,
        "{saves} cursor saves in {elapsed:?} (at most {allowed})"
    );
    assert_eq!(stats.relayed_total.load(Ordering::Relaxed), 30);
    relay.shutdown().await;
}
