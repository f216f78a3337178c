//! Durable pull consumers, one per partition, and the deliveries they hand to projections.

use crate::bus::{is_name, Bus};
use crate::headers;
use anyhow::{bail, Context as _};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::{self, ErrorCode};
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{FutureExt as _, StreamExt};
use rookery_events::RecordedEvent;
use std::time::Duration;
use tokio::time::Instant;

/// Unacked deliveries the server lets one consumer have out. Well above the subscription's
/// prefetch and any batch a projection takes, so the limit never throttles a healthy worker.
const MAX_ACK_PENDING: i64 = 20_000;

/// Messages a partition's subscription asks for at a time (renewed at half): a projection batch
/// is at most this many messages that arrived while the previous one was being committed.
const PREFETCH: usize = 1_000;

/// How long one pull request stays open, and how often an idle server proves it is alive.
const PULL_EXPIRES: Duration = Duration::from_secs(30);
const HEARTBEAT: Duration = Duration::from_secs(5);

/// A durable pull consumer on one partition's subjects.
pub struct PartitionConsumer {
    consumer: PullConsumer,
    partition: u32,
    /// The pull subscription, opened by the first fetch.
    messages: Option<pull::Stream>,
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
    /// A durable pull consumer named `durable` on `partition`, delivering from stream sequence
    /// `start_after_stream_seq + 1` (from the beginning when 0).
    ///
    /// The projection's checkpoint in Postgres is the truth, so any existing consumer of that
    /// name is deleted and recreated at the given start: messages a crashed worker left unacked
    /// would otherwise be redelivered after `ack_wait`, behind newer ones, out of order. One
    /// worker per (durable, partition) must hold it at a time.
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
        if !is_name(durable) {
            bail!(
                "`{durable}` is not a valid consumer name \
                 (no `.`, `*`, `>`, `/`, `\\` or whitespace)"
            );
        }
        self.delete_consumer(durable).await?;
        let deliver_policy = match start_after_stream_seq {
            0 => DeliverPolicy::All,
            n => DeliverPolicy::ByStartSequence {
                start_sequence: n.saturating_add(1),
            },
        };
        let config = pull::Config {
            durable_name: Some(durable.to_string()),
            description: Some(format!("rookery partition {partition}")),
            filter_subject: self.partition_filter(partition),
            deliver_policy,
            ack_policy: AckPolicy::Explicit,
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
            .with_context(|| {
                format!(
                    "creating consumer {durable} on stream {} (partition {partition})",
                    c.stream
                )
            })?;
        Ok(PartitionConsumer {
            consumer,
            partition,
            messages: None,
        })
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

    /// Up to `max` messages: returns as soon as any are available, or empty after `wait`.
    ///
    /// Messages come from one long-lived pull subscription that keeps a pull request of
    /// [`PREFETCH`] messages open and renews it at half, so a busy partition costs no round trip
    /// per fetch: the server pushes messages as they are stored and a fetch takes what has
    /// arrived. Cancel-safe: a fetch dropped before it returns loses nothing.
    pub async fn fetch(&mut self, max: usize, wait: Duration) -> anyhow::Result<Vec<Delivery>> {
        let max = max.max(1);
        let partition = self.partition;
        if self.messages.is_none() {
            let stream = self
                .consumer
                .stream()
                .max_messages_per_batch(PREFETCH)
                .heartbeat(HEARTBEAT)
                .expires(PULL_EXPIRES)
                .messages()
                .await
                .with_context(|| format!("subscribing to partition {partition}"))?;
            self.messages = Some(stream);
        }
        let Some(messages) = self.messages.as_mut() else {
            bail!("partition {partition}: no subscription");
        };
        // `timeout` polls the message first, so a zero wait still takes one that is there.
        let first = match tokio::time::timeout(wait, messages.next()).await {
            Err(_) => return Ok(Vec::new()),
            Ok(next) => next,
        };
        let mut out = Vec::new();
        let mut next = Some(first);
        let mut yielded = false;
        while let Some(item) = next {
            let message = item
                .ok_or_else(|| anyhow::anyhow!("the subscription to partition {partition} ended"))?
                .map_err(|e| {
                    anyhow::Error::from(e).context(format!("reading partition {partition}"))
                })?;
            out.push(self.delivery(message)?);
            if out.len() >= max {
                break;
            }
            next = self.ready();
            if next.is_none() && !yielded {
                // The connection task may still be handing over the rest of a burst: let it
                // run once before calling the batch complete.
                yielded = true;
                tokio::task::yield_now().await;
                next = self.ready();
            }
        }
        Ok(out)
    }

    /// The subscription's next item if it has already arrived.
    fn ready(&mut self) -> Option<Option<Result<jetstream::Message, pull::MessagesError>>> {
        self.messages.as_mut()?.next().now_or_never()
    }

    /// Messages matching the filter not yet delivered.
    pub async fn num_pending(&mut self) -> anyhow::Result<u64> {
        Ok(self.info().await?.num_pending)
    }

    /// Whether every message on the partition was delivered *and* acknowledged: nothing is
    /// waiting on the server, in flight, or prefetched but not yet handled.
    pub async fn is_drained(&mut self) -> anyhow::Result<bool> {
        let info = self.info().await?;
        Ok(info.num_pending == 0 && info.num_ack_pending == 0)
    }

    async fn info(&mut self) -> anyhow::Result<async_nats::jetstream::consumer::Info> {
        let info = self
            .consumer
            .info()
            .await
            .context("reading consumer info")?;
        Ok(info.clone())
    }

    fn delivery(&self, message: jetstream::Message) -> anyhow::Result<Delivery> {
        let info = message.info().map_err(anyhow::Error::from_boxed)?;
        let (stream_seq, delivered) = (info.stream_sequence, info.delivered);
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

fn decode(payload: &Bytes) -> Result<RecordedEvent, String> {
    serde_json::from_slice(payload).map_err(|e| format!("undecodable event body: {e}"))
}

impl Delivery {
    /// Acknowledges this message and waits until the server has it.
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

    fn reply(&self) -> Option<&async_nats::Subject> {
        self.message.reply.as_ref()
    }
}

/// Acknowledges every delivery: all acks are sent back to back, then one flush waits until
/// the server has them. Plain acks, not double acks: a lost ack only means a redelivery, which
/// the projection's checkpoint absorbs.
pub async fn ack_all(client: &async_nats::Client, deliveries: &[Delivery]) -> anyhow::Result<()> {
    for d in deliveries {
        let Some(reply) = d.reply() else {
            bail!(
                "stream sequence {} has no reply subject to ack",
                d.stream_seq
            );
        };
        client
            .publish(reply.clone(), Bytes::from_static(b"+ACK"))
            .await
            .with_context(|| format!("acking stream sequence {}", d.stream_seq))?;
    }
    client.flush().await.context("flushing acks")?;
    Ok(())
}
