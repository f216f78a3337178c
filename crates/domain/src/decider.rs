//! [`Decider`]: what the application needs of an aggregate to run a command — the decision and
//! the uniqueness claims its events take — implemented beside each aggregate.

use cqrs_es::Aggregate;

use crate::claims::ClaimOp;
use crate::error::DomainError;

/// An aggregate the application can decide commands for, synchronously and without the cqrs-es
/// machinery (so it can batch and guard commits), with the uniqueness claims its events take or
/// release.
pub trait Decider: Aggregate + Clone {
    /// The events `command` produces against this state, or why it is refused.
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, DomainError>;

    /// The claims `event` takes or releases (none by default).
    fn claims(_event: &Self::Event) -> Vec<ClaimOp> {
        Vec::new()
    }
}
