//! The `community` aggregate: profile, join mode, linked platform servers and archival.
//!
//! Founding also makes the owner a member; that is a second aggregate
//! ([`MembershipCommand::Found`](crate::membership::MembershipCommand::Found)) written in the
//! same commit by the application. Name and server uniqueness live in [`crate::claims`].

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use rookery_events::{aggregate_types, CommunityEvent, JoinMode, Platform, ReputationPolicy, Role};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::claims::{community_claims, ClaimOp};
use crate::decider::Decider;
use crate::membership::CommunityContext;
use crate::validation::{
    validate_community_name, validate_description, validate_display_name, validate_reason,
    validate_reputation_policy, validate_server_id,
};
use crate::DomainError;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default)]
pub struct Community {
    /// `None` until the community is created.
    pub id: Option<Uuid>,
    pub name: String,
    pub display_name: String,
    pub description: Option<String>,
    pub platform: Option<Platform>,
    pub is_public: bool,
    pub join_mode: JoinMode,
    pub owner_id: Option<Uuid>,
    pub platform_servers: Vec<LinkedServer>,
    pub archived: bool,
    /// The reputation rules in force (the defaults until the community sets its own).
    pub reputation_policy: ReputationPolicy,
}

impl Default for Community {
    fn default() -> Self {
        Community {
            id: None,
            name: String::new(),
            display_name: String::new(),
            description: None,
            platform: None,
            is_public: false,
            join_mode: JoinMode::Open,
            owner_id: None,
            platform_servers: Vec::new(),
            archived: false,
            reputation_policy: ReputationPolicy::default(),
        }
    }
}

/// A platform server (guild, channel, workspace) that belongs to a community.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LinkedServer {
    pub platform: Platform,
    pub server_id: String,
}

/// Commands carry the actor's role as resolved by the caller from the members read model; the
/// aggregate decides what that role may do. Deliberately not `Deserialize`: a role must never
/// come straight from a request body.
#[derive(Clone, Debug, PartialEq)]
pub enum CommunityCommand {
    Create {
        community_id: Uuid,
        name: String,
        display_name: String,
        platform: Platform,
        is_public: bool,
        join_mode: JoinMode,
        owner_id: Uuid,
    },
    /// `None` keeps a field; an empty description clears it.
    UpdateProfile {
        actor_role: Role,
        display_name: Option<String>,
        description: Option<String>,
        is_public: Option<bool>,
    },
    LinkPlatform {
        actor_role: Role,
        platform: Platform,
        server_id: String,
    },
    UnlinkPlatform {
        actor_role: Role,
        platform: Platform,
        server_id: String,
    },
    SetJoinMode {
        actor_role: Role,
        join_mode: JoinMode,
    },
    /// Owner only. Linked servers are unlinked first so they can join another community.
    Archive {
        actor_role: Role,
        reason: Option<String>,
    },
    /// Owners and admins: the reputation rules from now on.
    SetReputationPolicy {
        actor_role: Role,
        policy: ReputationPolicy,
    },
}

impl Community {
    pub fn exists(&self) -> bool {
        self.id.is_some()
    }

    pub fn is_linked(&self, platform: Platform, server_id: &str) -> bool {
        self.platform_servers
            .iter()
            .any(|s| s.platform == platform && s.server_id == server_id)
    }

    /// What a membership needs to know about its community to decide a join.
    pub fn context(&self) -> CommunityContext {
        CommunityContext {
            join_mode: self.join_mode,
            archived: self.archived,
        }
    }

