use crate::helpers::*;
use rookery_nats::{headers, Bus, BusConfig};
use rookery_store::testing::TestDb;
use std::time::{Duration, Instant};

async fn duplicate_window_of(bus: &Bus) -> Duration {
    let js = async_nats::jetstream::new(bus.client().clone());
    let stream = js.get_stream(&bus.config().stream).await.unwrap();
    stream.cached_info().config.duplicate_window
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_creation_is_idempotent_and_updates_a_changed_duplicate_window() {
    let db = TestDb::create().await.unwrap();
    let mut config = unique_config();
    let _guard = StreamGuard::new(&config);

    let first = Bus::connect(config.clone()).await.unwrap();
    assert_eq!(
        duplicate_window_of(&first).await,
        BusConfig::DEFAULT_DUPLICATE_WINDOW
    );
    append(&db.pool, &uuid::Uuid::new_v4().to_string(), 1, 3).await;
    let entries = read_all(&db.pool, 3).await;
    assert_eq!(first.publish_batch(&entries).await.unwrap(), 3);

    // Same definition again: nothing changes, nothing is lost.
    let second = Bus::connect(config.clone()).await.unwrap();
    assert_eq!(
        duplicate_window_of(&second).await,
        BusConfig::DEFAULT_DUPLICATE_WINDOW
    );
    assert_eq!(second.stream_state().await.unwrap().messages, 3);

    // A changed window is applied in place, keeping the messages.
    config.duplicate_window = Duration::from_secs(10 * 60);
    let third = Bus::connect(config.clone()).await.unwrap();
    assert_eq!(duplicate_window_of(&third).await, Duration::from_secs(600));
    let state = third.stream_state().await.unwrap();
    assert_eq!((state.messages, state.first_seq, state.last_seq), (3, 1, 3));
    assert!(third.is_connected());
    assert!(
        third.server_version().starts_with('2'),
        "{}",
        third.server_version()
    );

    third.delete_stream().await.unwrap();
    // Absent is fine.
    third.delete_stream().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_server_fails_fast_naming_the_url() {
    let config = BusConfig::new("nats://127.0.0.1:1", "rookery_unreachable", "unreachable");
    let started = Instant::now();
    let err = Bus::connect(config)
        .await
        .err()
        .expect("connecting to a closed port must fail");
    let message = format!("{err:#}");
    assert!(message.contains("nats://127.0.0.1:1"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_batch_dedupes_by_message_id() {
    let db = TestDb::create().await.unwrap();
    let bus = TestBus::new().await;
    for _ in 0..10 {
        append(&db.pool, &uuid::Uuid::new_v4().to_string(), 1, 5).await;
    }
    let entries = read_all(&db.pool, 50).await;

    assert_eq!(bus.publish_batch(&entries).await.unwrap(), 50);
    // The relay re-publishing after a crash: every message is a duplicate.
    assert_eq!(bus.publish_batch(&entries).await.unwrap(), 0);
    // Overlapping batches store only what is new.
    append(&db.pool, &uuid::Uuid::new_v4().to_string(), 1, 2).await;
    let more = read_all(&db.pool, 52).await;
    assert_eq!(bus.publish_batch(&more[40..]).await.unwrap(), 2);

    let messages = bus.fetch_all(Duration::from_secs(10)).await.unwrap();
    assert_eq!(messages.len(), 52);
    for ((seq, event, hdrs), entry) in messages.iter().zip(&more) {
        assert_eq!(event, &entry.event, "stream seq {seq}");
        assert_eq!(
            hdrs.get(headers::MSG_ID).unwrap().as_str(),
            entry.event.message_id()
        );
        assert_eq!(
            hdrs.get(headers::SEQUENCE).unwrap().as_str(),
            entry.event.sequence.to_string()
        );
        assert_eq!(
            hdrs.get(headers::AGGREGATE_ID).unwrap().as_str(),
            entry.event.aggregate_id
        );
        assert_eq!(
            hdrs.get(headers::EVENT_TYPE).unwrap().as_str(),
            "TestHappened"
        );
    }
    assert_stream_matches_log(&bus, &db.pool).await;

    let subject = bus.subject_for(&more[0]);
    let partition = more[0].partition(bus.config().partitions);
    assert_eq!(
        subject,
        format!(
            "{}.{partition}.test.TestHappened",
            bus.config().subject_prefix
        )
    );
}

/// The relay chains each publish to the previous one with `Nats-Expected-Last-Msg-Id`. That is
/// only safe to retry because the server answers a re-sent message as a duplicate before it
/// checks the expectation, and because a duplicate does not move the "last message id".
#[tokio::test]
async fn the_server_checks_duplicates_before_the_expected_last_message_id() {
    use async_nats::jetstream::context::PublishErrorKind;
    use async_nats::jetstream::message::PublishMessage;
    let bus = TestBus::new().await;
    let js = async_nats::jetstream::new(bus.client().clone());
    let subject = format!("{}.0.test.Chained", bus.config().subject_prefix);
    let send = |id: &'static str, expect: Option<&'static str>| {
        let (js, subject) = (js.clone(), subject.clone());
        async move {
            let mut p = PublishMessage::build().payload("x".into()).message_id(id);
            if let Some(e) = expect {
                p = p.expected_last_message_id(e);
            }
            js.send_publish(subject, p).await.unwrap().await
        }
    };
    assert!(!send("a", None).await.unwrap().duplicate);
    assert!(!send("b", Some("a")).await.unwrap().duplicate);
    assert!(!send("c", Some("b")).await.unwrap().duplicate);
    // A retry of the chain: duplicates, although the expectations no longer hold.
    assert!(send("a", None).await.unwrap().duplicate);
    assert!(send("b", Some("a")).await.unwrap().duplicate);
    // The chain continues from the last stored message, not from the last duplicate.
    let err = send("d", Some("b")).await.unwrap_err();
    assert_eq!(err.kind(), PublishErrorKind::WrongLastMessageId);
    assert!(!send("d", Some("c")).await.unwrap().duplicate);
    assert_eq!(bus.stream_state().await.unwrap().messages, 4);
}
