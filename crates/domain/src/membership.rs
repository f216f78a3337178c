//! The `membership` aggregate: one `community × hub user` pair, its id from
//! [`rookery_events::membership::membership_id`]. It carries the user's status and role in that
//! community; everything about the community itself arrives in the command
//! ([`CommunityContext`], the actor's role), resolved by the caller.

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use rookery_events::{
    aggregate_types, Decimal4, JoinMode, JoinVia, MemberStatus, MembershipEvent, Role,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::decider::Decider;
use crate::validation::{validate_reason, validate_required_reason};
use crate::DomainError;

#[derive(Default, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default)]
pub struct Membership {
    pub community_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    /// `None` until the user first joins, asks to join or is banned.
    pub status: Option<MemberStatus>,
    /// Set only while the membership is active.
    pub role: Option<Role>,
}

/// What a join needs to know about the community, read by the caller from the community.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommunityContext {
    pub join_mode: JoinMode,
    pub archived: bool,
}

/// `actor_*` fields describe who sends the command, as resolved by the caller; the target is the
/// membership's own user. Not `Deserialize` on purpose: a role must never come from a request body.
#[derive(Clone, Debug, PartialEq)]
pub enum MembershipCommand {
    /// The founder becomes owner, in the same commit as `CommunityCreated`.
    Found {
        community_id: Uuid,
        owner_id: Uuid,
    },
    /// The user joins by themself (or asks to, in approval mode).
    Join {
        community_id: Uuid,
        user_id: Uuid,
        context: CommunityContext,
    },
    /// An admin adds the user or approves their request.
    Add {
        community_id: Uuid,
        user_id: Uuid,
        actor_role: Role,
        context: CommunityContext,
    },
    ChangeRole {
        actor_id: Uuid,
        actor_role: Role,
        role: Role,
    },
    /// The user leaves, or withdraws a join request.
    Leave,
    /// An admin removes a member or rejects a join request.
    Remove {
        actor_id: Uuid,
        actor_role: Role,
        reason: Option<String>,
    },
    /// Carries the ids because a user may be banned before ever joining.
    Ban {
        community_id: Uuid,
        user_id: Uuid,
        actor_id: Uuid,
        actor_role: Role,
        reason: Option<String>,
    },
    Unban {
        actor_role: Role,
    },
    /// The user's first message or activity in the community arrived from a platform: they
    /// become a member unless they ever were one (or were banned).
    JoinFromPlatform {
        community_id: Uuid,
        user_id: Uuid,
    },
    /// Moderation: moderators and above, on members ranked below them.
    Warn {
        actor_id: Uuid,
        actor_role: Role,
        reason: Option<String>,
    },
    Timeout {
        actor_id: Uuid,
        actor_role: Role,
        duration_secs: u64,
        reason: Option<String>,
    },
    Kick {
        actor_id: Uuid,
        actor_role: Role,
        reason: Option<String>,
    },
    /// Owners and admins, on members ranked below them, with a reason.
    AdjustReputation {
        actor_id: Uuid,
        actor_role: Role,
        delta: Decimal4,
        reason: String,
    },
    SetReputation {
        actor_id: Uuid,
        actor_role: Role,
        score: Decimal4,
        reason: String,
    },
    /// A shadow user's membership moves to the registered user `to_user_id`.
    MoveTo {
        to_user_id: Uuid,
    },
    /// The registered user's side of a move: what the shadow's membership was becomes theirs
    /// (an active membership, or a ban), unless they already have it.
    Inherit {
        community_id: Uuid,
        user_id: Uuid,
        shadow_status: Option<MemberStatus>,
    },
}

/// The longest timeout: 14 days, as the platforms allow.
pub const MAX_TIMEOUT_SECS: u64 = 14 * 24 * 3600;

/// Actions one member takes on another; they share the same authority rules.
#[derive(Clone, Copy)]
enum Action {
    ChangeRole,
    Remove,
    Ban,
    Moderate,
    Reputation,
}

impl Membership {
    pub fn is_active(&self) -> bool {
        self.status == Some(MemberStatus::Active)
    }

    fn is(&self, status: MemberStatus) -> bool {
        self.status == Some(status)
    }

    fn is_owner(&self) -> bool {
        self.is_active() && self.role == Some(Role::Owner)
    }

    /// Privilege of the target; anyone who is not an active member ranks below every role.
    fn rank(&self) -> u8 {
        self.role.map_or(0, Role::rank)
    }

    /// The `(community, user)` pair, for commands that do not carry it.
    fn subject(&self) -> Result<(Uuid, Uuid), DomainError> {
        match (self.community_id, self.user_id) {
            (Some(community_id), Some(user_id)) => Ok((community_id, user_id)),
            _ => Err(DomainError::NotFound("member")),
        }
    }

    /// Commands that carry the pair must address this aggregate's pair; a mismatch means the
    /// caller derived the aggregate id wrongly, and going on would corrupt the stream.
    fn check_subject(&self, community_id: Uuid, user_id: Uuid) -> Result<(), DomainError> {
        let matches = self.community_id.is_none_or(|c| c == community_id)
            && self.user_id.is_none_or(|u| u == user_id);
        if matches {
            Ok(())
        } else {
            Err(DomainError::invalid_state(
                "the command addresses a different membership",
            ))
        }
    }

