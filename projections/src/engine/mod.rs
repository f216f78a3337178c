//! The engine every read model runs on. It never names a model: it drives any [`Projection`]
//! live from the bus and in rebuilds from the log, and keeps the books (checkpoints, locks,
//! state, dead letters) in its own tables (`migrations/…_projections.sql`,
//! `…_projection_dead_letters.sql`).
//!
//! # Layout
//! - [`projection`]: the [`Projection`] trait, [`TableNames`] (live vs shadow), a rebuild's
//!   optional fast path ([`BulkFold`]).
//! - [`event`]: [`RawEvent`] (a rebuild's undecoded event), [`EventRef`] (what a fold reads of
//!   an event from either source) and [`PoisonEvent`].
//! - [`worker`]: the live worker, one task per partition.
//! - [`mod@rebuild`]: rebuild without downtime into shadow tables, resumable.
//! - [`checkpoints`]: per `(projection, partition)`, in the read model's transaction.
//! - [`locks`]: one active worker per partition, one rebuild per projection.
//! - [`state`]: per projection: version, running/rebuilding/failed, paused, rebuild cursor.
//! - [`dead_letters`]: parked poison events and the operations on them.
//! - [`consistency`]: read-your-writes (has a projection applied a position?).
//! - [`mod@status`]: what operators see per projection.

pub mod checkpoints;
pub mod consistency;
pub mod dead_letters;
pub mod event;
pub mod locks;
pub mod projection;
pub mod rebuild;
pub mod state;
pub mod status;
pub mod worker;

pub use event::{EventRef, PoisonEvent, RawEvent};
pub use projection::{
    partitions_of, BulkFold, BulkStart, BulkWrite, Freshness, NeedKeys, Projection, TableNames,
};