    /// All the rules: the events `command` produces from this state, without applying them.
    pub fn decide(&self, command: CommunityCommand) -> Result<Vec<CommunityEvent>, DomainError> {
        use CommunityCommand as C;
        use CommunityEvent as E;

        match command {
            C::Create {
                community_id,
                name,
                display_name,
                platform,
                is_public,
                join_mode,
                owner_id,
            } => {
                if self.exists() {
                    return Err(DomainError::conflict("community already exists"));
                }
                validate_community_name(&name)?;
                validate_display_name(&display_name)?;
                Ok(vec![E::CommunityCreated {
                    community_id,
                    name,
                    display_name: display_name.trim().to_string(),
                    platform,
                    is_public,
                    join_mode,
                    owner_id,
                }])
            }
            C::UpdateProfile {
                actor_role,
                display_name,
                description,
                is_public,
            } => {
                self.ensure_manager(actor_role)?;
                if let Some(display_name) = &display_name {
                    validate_display_name(display_name)?;
                }
                if let Some(description) = &description {
                    validate_description(description)?;
                }
                let display_name = display_name
                    .map(|d| d.trim().to_string())
                    .filter(|d| *d != self.display_name);
                let description = description
                    .map(|d| d.trim().to_string())
                    .filter(|d| d.as_str() != self.description.as_deref().unwrap_or(""));
                let is_public = is_public.filter(|p| *p != self.is_public);
                if display_name.is_none() && description.is_none() && is_public.is_none() {
                    return Ok(vec![]);
                }
                Ok(vec![E::CommunityProfileUpdated {
                    display_name,
                    description,
                    is_public,
                }])
            }
            C::LinkPlatform {
                actor_role,
                platform,
                server_id,
            } => {
                self.ensure_manager(actor_role)?;
                validate_server_id(&server_id)?;
                if self.is_linked(platform, &server_id) {
                    return Ok(vec![]);
                }
                Ok(vec![E::PlatformServerLinked {
                    platform,
                    server_id,
                }])
            }
            C::UnlinkPlatform {
                actor_role,
                platform,
                server_id,
            } => {
                self.ensure_manager(actor_role)?;
                if !self.is_linked(platform, &server_id) {
                    return Err(DomainError::NotFound("platform server"));
                }
                Ok(vec![E::PlatformServerUnlinked {
                    platform,
                    server_id,
                }])
            }
            C::SetJoinMode {
                actor_role,
                join_mode,
            } => {
                self.ensure_manager(actor_role)?;
                if join_mode == self.join_mode {
                    return Ok(vec![]);
                }
                Ok(vec![E::JoinModeChanged { join_mode }])
            }
            C::Archive { actor_role, reason } => {
                self.ensure_open()?;
                if actor_role != Role::Owner {
                    return Err(DomainError::forbidden(
                        "only the owner can archive a community",
                    ));
                }
                if let Some(reason) = &reason {
                    validate_reason(reason)?;
                }
                // An archived community accepts no commands, so a server left linked here could
                // never be linked anywhere else: release them while archiving.
                let mut events: Vec<_> = self
                    .platform_servers
                    .iter()
                    .map(|s| E::PlatformServerUnlinked {
                        platform: s.platform,
                        server_id: s.server_id.clone(),
                    })
                    .collect();
                events.push(E::CommunityArchived { reason });
                Ok(events)
            }
            C::SetReputationPolicy { actor_role, policy } => {
                self.ensure_manager(actor_role)?;
                validate_reputation_policy(&policy)?;
                if policy == self.reputation_policy {
                    return Ok(vec![]);
                }
                Ok(vec![E::ReputationPolicySet { policy }])
            }
        }
    }

    fn ensure_open(&self) -> Result<(), DomainError> {
        if !self.exists() {
            return Err(DomainError::NotFound("community"));
        }
        if self.archived {
            return Err(DomainError::invalid_state("this community is archived"));
        }
        Ok(())
    }

    fn ensure_manager(&self, actor_role: Role) -> Result<(), DomainError> {
        self.ensure_open()?;
        if !actor_role.can_manage() {
            return Err(DomainError::forbidden(
                "only owners and admins can manage a community",
            ));
        }
        Ok(())
    }
}

impl Aggregate for Community {
    const TYPE: &'static str = aggregate_types::COMMUNITY;
    type Command = CommunityCommand;
    type Event = CommunityEvent;
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
        match event {
            CommunityEvent::CommunityCreated {
                community_id,
                name,
                display_name,
                platform,
                is_public,
                join_mode,
                owner_id,
            } => {
                *self = Community {
                    id: Some(community_id),
                    name,
                    display_name,
                    platform: Some(platform),
                    is_public,
                    join_mode,
                    owner_id: Some(owner_id),
                    ..Community::default()
                };
            }
            CommunityEvent::CommunityProfileUpdated {
                display_name,
                description,
                is_public,
            } => {
                if let Some(display_name) = display_name {
                    self.display_name = display_name;
                }
                if let Some(description) = description {
                    self.description = Some(description).filter(|d| !d.is_empty());
                }
                if let Some(is_public) = is_public {
                    self.is_public = is_public;
                }
            }
            CommunityEvent::ReputationPolicySet { policy } => {
                self.reputation_policy = policy;
            }
            CommunityEvent::PlatformServerLinked {
                platform,
                server_id,
            } => {
                if !self.is_linked(platform, &server_id) {
                    self.platform_servers.push(LinkedServer {
                        platform,
                        server_id,
                    });
                }
            }
            CommunityEvent::PlatformServerUnlinked {
                platform,
                server_id,
            } => {
                self.platform_servers
                    .retain(|s| !(s.platform == platform && s.server_id == server_id));
            }
            CommunityEvent::JoinModeChanged { join_mode } => self.join_mode = join_mode,
            CommunityEvent::CommunityArchived { .. } => self.archived = true,
        }
    }
}