    /// Acting on another member takes enough privilege, never applies to oneself or the owner,
    /// and only reaches members ranked below the actor.
    fn check_authority(
        &self,
        action: Action,
        target_id: Uuid,
        actor_id: Uuid,
        actor_role: Role,
    ) -> Result<(), DomainError> {
        let (allowed, privilege, own, owner, rank) = match action {
            Action::ChangeRole => (
                actor_role.can_manage(),
                "only owners and admins can change roles",
                "you cannot change your own role",
                "the owner cannot be demoted; transfer ownership first",
                "you can only change the role of members ranked below you",
            ),
            Action::Remove => (
                actor_role.can_manage(),
                "only owners and admins can remove members",
                "you cannot remove yourself; leave the community instead",
                "the owner cannot be removed; transfer ownership first",
                "you can only remove members ranked below you",
            ),
            Action::Ban => (
                actor_role.can_moderate(),
                "only moderators and above can ban members",
                "you cannot ban yourself",
                "the owner cannot be banned",
                "you can only ban members ranked below you",
            ),
            Action::Moderate => (
                actor_role.can_moderate(),
                "only moderators and above can warn, time out or kick members",
                "you cannot moderate yourself",
                "the owner cannot be moderated",
                "you can only moderate members ranked below you",
            ),
            Action::Reputation => (
                actor_role.can_manage(),
                "only owners and admins can change reputation",
                "you cannot change your own reputation",
                "the owner's reputation cannot be changed by hand",
                "you can only change the reputation of members ranked below you",
            ),
        };
        if !allowed {
            return Err(DomainError::forbidden(privilege));
        }
        if target_id == actor_id {
            return Err(DomainError::forbidden(own));
        }
        if self.is_owner() {
            return Err(DomainError::invalid_state(owner));
        }
        if actor_role.rank() <= self.rank() {
            return Err(DomainError::forbidden(rank));
        }
        Ok(())
    }

