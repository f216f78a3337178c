//! Durable pull consumers, one per partition, and the deliveries they hand to projections.
//!
//! A partition's consumer keeps one pull subscription open for its whole life: the server
//! pushes messages into it as they are stored, and a new pull request goes out (in the
//! background) only when half of the last one's [`PREFETCH`] arrived. A projection batch then
//! takes what has arrived without a round trip to the server.
//!
//! That subscription's background task can still send a pull request after the consumer was
//! dropped. So every (re)creation gets a consumer of a **new name** (`<base>-<12 hex>`), after
//! deleting the partition's earlier ones: a late request from an old subscription can only reach
//! a deleted consumer, never make the new one deliver to an inbox nobody reads. Should a
//! delivery still go missing, its consumer sequence skips, and [`PartitionConsumer::fetch`]
//! fails so the caller recreates the consumer from its checkpoint.

use crate::bus::{is_name, Bus};
use crate::headers;
use anyhow::{bail, Context as _};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::{self, ErrorCode};
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::FutureExt as _;
use futures::{StreamExt, TryStreamExt};
use rookery_events::RecordedEvent;
use std::time::Duration;
use tokio::time::Instant;

/// Unacked deliveries the server lets one consumer have out. Above any batch a projection
/// fetches, so the limit never throttles a healthy worker.
const MAX_ACK_PENDING: i64 = 20_000;

/// Messages one pull request asks for: twice a projection's default batch, so a batch being
/// applied never leaves the subscription empty, and few enough that the buffered bodies stay
/// well under a megabyte per partition.
pub const PREFETCH: usize = 1_000;
/// How long one pull request stays open at the server; the subscription renews it.
const PULL_EXPIRES: Duration = Duration::from_secs(30);
/// Hex digits of the suffix that makes each (re)created consumer's name new.
const GENERATION_SUFFIX_LEN: usize = 12;
/// The server confirms an idle pull request this often; two missed heartbeats fail the fetch,
/// so a dead connection is noticed while a partition is idle.
const IDLE_HEARTBEAT: Duration = Duration::from_secs(10);

/// A durable pull consumer on one partition's subjects, with its open pull subscription.
pub struct PartitionConsumer {
    consumer: PullConsumer,
    messages: pull::Stream,
    partition: u32,
    /// Consumer sequence of the last message handed out (0: none yet). Every delivery of this
    /// consumer must be the next one.
    last_delivery: u64,
}

/// One delivered message. `event` is `Err` with a description when the body does not decode,
/// so the projection can park the poison message visibly instead of skipping it.
pub struct Delivery {
    pub stream_seq: u64,
    /// How many times this message has been delivered (1 on first delivery).
    pub delivered: i64,
    pub partition: u32,
    pub event: Result<RecordedEvent, String>,
    message: jetstream::Message,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("stream_seq", &self.stream_seq)
            .field("delivered", &self.delivered)
            .field("partition", &self.partition)
            .field("event", &self.event)
            .finish_non_exhaustive()
    }
}

impl Bus {
    /// A new durable pull consumer on `partition`, named `durable` plus a fresh suffix, delivering
    /// from stream sequence `start_after_stream_seq + 1` (from the beginning when 0).
    ///
    /// The projection's checkpoint in Postgres is the truth, so the consumers this partition had
    /// before (`durable` itself, or with a suffix) are deleted first: messages a crashed worker
    /// left unacked would otherwise be redelivered after `ack_wait`, behind newer ones, out of
    /// order. One worker per (durable, partition) must hold it at a time.
    pub async fn partition_consumer(
        &self,
        durable: &str,
        partition: u32,
        start_after_stream_seq: u64,
    ) -> anyhow::Result<PartitionConsumer> {
        let c = &self.inner.config;
        if partition >= c.partitions {
            bail!(
                "partition {partition} does not exist (the bus has {})",
                c.partitions
            );
        }
        let filter = self.partition_filter(partition);
        self.open_consumer(durable, filter, partition, start_after_stream_seq)
            .await
    }

