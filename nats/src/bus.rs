//! The connection, the stream definition, subjects and the pipelined publisher.

use crate::config::BusConfig;
use crate::headers;
use crate::message::{self, Outgoing};
use anyhow::{anyhow, bail, Context as _};
use async_nats::connection::State;
use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::HeaderValue;
use bytes::Bytes;
use rookery_events::LogPosition;
use rookery_store::LogEntry;
use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// Publishes awaiting their ack at once. Enough to hide the round trip on a local server
/// without letting one slow ack hold thousands of messages in memory.
const PUBLISH_WINDOW: usize = 256;
/// Acks settled at a time once the window is full, before sending again: one send per settled
/// ack wakes the publisher once per message, while in slices the server still always has three
/// quarters of the window queued.
const SETTLE_SLICE: usize = 64;

/// An unreachable server should fail start-up quickly and say so, not hang.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The handle to the bus: one NATS connection and its JetStream context. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: BusConfig,
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
}

/// The stream's counters, as JetStream reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamState {
    pub messages: u64,
    pub first_seq: u64,
    pub last_seq: u64,
}

impl Bus {
    /// Connects, checks JetStream is there, and creates or updates the stream to match the
    /// definition in code.
    pub async fn connect(config: BusConfig) -> anyhow::Result<Bus> {
        validate(&config)?;
        let bus = Self::open(config).await?;
        let Inner { config, client, js } = &*bus.inner;
        ensure_jetstream(client, &config.url).await?;
        ensure_stream(js, config).await?;
        Ok(bus)
    }

    /// A second connection to the same server and stream, which [`Bus::connect`] has already
    /// checked and set up: for parts that should not share this one's connection (its socket
    /// is driven by the runtime that opened it).
    pub async fn another_connection(&self) -> anyhow::Result<Bus> {
        Self::open(self.inner.config.clone()).await
    }

    async fn open(config: BusConfig) -> anyhow::Result<Bus> {
        // No retry on the initial connect: a wrong URL should be reported at once. Once
        // connected, the client reconnects on its own for as long as the process lives.
        let client = async_nats::ConnectOptions::new()
            .name("rookery")
            .connection_timeout(CONNECT_TIMEOUT)
            .connect(config.url.as_str())
            .await
            .with_context(|| {
                format!(
                    "cannot connect to NATS at {} (is nats-server running?)",
                    config.url
                )
            })?;
        let js = jetstream::new(client.clone());
        Ok(Bus {
            inner: Arc::new(Inner { config, client, js }),
        })
    }

