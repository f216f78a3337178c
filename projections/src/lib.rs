//! Rookery's read models and the engine that runs them.
//!
//! Every read model is a [`Projection`]: a pure, deterministic fold of the event log into its
//! own tables. The same `apply` serves the live [worker](engine::worker) (events from the bus,
//! one task per partition, checkpoint in the same transaction as the rows) and
//! [rebuilds](mod@engine::rebuild) (events from the Postgres log into shadow tables, switched in
//! atomically), which is why a rebuilt model is byte-identical to the live one.
//!
//! Guarantees (docs/architecture.md): no lost events (acks after commit; consumers restart at
//! the checkpoint), effectively once (checkpoint and rows in one transaction; redeliveries
//! skipped), per-aggregate order (one active worker per partition), determinism (time only from
//! event metadata), side effects never replay (rebuilds only call `apply`), poison parked
//! visibly.
//!
//! Starting workers: `run_projection(pool, bus, projection, WorkerConfig::default(), shutdown)`
//! for each of [`all()`]. Read-your-writes: [`wait_for_position`] with the position a command
//! returned. Operators: [`status()`], [`rebuild()`], [`pause`]/[`resume`], [`dead_letters`].
//!
//! # Layout
//! - [`engine`]: what runs any model — the [`Projection`] trait, worker, rebuild,
//!   checkpoints, locks, state, dead letters, consistency, status. It never names a model.
//! - [`support`]: what models share — binary `COPY`, hashing and a Bloom filter, keyset paging
//!   and the one [`QueryError`].
//! - [`models`]: one folder per read model (`members`, `messages`, `reputation`), and [`all()`],
//!   the registry.
//! - [`reactors`]: side effects driven by read models, gated behind the live position
//!   (auto-ban).

pub mod engine;
pub mod models;
pub mod reactors;
pub mod support;

pub use engine::consistency::{is_applied, wait_for_models, wait_for_position};
pub use engine::dead_letters;
pub use engine::rebuild::{rebuild, rebuild_with, RebuildConfig, RebuildProgress, RebuildReport};
pub use engine::status::{PartitionStatus, ProjectionState, ProjectionStatus, RebuildStatus};
pub use engine::worker::{
    run_projection, run_until_idle, BatchSummary, ProjectionWorker, WorkerConfig, WorkerStats,
};
pub use engine::{
    BulkFold, BulkStart, BulkWrite, EventRef, Freshness, NeedKeys, PoisonEvent, Projection,
    RawEvent, TableNames,
};
pub use models::all;
pub use support::QueryError;

use std::sync::Arc;

/// The projection named `name`, if this build has it.
pub fn by_name(name: &str) -> Option<Arc<dyn Projection>> {
    all().into_iter().find(|p| p.name() == name)
}

/// Status of every projection this build runs, plus any other registered in the database.
pub async fn status(pool: &sqlx::PgPool, partitions: u32) -> anyhow::Result<Vec<ProjectionStatus>> {
    engine::status::status(pool, partitions, &all()).await
}

/// Pauses a projection's live workers (they finish their batch and wait). Returns false for a
/// projection that was never registered.
pub async fn pause(pool: &sqlx::PgPool, name: &str) -> anyhow::Result<bool> {
    Ok(engine::state::set_paused(pool, name, true).await?)
}

/// Resumes a paused projection; its workers restart from their checkpoints.
pub async fn resume(pool: &sqlx::PgPool, name: &str) -> anyhow::Result<bool> {
    Ok(engine::state::set_paused(pool, name, false).await?)
}