    /// [`Bus::partition_consumer`] over every partition: the whole stream in its order, which
    /// is the log's order (the relay publishes it so). For projections whose rows depend on the
    /// order of events of different aggregates; its deliveries carry partition 0.
    pub async fn log_consumer(
        &self,
        durable: &str,
        start_after_stream_seq: u64,
    ) -> anyhow::Result<PartitionConsumer> {
        let filter = format!("{}.>", self.inner.config.subject_prefix);
        self.open_consumer(durable, filter, 0, start_after_stream_seq)
            .await
    }

    async fn open_consumer(
        &self,
        durable: &str,
        filter_subject: String,
        partition: u32,
        start_after_stream_seq: u64,
    ) -> anyhow::Result<PartitionConsumer> {
        let c = &self.inner.config;
        if !is_name(durable) {
            bail!(
                "`{durable}` is not a valid consumer name \
                 (no `.`, `*`, `>`, `/`, `\\` or whitespace)"
            );
        }
        self.delete_consumer_generations(durable).await?;
        let name = format!(
            "{durable}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..GENERATION_SUFFIX_LEN]
        );
        let deliver_policy = match start_after_stream_seq {
            0 => DeliverPolicy::All,
            n => DeliverPolicy::ByStartSequence {
                start_sequence: n.saturating_add(1),
            },
        };
        let config = pull::Config {
            durable_name: Some(name.clone()),
            description: Some(format!("rookery {filter_subject}")),
            filter_subject,
            deliver_policy,
            // One ack per batch: acking a message acks every earlier one. Deliveries come in
            // stream order and a projection commits them in order, so nothing is acked that
            // was not committed.
            ack_policy: AckPolicy::All,
            ack_wait: c.ack_wait,
            max_deliver: c.max_deliver,
            max_ack_pending: MAX_ACK_PENDING,
            ..Default::default()
        };
        let consumer = self
            .inner
            .js
            .create_consumer_on_stream(config, &c.stream)
            .await
            .with_context(|| format!("creating consumer {name} on stream {}", c.stream))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(PREFETCH)
            .expires(PULL_EXPIRES)
            .heartbeat(IDLE_HEARTBEAT)
            .messages()
            .await
            .with_context(|| format!("opening the pull subscription of consumer {name}"))?;
        Ok(PartitionConsumer {
            consumer,
            messages,
            partition,
            last_delivery: 0,
        })
    }

    /// Deletes `base` and every consumer [`Bus::partition_consumer`] created under it.
    async fn delete_consumer_generations(&self, base: &str) -> anyhow::Result<()> {
        let stream = &self.inner.config.stream;
        let names: Vec<String> = self
            .inner
            .js
            .get_stream_no_info(stream)
            .await
            .with_context(|| format!("looking up stream {stream}"))?
            .consumer_names()
            .try_collect()
            .await
            .with_context(|| format!("listing the consumers of {stream}"))?;
        for name in names.iter().filter(|n| is_generation_of(base, n)) {
            self.delete_consumer(name).await?;
        }
        Ok(())
    }

    /// Deletes a consumer; absent is fine.
    pub async fn delete_consumer(&self, durable: &str) -> anyhow::Result<()> {
        let stream = &self.inner.config.stream;
        match self
            .inner
            .js
            .delete_consumer_from_stream(durable, stream)
            .await
        {
            Ok(_) => Ok(()),
            Err(err)
                if matches!(err.kind(), ConsumerErrorKind::JetStream(ref e)
                    if e.error_code() == ErrorCode::CONSUMER_NOT_FOUND) =>
            {
                Ok(())
            }
            Err(err) => {
                Err(err).with_context(|| format!("deleting consumer {durable} on {stream}"))
            }
        }
    }

