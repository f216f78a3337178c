//! Rookery read models: the projection worker, checkpoints, rebuilds, and one module per read
//! model.
//!
//! Every read model is a [`Projection`]: a pure, deterministic fold of the event log into its
//! own tables. The same `apply` serves the live [worker] (events from the bus, one task
//! per partition, checkpoint in the same transaction as the rows) and [rebuilds](mod@rebuild)
//! (events from the Postgres log into shadow tables, switched in atomically), which is why a
//! rebuilt model is byte-identical to the live one.
//!
//! Guarantees (DESIGN.md §3): no lost events (acks after commit; consumers restart at the
//! checkpoint), effectively once (checkpoint and rows in one transaction; redeliveries skipped),
//! per-aggregate order (one active worker per partition), determinism (time only from event
//! metadata), side effects never replay (rebuilds only call `apply`), poison parked visibly.
//!
//! Starting workers: `run_projection(pool, bus, projection, WorkerConfig::default(), shutdown)`
//! for each of [`all()`]. Read-your-writes: [`wait_for_position`] with the position a command
//! returned. Operators: [`status()`], [`rebuild()`], [`pause`]/[`resume`], [`dead_letters`].
//!
//! # Layout
//! - [`projection`]: the [`Projection`] trait, [`TableNames`] (live vs shadow), [`PoisonEvent`],
//!   and a rebuild's optional fast path ([`BulkFold`]).
//! - [`worker`]: the live worker ([`run_projection`], [`ProjectionWorker`], [`run_until_idle`]).
//! - [`consistency`]: read-your-writes ([`wait_for_position`], [`is_applied`]).
//! - [`mod@status`]: state, positions, lag, errors and parked events per projection.
//! - [`mod@rebuild`]: rebuild without downtime into shadow tables, resumable; helpers for bulk
//!   folds ([`rebuild::KeyFilter`], [`rebuild::copy_in`]).
//! - [`dead_letters`]: list, retry and skip parked poison events.
//! - [`members`]: the members read model and its queries.
//!
//! Checkpoint, lock, state and dead-letter SQL lives in `rookery_store::checkpoints`.

pub mod consistency;
pub mod dead_letters;
pub mod members;
pub mod projection;
pub mod rebuild;
pub mod status;
pub mod worker;

pub use consistency::{is_applied, wait_for_position};
pub use members::MembersProjection;
pub use projection::{
    occurred_at, BulkFold, BulkStart, BulkWrite, NeedKeys, PoisonEvent, Projection, RawEvent,
    TableNames,
};
pub use rebuild::{rebuild, rebuild_with, RebuildConfig, RebuildProgress, RebuildReport};
pub use status::{status, PartitionStatus, ProjectionState, ProjectionStatus, RebuildStatus};
pub use worker::{
    run_projection, run_until_idle, BatchSummary, ProjectionWorker, WorkerConfig, WorkerStats,
};

use std::sync::Arc;

/// Every projection this build runs.
pub fn all() -> Vec<Arc<dyn Projection>> {
    vec![Arc::new(MembersProjection)]
}

/// The projection named `name`, if this build has it.
pub fn by_name(name: &str) -> Option<Arc<dyn Projection>> {
    all().into_iter().find(|p| p.name() == name)
}

/// Pauses a projection's live workers (they finish their batch and wait). Returns false for a
/// projection that was never registered.
pub async fn pause(pool: &sqlx::PgPool, name: &str) -> anyhow::Result<bool> {
    Ok(rookery_store::checkpoints::set_paused(pool, name, true).await?)
}

/// Resumes a paused projection; its workers restart from their checkpoints.
pub async fn resume(pool: &sqlx::PgPool, name: &str) -> anyhow::Result<bool> {
    Ok(rookery_store::checkpoints::set_paused(pool, name, false).await?)
}
