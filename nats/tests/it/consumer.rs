use crate::helpers::*;
use futures::StreamExt;
use rookery_nats::{ack_all, Delivery, PartitionConsumer};
use rookery_store::testing::TestDb;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Fetches until `expected` deliveries arrived.
async fn fetch_n(consumer: &mut PartitionConsumer, expected: usize) -> Vec<Delivery> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    while out.len() < expected {
        assert!(
            Instant::now() < deadline,
            "got {} of {expected} deliveries",
            out.len()
        );
        out.extend(
            consumer
                .fetch(expected - out.len(), Duration::from_millis(500))
                .await
                .unwrap(),
        );
    }
    out
}

/// Unacked messages come back after `ack_wait` (1 s on [`short_ack_wait_bus`]); acked ones never
/// do.
async fn assert_nothing_redelivered(consumer: &mut PartitionConsumer, after: &str) {
    let redelivered = consumer
        .fetch(100, Duration::from_millis(1500))
        .await
        .unwrap();
    assert!(
        redelivered.is_empty(),
        "redelivered after {after}: {redelivered:?}"
    );
}

/// A bus whose unacked deliveries come back after one second, so a test can see what was not
/// acked.
async fn short_ack_wait_bus(partitions: u32) -> TestBus {
    TestBus::with(|c| {
        c.partitions = partitions;
        c.ack_wait = Duration::from_secs(1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_consumer_delivers_in_order_acks_and_restarts_after_a_checkpoint() {
    let db = TestDb::create().await.unwrap();
    let bus = short_ack_wait_bus(2).await;
    // Interleave aggregates across transactions so each partition's messages mix aggregates.
    let ids: Vec<String> = (0..12).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    for round in 0..4 {
        for id in &ids {
            append(&db.pool, id, round * 2 + 1, 2).await;
        }
    }
    let entries = read_all(&db.pool, 96).await;
    assert_eq!(bus.publish_batch(&entries).await.unwrap(), 96);

    // The partition with more messages, and its stream sequences in order.
    let all = bus.fetch_all(Duration::from_secs(10)).await.unwrap();
    let mut by_partition: HashMap<u32, Vec<u64>> = HashMap::new();
    for ((seq, _, _), entry) in all.iter().zip(&entries) {
        by_partition
            .entry(entry.partition(2))
            .or_default()
            .push(*seq);
    }
    let (partition, seqs) = by_partition
        .into_iter()
        .max_by_key(|(_, s)| s.len())
        .unwrap();
    assert!(
        seqs.len() >= 16,
        "partition {partition} has only {} messages",
        seqs.len()
    );

    let mut consumer = bus
        .partition_consumer("proj_test", partition, 0)
        .await
        .unwrap();
    assert_eq!(consumer.partition(), partition);
    assert_eq!(consumer.num_pending().await.unwrap(), seqs.len() as u64);
    let started = Instant::now();
    let first = consumer.fetch(1000, Duration::from_secs(5)).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "fetch returns as soon as messages are there, took {:?}",
        started.elapsed()
    );
    let mut deliveries = first;
    let rest = seqs.len() - deliveries.len();
    deliveries.extend(fetch_n(&mut consumer, rest).await);

    let got: Vec<u64> = deliveries.iter().map(|d| d.stream_seq).collect();
    assert_eq!(got, seqs, "deliveries in stream order");
    let mut last: HashMap<String, i64> = HashMap::new();
    let prefix = format!("{}.{partition}.", bus.config().subject_prefix);
    for d in &deliveries {
        assert_eq!((d.partition, d.delivered), (partition, 1));
        assert!(d.subject().starts_with(&prefix), "{}", d.subject());
        assert!(d.recorded_at().is_some());
        let event = d.event.as_ref().unwrap();
        let previous = last
            .insert(event.aggregate_id.clone(), event.sequence)
            .unwrap_or(0);
        assert_eq!(event.sequence, previous + 1);
    }

    ack_all(bus.client(), &deliveries).await.unwrap();
    assert_eq!(consumer.num_pending().await.unwrap(), 0);
    assert_nothing_redelivered(&mut consumer, "ack_all").await;

    // A restart at a checkpoint skips everything up to it, and leaves nothing unacked behind.
    let checkpoint = seqs[9];
    drop(consumer);
    let mut consumer = bus
        .partition_consumer("proj_test", partition, checkpoint)
        .await
        .unwrap();
    assert_eq!(
        consumer.num_pending().await.unwrap(),
        (seqs.len() - 10) as u64
    );
    let again = fetch_n(&mut consumer, seqs.len() - 10).await;
    assert_eq!(
        again.iter().map(|d| d.stream_seq).collect::<Vec<_>>(),
        seqs[10..].to_vec()
    );
    for d in &again {
        d.ack().await.unwrap();
    }
    assert!(consumer
        .fetch(10, Duration::from_millis(100))
        .await
        .unwrap()
        .is_empty());

    let name = consumer.name().to_string();
    bus.delete_consumer(&name).await.unwrap();
    bus.delete_consumer(&name).await.unwrap();
    assert!(
        bus.partition_consumer("proj_test", 2, 0).await.is_err(),
        "partition out of range"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_wakes_for_a_new_message_and_surfaces_poison() {
    let db = TestDb::create().await.unwrap();
    let bus = TestBus::with(|c| c.partitions = 1).await;
    let mut consumer = bus.partition_consumer("waiter", 0, 0).await.unwrap();

    let started = Instant::now();
    assert!(consumer
        .fetch(10, Duration::from_millis(200))
        .await
        .unwrap()
        .is_empty());
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(150), "{waited:?}");

    let publisher = {
        let bus = bus.bus.clone();
        let pool = db.pool.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            append(&pool, &uuid::Uuid::new_v4().to_string(), 1, 1).await;
            bus.publish_batch(&read_all(&pool, 1).await).await.unwrap();
        })
    };
    let started = Instant::now();
    let got = consumer.fetch(10, Duration::from_secs(10)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    publisher.await.unwrap();
    got[0].ack().await.unwrap();

    // A body that is not an event is delivered as an error, not dropped.
    let js = async_nats::jetstream::new(bus.client().clone());
    let subject = format!("{}.0.test.Garbage", bus.config().subject_prefix);
    js.publish(subject, "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let poison = consumer.fetch(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(poison.len(), 1);
    assert_eq!(poison[0].stream_seq, 2);
    let err = poison[0].event.as_ref().unwrap_err();
    assert!(err.contains("undecodable"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_acked_with_one_message_and_stays_acked() {
    let db = TestDb::create().await.unwrap();
    let bus = short_ack_wait_bus(1).await;
    let id = uuid::Uuid::new_v4().to_string();
    append(&db.pool, &id, 1, 20).await;
    assert_eq!(
        bus.publish_batch(&read_all(&db.pool, 20).await)
            .await
            .unwrap(),
        20
    );

    // Every ack to this stream's consumers, as the server receives it.
    let watcher = async_nats::connect(nats_url()).await.unwrap();
    let mut acks = watcher
        .subscribe(format!("$JS.ACK.{}.>", bus.config().stream))
        .await
        .unwrap();
    watcher.flush().await.unwrap();

    let mut consumer = bus.partition_consumer("one_ack", 0, 0).await.unwrap();
    let deliveries = fetch_n(&mut consumer, 20).await;
    ack_all(bus.client(), &deliveries).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), acks.next())
        .await
        .expect("the ack reaches the server")
        .unwrap();
    assert_eq!(&first.payload[..], b"+ACK");
    let last_reply = deliveries[19].reply_subject().unwrap();
    assert_eq!(
        first.subject.as_str(),
        last_reply,
        "the last delivery is acked"
    );
    // No second ack follows, and none was needed.
    assert_nothing_redelivered(&mut consumer, "one ack").await;
    assert!(
        tokio::time::timeout(Duration::from_millis(100), acks.next())
            .await
            .is_err(),
        "one ack for the whole batch"
    );
}

/// A one-partition bus whose stream holds three events of one aggregate.
async fn one_partition_with_three_events() -> (TestDb, TestBus) {
    let db = TestDb::create().await.unwrap();
    let bus = TestBus::with(|c| c.partitions = 1).await;
    append(&db.pool, &uuid::Uuid::new_v4().to_string(), 1, 3).await;
    bus.publish_batch(&read_all(&db.pool, 3).await)
        .await
        .unwrap();
    (db, bus)
}

/// The names of the stream's consumers.
async fn consumer_names(bus: &TestBus) -> Vec<String> {
    let js = async_nats::jetstream::new(bus.client().clone());
    let mut names: Vec<String> = js
        .get_stream(&bus.config().stream)
        .await
        .unwrap()
        .consumer_names()
        .map(|n| n.unwrap())
        .collect()
        .await;
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_recreation_is_a_new_consumer_and_replaces_the_earlier_ones() {
    let (_db, bus) = one_partition_with_three_events().await;
    // A consumer under the bare name, as releases before generations created it, and one of
    // another projection whose name extends this one's.
    let js = async_nats::jetstream::new(bus.client().clone());
    for name in ["gen_p0", "gen_p0_other"] {
        js.create_consumer_on_stream(
            async_nats::jetstream::consumer::pull::Config {
                durable_name: Some(name.into()),
                ..Default::default()
            },
            &bus.config().stream,
        )
        .await
        .unwrap();
    }

    let mut first = bus.partition_consumer("gen_p0", 0, 0).await.unwrap();
    let first_name = first.name().to_string();
    assert!(first_name.starts_with("gen_p0-"), "{first_name}");
    assert_eq!(
        consumer_names(&bus).await,
        [first_name.clone(), "gen_p0_other".into()]
    );
    assert_eq!(fetch_n(&mut first, 3).await.len(), 3);
    drop(first);

    let mut second = bus.partition_consumer("gen_p0", 0, 1).await.unwrap();
    assert_ne!(second.name(), first_name);
    assert_eq!(
        consumer_names(&bus).await,
        [second.name().to_string(), "gen_p0_other".into()]
    );
    let again = fetch_n(&mut second, 2).await;
    assert_eq!(
        again.iter().map(|d| d.stream_seq).collect::<Vec<_>>(),
        [2, 3]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_taken_by_another_pull_fails_the_fetch() {
    let (_db, bus) = one_partition_with_three_events().await;
    let mut consumer = bus.partition_consumer("thief", 0, 0).await.unwrap();

    // A pull request from elsewhere (a dropped subscription's late one, say) takes the first
    // message before this consumer's subscription asks.
    let other = async_nats::connect(nats_url()).await.unwrap();
    let inbox = other.new_inbox();
    let mut taken = other.subscribe(inbox.clone()).await.unwrap();
    other
        .publish_with_reply(
            format!(
                "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
                bus.config().stream,
                consumer.name()
            ),
            inbox,
            r#"{"batch":1}"#.into(),
        )
        .await
        .unwrap();
    let stolen = tokio::time::timeout(Duration::from_secs(5), taken.next())
        .await
        .expect("the other pull gets a message")
        .unwrap();
    assert!(stolen
        .subject
        .as_str()
        .starts_with(bus.config().subject_prefix.as_str()));

    let err = consumer
        .fetch(10, Duration::from_secs(5))
        .await
        .expect_err("the skipped delivery is noticed");
    assert!(format!("{err:#}").contains("went missing"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_only_once_every_delivery_was_fetched() {
    let db = TestDb::create().await.unwrap();
    let bus = TestBus::with(|c| c.partitions = 1).await;
    let mut consumer = bus.partition_consumer("drain", 0, 0).await.unwrap();
    assert!(consumer
        .fetch(10, Duration::from_millis(100))
        .await
        .unwrap()
        .is_empty());
    assert!(consumer.drained().await.unwrap(), "nothing on the stream");

    append(&db.pool, &uuid::Uuid::new_v4().to_string(), 1, 1).await;
    bus.publish_batch(&read_all(&db.pool, 1).await)
        .await
        .unwrap();
    // Stored, so once nothing is pending the server has delivered it: it waits here, unfetched.
    let deadline = Instant::now() + Duration::from_secs(5);
    while consumer.num_pending().await.unwrap() > 0 {
        assert!(Instant::now() < deadline, "the message was never delivered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !consumer.drained().await.unwrap(),
        "a delivered message not yet fetched"
    );
    assert_eq!(fetch_n(&mut consumer, 1).await.len(), 1);
    assert!(consumer.drained().await.unwrap());
}
