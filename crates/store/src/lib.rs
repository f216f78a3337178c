//! Rookery's Postgres side.
//!
//! The `events` table is postgres-es' own plus Rookery's log columns (docs/architecture.md, "The
//! log"). Aggregates are written through [`EventStore`] — group-committed [`Changes`], or a
//! [`UnitOfWork`] when side rows (credentials) must commit with them — so that the events and the
//! uniqueness claims they take commit together and the caller learns the version and log
//! position it produced; what it writes stays readable by postgres-es (a test proves it).
//! Projection bookkeeping (checkpoints, locks, dead letters) is not here: it belongs to the
//! projection engine (rookery-projections).
//!
//! # Layout
//! - [`db`]: connecting (creating the database when missing) and [`KeptConn`] (one connection
//!   kept between uses, without the pool's two checks per use).
//! - [`migrations`]: the embedded migration set and running it (adopting databases migrated
//!   before some files were rewritten).
//! - [`event_store`]: loading aggregates, group commit, the unit of work (append + claims).
//! - [`log`]: the global log in commit-safe order, for the relay, rebuilds and replays.
//! - [`relay`]: the relay's cursor and its single-active advisory lock.
//! - [`settings`]: generated settings (e.g. the JWT secret).
//! - `testing` (feature `testing`): a fresh migrated database per test.

pub mod db;
pub mod event_store;
pub mod log;
pub mod migrations;
pub mod relay;
pub mod settings;
#[cfg(feature = "testing")]
pub mod testing;

pub use db::{connect, DbConfig, KeptConn};
pub use event_store::{Changes, Claim, CommitOutcome, EventStore, Loaded, StoreError, UnitOfWork};
pub use log::LogEntry;
pub use migrations::{migrate, NewerSchema, MIGRATOR};
pub use sqlx::PgPool;