    /// All the rules: the events `command` produces from this state, without applying them.
    pub fn decide(&self, command: MembershipCommand) -> Result<Vec<MembershipEvent>, DomainError> {
        use MemberStatus as S;
        use MembershipCommand as C;
        use MembershipEvent as E;

        match command {
            C::Found {
                community_id,
                owner_id,
            } => {
                if self.status.is_some() {
                    return Err(DomainError::conflict("already a member"));
                }
                self.check_subject(community_id, owner_id)?;
                Ok(vec![E::MemberJoined {
                    community_id,
                    user_id: owner_id,
                    role: Role::Owner,
                    via: None,
                }])
            }
            C::Join {
                community_id,
                user_id,
                context,
            } => {
                self.check_subject(community_id, user_id)?;
                if context.archived {
                    return Err(DomainError::invalid_state("this community is archived"));
                }
                if self.is(S::Banned) {
                    return Err(DomainError::forbidden("banned from this community"));
                }
                if self.is(S::Active) {
                    return Err(DomainError::conflict("already a member"));
                }
                match context.join_mode {
                    JoinMode::Open => Ok(vec![E::MemberJoined {
                        community_id,
                        user_id,
                        role: Role::Member,
                        via: None,
                    }]),
                    JoinMode::Approval if self.is(S::Pending) => {
                        Err(DomainError::conflict("join request pending"))
                    }
                    JoinMode::Approval => Ok(vec![E::JoinRequested {
                        community_id,
                        user_id,
                    }]),
                    JoinMode::Invite => Err(DomainError::forbidden(
                        "this community is invite-only; ask an admin to add you",
                    )),
                }
            }
            C::Add {
                community_id,
                user_id,
                actor_role,
                context,
            } => {
                self.check_subject(community_id, user_id)?;
                if context.archived {
                    return Err(DomainError::invalid_state("this community is archived"));
                }
                if !actor_role.can_manage() {
                    return Err(DomainError::forbidden(
                        "only owners and admins can add members",
                    ));
                }
                if self.is(S::Banned) {
                    return Err(DomainError::conflict("user is banned; unban first"));
                }
                if self.is(S::Active) {
                    return Err(DomainError::conflict("already a member"));
                }
                Ok(vec![E::MemberJoined {
                    community_id,
                    user_id,
                    role: Role::Member,
                    via: None,
                }])
            }
            C::ChangeRole {
                actor_id,
                actor_role,
                role,
            } => {
                let current = match self.role {
                    Some(current) if self.is_active() => current,
                    _ => return Err(DomainError::NotFound("member")),
                };
                let (community_id, user_id) = self.subject()?;
                self.check_authority(Action::ChangeRole, user_id, actor_id, actor_role)?;
                if role == Role::Owner {
                    return Err(DomainError::invalid_state(
                        "ownership can only be transferred",
                    ));
                }
                if actor_role.rank() <= role.rank() {
                    return Err(DomainError::forbidden(
                        "you can only grant roles ranked below your own",
                    ));
                }
                if role == current {
                    return Ok(vec![]);
                }
                Ok(vec![E::MemberRoleChanged {
                    community_id,
                    user_id,
                    from: current,
                    to: role,
                }])
            }
            C::Leave => {
                if self.is_owner() {
                    return Err(DomainError::invalid_state(
                        "the owner cannot leave; transfer ownership first",
                    ));
                }
                if !(self.is(S::Active) || self.is(S::Pending)) {
                    return Err(DomainError::NotFound("member"));
                }
                let (community_id, user_id) = self.subject()?;
                Ok(vec![E::MemberLeft {
                    community_id,
                    user_id,
                }])
            }
            C::Remove {
                actor_id,
                actor_role,
                reason,
            } => {
                if !(self.is(S::Active) || self.is(S::Pending)) {
                    return Err(DomainError::NotFound("member"));
                }
                let (community_id, user_id) = self.subject()?;
                self.check_authority(Action::Remove, user_id, actor_id, actor_role)?;
                if let Some(reason) = &reason {
                    validate_reason(reason)?;
                }
                Ok(vec![E::MemberRemoved {
                    community_id,
                    user_id,
                    reason,
                }])
            }
            C::Ban {
                community_id,
                user_id,
                actor_id,
                actor_role,
                reason,
            } => {
                self.check_subject(community_id, user_id)?;
                self.check_authority(Action::Ban, user_id, actor_id, actor_role)?;
                if let Some(reason) = &reason {
                    validate_reason(reason)?;
                }
                if self.is(S::Banned) {
                    return Ok(vec![]);
                }
                Ok(vec![E::MemberBanned {
                    community_id,
                    user_id,
                    reason,
                }])
            }
            C::Unban { actor_role } => {
                if !actor_role.can_moderate() {
                    return Err(DomainError::forbidden(
                        "only moderators and above can unban members",
                    ));
                }
                if !self.is(S::Banned) {
                    return Err(DomainError::conflict("user is not banned"));
                }
                let (community_id, user_id) = self.subject()?;
                Ok(vec![E::MemberUnbanned {
                    community_id,
                    user_id,
                }])
            }
            C::JoinFromPlatform {
                community_id,
                user_id,
            } => {
                self.check_subject(community_id, user_id)?;
                if self.status.is_some() {
                    return Ok(vec![]);
                }
                Ok(vec![E::MemberJoined {
                    community_id,
                    user_id,
                    role: Role::Member,
                    via: Some(JoinVia::Activity),
                }])
            }
            C::Warn {
                actor_id,
                actor_role,
                reason,
            } => {
                let (community_id, user_id) = self.moderated(actor_id, actor_role, &reason)?;
                Ok(vec![E::MemberWarned {
                    community_id,
                    user_id,
                    reason,
                }])
            }
            C::Timeout {
                actor_id,
                actor_role,
                duration_secs,
                reason,
            } => {
                let (community_id, user_id) = self.moderated(actor_id, actor_role, &reason)?;
                if !(1..=MAX_TIMEOUT_SECS).contains(&duration_secs) {
                    return Err(DomainError::validation(
                        "duration_secs",
                        format!("must be from 1 to {MAX_TIMEOUT_SECS} seconds (14 days)"),
                    ));
                }
                Ok(vec![E::MemberTimedOut {
                    community_id,
                    user_id,
                    duration_secs,
                    reason,
                }])
            }
            C::Kick {
                actor_id,
                actor_role,
                reason,
            } => {
                let (community_id, user_id) = self.moderated(actor_id, actor_role, &reason)?;
                Ok(vec![E::MemberKicked {
                    community_id,
                    user_id,
                    reason,
                }])
            }
            C::AdjustReputation {
                actor_id,
                actor_role,
                delta,
                reason,
            } => {
                let (community_id, user_id) =
                    self.reputation_change(actor_id, actor_role, &reason)?;
                if delta == Decimal4::ZERO {
                    return Err(DomainError::validation("delta", "must not be zero"));
                }
                if delta.0.abs() > Decimal4::units(1_000).0 {
                    return Err(DomainError::validation("delta", "must be within ±1000"));
                }
                Ok(vec![E::ReputationAdjusted {
                    community_id,
                    user_id,
                    delta,
                    reason: reason.trim().to_string(),
                }])
            }
            C::SetReputation {
                actor_id,
                actor_role,
                score,
                reason,
            } => {
                let (community_id, user_id) =
                    self.reputation_change(actor_id, actor_role, &reason)?;
                if score.is_negative() || score > Decimal4::units(10_000) {
                    return Err(DomainError::validation(
                        "score",
                        "must be from 0 to 10000 (the community's range applies)",
                    ));
                }
                Ok(vec![E::ReputationSet {
                    community_id,
                    user_id,
                    score,
                    reason: reason.trim().to_string(),
                }])
            }
            C::MoveTo { to_user_id } => {
                let (community_id, user_id) = self.subject()?;
                if to_user_id == user_id {
                    return Err(DomainError::invalid_state(
                        "a membership cannot move to itself",
                    ));
                }
                Ok(vec![E::MembershipMoved {
                    community_id,
                    user_id,
                    to_user_id,
                }])
            }
            C::Inherit {
                community_id,
                user_id,
                shadow_status,
            } => {
                self.check_subject(community_id, user_id)?;
                match shadow_status {
                    Some(S::Banned) if !self.is(S::Banned) && !self.is_owner() => {
                        Ok(vec![E::MemberBanned {
                            community_id,
                            user_id,
                            reason: Some("banned on a platform account now linked".into()),
                        }])
                    }
                    Some(S::Active) if !self.is(S::Active) && !self.is(S::Banned) => {
                        Ok(vec![E::MemberJoined {
                            community_id,
                            user_id,
                            role: Role::Member,
                            via: Some(JoinVia::Merge),
                        }])
                    }
                    _ => Ok(vec![]),
                }
            }
        }
    }

    /// The pair of an active member a moderator may act on, the reason checked.
    fn moderated(
        &self,
        actor_id: Uuid,
        actor_role: Role,
        reason: &Option<String>,
    ) -> Result<(Uuid, Uuid), DomainError> {
        if !self.is_active() {
            return Err(DomainError::NotFound("member"));
        }
        let (community_id, user_id) = self.subject()?;
        self.check_authority(Action::Moderate, user_id, actor_id, actor_role)?;
        if let Some(reason) = reason {
            validate_reason(reason)?;
        }
        Ok((community_id, user_id))
    }

