//! The log streamed in batches, from a task of its own, a batch ahead of the fold.

use crate::engine::RawEvent;
use futures::StreamExt;
use rookery_events::LogPosition;
use rookery_store::log::{self, LogEntry};
use sqlx::PgPool;

/// Streams the log in batches from a task of its own, a batch ahead of the consumer; stops
/// when dropped.
pub(super) struct Reader<T> {
    rx: tokio::sync::mpsc::Receiver<Result<Vec<T>, sqlx::Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl Reader<LogEntry> {
    pub(super) fn spawn(
        pool: PgPool,
        after: LogPosition,
        upto: LogPosition,
        batch_size: usize,
    ) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(async move {
            forward(log::stream_committed(&pool, after, upto), tx, batch_size).await;
        });
        Self { rx, task }
    }
}

impl Reader<RawEntry> {
    pub(super) fn spawn_raw(
        pool: PgPool,
        after: LogPosition,
        upto: LogPosition,
        batch_size: usize,
    ) -> Self {
        // A few batches of slack: the reader and the fold take turns on the cores.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let task = tokio::spawn(async move {
            forward(stream_raw(&pool, after, upto), tx, batch_size).await;
        });
        Self { rx, task }
    }
}

impl<T> Reader<T> {
    pub(super) async fn next(&mut self) -> Option<Result<Vec<T>, sqlx::Error>> {
        self.rx.recv().await
    }
}

impl<T> Drop for Reader<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(super) async fn forward<T>(
    stream: impl futures::Stream<Item = Result<T, sqlx::Error>>,
    tx: tokio::sync::mpsc::Sender<Result<Vec<T>, sqlx::Error>>,
    batch_size: usize,
) {
    let mut stream = std::pin::pin!(stream);
    let mut batch = Vec::with_capacity(batch_size);
    while let Some(next) = stream.next().await {
        match next {
            Ok(entry) => batch.push(entry),
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
        if batch.len() >= batch_size.max(1) {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(batch_size));
            if tx.send(Ok(full)).await.is_err() {
                return;
            }
        }
    }
    if !batch.is_empty() {
        let _ = tx.send(Ok(batch)).await;
    }
}

/// A [`RawEvent`] and the partition it belongs to.
pub(super) struct RawEntry {
    pub(super) event: RawEvent,
    pub(super) partition_key: u32,
}

/// The range as [`RawEntry`]s (`upto` is at most the commit-safe head, so the range alone is
/// commit-safe).
pub(super) fn stream_raw(
    pool: &PgPool,
    after: LogPosition,
    upto: LogPosition,
) -> impl futures::Stream<Item = Result<RawEntry, sqlx::Error>> + Send + '_ {
    log::stream_committed_raw(pool, after, upto, |e| RawEntry {
        event: RawEvent {
            position: e.position,
            aggregate_type: e.aggregate_type.to_owned(),
            aggregate_id: e.aggregate_id.to_owned(),
            sequence: e.sequence,
            event_type: e.event_type.to_owned(),
            event_version: e.event_version.to_owned(),
            payload: e.payload.to_owned(),
            metadata: e.metadata.to_owned(),
        },
        partition_key: e.partition_key,
    })
}

/// How many events follow `after` (committed or not, as `log::count_after`), counting no
/// further than `limit`.
pub(super) async fn count_after_at_most(
    pool: &PgPool,
    after: LogPosition,
    limit: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT 1 FROM events
             WHERE (transaction_id, global_position) > ($1::bigint::text::xid8, $2)
             LIMIT $3) AS s",
    )
    .bind(after.txid_i64())
    .bind(after.gpos)
    .bind(limit)
    .fetch_one(pool)
    .await
}