impl Decider for Community {
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, DomainError> {
        Community::decide(self, command)
    }

    fn claims(event: &Self::Event) -> Vec<ClaimOp> {
        community_claims(event)
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::{AggregateTestExecutor, TestFramework};

    use super::*;

    const SERVER: &str = "80351110224678912";

    fn community_id() -> Uuid {
        Uuid::from_u128(1)
    }

    fn owner_id() -> Uuid {
        Uuid::from_u128(2)
    }

    fn created() -> CommunityEvent {
        CommunityEvent::CommunityCreated {
            community_id: community_id(),
            name: "rustaceans".into(),
            display_name: "Rustaceans".into(),
            platform: Platform::Discord,
            is_public: true,
            join_mode: JoinMode::Open,
            owner_id: owner_id(),
        }
    }

    fn linked() -> CommunityEvent {
        CommunityEvent::PlatformServerLinked {
            platform: Platform::Discord,
            server_id: SERVER.into(),
        }
    }

    fn given(events: Vec<CommunityEvent>) -> AggregateTestExecutor<Community> {
        TestFramework::<Community>::with(()).given(events)
    }

    fn create(name: &str, display_name: &str) -> CommunityCommand {
        CommunityCommand::Create {
            community_id: community_id(),
            name: name.into(),
            display_name: display_name.into(),
            platform: Platform::Discord,
            is_public: true,
            join_mode: JoinMode::Open,
            owner_id: owner_id(),
        }
    }

    fn update(actor_role: Role) -> CommunityCommand {
        CommunityCommand::UpdateProfile {
            actor_role,
            display_name: None,
            description: None,
            is_public: None,
        }
    }

    fn describe(actor_role: Role, description: &str) -> CommunityCommand {
        CommunityCommand::UpdateProfile {
            actor_role,
            display_name: None,
            description: Some(description.into()),
            is_public: None,
        }
    }

    fn link(actor_role: Role, server_id: &str) -> CommunityCommand {
        CommunityCommand::LinkPlatform {
            actor_role,
            platform: Platform::Discord,
            server_id: server_id.into(),
        }
    }

    fn unlink(actor_role: Role, server_id: &str) -> CommunityCommand {
        CommunityCommand::UnlinkPlatform {
            actor_role,
            platform: Platform::Discord,
            server_id: server_id.into(),
        }
    }

    fn fold(events: Vec<CommunityEvent>) -> Community {
        let mut community = Community::default();
        events.into_iter().for_each(|e| community.apply(e));
        community
    }

    #[test]
    fn creates_a_community() {
        given(vec![])
            .when(create("rustaceans", "Rustaceans"))
            .then_expect_events(vec![created()]);
    }

    #[test]
    fn display_name_is_trimmed_on_create() {
        given(vec![])
            .when(create("rustaceans", "  Rustaceans "))
            .then_expect_events(vec![created()]);
    }

    #[test]
    fn create_rejects_an_invalid_name() {
        given(vec![])
            .when(create("Rust Aceans", "Rustaceans"))
            .then_expect_error_message(
                "invalid name: must be 3 to 63 lowercase letters, digits or hyphens, starting \
                 with a letter or digit",
            );
    }

    #[test]
    fn create_rejects_a_blank_display_name() {
        given(vec![])
            .when(create("rustaceans", "   "))
            .then_expect_error(DomainError::validation("display_name", "must not be empty"));
    }

    #[test]
    fn creating_an_existing_community_conflicts() {
        given(vec![created()])
            .when(create("rustaceans", "Rustaceans"))
            .then_expect_error_message("community already exists");
    }

    #[test]
    fn created_community_state_is_folded_from_events() {
        let community = fold(vec![created(), linked()]);
        assert!(community.exists());
        assert_eq!(community.owner_id, Some(owner_id()));
        assert_eq!(community.platform, Some(Platform::Discord));
        assert_eq!(
            community.platform_servers,
            vec![LinkedServer {
                platform: Platform::Discord,
                server_id: SERVER.into()
            }]
        );
        assert_eq!(
            community.context(),
            CommunityContext {
                join_mode: JoinMode::Open,
                archived: false
            }
        );
    }

    #[test]
    fn profile_update_carries_only_changed_fields() {
        let command = CommunityCommand::UpdateProfile {
            actor_role: Role::Admin,
            display_name: Some("Rustaceans".into()),
            description: Some(" All things Rust ".into()),
            is_public: Some(false),
        };
        given(vec![created()])
            .when(command)
            .then_expect_events(vec![CommunityEvent::CommunityProfileUpdated {
                display_name: None,
                description: Some("All things Rust".into()),
                is_public: Some(false),
            }]);
    }

    #[test]
    fn profile_update_without_changes_emits_nothing() {
        let command = CommunityCommand::UpdateProfile {
            actor_role: Role::Owner,
            display_name: Some("Rustaceans".into()),
            description: Some(String::new()),
            is_public: Some(true),
        };
        given(vec![created()])
            .when(command)
            .then_expect_events(vec![]);
    }

    #[test]
    fn empty_description_clears_it() {
        let described = CommunityEvent::CommunityProfileUpdated {
            display_name: None,
            description: Some("All things Rust".into()),
            is_public: None,
        };
        let cleared = CommunityEvent::CommunityProfileUpdated {
            display_name: None,
            description: Some(String::new()),
            is_public: None,
        };
        let command = describe(Role::Admin, " ");
        given(vec![created(), described.clone()])
            .when(command)
            .then_expect_events(vec![cleared.clone()]);
        assert_eq!(fold(vec![created(), described, cleared]).description, None);
    }

    #[test]
    fn profile_update_rejects_a_long_description() {
        let command = describe(Role::Admin, &"x".repeat(2001));
        given(vec![created()])
            .when(command)
            .then_expect_error(DomainError::validation(
                "description",
                "must be at most 2000 characters",
            ));
    }

    #[test]
    fn updating_a_missing_community_is_not_found() {
        given(vec![])
            .when(update(Role::Owner))
            .then_expect_error(DomainError::NotFound("community"));
    }

    #[test]
    fn moderator_cannot_update_the_profile() {
        given(vec![created()])
            .when(update(Role::Moderator))
            .then_expect_error_message("only owners and admins can manage a community");
    }

    #[test]
    fn archived_community_rejects_every_command() {
        let archived = CommunityEvent::CommunityArchived { reason: None };
        let commands = vec![
            update(Role::Owner),
            link(Role::Owner, SERVER),
            unlink(Role::Owner, SERVER),
            CommunityCommand::SetJoinMode {
                actor_role: Role::Owner,
                join_mode: JoinMode::Invite,
            },
            CommunityCommand::Archive {
                actor_role: Role::Owner,
                reason: None,
            },
        ];
        for command in commands {
            given(vec![created(), archived.clone()])
                .when(command)
                .then_expect_error(DomainError::invalid_state("this community is archived"));
        }
    }

    #[test]
    fn admin_links_a_platform_server() {
        given(vec![created()])
            .when(link(Role::Admin, SERVER))
            .then_expect_events(vec![linked()]);
    }

    #[test]
    fn linking_a_linked_server_again_emits_nothing() {
        given(vec![created(), linked()])
            .when(link(Role::Admin, SERVER))
            .then_expect_events(vec![]);
    }

    #[test]
    fn link_rejects_an_invalid_server_id() {
        given(vec![created()])
            .when(link(Role::Admin, "not a server"))
            .then_expect_error(DomainError::validation(
                "server_id",
                "must be 1 to 128 letters, digits, '_', '.', ':' or '-'",
            ));
    }

    #[test]
    fn member_cannot_link_a_platform_server() {
        given(vec![created()])
            .when(link(Role::Member, SERVER))
            .then_expect_error(DomainError::forbidden(
                "only owners and admins can manage a community",
            ));
    }

    #[test]
    fn linking_to_a_missing_community_is_not_found() {
        given(vec![])
            .when(link(Role::Owner, SERVER))
            .then_expect_error(DomainError::NotFound("community"));
    }

    #[test]
    fn admin_unlinks_a_linked_server() {
        given(vec![created(), linked()])
            .when(unlink(Role::Admin, SERVER))
            .then_expect_events(vec![CommunityEvent::PlatformServerUnlinked {
                platform: Platform::Discord,
                server_id: SERVER.into(),
            }]);
        let unlinked = CommunityEvent::PlatformServerUnlinked {
            platform: Platform::Discord,
            server_id: SERVER.into(),
        };
        assert!(fold(vec![created(), linked(), unlinked])
            .platform_servers
            .is_empty());
    }

    #[test]
    fn unlinking_a_server_that_is_not_linked_is_not_found() {
        given(vec![created(), linked()])
            .when(CommunityCommand::UnlinkPlatform {
                actor_role: Role::Owner,
                platform: Platform::Twitch,
                server_id: SERVER.into(),
            })
            .then_expect_error(DomainError::NotFound("platform server"));
    }

    #[test]
    fn vip_cannot_unlink_a_server() {
        given(vec![created(), linked()])
            .when(unlink(Role::Vip, SERVER))
            .then_expect_error_message("only owners and admins can manage a community");
    }

    #[test]
    fn admin_changes_the_join_mode() {
        given(vec![created()])
            .when(CommunityCommand::SetJoinMode {
                actor_role: Role::Admin,
                join_mode: JoinMode::Approval,
            })
            .then_expect_events(vec![CommunityEvent::JoinModeChanged {
                join_mode: JoinMode::Approval,
            }]);
    }

    #[test]
    fn setting_the_same_join_mode_emits_nothing() {
        given(vec![created()])
            .when(CommunityCommand::SetJoinMode {
                actor_role: Role::Admin,
                join_mode: JoinMode::Open,
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn moderator_cannot_change_the_join_mode() {
        given(vec![created()])
            .when(CommunityCommand::SetJoinMode {
                actor_role: Role::Moderator,
                join_mode: JoinMode::Invite,
            })
            .then_expect_error_message("only owners and admins can manage a community");
    }

    #[test]
    fn owner_archives_and_linked_servers_are_released() {
        let reason = Some("moved to a new home".to_string());
        given(vec![created(), linked()])
            .when(CommunityCommand::Archive {
                actor_role: Role::Owner,
                reason: reason.clone(),
            })
            .then_expect_events(vec![
                CommunityEvent::PlatformServerUnlinked {
                    platform: Platform::Discord,
                    server_id: SERVER.into(),
                },
                CommunityEvent::CommunityArchived { reason },
            ]);
    }

    #[test]
    fn admin_cannot_archive() {
        given(vec![created()])
            .when(CommunityCommand::Archive {
                actor_role: Role::Admin,
                reason: None,
            })
            .then_expect_error(DomainError::forbidden(
                "only the owner can archive a community",
            ));
    }

    #[test]
    fn archive_rejects_a_long_reason() {
        given(vec![created()])
            .when(CommunityCommand::Archive {
                actor_role: Role::Owner,
                reason: Some("r".repeat(501)),
            })
            .then_expect_error(DomainError::validation(
                "reason",
                "must be at most 500 characters",
            ));
    }

    #[test]
    fn archiving_a_missing_community_is_not_found() {
        given(vec![])
            .when(CommunityCommand::Archive {
                actor_role: Role::Owner,
                reason: None,
            })
            .then_expect_error(DomainError::NotFound("community"));
    }

    #[test]
    fn managers_set_a_valid_reputation_policy_from_now_on() {
        let mut policy = ReputationPolicy {
            start: rookery_events::Decimal4::units(500),
            ..ReputationPolicy::default()
        };
        policy.auto_ban.enabled = true;
        given(vec![created()])
            .when(CommunityCommand::SetReputationPolicy {
                actor_role: Role::Admin,
                policy: policy.clone(),
            })
            .then_expect_events(vec![CommunityEvent::ReputationPolicySet {
                policy: policy.clone(),
            }]);
        let folded = fold(vec![
            created(),
            CommunityEvent::ReputationPolicySet {
                policy: policy.clone(),
            },
        ]);
        assert_eq!(folded.reputation_policy, policy);
        given(vec![created()])
            .when(CommunityCommand::SetReputationPolicy {
                actor_role: Role::Moderator,
                policy: policy.clone(),
            })
            .then_expect_error(DomainError::Forbidden(
                "only owners and admins can manage a community".into(),
            ));
        // The defaults again change nothing.
        given(vec![created()])
            .when(CommunityCommand::SetReputationPolicy {
                actor_role: Role::Owner,
                policy: ReputationPolicy::default(),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_reputation_policy_out_of_range_is_refused_naming_the_field() {
        use rookery_events::Decimal4;
        type Change = fn(&mut ReputationPolicy);
        let cases: Vec<(Change, &str)> = vec![
            (|p| p.min = Decimal4::units(900), "max"),
            (|p| p.start = Decimal4::units(100), "start"),
            (
                |p| p.auto_ban.threshold = Decimal4::units(900),
                "auto_ban.threshold",
            ),
            (|p| p.weights.ban = Decimal4::units(-5000), "weights.ban"),
        ];
        for (change, field) in cases {
            let mut policy = ReputationPolicy::default();
            change(&mut policy);
            let err = given(vec![created()])
                .when(CommunityCommand::SetReputationPolicy {
                    actor_role: Role::Owner,
                    policy,
                })
                .inspect_result()
                .expect_err("refused");
            assert!(
                matches!(err, DomainError::Validation { field: f, .. } if f == field),
                "{err:?}"
            );
        }
    }
}
