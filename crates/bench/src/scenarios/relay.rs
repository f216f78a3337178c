use anyhow::Context as _;
use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use rookery_nats::{headers, subject_token, Bus, BusConfig, Relay, RelayConfig};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

use super::cpu::Cpu;
use super::{RAW_PUBLISH_WINDOW, RELAY_TARGET};
use crate::env::Env;
use crate::report::{Figure, Progress};
use crate::stats::{self};
use crate::Plan;

// ---- relay ----

/// Relays N freshly stored events to a stream of their own with `Relay::relay_once` batches,
/// against raw pipelined publishes of the same messages (payloads, subjects, headers, a unique
/// message id each) to a scratch stream defined the same way. Half the raw publishes run before
/// the relay and half after.
pub(super) async fn relay(
    env: &mut Env,
    plan: &Plan,
    progress: &Progress,
) -> anyhow::Result<Vec<Figure>> {
    let n = plan.relay_events;
    let nats = env.config.nats_url.clone();
    let partitions = env.config.partitions;
    let stream = format!("rookery_bench_{}_relay", env.id);
    let raw_stream = format!("rookery_bench_{}_raw", env.id);
    env.track_stream(stream.clone());
    env.track_stream(raw_stream.clone());
    let mut config = BusConfig::new(&nats, &stream, format!("rookerybench{}relay", env.id));
    config.partitions = partitions;
    let bus = Bus::connect(config).await?;
    let raw_prefix = format!("rookerybench{}raw", env.id);
    let mut raw_config = BusConfig::new(&nats, &raw_stream, &raw_prefix);
    raw_config.partitions = partitions;
    let raw_bus = Bus::connect(raw_config).await?;

    // The relay starts at the current head, so it relays exactly the events stored next.
    let head = env.committed_head().await?;
    rookery_store::relay::reset_cursor(&env.pool, &stream, head).await?;
    let have = u64::try_from(env.event_count().await?).unwrap_or(0);
    env.fill_log(have + n, progress).await?;

    let sample = rookery_store::log::read_committed(&env.pool, head, 1000).await?;
    if sample.is_empty() {
        anyhow::bail!("no events to relay");
    }
    let messages: Vec<(String, HeaderMap, Bytes)> = sample
        .iter()
        .map(|entry| {
            let e = &entry.event;
            let subject = format!(
                "{raw_prefix}.{}.{}.{}",
                entry.partition(partitions),
                subject_token(&e.aggregate_type),
                subject_token(&e.event_type)
            );
            let mut h = HeaderMap::new();
            h.insert(headers::POSITION, e.position.to_string().as_str());
            h.insert(headers::AGGREGATE_TYPE, e.aggregate_type.as_str());
            h.insert(headers::AGGREGATE_ID, e.aggregate_id.as_str());
            h.insert(headers::SEQUENCE, e.sequence.to_string().as_str());
            h.insert(headers::EVENT_TYPE, e.event_type.as_str());
            h.insert(
                headers::RECORDED_AT,
                entry
                    .recorded_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                    .as_str(),
            );
            let payload = serde_json::to_vec(e).map(Bytes::from)?;
            Ok((subject, h, payload))
        })
        .collect::<anyhow::Result<_>>()?;
    let avg_bytes = messages.iter().map(|m| m.2.len()).sum::<usize>() / messages.len();
    let js = jetstream::new(raw_bus.client().clone());

    progress.status(&format!("relay: raw publishes (limit), {} messages", n / 2));
    let raw1 = raw_publish(&js, &messages, n / 2, 0).await?;

    progress.status(&format!("relay: relaying {n} events Postgres → JetStream"));
    let relay = Relay::new(env.pool.clone(), bus.clone(), RelayConfig::default());
    let cpu_before = Cpu::now();
    let started = Instant::now();
    let mut relayed = 0u64;
    loop {
        let batch = relay.relay_once().await?;
        if batch == 0 {
            break;
        }
        relayed += batch;
        progress.tick(&format!(
            "relay: {relayed}/{n} events ({:.0}/s)",
            stats::rate(relayed, started.elapsed())
        ));
    }
    let relay_elapsed = started.elapsed();
    let cpu = cpu_before
        .zip(Cpu::now())
        .map(|(a, b)| b.minus(&a).describe(relayed, 1000))
        .unwrap_or_default();

    progress.status(&format!(
        "relay: raw publishes (limit), {} messages",
        n - n / 2
    ));
    let raw2 = raw_publish(&js, &messages, n - n / 2, n / 2).await?;
    let raw_rate = stats::rate(n, raw1 + raw2);
    // The Postgres share of the relay: reading the same events in the same batches, alone.
    let read_started = Instant::now();
    let mut cursor = head;
    loop {
        let batch = rookery_store::log::read_committed(
            &env.pool,
            cursor,
            RelayConfig::default().batch_size,
        )
        .await?;
        match batch.last() {
            Some(last) => cursor = last.event.position,
            None => break,
        }
    }
    let read_elapsed = read_started.elapsed();
    let stored = bus.stream_state().await?.messages;

    let mut f = Figure::new(
        "relay",
        stats::rate(relayed, relay_elapsed),
        "events/s",
        Some(raw_rate),
        RELAY_TARGET,
    )
    .with_note(format!(
        "{relayed} events in {:.2}s ({stored} on the stream), batches of {}; reading them alone with \
         read_committed takes {:.2}s; raw: {n} publishes of the same ~{avg_bytes}-byte messages \
         with ids, {RAW_PUBLISH_WINDOW} acks outstanding, in {:.2}s",
        relay_elapsed.as_secs_f64(),
        RelayConfig::default().batch_size,
        read_elapsed.as_secs_f64(),
        (raw1 + raw2).as_secs_f64()
    ));
    if !cpu.is_empty() {
        f = f.with_note(format!("CPU per 1000 relayed events: {cpu}"));
    }
    if relayed != n {
        f = f.with_note(format!("expected {n} events relayed, got {relayed}"));
    }
    Ok(vec![f])
}

/// `count` publishes with unique message ids, `RAW_PUBLISH_WINDOW` acks outstanding.
pub(super) async fn raw_publish(
    js: &jetstream::Context,
    messages: &[(String, HeaderMap, Bytes)],
    count: u64,
    first_id: u64,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut window = VecDeque::with_capacity(RAW_PUBLISH_WINDOW);
    for i in 0..count {
        if window.len() >= RAW_PUBLISH_WINDOW {
            if let Some(ack) = window.pop_front() {
                let _: jetstream::publish::PublishAck = ack_result(ack).await?;
            }
        }
        let (subject, headers, payload) = &messages[(i as usize) % messages.len()];
        let mut h = headers.clone();
        h.insert(headers::MSG_ID, format!("raw/{}", first_id + i).as_str());
        let ack = js
            .publish_with_headers(subject.clone(), h, payload.clone())
            .await
            .context("raw publish")?;
        window.push_back(ack);
    }
    while let Some(ack) = window.pop_front() {
        ack_result(ack).await?;
    }
    Ok(started.elapsed())
}

pub(super) async fn ack_result(
    ack: jetstream::context::PublishAckFuture,
) -> anyhow::Result<jetstream::publish::PublishAck> {
    ack.await.context("raw publish ack")
}
