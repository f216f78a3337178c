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
use futures::StreamExt;
use rookery_events::RecordedEvent;
use std::time::Duration;
use tokio::time::Instant;

/// Unacked deliveries the server lets one consumer have out. Above any batch a projection
/// fetches, so the limit never throttles a healthy worker.
const MAX_ACK_PENDING: i64 = 20_000;

/// Slack on top of a pull's own expiry before the client gives up on the server's answer.
const PULL_GRACE: Duration = Duration::from_secs(5);

/// A durable pull consumer on one partition's subjects.
pub struct PartitionConsumer {
    consumer: PullConsumer,
    partition: u32,
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
            .with_context(|| {
                format!(
                    "creating consumer {durable} on stream {} (partition {partition})",
                    c.stream
                )
            })?;
        Ok(PartitionConsumer {
            consumer,
            partition,
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
    /// A waiting pull request that is abandoned mid-way would leave messages delivered to no
    /// one (redelivered only after `ack_wait`, behind newer ones), so every pull here runs to
    /// its end: first one that takes what is there without waiting; when that is empty, one
    /// that waits for a single message, then again one that takes the rest without waiting.
    /// For the same reason, a caller that drops a `fetch` before it returns should recreate
    /// the consumer (from its checkpoint) before fetching again.
    pub async fn fetch(&mut self, max: usize, wait: Duration) -> anyhow::Result<Vec<Delivery>> {
        let max = max.max(1);
        let mut out = self.pull(max, None).await?;
        if out.is_empty() && !wait.is_zero() {
            out = self.pull(1, Some(wait)).await?;
            if !out.is_empty() && max > 1 {
                let rest = self.pull(max - 1, None).await?;
                out.extend(rest);
            }
        }
        Ok(out)
    }

    /// Messages matching the filter not yet delivered.
    pub async fn num_pending(&mut self) -> anyhow::Result<u64> {
        let info = self
            .consumer
            .info()
            .await
            .context("reading consumer info")?;
        Ok(info.num_pending)
    }

    async fn pull(&self, max: usize, wait: Option<Duration>) -> anyhow::Result<Vec<Delivery>> {
        let batch = match wait {
            None => self.consumer.fetch().max_messages(max).messages().await,
            Some(wait) => {
                self.consumer
                    .batch()
                    .max_messages(max)
                    .expires(wait)
                    .messages()
                    .await
            }
        };
        let mut batch = batch.context("requesting messages")?;
        let deadline = Instant::now() + wait.unwrap_or_default() + PULL_GRACE;
        let mut out = Vec::new();
        loop {
            let next = match tokio::time::timeout_at(deadline, batch.next()).await {
                Ok(next) => next,
                Err(_) => bail!(
                    "the server did not answer a pull request on partition {}",
                    self.partition
                ),
            };
            let Some(message) = next else { break };
            let message = message.map_err(anyhow::Error::from_boxed)?;
            out.push(self.delivery(message)?);
        }
        Ok(out)
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
