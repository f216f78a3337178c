//! The application service: the one path every command takes.
//!
//! Load the aggregate(s) from the event store (strongly consistent), check `If-Match`, let the
//! aggregate `decide`, then commit the events with their metadata and uniqueness claims
//! atomically at the very end (group-committed with concurrent commands when they take no
//! claims), so a rejected command stores nothing. Commands that change nothing answer the current
//! version and `position: null` without writing.
//!
//! One command skips the load: a first join (`routes::members`) is decided on a cached community
//! and staged with `Tx::guard`s, which make the insert itself confirm what the load would have.

use std::future::Future;
use std::time::Instant;

use chrono::Utc;
use cqrs_es::Aggregate;
use rookery_domain::{ClaimOp, Decider};
use rookery_events::EventMetadata;
use rookery_store::{Changes, Claim, Loaded, StoreError, UnitOfWork};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::extract::RequestMeta;
use crate::state::AppState;

/// What a command returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CommandResult {
    /// The aggregate the command addressed (for member commands, the membership's id).
    pub id: String,
    /// The aggregate's version after the command; send it as `If-Match` to change it again only
    /// if nobody else did meanwhile.
    pub version: i64,
    /// Consistency token of the last event written: pass it as `min_position` to a query to read
    /// your own write. `null` when the command changed nothing.
    pub position: Option<String>,
}

/// Who runs a command and as part of which request: stamped on every event it writes.
#[derive(Clone, Debug)]
pub(crate) struct Ctx {
    pub actor: String,
    pub meta: RequestMeta,
}

impl Ctx {
    pub fn new(auth: &AuthUser, meta: RequestMeta) -> Self {
        Self {
            actor: auth.actor(),
            meta,
        }
    }

    pub fn metadata(&self) -> EventMetadata {
        let mut m = EventMetadata::new(Utc::now()).with_actor(self.actor.clone());
        m.request_id = self.meta.request_id.clone();
        m.correlation_id = self.meta.correlation_id.clone();
        m
    }

    /// 412 when the client's `If-Match` names another version than `current`.
    pub fn check_if_match(&self, current: i64) -> Result<(), ApiError> {
        match self.meta.if_match {
            Some(expected) if expected != current => Err(ApiError::PreconditionFailed {
                expected,
                actual: current,
            }),
            _ => Ok(()),
        }
    }
}

/// The events decided for one aggregate, not yet stored.
pub(crate) struct Change<A: Aggregate> {
    pub id: String,
    /// The version the aggregate was loaded at (appends continue from it).
    pub loaded_version: i64,
    pub events: Vec<A::Event>,
    /// The aggregate with the events applied.
    pub after: A,
}

impl<A: Decider> Change<A> {
    /// Decides `commands` in order, each against the state the previous ones' events produced, so
    /// several changes to one aggregate (a PATCH) commit together or not at all.
    pub fn decide(
        id: impl Into<String>,
        loaded: Loaded<A>,
        commands: Vec<A::Command>,
    ) -> Result<Self, ApiError> {
        let mut after = loaded.aggregate;
        let mut events = Vec::new();
        for command in commands {
            let decided = Decider::decide(&after, command)?;
            for event in &decided {
                after.apply(event.clone());
            }
            events.extend(decided);
        }
        Ok(Change {
            id: id.into(),
            loaded_version: loaded.version,
            events,
            after,
        })
    }