    pub fn config(&self) -> &BusConfig {
        &self.inner.config
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// `<prefix>.<partition>.<aggregate_type>.<event_type>`.
    pub fn subject_for(&self, entry: &LogEntry) -> String {
        let c = &self.inner.config;
        message::subject(
            &c.subject_prefix,
            entry.partition(c.partitions),
            &entry.event.aggregate_type,
            &entry.event.event_type,
        )
        .to_string()
    }

    /// Every subject of one partition: `<prefix>.<partition>.>`.
    pub fn partition_filter(&self, partition: u32) -> String {
        format!("{}.{}.>", self.inner.config.subject_prefix, partition)
    }

    /// Publishes `entries` (in log order) and returns once JetStream has confirmed every one;
    /// the count returned is how many were newly stored (duplicates of messages already on the
    /// stream, within the duplicate window, count as confirmed but not as stored).
    ///
    /// Pipelined, each message sent while its predecessor is unconfirmed chained to it with
    /// `Nats-Expected-Last-Msg-Id`, so the stream keeps log order even when a publish is lost
    /// in a reconnect. On an error some leading entries may be stored: publishing them again is
    /// safe, as the server checks duplicates before the expectation.
    pub async fn publish_batch(&self, entries: &[LogEntry]) -> Result<u64, anyhow::Error> {
        let c = &self.inner.config;
        let mut chain = Chain::new(self);
        for (i, entry) in entries.iter().enumerate() {
            let msg = Outgoing::from_entry(entry, &c.subject_prefix, c.partitions)
                .with_context(|| format!("encoding {}", entry.event.message_id()))?;
            chain.send(msg, i + 1 == entries.len()).await?;
        }
        chain.drain().await?;
        Ok(chain.stored())
    }

    pub async fn stream_state(&self) -> anyhow::Result<StreamState> {
        let name = &self.inner.config.stream;
        let stream = self
            .inner
            .js
            .get_stream(name)
            .await
            .with_context(|| format!("reading the state of stream {name}"))?;
        let state = &stream.cached_info().state;
        Ok(StreamState {
            messages: state.messages,
            first_seq: state.first_sequence,
            last_seq: state.last_sequence,
        })
    }

    /// Deletes the stream and everything on it (tests and benchmarks). Absent is fine.
    pub async fn delete_stream(&self) -> anyhow::Result<()> {
        let name = &self.inner.config.stream;
        match self.inner.js.delete_stream(name).await {
            Ok(_) => Ok(()),
            Err(err) if is_stream_not_found(&err.kind()) => Ok(()),
            Err(err) => Err(err).with_context(|| format!("deleting stream {name}")),
        }
    }

    pub fn server_version(&self) -> String {
        self.inner.client.server_info().version
    }

    pub fn is_connected(&self) -> bool {
        self.inner.client.connection_state() == State::Connected
    }
}

/// Publishes events in log order, pipelined: up to [`PUBLISH_WINDOW`] acks outstanding, also
/// across the batches a caller feeds it, so the server never waits for the next batch's
/// first message while the previous one's acks drain.
///
/// Each message sent while an earlier one is unconfirmed is chained to its predecessor with
/// `Nats-Expected-Last-Msg-Id`. The chain keeps the stream in log order even when a publish is
/// lost: a message written to a connection that then breaks is gone, while those queued behind
/// it are re-sent on the new connection. Unchained, they would be stored ahead of it and the
/// retry would put it behind them (and behind later events of its own aggregate); chained, they
/// are rejected. A message sent when everything before it is confirmed needs no link: nothing
/// before it can still be lost. The server checks duplicates before the expectation, so
/// re-publishing what the stream already holds (after a crash, from a cursor that lagged behind
/// the acks) passes as duplicates and the chain continues from the last stored message.
///
/// Stops at the first failure: what was confirmed before it is a prefix the caller may commit;
/// the chain itself is then spent (later messages were chained to the failed one), and the
/// caller starts a new one after the confirmed prefix.
pub(crate) struct Chain {
    js: jetstream::Context,
    window: VecDeque<InFlight>,
    /// Everything up to here is on the stream.
    confirmed: Option<LogPosition>,
    /// The last confirmed message that ended a batch: a cursor worth saving.
    checkpoint: Option<LogPosition>,
    confirmed_count: u64,
    stored_count: u64,
    /// Of `stored_count`, how many are at or before `checkpoint`.
    stored_at_checkpoint: u64,
}

type AckFuture =
    Pin<Box<dyn Future<Output = Result<PublishAck, jetstream::context::PublishError>> + Send>>;

struct InFlight {
    position: LogPosition,
    id: String,
    ends_batch: bool,
    ack: AckFuture,
}

impl Chain {
    pub(crate) fn new(bus: &Bus) -> Self {
        Self {
            js: bus.inner.js.clone(),
            window: VecDeque::with_capacity(PUBLISH_WINDOW),
            confirmed: None,
            checkpoint: None,
            confirmed_count: 0,
            stored_count: 0,
            stored_at_checkpoint: 0,
        }
    }

    /// Sends `msg` (the next event in log order), first waiting for the oldest ack when the
    /// window is full. `ends_batch` marks it as a [`Chain::checkpoint`] once confirmed.
    pub(crate) async fn send(&mut self, msg: Outgoing, ends_batch: bool) -> anyhow::Result<()> {
        if self.window.len() >= PUBLISH_WINDOW {
            while self.window.len() > PUBLISH_WINDOW - SETTLE_SLICE {
                self.settle_one().await?;
            }
        }
        let Outgoing {
            position,
            id,
            subject,
            mut headers,
            payload,
        } = msg;
        if let Some(previous) = self.window.back() {
            headers.insert(
                headers::EXPECTED_LAST_MSG_ID,
                HeaderValue::from(previous.id.as_str()),
            );
        }
        let sent = self
            .js
            .publish_with_headers(subject, headers, payload)
            .await
            .with_context(|| format!("publishing {id} (position {position})"));
        match sent {
            Ok(ack) => {
                self.window.push_back(InFlight {
                    position,
                    id,
                    ends_batch,
                    ack: ack.into_future(),
                });
                Ok(())
            }
            Err(err) => {
                // Settle what is already out, so the confirmed prefix is as long as it can be.
                let _ = self.drain().await;
                Err(err)
            }
        }
    }

