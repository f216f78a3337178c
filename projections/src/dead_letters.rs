//! Operating on parked poison events (`rookery dead-letters list|retry|skip`).
//!
//! Parking moved the checkpoint past the event, so the read model does not contain it until an
//! operator retries it (after fixing the cause) or skips it for good. A rebuild leaves out parked
//! and skipped events and includes retried ones, so it still matches the live model.

use crate::projection::{Projection, TableNames};
use anyhow::{bail, Context as _};
use rookery_events::RecordedEvent;
use rookery_store::checkpoints;
pub use rookery_store::checkpoints::DeadLetter;
use sqlx::PgPool;

/// Parked events, oldest first (all projections when `projection` is `None`).
pub async fn list(
    pool: &PgPool,
    projection: Option<&str>,
    include_resolved: bool,
) -> anyhow::Result<Vec<DeadLetter>> {
    Ok(checkpoints::list_dead_letters(pool, projection, include_resolved).await?)
}

/// Marks a parked event as skipped for good. Returns false when it was not open.
pub async fn skip(pool: &PgPool, id: i64) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    let done = checkpoints::resolve_dead_letter(&mut tx, id, "skipped").await?;
    tx.commit().await?;
    Ok(done)
}

/// Applies a parked event to the live tables now (after the cause was fixed) and marks it
/// retried, in one transaction that holds its partition's checkpoint row, so it does not
/// interleave with that partition's batches. Fails, changing nothing, if it still fails.
///
/// The event is applied out of its original order; for the members model that is what an
/// operator wants (the late fact takes effect), and a rebuild applies it in log order.
pub async fn retry(pool: &PgPool, projection: &dyn Projection, id: i64) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let Some(letter) = checkpoints::lock_dead_letter(&mut tx, id).await? else {
        bail!("dead letter {id} does not exist");
    };
    if letter.projection != projection.name() {
        bail!(
            "dead letter {id} belongs to projection {}",
            letter.projection
        );
    }
    if letter.resolved_at.is_some() {
        bail!(
            "dead letter {id} was already {}",
            letter.resolution.as_deref().unwrap_or("resolved")
        );
    }
    let Some(event) = letter.event.clone() else {
        bail!("dead letter {id} is a bus message that could not be decoded; skip it (the event is still in the log: `bus republish` re-sends it)");
    };
    let event: RecordedEvent =
        serde_json::from_value(event).context("the parked event no longer decodes")?;
    checkpoints::lock(&mut tx, projection.name(), letter.partition).await?;
    let tables = TableNames::live(projection.tables());
    projection
        .apply(&mut tx, &tables, std::slice::from_ref(&event))
        .await
        .with_context(|| format!("retrying dead letter {id}"))?;
    checkpoints::resolve_dead_letter(&mut tx, id, "retried").await?;
    tx.commit().await?;
    Ok(())
}