    /// Reads the whole stream, first to last message, with an ephemeral ordered consumer
    /// (tests and diagnostics). Fails when the messages present at the call are not all read
    /// within `max_wait`.
    pub async fn fetch_all(
        &self,
        max_wait: Duration,
    ) -> anyhow::Result<Vec<(u64, RecordedEvent, HeaderMap)>> {
        let deadline = Instant::now() + max_wait;
        let state = self.stream_state().await?;
        if state.messages == 0 {
            return Ok(Vec::new());
        }
        let stream_name = &self.inner.config.stream;
        let consumer = self
            .inner
            .js
            .create_consumer_on_stream(
                pull::OrderedConfig {
                    deliver_policy: DeliverPolicy::All,
                    ..Default::default()
                },
                stream_name,
            )
            .await
            .with_context(|| format!("creating an ordered consumer on {stream_name}"))?;
        let name = consumer.cached_info().name.clone();
        let mut messages = consumer
            .messages()
            .await
            .context("starting the ordered consumer")?;
        let mut out = Vec::with_capacity(usize::try_from(state.messages).unwrap_or(0));
        let mut last_seen = 0u64;
        while last_seen < state.last_seq {
            let next = tokio::time::timeout_at(deadline, messages.next()).await;
            let message = match next {
                Err(_) => bail!(
                    "read {} of {} messages of {stream_name} within {max_wait:?}",
                    out.len(),
                    state.messages
                ),
                Ok(None) => bail!("the ordered consumer on {stream_name} ended early"),
                Ok(Some(m)) => m.context("reading the stream")?,
            };
            let seq = message
                .info()
                .map_err(anyhow::Error::from_boxed)?
                .stream_sequence;
            last_seen = seq;
            let event = decode(&message.payload)
                .map_err(|e| anyhow::anyhow!("stream sequence {seq}: {e}"))?;
            out.push((seq, event, message.headers.clone().unwrap_or_default()));
        }
        drop(messages);
        // Ephemeral consumers expire on their own; deleting is only tidiness.
        let _ = self.delete_consumer(&name).await;
        Ok(out)
    }
}

impl PartitionConsumer {
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The consumer's name at the server (its base name plus this generation's suffix).
    pub fn name(&self) -> &str {
        &self.consumer.cached_info().name
    }

    /// Up to `max` of the messages that have arrived; when none have, waits up to `wait` for
    /// the first, then takes what else has arrived with it. Empty after `wait`.
    ///
    /// Cancel-safe: the only wait is for the first message, and what is taken is returned.
    /// Fails when the subscription fails (the server went away, missed heartbeats) or a
    /// delivery was skipped; the caller then recreates the consumer from its checkpoint.
    pub async fn fetch(&mut self, max: usize, wait: Duration) -> anyhow::Result<Vec<Delivery>> {
        let max = max.max(1);
        let mut out = Vec::new();
        self.take_arrived(&mut out, max)?;
        if out.is_empty() && !wait.is_zero() {
            match tokio::time::timeout(wait, self.messages.next()).await {
                Ok(next) => out.push(self.delivery(next)?),
                Err(_) => return Ok(out),
            }
            self.take_arrived(&mut out, max)?;
        }
        Ok(out)
    }

    /// Moves messages that have already arrived into `out`, up to `max` in all, without waiting.
    fn take_arrived(&mut self, out: &mut Vec<Delivery>, max: usize) -> anyhow::Result<()> {
        while out.len() < max {
            match self.messages.next().now_or_never() {
                Some(next) => out.push(self.delivery(next)?),
                None => break,
            }
        }
        Ok(())
    }

    /// Messages matching the filter not yet delivered.
    pub async fn num_pending(&mut self) -> anyhow::Result<u64> {
        Ok(self.progress().await?.0)
    }

    /// Whether every message on the stream for this partition, from the consumer's start, was
    /// handed out by [`PartitionConsumer::fetch`]: none left at the server, and none delivered
    /// that is still on its way here. Idle partitions check this before raising their floor.
    pub async fn drained(&mut self) -> anyhow::Result<bool> {
        let (pending, delivered) = self.progress().await?;
        Ok(pending == 0 && delivered == self.last_delivery)
    }

    /// From the server: messages not yet delivered, and the consumer sequence of the last
    /// delivery.
    async fn progress(&mut self) -> anyhow::Result<(u64, u64)> {
        let info = self
            .consumer
            .info()
            .await
            .context("reading consumer info")?;
        Ok((info.num_pending, info.delivered.consumer_sequence))
    }

    fn delivery(
        &mut self,
        next: Option<Result<jetstream::Message, pull::MessagesError>>,
    ) -> anyhow::Result<Delivery> {
        let partition = self.partition;
        let message = match next {
            Some(m) => {
                m.with_context(|| format!("the pull subscription of partition {partition}"))?
            }
            None => bail!("the pull subscription of partition {partition} ended"),
        };
        let info = message.info().map_err(anyhow::Error::from_boxed)?;
        let (stream_seq, delivered) = (info.stream_sequence, info.delivered);
        if info.consumer_sequence != self.last_delivery + 1 {
            bail!(
                "partition {partition}: delivery {} arrived after {}; a delivery went missing",
                info.consumer_sequence,
                self.last_delivery
            );
        }
        self.last_delivery = info.consumer_sequence;
        let event = decode(&message.payload);
        Ok(Delivery {
            stream_seq,
            delivered,
            partition: self.partition,
            event,
            message,
        })
    }
}