    /// Waits for the oldest outstanding ack (none: returns at once). Cancel-safe: the ack stays
    /// in the window until it has arrived.
    pub(crate) async fn settle_one(&mut self) -> anyhow::Result<()> {
        let Some(oldest) = self.window.front_mut() else {
            return Ok(());
        };
        let result = (&mut oldest.ack).await;
        let Some(done) = self.window.pop_front() else {
            return Ok(());
        };
        let ack = result.with_context(|| {
            format!(
                "JetStream did not confirm {} (position {})",
                done.id, done.position
            )
        })?;
        self.confirmed = Some(done.position);
        self.confirmed_count += 1;
        self.stored_count += u64::from(!ack.duplicate);
        if done.ends_batch {
            self.checkpoint = Some(done.position);
            self.stored_at_checkpoint = self.stored_count;
        }
        Ok(())
    }

    /// Waits for every outstanding ack.
    pub(crate) async fn drain(&mut self) -> anyhow::Result<()> {
        while !self.window.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }

    /// Acks still outstanding.
    pub(crate) fn outstanding(&self) -> usize {
        self.window.len()
    }

    /// The last event confirmed on the stream (with everything before it).
    pub(crate) fn confirmed(&self) -> Option<LogPosition> {
        self.confirmed
    }

    /// The last confirmed event that ended a batch, and how many events up to it were newly
    /// stored.
    pub(crate) fn checkpoint(&self) -> Option<(LogPosition, u64)> {
        self.checkpoint.map(|p| (p, self.stored_at_checkpoint))
    }

    /// Events confirmed, duplicates included.
    pub(crate) fn confirmed_count(&self) -> u64 {
        self.confirmed_count
    }

