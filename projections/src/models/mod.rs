//! The read models, one folder each (`mod.rs` with the [`Projection`] impl and its SQL, a pure
//! `fold.rs`, `queries.rs`, an optional `bulk.rs` for rebuilds), each with its own migration
//! (`migrations/…_rm_<name>.sql`). Registering a model in [`all`] is all it takes for workers,
//! rebuilds, status, the CLI and the conformance suite to run it.

use crate::engine::Projection;
use std::sync::Arc;

pub mod members;
pub mod messages;
pub mod reputation;

/// Every projection this build runs.
pub fn all() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(members::MembersProjection),
        Arc::new(messages::MessagesProjection),
        Arc::new(reputation::ReputationProjection),
    ]
}
