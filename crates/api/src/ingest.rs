//! Messages and activities arriving from the platforms (through a service token, or an owner or
//! admin posting for a platform user): who sent them — the hub user holding the platform
//! account, or a shadow user made for it on first sight, who also becomes a member — and the
//! write, decided without a load in the common case.
//!
//! The common case is a known sender, already a member, and a new message: nothing is loaded
//! (the community, the sender and the membership come from what this process last saw) and the
//! write is guarded by the community's and the sender's versions, so a stale memory fails the
//! write (nothing stored) and the next attempt loads instead. A repeat of a platform item (the
//! same id) fails its append the same way, and the next attempt finds it and answers the original.
//! Concurrent first items of one new sender all try to create the same shadow user (its id is
//! derived from the account); one wins, the others load it on their next attempt.

use rookery_domain::{Decider, Membership, MembershipCommand, User, UserCommand};
use rookery_events::membership::membership_id;
use rookery_store::{Loaded, StoreError};
use uuid::Uuid;

use crate::commands::{timed, Change, CommandResult, Ctx, Tx};
pub(crate) use crate::directory::PlatformSender;
use crate::directory::Resolved;
use crate::error::ApiError;
use crate::state::AppState;

/// Attempts before a write that keeps meeting concurrent writers gives up with a conflict.
const ATTEMPTS: usize = 5;

/// Records the platform item `A` `id` (a message, an activity) in `community_id`, sent by
/// `sender`: `command` builds its command for the sender's hub user. Creates the shadow user
/// and the membership (`via: activity`) when the sender is new to the hub or the community.
/// A repeat (the item exists) answers its current version with `position: null`.
pub(crate) async fn record<A>(
    state: &AppState,
    ctx: &Ctx,
    name: &'static str,
    community_id: Uuid,
    id: String,
    sender: &PlatformSender,
    command: impl Fn(Uuid) -> A::Command,
) -> Result<CommandResult, ApiError>
where
    A: Decider,
{
    timed(name, async {
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            match try_record::<A>(state, ctx, community_id, &id, sender, &command, attempt > 0)
                .await
            {
                Ok(result) => return Ok(result),
                Err(Retry::Again(e)) => {
                    state.communities().forget(community_id);
                    last = Some(e);
                }
                Err(Retry::Fail(e)) => return Err(e),
            }
        }
        Err(last.map_or_else(
            || ApiError::Internal(anyhow::anyhow!("no attempt was made")),
            ApiError::from,
        ))
    })
    .await
}

enum Retry {
    /// Another writer (or a stale memory) got in the way: try again, loading.
    Again(StoreError),
    Fail(ApiError),
}

impl From<ApiError> for Retry {
    fn from(e: ApiError) -> Self {
        Retry::Fail(e)
    }
}

impl From<StoreError> for Retry {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { .. }
            | StoreError::Stale { .. }
            | StoreError::ClaimTaken { .. } => Retry::Again(e),
            other => Retry::Fail(other.into()),
        }
    }
}

async fn try_record<A>(
    state: &AppState,
    ctx: &Ctx,
    community_id: Uuid,
    id: &str,
    sender: &PlatformSender,
    command: &impl Fn(Uuid) -> A::Command,
    load: bool,
) -> Result<CommandResult, Retry>
where
    A: Decider,
{
    let community = state.communities().community(community_id).await?;
    if community.aggregate.archived {
        return Err(ApiError::Conflict {
            detail: "this community is archived".into(),
            field: None,
        }
        .into());
    }
    let directory = state.directory();
    let resolved = directory.resolve(state.store(), sender, load).await?;
    let user_id = resolved.user_id();

    let item: Loaded<A> = if load {
        state.store().load::<A>(id).await?
    } else {
        Loaded {
            aggregate: A::default(),
            version: 0,
        }
    };
    let change = Change::decide(id.to_string(), item, vec![command(user_id)])?;
    if change.is_empty() {
        return Ok(CommandResult {
            id: change.id,
            version: change.loaded_version,
            position: None,
        });
    }

    let mut tx = Tx::new(ctx);
    let new_user = matches!(resolved, Resolved::New { .. });
    let user_version = match resolved {
        Resolved::New { user_id } => {
            let shadow = Change::decide(
                user_id.to_string(),
                Loaded {
                    aggregate: User::default(),
                    version: 0,
                },
                vec![UserCommand::CreateShadow {
                    user_id,
                    platform: sender.platform,
                    platform_user_id: sender.platform_user_id.clone(),
                    username: sender.username.clone(),
                }],
            )?;
            tx.stage(&shadow)?;
            shadow.version()
        }
        Resolved::Known { user_id, version } => {
            tx.guard::<User>(&user_id.to_string(), version);
            version
        }
    };
    if !directory.is_member(community_id, user_id) {
        let membership = membership_id(community_id, user_id).to_string();
        // A user made by this write has no membership yet: nothing to load.
        let loaded = if new_user {
            Loaded {
                aggregate: Membership::default(),
                version: 0,
            }
        } else {
            state.store().load::<Membership>(&membership).await?
        };
        let join = Change::decide(
            membership,
            loaded,
            vec![MembershipCommand::JoinFromPlatform {
                community_id,
                user_id,
            }],
        )?;
        tx.stage(&join)?;
    }
    tx.stage(&change)?;
    tx.guard::<rookery_domain::Community>(&community_id.to_string(), community.version);
    let result = tx.commit_change(state, change).await?;
    directory.remember(sender, user_id, user_version, community_id);
    Ok(result)
}