    /// Events newly stored (duplicates not counted).
    pub(crate) fn stored(&self) -> u64 {
        self.stored_count
    }
}

fn validate(config: &BusConfig) -> anyhow::Result<()> {
    if config.partitions == 0 {
        bail!("bus partitions must be at least 1");
    }
    if config.stream.is_empty() || !is_name(&config.stream) {
        bail!(
            "`{}` is not a valid stream name (no `.`, `*`, `>`, `/`, `\\` or whitespace)",
            config.stream
        );
    }
    let prefix_ok = !config.subject_prefix.is_empty()
        && config
            .subject_prefix
            .split('.')
            .all(|t| !t.is_empty() && is_token(t));
    if !prefix_ok {
        bail!(
            "`{}` is not a valid subject prefix \
             (dot-separated tokens without `*`, `>` or whitespace)",
            config.subject_prefix
        );
    }
    Ok(())
}

/// A stream or consumer name as JetStream accepts it.
pub(crate) fn is_name(s: &str) -> bool {
    !s.is_empty() && is_token(s) && !s.contains(['.', '/', '\\'])
}

fn is_token(s: &str) -> bool {
    !s.chars()
        .any(|c| matches!(c, '*' | '>') || c.is_whitespace() || c.is_control())
}

/// One subject token from free text: the characters NATS gives meaning to (`.` separates
/// tokens, `*` and `>` are wildcards, whitespace ends the subject) become `_`.
pub fn subject_token(s: &str) -> String {
    let mut token = String::with_capacity(s.len().max(1));
    message::push_token(&mut token, s);
    token
}

fn is_stream_not_found(kind: &GetStreamErrorKind) -> bool {
    matches!(kind, GetStreamErrorKind::JetStream(e)
        if e.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

async fn ensure_jetstream(client: &async_nats::Client, url: &str) -> anyhow::Result<()> {
    let not_enabled = || anyhow!("JetStream is not enabled on {url}; start nats-server with -js");
    if !client.server_info().jetstream {
        return Err(not_enabled());
    }
    // A raw request: async-nats' typed account info expects fields nats-server 2.9 lacks.
    let reply = match client.request("$JS.API.INFO", Bytes::new()).await {
        Ok(reply) => reply,
        Err(err) if err.kind() == async_nats::client::RequestErrorKind::NoResponders => {
            return Err(not_enabled());
        }
        Err(err) => return Err(err).with_context(|| format!("asking {url} for JetStream info")),
    };
    let info: serde_json::Value = serde_json::from_slice(&reply.payload)
        .with_context(|| format!("JetStream info from {url} is not JSON"))?;
    if let Some(error) = info.get("error") {
        let code = error
            .get("err_code")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        if code == ErrorCode::JETSTREAM_NOT_ENABLED.0
            || code == ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT.0
        {
            return Err(not_enabled());
        }
        bail!("JetStream on {url} answered with an error: {error}");
    }
    Ok(())
}

/// The stream as Rookery defines it.
fn stream_definition(config: &BusConfig) -> stream::Config {
    stream::Config {
        name: config.stream.clone(),
        description: Some("Rookery event log, relayed from Postgres".to_string()),
        subjects: vec![format!("{}.>", config.subject_prefix)],
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        duplicate_window: config.duplicate_window,
        max_messages: -1,
        max_bytes: -1,
        max_messages_per_subject: -1,
        max_consumers: -1,
        num_replicas: 1,
        ..Default::default()
    }
}

/// What Rookery relies on; everything else an operator may have tuned is left alone.
fn differences(have: &stream::Config, want: &stream::Config) -> Vec<&'static str> {
    let mut d = Vec::new();
    if have.subjects != want.subjects {
        d.push("subjects");
    }
    if have.storage != want.storage {
        d.push("storage");
    }
    if have.retention != want.retention {
        d.push("retention");
    }
    if have.duplicate_window != want.duplicate_window {
        d.push("duplicate_window");
    }
    d
}

async fn ensure_stream(js: &jetstream::Context, config: &BusConfig) -> anyhow::Result<()> {
    let want = stream_definition(config);
    let name = &config.stream;
    // Two processes starting together may race to create it: the loser re-reads and compares.
    for _ in 0..3 {
        let have = match js.get_stream(name).await {
            Ok(stream) => stream.cached_info().config.clone(),
            Err(err) if is_stream_not_found(&err.kind()) => {
                match js.create_stream(want.clone()).await {
                    Ok(_) => {
                        tracing::info!(stream = %name, subjects = ?want.subjects, "created stream");
                        return Ok(());
                    }
                    Err(err)
                        if matches!(err.kind(), CreateStreamErrorKind::JetStream(ref e)
                            if e.error_code() == ErrorCode::STREAM_NAME_EXIST) =>
                    {
                        continue;
                    }
                    Err(err) => {
                        return Err(err).with_context(|| format!("creating stream {name}"));
                    }
                }
            }
            Err(err) => return Err(err).with_context(|| format!("reading stream {name}")),
        };
        let changed = differences(&have, &want);
        if changed.is_empty() {
            return Ok(());
        }
        if changed.contains(&"storage") {
            bail!(
                "stream {name} exists with {:?} storage but Rookery needs file storage, which \
                 JetStream cannot change in place; delete the stream (the log stays in Postgres and \
                 read models keep their checkpoints; new events flow into the new stream) or \
                 configure another stream name",
                have.storage
            );
        }
        let mut updated = have;
        updated.subjects = want.subjects.clone();
        updated.retention = want.retention;
        updated.duplicate_window = want.duplicate_window;
        js.update_stream(&updated)
            .await
            .with_context(|| format!("updating stream {name} ({})", changed.join(", ")))?;
        tracing::info!(stream = %name, changed = ?changed, "updated stream definition");
        return Ok(());
    }
    bail!("stream {name} kept changing while it was being created")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_tokens_lose_wildcards_and_separators() {
        assert_eq!(subject_token("community"), "community");
        assert_eq!(subject_token("a.b*c>d e\tf"), "a_b_c_d_e_f");
        assert_eq!(subject_token(""), "_");
    }

    #[test]
    fn names_and_prefixes_are_validated() {
        let ok = BusConfig::new("nats://x", "rookery", "rookery.events");
        assert!(validate(&ok).is_ok());
        let bad_stream = BusConfig::new("nats://x", "rook.ery", "rookery");
        assert!(validate(&bad_stream).is_err());
        let bad_prefix = BusConfig::new("nats://x", "rookery", "rookery.>");
        assert!(validate(&bad_prefix).is_err());
        let empty_token = BusConfig::new("nats://x", "rookery", "rookery..x");
        assert!(validate(&empty_token).is_err());
        let mut no_partitions = ok.clone();
        no_partitions.partitions = 0;
        assert!(validate(&no_partitions).is_err());
    }
}