    /// The pair of a member whose reputation an admin may change, the reason required.
    fn reputation_change(
        &self,
        actor_id: Uuid,
        actor_role: Role,
        reason: &str,
    ) -> Result<(Uuid, Uuid), DomainError> {
        if self.status.is_none() {
            return Err(DomainError::NotFound("member"));
        }
        let (community_id, user_id) = self.subject()?;
        self.check_authority(Action::Reputation, user_id, actor_id, actor_role)?;
        validate_required_reason(reason)?;
        Ok((community_id, user_id))
    }
}

impl Aggregate for Membership {
    const TYPE: &'static str = aggregate_types::MEMBERSHIP;
    type Command = MembershipCommand;
    type Event = MembershipEvent;
    type Error = DomainError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        let (community_id, user_id) = event.subject();
        self.community_id = Some(community_id);
        self.user_id = Some(user_id);
        let (status, role) = match event {
            MembershipEvent::MemberJoined { role, .. } => (MemberStatus::Active, Some(role)),
            MembershipEvent::JoinRequested { .. } => (MemberStatus::Pending, None),
            MembershipEvent::MemberRoleChanged { to, .. } => (MemberStatus::Active, Some(to)),
            MembershipEvent::MemberLeft { .. } => (MemberStatus::Left, None),
            MembershipEvent::MemberRemoved { .. } | MembershipEvent::MemberKicked { .. } => {
                (MemberStatus::Removed, None)
            }
            MembershipEvent::MemberBanned { .. } => (MemberStatus::Banned, None),
            // Unbanning lifts the ban, it does not restore the membership: they join again.
            MembershipEvent::MemberUnbanned { .. } => (MemberStatus::Left, None),
            // The membership now belongs to another user.
            MembershipEvent::MembershipMoved { .. } => (MemberStatus::Left, None),
            MembershipEvent::MemberWarned { .. }
            | MembershipEvent::MemberTimedOut { .. }
            | MembershipEvent::ReputationAdjusted { .. }
            | MembershipEvent::ReputationSet { .. } => return,
        };
        self.status = Some(status);
        self.role = role;
    }
}