    pub fn version(&self) -> i64 {
        self.loaded_version + self.events.len() as i64
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// The changes of one command, committed together or not at all.
pub(crate) struct Tx {
    changes: Changes,
    metadata: EventMetadata,
}

impl Tx {
    pub fn new(ctx: &Ctx) -> Self {
        Tx {
            changes: Changes::default(),
            metadata: ctx.metadata(),
        }
    }

    /// Queues `change`'s events and the claims they take or release.
    pub fn stage<A: Decider>(&mut self, change: &Change<A>) -> Result<(), ApiError> {
        if change.is_empty() {
            return Ok(());
        }
        self.changes.append::<A>(
            &change.id,
            change.loaded_version,
            &change.events,
            &self.metadata,
        )?;
        let claims: Vec<Claim> = change
            .events
            .iter()
            .flat_map(A::claims)
            .map(to_store_claim)
            .collect();
        self.changes.claim(A::TYPE, &change.id, &claims);
        Ok(())
    }

    /// Writes the staged changes only if aggregate `A` `id` is still at `version` (see
    /// [`Changes::guard`]).
    pub fn guard<A: Aggregate>(&mut self, id: &str, version: i64) {
        self.changes.guard::<A>(id, version);
    }

    /// Commits; returns the position token of the last event written.
    pub async fn commit(self, state: &AppState) -> Result<Option<String>, ApiError> {
        Ok(self.try_commit(state).await?)
    }

    /// [`Tx::commit`] with the store's own error, for callers that handle [`StoreError::Stale`].
    pub async fn try_commit(self, state: &AppState) -> Result<Option<String>, StoreError> {
        let outcome = state.store().commit(self.changes).await?;
        Ok(outcome.position.map(|p| p.to_string()))
    }

    /// Commits a transaction holding `change` (staged, with any guards) and answers with the
    /// aggregate's id, new version and the position of its last event.
    pub async fn commit_change<A: Decider>(
        self,
        state: &AppState,
        change: Change<A>,
    ) -> Result<CommandResult, StoreError> {
        let position = self.try_commit(state).await?;
        tracing::debug!(events = change.events.len(), ?position, "command committed");
        Ok(CommandResult {
            version: change.version(),
            id: change.id,
            position,
        })
    }

    /// Opens a transaction holding the staged changes (claims taken at once), for side rows
    /// that must commit with the events (credentials).
    pub async fn begin(self, state: &AppState) -> Result<UnitOfWork, ApiError> {
        Ok(state.store().begin_with(self.changes).await?)
    }
}

fn to_store_claim(op: ClaimOp) -> Claim {
    match op {
        ClaimOp::Take { kind, key } => Claim::Take {
            kind: kind.to_string(),
            key,
        },
        ClaimOp::Release { kind, key } => Claim::Release {
            kind: kind.to_string(),
            key,
        },
    }
}

/// Times a command and records it under `name` in the metrics.
pub(crate) async fn timed<T>(
    name: &'static str,
    work: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    let started = Instant::now();
    let result = work.await;
    crate::metrics::observe_command(name, started.elapsed().as_secs_f64(), result.is_ok());
    result
}

/// The generic path for a command on one aggregate: load `id`, check `If-Match`, build the
/// commands from the loaded state, decide, store, commit.
pub(crate) async fn execute<A: Decider>(
    state: &AppState,
    ctx: &Ctx,
    name: &'static str,
    id: String,
    commands: impl FnOnce(&A) -> Result<Vec<A::Command>, ApiError>,
) -> Result<CommandResult, ApiError> {
    timed(name, async {
        let loaded = state.store().load::<A>(&id).await?;
        run_loaded(state, ctx, id, loaded, commands).await
    })
    .await
}

/// [`execute`] for an aggregate the caller already loaded (e.g. the caller's own membership,
/// loaded to resolve their role).
pub(crate) async fn execute_loaded<A: Decider>(
    state: &AppState,
    ctx: &Ctx,
    name: &'static str,
    id: String,
    loaded: Loaded<A>,
    commands: impl FnOnce(&A) -> Result<Vec<A::Command>, ApiError>,
) -> Result<CommandResult, ApiError> {
    timed(name, run_loaded(state, ctx, id, loaded, commands)).await
}

#[tracing::instrument(skip_all, fields(aggregate_type = A::TYPE, aggregate_id = %id, version = loaded.version))]
async fn run_loaded<A: Decider>(
    state: &AppState,
    ctx: &Ctx,
    id: String,
    loaded: Loaded<A>,
    commands: impl FnOnce(&A) -> Result<Vec<A::Command>, ApiError>,
) -> Result<CommandResult, ApiError> {
    ctx.check_if_match(loaded.version)?;
    let commands = commands(&loaded.aggregate)?;
    let change = Change::decide(id, loaded, commands)?;
    if change.is_empty() {
        return Ok(CommandResult {
            id: change.id,
            version: change.loaded_version,
            position: None,
        });
    }
    let mut tx = Tx::new(ctx);
    tx.stage(&change)?;
    Ok(tx.commit_change(state, change).await?)
}

#[cfg(test)]
mod tests {
    use rookery_domain::Community;
    use rookery_events::{JoinMode, Platform, Role};
    use uuid::Uuid;

    use super::*;

    fn created() -> Loaded<Community> {
        let mut community = Community::default();
        community.apply(rookery_events::CommunityEvent::CommunityCreated {
            community_id: Uuid::from_u128(1),
            name: "rustaceans".into(),
            display_name: "Rustaceans".into(),
            platform: Platform::Discord,
            is_public: true,
            join_mode: JoinMode::Open,
            owner_id: Uuid::from_u128(2),
        });
        Loaded {
            aggregate: community,
            version: 1,
        }
    }

    #[test]
    fn several_commands_decide_against_each_others_events() {
        use rookery_domain::CommunityCommand as C;
        let change = Change::decide(
            "c",
            created(),
            vec![
                C::UpdateProfile {
                    actor_role: Role::Owner,
                    display_name: Some("Crabs".into()),
                    description: None,
                    is_public: None,
                },
                C::SetJoinMode {
                    actor_role: Role::Owner,
                    join_mode: JoinMode::Approval,
                },
                // Repeating the first change is a no-op once it is applied.
                C::UpdateProfile {
                    actor_role: Role::Owner,
                    display_name: Some("Crabs".into()),
                    description: None,
                    is_public: None,
                },
            ],
        )
        .unwrap_or_else(|e| panic!("rejected: {e}"));
        assert_eq!(change.events.len(), 2);
        assert_eq!(change.version(), 3);
        assert_eq!(change.after.display_name, "Crabs");
        assert_eq!(change.after.join_mode, JoinMode::Approval);
    }

    #[test]
    fn one_rejected_command_rejects_the_whole_change() {
        use rookery_domain::CommunityCommand as C;
        let result = Change::decide(
            "c",
            created(),
            vec![
                C::SetJoinMode {
                    actor_role: Role::Owner,
                    join_mode: JoinMode::Invite,
                },
                C::UpdateProfile {
                    actor_role: Role::Owner,
                    display_name: Some(" ".into()),
                    description: None,
                    is_public: None,
                },
            ],
        );
        let err = result.err().expect("rejected");
        assert_eq!(
            err.problem().errors.expect("field")[0].field,
            "display_name"
        );
    }

    #[test]
    fn if_match_must_name_the_current_version() {
        let ctx = |if_match| Ctx {
            actor: "user:x".into(),
            meta: RequestMeta {
                if_match,
                ..RequestMeta::default()
            },
        };
        assert!(ctx(None).check_if_match(4).is_ok());
        assert!(ctx(Some(4)).check_if_match(4).is_ok());
        let err = ctx(Some(3)).check_if_match(4).expect_err("stale");
        assert_eq!(err.status().as_u16(), 412);
    }

    #[test]
    fn metadata_carries_actor_request_and_correlation() {
        let ctx = Ctx {
            actor: "user:1".into(),
            meta: RequestMeta {
                request_id: Some("r1".into()),
                correlation_id: Some("c1".into()),
                if_match: None,
            },
        };
        let m = ctx.metadata();
        assert_eq!(m.actor.as_deref(), Some("user:1"));
        assert_eq!(m.request_id.as_deref(), Some("r1"));
        assert_eq!(m.correlation_id.as_deref(), Some("c1"));
        assert!(m.occurred_at().is_some());
    }
}
