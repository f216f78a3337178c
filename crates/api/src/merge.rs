//! A registered user claiming a platform account the hub knew only from the platform: the
//! shadow user made for it gives the account up, and its memberships move (`MembershipMoved`
//! on the shadow's side, the status inherited on the claimer's), all in one commit. Read models
//! move the rest: the reputation history is folded again onto the claimer, messages show them.
//!
//! Which communities the shadow is a member of comes from the members read model, read once it
//! has caught up with the log. A membership committed in the moment between that read and the
//! merge (a first message of the shadow in another community) is found by a second look after
//! the merge and moved in a follow-up commit; none can come after it, because every platform
//! write names the shadow's version and the merge changed it.

use rookery_domain::{Membership, MembershipCommand, User, UserCommand};
use rookery_events::membership::membership_id;
use rookery_events::MemberStatus;
use rookery_projections::models::members::{self, MembersProjection};
use rookery_store::Loaded;
use uuid::Uuid;

use crate::commands::{Change, CommandResult, Ctx, Tx};
use crate::directory::PlatformSender;
use crate::error::ApiError;
use crate::state::AppState;

/// Links `account` to `user_id`, taking it over from `shadow` (see the module docs).
pub(crate) async fn claim_shadow(
    state: &AppState,
    ctx: &Ctx,
    user_id: Uuid,
    shadow: Loaded<User>,
    account: PlatformSender,
) -> Result<CommandResult, ApiError> {
    let Some(shadow_id) = shadow.aggregate.id else {
        return Err(ApiError::not_found("user"));
    };
    let me = state.store().load::<User>(&user_id.to_string()).await?;
    let communities = shadow_communities(state, shadow_id).await?;

    let mut tx = Tx::new(ctx);
    // The shadow lets the account go before the claimer takes it (claims apply in order).
    let released = Change::decide(
        shadow_id.to_string(),
        shadow,
        vec![UserCommand::MergeInto { into: user_id }],
    )?;
    tx.stage(&released)?;
    let linked = Change::decide(
        user_id.to_string(),
        me,
        vec![UserCommand::LinkIdentity {
            platform: account.platform,
            platform_user_id: account.platform_user_id,
            username: account.username,
        }],
    )?;
    tx.stage(&linked)?;
    stage_moves(state, &mut tx, shadow_id, user_id, &communities).await?;
    let result = tx.commit_change(state, linked).await?;

    // A second look, for a membership the first read could not see yet.
    let late: Vec<Uuid> = shadow_communities(state, shadow_id)
        .await?
        .into_iter()
        .filter(|c| !communities.contains(c))
        .collect();
    if !late.is_empty() {
        let mut tx = Tx::new(ctx);
        stage_moves(state, &mut tx, shadow_id, user_id, &late).await?;
        tx.commit(state).await?;
    }
    Ok(result)
}

/// The communities the shadow has a membership in that has not moved yet, from the members read
/// model once it has applied everything committed so far (not only the commit-safe head, which
/// a long transaction anywhere on the server holds back).
async fn shadow_communities(state: &AppState, shadow_id: Uuid) -> Result<Vec<Uuid>, ApiError> {
    let config = state.config();
    if let Some(head) = rookery_store::log::latest(state.pool()).await? {
        let behind = rookery_projections::wait_for_models(
            state.pool(),
            &[&MembersProjection],
            config.partitions,
            head,
            config.read_wait,
        )
        .await
        .map_err(|e| ApiError::Internal(e.context("waiting for the members read model")))?;
        if behind.is_some() {
            return Err(ApiError::Unavailable {
                detail: "the members read model is behind; retry shortly".into(),
                retry_after: Some(1),
                errors: vec![],
            });
        }
    }
    Ok(members::memberships_of(state.pool(), shadow_id)
        .await?
        .into_iter()
        .filter(|(_, status)| *status != MemberStatus::Left)
        .map(|(c, _)| c)
        .collect())
}

/// Stages, for each community, the shadow's membership moving and the claimer inheriting it (the
/// statuses as the write side has them, not the read model).
async fn stage_moves(
    state: &AppState,
    tx: &mut Tx,
    shadow_id: Uuid,
    user_id: Uuid,
    communities: &[Uuid],
) -> Result<(), ApiError> {
    for community_id in communities {
        let theirs = membership_id(*community_id, shadow_id).to_string();
        let mine = membership_id(*community_id, user_id).to_string();
        let (shadow_membership, my_membership) = state
            .store()
            .load_two::<Membership, Membership>(&theirs, &mine)
            .await?;
        let shadow_status = shadow_membership.aggregate.status;
        if shadow_status.is_none() || shadow_status == Some(MemberStatus::Left) {
            continue;
        }
        let moved = Change::decide(
            theirs,
            shadow_membership,
            vec![MembershipCommand::MoveTo {
                to_user_id: user_id,
            }],
        )?;
        tx.stage(&moved)?;
        let inherited = Change::decide(
            mine,
            my_membership,
            vec![MembershipCommand::Inherit {
                community_id: *community_id,
                user_id,
                shadow_status,
            }],
        )?;
        tx.stage(&inherited)?;
    }
    Ok(())
}