impl Decider for Membership {
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, DomainError> {
        Membership::decide(self, command)
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::{AggregateTestExecutor, TestFramework};

    use super::*;

    const COMMUNITY: Uuid = Uuid::from_u128(1);
    const USER: Uuid = Uuid::from_u128(2);
    const ACTOR: Uuid = Uuid::from_u128(3);

    const OPEN: CommunityContext = CommunityContext {
        join_mode: JoinMode::Open,
        archived: false,
    };
    const APPROVAL: CommunityContext = CommunityContext {
        join_mode: JoinMode::Approval,
        archived: false,
    };
    const INVITE: CommunityContext = CommunityContext {
        join_mode: JoinMode::Invite,
        archived: false,
    };
    const ARCHIVED: CommunityContext = CommunityContext {
        join_mode: JoinMode::Open,
        archived: true,
    };

    fn given(events: Vec<MembershipEvent>) -> AggregateTestExecutor<Membership> {
        TestFramework::<Membership>::with(()).given(events)
    }

    fn joined(role: Role) -> MembershipEvent {
        MembershipEvent::MemberJoined {
            community_id: COMMUNITY,
            user_id: USER,
            role,
            via: None,
        }
    }

    fn requested() -> MembershipEvent {
        MembershipEvent::JoinRequested {
            community_id: COMMUNITY,
            user_id: USER,
        }
    }

    fn left() -> MembershipEvent {
        MembershipEvent::MemberLeft {
            community_id: COMMUNITY,
            user_id: USER,
        }
    }

    fn removed() -> MembershipEvent {
        MembershipEvent::MemberRemoved {
            community_id: COMMUNITY,
            user_id: USER,
            reason: None,
        }
    }

    fn banned() -> MembershipEvent {
        MembershipEvent::MemberBanned {
            community_id: COMMUNITY,
            user_id: USER,
            reason: None,
        }
    }

    fn unbanned() -> MembershipEvent {
        MembershipEvent::MemberUnbanned {
            community_id: COMMUNITY,
            user_id: USER,
        }
    }

    fn role_changed(from: Role, to: Role) -> MembershipEvent {
        MembershipEvent::MemberRoleChanged {
            community_id: COMMUNITY,
            user_id: USER,
            from,
            to,
        }
    }

    fn join(context: CommunityContext) -> MembershipCommand {
        MembershipCommand::Join {
            community_id: COMMUNITY,
            user_id: USER,
            context,
        }
    }

    fn add(actor_role: Role) -> MembershipCommand {
        MembershipCommand::Add {
            community_id: COMMUNITY,
            user_id: USER,
            actor_role,
            context: INVITE,
        }
    }

    fn change_role(actor_role: Role, role: Role) -> MembershipCommand {
        MembershipCommand::ChangeRole {
            actor_id: ACTOR,
            actor_role,
            role,
        }
    }

    fn remove(actor_role: Role) -> MembershipCommand {
        MembershipCommand::Remove {
            actor_id: ACTOR,
            actor_role,
            reason: None,
        }
    }

    fn ban(actor_role: Role) -> MembershipCommand {
        MembershipCommand::Ban {
            community_id: COMMUNITY,
            user_id: USER,
            actor_id: ACTOR,
            actor_role,
            reason: None,
        }
    }

    fn fold(events: Vec<MembershipEvent>) -> Membership {
        let mut membership = Membership::default();
        events.into_iter().for_each(|e| membership.apply(e));
        membership
    }

    // Found

    #[test]
    fn founding_makes_the_owner_a_member() {
        given(vec![])
            .when(MembershipCommand::Found {
                community_id: COMMUNITY,
                owner_id: USER,
            })
            .then_expect_events(vec![joined(Role::Owner)]);
    }

    #[test]
    fn founding_an_existing_membership_conflicts() {
        given(vec![joined(Role::Member)])
            .when(MembershipCommand::Found {
                community_id: COMMUNITY,
                owner_id: USER,
            })
            .then_expect_error(DomainError::conflict("already a member"));
    }

    // Join

    #[test]
    fn joining_an_open_community_makes_a_member() {
        given(vec![])
            .when(join(OPEN))
            .then_expect_events(vec![joined(Role::Member)]);
    }

    #[test]
    fn joining_an_approval_community_requests_to_join() {
        given(vec![])
            .when(join(APPROVAL))
            .then_expect_events(vec![requested()]);
    }

    #[test]
    fn invite_only_community_refuses_joins() {
        given(vec![])
            .when(join(INVITE))
            .then_expect_error(DomainError::forbidden(
                "this community is invite-only; ask an admin to add you",
            ));
    }

    #[test]
    fn archived_community_refuses_joins() {
        given(vec![])
            .when(join(ARCHIVED))
            .then_expect_error(DomainError::invalid_state("this community is archived"));
    }

    #[test]
    fn banned_user_cannot_join() {
        given(vec![banned()])
            .when(join(OPEN))
            .then_expect_error(DomainError::forbidden("banned from this community"));
    }

    #[test]
    fn active_member_cannot_join_again() {
        given(vec![joined(Role::Member)])
            .when(join(OPEN))
            .then_expect_error(DomainError::conflict("already a member"));
    }

    #[test]
    fn pending_request_cannot_be_repeated() {
        given(vec![requested()])
            .when(join(APPROVAL))
            .then_expect_error(DomainError::conflict("join request pending"));
    }

    #[test]
    fn pending_user_joins_once_the_community_is_open() {
        given(vec![requested()])
            .when(join(OPEN))
            .then_expect_events(vec![joined(Role::Member)]);
    }

    #[test]
    fn members_who_left_or_were_removed_may_rejoin() {
        given(vec![joined(Role::Member), left()])
            .when(join(OPEN))
            .then_expect_events(vec![joined(Role::Member)]);
        given(vec![joined(Role::Member), removed()])
            .when(join(APPROVAL))
            .then_expect_events(vec![requested()]);
    }

    #[test]
    fn a_command_for_another_pair_is_rejected() {
        given(vec![joined(Role::Member)])
            .when(MembershipCommand::Join {
                community_id: COMMUNITY,
                user_id: ACTOR,
                context: OPEN,
            })
            .then_expect_error(DomainError::invalid_state(
                "the command addresses a different membership",
            ));
    }

    // Add

    #[test]
    fn admin_adds_a_user_to_an_invite_only_community() {
        given(vec![])
            .when(add(Role::Admin))
            .then_expect_events(vec![joined(Role::Member)]);
    }

    #[test]
    fn admin_approves_a_pending_request() {
        given(vec![requested()])
            .when(add(Role::Owner))
            .then_expect_events(vec![joined(Role::Member)]);
    }

    #[test]
    fn moderator_cannot_add_members() {
        given(vec![requested()])
            .when(add(Role::Moderator))
            .then_expect_error(DomainError::forbidden(
                "only owners and admins can add members",
            ));
    }

    #[test]
    fn adding_a_banned_user_conflicts() {
        given(vec![banned()])
            .when(add(Role::Admin))
            .then_expect_error(DomainError::conflict("user is banned; unban first"));
    }

    #[test]
    fn adding_an_active_member_conflicts() {
        given(vec![joined(Role::Vip)])
            .when(add(Role::Admin))
            .then_expect_error(DomainError::conflict("already a member"));
    }

    #[test]
    fn adding_to_an_archived_community_is_refused() {
        given(vec![])
            .when(MembershipCommand::Add {
                community_id: COMMUNITY,
                user_id: USER,
                actor_role: Role::Owner,
                context: ARCHIVED,
            })
            .then_expect_error(DomainError::invalid_state("this community is archived"));
    }

    // ChangeRole

    #[test]
    fn admin_promotes_a_member_to_moderator() {
        given(vec![joined(Role::Member)])
            .when(change_role(Role::Admin, Role::Moderator))
            .then_expect_events(vec![role_changed(Role::Member, Role::Moderator)]);
    }

    #[test]
    fn owner_promotes_a_member_to_admin_and_demotes_an_admin() {
        given(vec![joined(Role::Member)])
            .when(change_role(Role::Owner, Role::Admin))
            .then_expect_events(vec![role_changed(Role::Member, Role::Admin)]);
        given(vec![joined(Role::Admin)])
            .when(change_role(Role::Owner, Role::Vip))
            .then_expect_events(vec![role_changed(Role::Admin, Role::Vip)]);
    }

    #[test]
    fn changing_the_role_of_a_non_member_is_not_found() {
        for history in [
            vec![],
            vec![requested()],
            vec![joined(Role::Member), left()],
        ] {
            given(history)
                .when(change_role(Role::Owner, Role::Vip))
                .then_expect_error(DomainError::NotFound("member"));
        }
    }

    #[test]
    fn moderator_cannot_change_roles() {
        given(vec![joined(Role::Member)])
            .when(change_role(Role::Moderator, Role::Vip))
            .then_expect_error(DomainError::forbidden(
                "only owners and admins can change roles",
            ));
    }

    #[test]
    fn nobody_can_grant_ownership() {
        given(vec![joined(Role::Admin)])
            .when(change_role(Role::Owner, Role::Owner))
            .then_expect_error(DomainError::invalid_state(
                "ownership can only be transferred",
            ));
    }

    #[test]
    fn owner_cannot_be_demoted() {
        given(vec![joined(Role::Owner)])
            .when(change_role(Role::Admin, Role::Member))
            .then_expect_error(DomainError::invalid_state(
                "the owner cannot be demoted; transfer ownership first",
            ));
    }

    #[test]
    fn admin_cannot_change_another_admins_role() {
        given(vec![joined(Role::Admin)])
            .when(change_role(Role::Admin, Role::Member))
            .then_expect_error(DomainError::forbidden(
                "you can only change the role of members ranked below you",
            ));
    }

    #[test]
    fn admin_cannot_promote_to_admin() {
        given(vec![joined(Role::Moderator)])
            .when(change_role(Role::Admin, Role::Admin))
            .then_expect_error(DomainError::forbidden(
                "you can only grant roles ranked below your own",
            ));
    }

    #[test]
    fn actor_cannot_change_their_own_role() {
        given(vec![joined(Role::Admin)])
            .when(MembershipCommand::ChangeRole {
                actor_id: USER,
                actor_role: Role::Admin,
                role: Role::Moderator,
            })
            .then_expect_error(DomainError::forbidden("you cannot change your own role"));
    }

    #[test]
    fn setting_the_same_role_emits_nothing() {
        given(vec![joined(Role::Moderator)])
            .when(change_role(Role::Admin, Role::Moderator))
            .then_expect_events(vec![]);
    }

    // Leave

    #[test]
    fn member_leaves() {
        given(vec![joined(Role::Admin)])
            .when(MembershipCommand::Leave)
            .then_expect_events(vec![left()]);
    }

    #[test]
    fn pending_request_can_be_withdrawn() {
        given(vec![requested()])
            .when(MembershipCommand::Leave)
            .then_expect_events(vec![left()]);
    }

    #[test]
    fn owner_cannot_leave() {
        given(vec![joined(Role::Owner)])
            .when(MembershipCommand::Leave)
            .then_expect_error_message("the owner cannot leave; transfer ownership first");
    }

    #[test]
    fn leaving_without_a_membership_is_not_found() {
        for history in [vec![], vec![joined(Role::Member), left()], vec![banned()]] {
            given(history)
                .when(MembershipCommand::Leave)
                .then_expect_error(DomainError::NotFound("member"));
        }
    }

    // Remove

    #[test]
    fn admin_removes_a_member_with_a_reason() {
        given(vec![joined(Role::Moderator)])
            .when(MembershipCommand::Remove {
                actor_id: ACTOR,
                actor_role: Role::Admin,
                reason: Some("inactive".into()),
            })
            .then_expect_events(vec![MembershipEvent::MemberRemoved {
                community_id: COMMUNITY,
                user_id: USER,
                reason: Some("inactive".into()),
            }]);
    }

    #[test]
    fn admin_rejects_a_pending_request() {
        given(vec![requested()])
            .when(remove(Role::Admin))
            .then_expect_events(vec![removed()]);
    }

    #[test]
    fn moderator_cannot_remove_members() {
        given(vec![joined(Role::Member)])
            .when(remove(Role::Moderator))
            .then_expect_error(DomainError::forbidden(
                "only owners and admins can remove members",
            ));
    }

    #[test]
    fn admin_cannot_remove_another_admin() {
        given(vec![joined(Role::Admin)])
            .when(remove(Role::Admin))
            .then_expect_error(DomainError::forbidden(
                "you can only remove members ranked below you",
            ));
    }

    #[test]
    fn owner_cannot_be_removed() {
        given(vec![joined(Role::Owner)])
            .when(remove(Role::Admin))
            .then_expect_error(DomainError::invalid_state(
                "the owner cannot be removed; transfer ownership first",
            ));
    }

    #[test]
    fn removing_oneself_is_forbidden() {
        given(vec![joined(Role::Admin)])
            .when(MembershipCommand::Remove {
                actor_id: USER,
                actor_role: Role::Admin,
                reason: None,
            })
            .then_expect_error(DomainError::forbidden(
                "you cannot remove yourself; leave the community instead",
            ));
    }

    #[test]
    fn removing_a_non_member_is_not_found() {
        for history in [vec![], vec![joined(Role::Member), removed()]] {
            given(history)
                .when(remove(Role::Owner))
                .then_expect_error(DomainError::NotFound("member"));
        }
    }

    #[test]
    fn remove_rejects_a_long_reason() {
        given(vec![joined(Role::Member)])
            .when(MembershipCommand::Remove {
                actor_id: ACTOR,
                actor_role: Role::Owner,
                reason: Some("r".repeat(501)),
            })
            .then_expect_error(DomainError::validation(
                "reason",
                "must be at most 500 characters",
            ));
    }

    // Ban

    #[test]
    fn moderator_bans_a_member_with_a_reason() {
        given(vec![joined(Role::Vip)])
            .when(MembershipCommand::Ban {
                community_id: COMMUNITY,
                user_id: USER,
                actor_id: ACTOR,
                actor_role: Role::Moderator,
                reason: Some("spam".into()),
            })
            .then_expect_events(vec![MembershipEvent::MemberBanned {
                community_id: COMMUNITY,
                user_id: USER,
                reason: Some("spam".into()),
            }]);
    }

    #[test]
    fn users_can_be_banned_before_they_ever_join() {
        given(vec![])
            .when(ban(Role::Moderator))
            .then_expect_events(vec![banned()]);
        given(vec![requested()])
            .when(ban(Role::Moderator))
            .then_expect_events(vec![banned()]);
        given(vec![joined(Role::Member), left()])
            .when(ban(Role::Moderator))
            .then_expect_events(vec![banned()]);
    }

    #[test]
    fn moderator_cannot_ban_admin() {
        given(vec![joined(Role::Admin)])
            .when(ban(Role::Moderator))
            .then_expect_error(DomainError::forbidden(
                "you can only ban members ranked below you",
            ));
    }

    #[test]
    fn moderator_cannot_ban_another_moderator() {
        given(vec![joined(Role::Moderator)])
            .when(ban(Role::Moderator))
            .then_expect_error(DomainError::forbidden(
                "you can only ban members ranked below you",
            ));
    }

    #[test]
    fn vip_cannot_ban() {
        given(vec![joined(Role::Member)])
            .when(ban(Role::Vip))
            .then_expect_error(DomainError::forbidden(
                "only moderators and above can ban members",
            ));
    }

    #[test]
    fn owner_cannot_be_banned() {
        given(vec![joined(Role::Owner)])
            .when(ban(Role::Admin))
            .then_expect_error(DomainError::invalid_state("the owner cannot be banned"));
    }

    #[test]
    fn moderator_cannot_ban_themself() {
        given(vec![])
            .when(MembershipCommand::Ban {
                community_id: COMMUNITY,
                user_id: USER,
                actor_id: USER,
                actor_role: Role::Moderator,
                reason: None,
            })
            .then_expect_error(DomainError::forbidden("you cannot ban yourself"));
    }

    #[test]
    fn banning_a_banned_user_emits_nothing() {
        given(vec![joined(Role::Member), banned()])
            .when(ban(Role::Admin))
            .then_expect_events(vec![]);
    }

    #[test]
    fn ban_rejects_a_long_reason() {
        given(vec![])
            .when(MembershipCommand::Ban {
                community_id: COMMUNITY,
                user_id: USER,
                actor_id: ACTOR,
                actor_role: Role::Moderator,
                reason: Some("r".repeat(501)),
            })
            .then_expect_error(DomainError::validation(
                "reason",
                "must be at most 500 characters",
            ));
    }

    #[test]
    fn banned_member_keeps_the_pair_but_loses_the_role() {
        let membership = fold(vec![joined(Role::Moderator), banned()]);
        assert_eq!(
            membership,
            Membership {
                community_id: Some(COMMUNITY),
                user_id: Some(USER),
                status: Some(MemberStatus::Banned),
                role: None,
            }
        );
    }

    // Unban

    #[test]
    fn moderator_unbans_a_user() {
        given(vec![banned()])
            .when(MembershipCommand::Unban {
                actor_role: Role::Moderator,
            })
            .then_expect_events(vec![unbanned()]);
    }

    #[test]
    fn unbanned_user_must_join_again() {
        let membership = fold(vec![joined(Role::Member), banned(), unbanned()]);
        assert_eq!(membership.status, Some(MemberStatus::Left));
        assert!(!membership.is_active());
        given(vec![joined(Role::Member), banned(), unbanned()])
            .when(join(OPEN))
            .then_expect_events(vec![joined(Role::Member)]);
    }

    #[test]
    fn unbanning_a_user_who_is_not_banned_conflicts() {
        for history in [vec![], vec![joined(Role::Member)]] {
            given(history)
                .when(MembershipCommand::Unban {
                    actor_role: Role::Admin,
                })
                .then_expect_error(DomainError::conflict("user is not banned"));
        }
    }

    #[test]
    fn vip_cannot_unban() {
        given(vec![banned()])
            .when(MembershipCommand::Unban {
                actor_role: Role::Vip,
            })
            .then_expect_error_message("only moderators and above can unban members");
    }

    // ---- moderation, reputation by hand, platform joins, moves ----

    fn warn(actor_role: Role) -> MembershipCommand {
        MembershipCommand::Warn {
            actor_id: ACTOR,
            actor_role,
            reason: Some("caps".into()),
        }
    }

    #[test]
    fn moderators_warn_time_out_and_kick_members() {
        given(vec![joined(Role::Member)])
            .when(warn(Role::Moderator))
            .then_expect_events(vec![MembershipEvent::MemberWarned {
                community_id: COMMUNITY,
                user_id: USER,
                reason: Some("caps".into()),
            }]);
        given(vec![joined(Role::Member)])
            .when(MembershipCommand::Timeout {
                actor_id: ACTOR,
                actor_role: Role::Moderator,
                duration_secs: 600,
                reason: None,
            })
            .then_expect_events(vec![MembershipEvent::MemberTimedOut {
                community_id: COMMUNITY,
                user_id: USER,
                duration_secs: 600,
                reason: None,
            }]);
        given(vec![joined(Role::Vip)])
            .when(MembershipCommand::Kick {
                actor_id: ACTOR,
                actor_role: Role::Admin,
                reason: Some("out".into()),
            })
            .then_expect_events(vec![MembershipEvent::MemberKicked {
                community_id: COMMUNITY,
                user_id: USER,
                reason: Some("out".into()),
            }]);
    }

    #[test]
    fn a_member_cannot_moderate_a_moderator_and_timeouts_are_bounded() {
        given(vec![joined(Role::Moderator)])
            .when(warn(Role::Member))
            .then_expect_error(DomainError::Forbidden(
                "only moderators and above can warn, time out or kick members".into(),
            ));
        given(vec![joined(Role::Moderator)])
            .when(warn(Role::Moderator))
            .then_expect_error(DomainError::Forbidden(
                "you can only moderate members ranked below you".into(),
            ));
        given(vec![joined(Role::Owner)])
            .when(warn(Role::Admin))
            .then_expect_error(DomainError::InvalidState(
                "the owner cannot be moderated".into(),
            ));
        for duration_secs in [0, MAX_TIMEOUT_SECS + 1] {
            let err = given(vec![joined(Role::Member)])
                .when(MembershipCommand::Timeout {
                    actor_id: ACTOR,
                    actor_role: Role::Moderator,
                    duration_secs,
                    reason: None,
                })
                .inspect_result()
                .expect_err("refused");
            assert!(
                matches!(
                    err,
                    DomainError::Validation {
                        field: "duration_secs",
                        ..
                    }
                ),
                "{err:?}"
            );
        }
        given(vec![])
            .when(warn(Role::Moderator))
            .then_expect_error(DomainError::NotFound("member"));
    }

    #[test]
    fn a_kicked_member_may_join_again() {
        let kicked = MembershipEvent::MemberKicked {
            community_id: COMMUNITY,
            user_id: USER,
            reason: None,
        };
        given(vec![joined(Role::Member), kicked])
            .when(MembershipCommand::Join {
                community_id: COMMUNITY,
                user_id: USER,
                context: OPEN,
            })
            .then_expect_events(vec![joined(Role::Member)]);
    }

    #[test]
    fn admins_adjust_and_set_reputation_with_a_reason() {
        let d = |x: f64| Decimal4::from_f64(x).expect("finite");
        given(vec![joined(Role::Member)])
            .when(MembershipCommand::AdjustReputation {
                actor_id: ACTOR,
                actor_role: Role::Admin,
                delta: d(-12.5),
                reason: " abuse ".into(),
            })
            .then_expect_events(vec![MembershipEvent::ReputationAdjusted {
                community_id: COMMUNITY,
                user_id: USER,
                delta: d(-12.5),
                reason: "abuse".into(),
            }]);
        given(vec![joined(Role::Member)])
            .when(MembershipCommand::SetReputation {
                actor_id: ACTOR,
                actor_role: Role::Owner,
                score: d(700.0),
                reason: "appeal".into(),
            })
            .then_expect_events(vec![MembershipEvent::ReputationSet {
                community_id: COMMUNITY,
                user_id: USER,
                score: d(700.0),
                reason: "appeal".into(),
            }]);
        given(vec![joined(Role::Member)])
            .when(MembershipCommand::AdjustReputation {
                actor_id: ACTOR,
                actor_role: Role::Moderator,
                delta: d(1.0),
                reason: "nice".into(),
            })
            .then_expect_error(DomainError::Forbidden(
                "only owners and admins can change reputation".into(),
            ));
        for (reason, delta, field) in [
            ("", 1.0, "reason"),
            ("why", 0.0, "delta"),
            ("why", 1000.5, "delta"),
        ] {
            let err = given(vec![joined(Role::Member)])
                .when(MembershipCommand::AdjustReputation {
                    actor_id: ACTOR,
                    actor_role: Role::Admin,
                    delta: d(delta),
                    reason: reason.into(),
                })
                .inspect_result()
                .expect_err("refused");
            assert!(
                matches!(err, DomainError::Validation { field: f, .. } if f == field),
                "{err:?}"
            );
        }
    }

    #[test]
    fn a_first_platform_activity_joins_once_and_never_over_a_ban() {
        let from_platform = || MembershipCommand::JoinFromPlatform {
            community_id: COMMUNITY,
            user_id: USER,
        };
        given(vec![]).when(from_platform()).then_expect_events(vec![
            MembershipEvent::MemberJoined {
                community_id: COMMUNITY,
                user_id: USER,
                role: Role::Member,
                via: Some(JoinVia::Activity),
            },
        ]);
        for history in [
            vec![joined(Role::Member)],
            vec![joined(Role::Member), left()],
            vec![banned()],
        ] {
            given(history)
                .when(from_platform())
                .then_expect_events(vec![]);
        }
    }

    #[test]
    fn a_shadow_membership_moves_and_the_registered_side_inherits_it() {
        let registered = Uuid::from_u128(9);
        given(vec![joined(Role::Member)])
            .when(MembershipCommand::MoveTo {
                to_user_id: registered,
            })
            .then_expect_events(vec![MembershipEvent::MembershipMoved {
                community_id: COMMUNITY,
                user_id: USER,
                to_user_id: registered,
            }]);
        let inherit = |status| MembershipCommand::Inherit {
            community_id: COMMUNITY,
            user_id: USER,
            shadow_status: Some(status),
        };
        given(vec![])
            .when(inherit(MemberStatus::Active))
            .then_expect_events(vec![MembershipEvent::MemberJoined {
                community_id: COMMUNITY,
                user_id: USER,
                role: Role::Member,
                via: Some(JoinVia::Merge),
            }]);
        given(vec![joined(Role::Admin)])
            .when(inherit(MemberStatus::Active))
            .then_expect_events(vec![]);
        given(vec![])
            .when(inherit(MemberStatus::Banned))
            .then_expect_events(vec![MembershipEvent::MemberBanned {
                community_id: COMMUNITY,
                user_id: USER,
                reason: Some("banned on a platform account now linked".into()),
            }]);
        given(vec![joined(Role::Owner)])
            .when(inherit(MemberStatus::Banned))
            .then_expect_events(vec![]);
    }
}
