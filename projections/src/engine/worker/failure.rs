//! A batch that rolled back: count and record the failure, back off, retry one delivery at a
//! time so the failure is pinned on the event that causes it, and park that event after
//! `max_attempts`. Connection losses and other transient errors never count towards parking.

use super::super::checkpoints::{self, Advance, BatchTx};
use super::super::dead_letters;
use super::partition::PartitionRun;
use anyhow::bail;
use rookery_nats::Delivery;
use tokio_util::sync::CancellationToken;

impl PartitionRun {
    /// Logs, counts and backs off after a rolled-back batch; parks the event after
    /// `max_attempts` consecutive failures on it. Returns true on shutdown.
    pub(super) async fn on_failure(
        &mut self,
        deliveries: &[Delivery],
        error: anyhow::Error,
        token: &CancellationToken,
    ) -> bool {
        let config = self.shared.config.clone();
        let name = self.name();
        self.shared.stats.batch_failed();
        let Some(first) = deliveries.first() else {
            return false;
        };
        let transient = is_transient(&error);
        // Connection losses, deadlocks and serialization failures say nothing about the event,
        // so they never count towards parking it.
        let attempts = match (transient, self.failure) {
            (true, Some((seq, n))) if seq == first.stream_seq => n,
            (true, _) => 0,
            (false, Some((seq, n))) if seq == first.stream_seq => n + 1,
            (false, _) => 1,
        };
        if attempts > 0 {
            self.failure = Some((first.stream_seq, attempts));
        }
        let message = format!("{error:#}");
        tracing::error!(projection = name, partition = self.partition, stream_seq = first.stream_seq, attempts, transient, error = %message, "batch failed and was rolled back");
        let _ = checkpoints::record_failure(
            &self.shared.pool,
            name,
            self.partition,
            i32::try_from(attempts).unwrap_or(i32::MAX),
            &message,
        )
        .await;
        let last = deliveries
            .iter()
            .map(|d| d.stream_seq)
            .max()
            .unwrap_or(first.stream_seq);
        self.single_until = Some(self.single_until.map_or(last, |u| u.max(last)));
        // Park only a delivery that failed alone, so an innocent neighbour is never blamed.
        if attempts >= config.max_attempts && deliveries.len() == 1 {
            match self.park(first, &message, attempts).await {
                Ok(()) => {
                    self.failure = None;
                    self.shared.stats.parked_one();
                    tracing::warn!(
                        projection = name,
                        partition = self.partition,
                        stream_seq = first.stream_seq,
                        attempts,
                        "parked the event after repeated failures"
                    );
                }
                Err(e) => tracing::error!(
                    projection = name,
                    partition = self.partition,
                    error = format!("{e:#}"),
                    "could not park the event"
                ),
            }
        }
        self.consumer = None;
        self.back_off(token).await
    }

    /// Parks one delivery and moves the checkpoint past it, in one transaction.
    async fn park(&self, d: &Delivery, error: &str, attempts: u32) -> anyhow::Result<()> {
        let name = self.name();
        let conn = self.shared.pool.acquire().await?;
        let (mut tx, cp) = BatchTx::begin(conn, name, self.partition).await?;
        let Some((cp, _)) = cp else {
            bail!(
                "checkpoint row of {name} partition {} is missing",
                self.partition
            );
        };
        let key = d.event.as_ref().ok().map(|e| e.position);
        if d.stream_seq <= cp.stream_seq || key.is_some_and(|k| cp.covers(d.stream_seq, k)) {
            tx.rollback().await?;
            return Ok(());
        }
        let letter = self.dead_letter(
            d,
            d.event.as_ref().ok(),
            error,
            i32::try_from(attempts).unwrap_or(i32::MAX),
        );
        dead_letters::park(tx.conn(), &letter).await?;
        tx.commit(Some(Advance {
            position: key.map_or(cp.position, |k| k.max(cp.position)),
            stream_seq: d.stream_seq,
            applied: 0,
        }))
        .await?;
        Ok(())
    }
}

/// Errors that say nothing about the events being applied: the database went away, a deadlock
/// or serialization failure, a timeout.
pub(crate) fn is_transient(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| match cause.downcast_ref::<sqlx::Error>() {
            Some(
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed,
            ) => true,
            Some(sqlx::Error::Database(db)) => db.code().is_some_and(|code| {
                matches!(
                    &*code,
                    "40001" | "40P01" | "55P03" | "57014" | "57P01" | "57P02" | "57P03" | "53300"
                ) || code.starts_with("08")
            }),
            _ => false,
        })
}