/// Whether `name` is `base` or a consumer [`Bus::partition_consumer`] created under it.
pub fn is_generation_of(base: &str, name: &str) -> bool {
    match name.strip_prefix(base) {
        Some("") => true,
        Some(rest) => rest.strip_prefix('-').is_some_and(|suffix| {
            suffix.len() == GENERATION_SUFFIX_LEN && suffix.bytes().all(|b| b.is_ascii_hexdigit())
        }),
        None => false,
    }
}

fn decode(payload: &Bytes) -> Result<RecordedEvent, String> {
    serde_json::from_slice(payload).map_err(|e| format!("undecodable event body: {e}"))
}

impl Delivery {
    /// Acknowledges this message (and, the consumers being `AckPolicy::All`, every earlier
    /// delivery) and waits until the server has it.
    pub async fn ack(&self) -> anyhow::Result<()> {
        self.message
            .ack()
            .await
            .map_err(anyhow::Error::from_boxed)?;
        self.message
            .context
            .client()
            .flush()
            .await
            .context("flushing an ack")?;
        Ok(())
    }

    pub fn subject(&self) -> &str {
        self.message.subject.as_str()
    }

    pub fn headers(&self) -> Option<&HeaderMap> {
        self.message.headers.as_ref()
    }

    /// When the event was recorded in Postgres (for lag in seconds), from its header.
    pub fn recorded_at(&self) -> Option<DateTime<Utc>> {
        let value = self.headers()?.get(headers::RECORDED_AT)?;
        DateTime::parse_from_rfc3339(value.as_str())
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The subject an ack of this delivery is published to.
    pub fn reply_subject(&self) -> Option<&str> {
        self.message.reply.as_ref().map(|s| s.as_str())
    }
}

/// Acknowledges every delivery with one ack of the last (the consumers are `AckPolicy::All`),
/// then one flush waits until the server has it. A plain ack, not a double ack: a lost ack only
/// means a redelivery, which the projection's checkpoint absorbs.
pub async fn ack_all(client: &async_nats::Client, deliveries: &[Delivery]) -> anyhow::Result<()> {
    let Some(last) = deliveries.iter().max_by_key(|d| d.stream_seq) else {
        return Ok(());
    };
    let Some(reply) = last.message.reply.clone() else {
        bail!(
            "stream sequence {} has no reply subject to ack",
            last.stream_seq
        );
    };
    client
        .publish(reply, Bytes::from_static(b"+ACK"))
        .await
        .with_context(|| format!("acking up to stream sequence {}", last.stream_seq))?;
    client.flush().await.context("flushing the ack")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_generation_of;

    #[test]
    fn generations_are_the_base_or_the_base_with_a_fresh_suffix() {
        let base = "rookery_members_p1";
        for (name, expected, why) in [
            (
                "rookery_members_p1",
                true,
                "a consumer from before suffixes",
            ),
            ("rookery_members_p1-0123456789ab", true, "a generation"),
            (
                "rookery_members_p10-0123456789ab",
                false,
                "another partition",
            ),
            ("rookery_members_p1-0123456789", false, "suffix too short"),
            ("rookery_members_p1-0123456789abc", false, "suffix too long"),
            ("rookery_members_p1-0123456789ag", false, "suffix not hex"),
            (
                "rookery_members_p1_x-0123456789ab",
                false,
                "another projection",
            ),
            ("rookery_members", false, "a prefix of the base"),
        ] {
            assert_eq!(is_generation_of(base, name), expected, "{name}: {why}");
        }
    }
}
