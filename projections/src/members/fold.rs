//! The members fold, pure: rows in, events in order, rows out. No I/O, no clock.

use crate::projection::{occurred_at, PoisonEvent};
use chrono::{DateTime, Utc};
use rookery_events::recorded::AnyEvent;
use rookery_events::UserEvent;
use rookery_events::{LogPosition, MemberStatus, MembershipEvent, Platform, RecordedEvent, Role};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

/// A platform account linked to a hub user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Identity {
    pub platform: Platform,
    pub platform_user_id: String,
    pub username: String,
}

/// A `member_users` row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserRow {
    /// `''` until the user's registration is applied.
    pub username: String,
    /// Sorted by platform name, then account id.
    pub identities: Vec<Identity>,
}

/// A `members` row (without its key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberRow {
    pub username: String,
    pub role: Role,
    pub status: MemberStatus,
    pub joined_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Log key of the last membership event applied to the row.
    pub key: LogPosition,
}

/// One event, decoded into what the fold needs.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    User {
        user_id: Uuid,
        event: UserEvent,
    },
    Membership {
        event: MembershipEvent,
        at: DateTime<Utc>,
        key: LogPosition,
    },
}

/// Decodes a batch; community events and unknown aggregates are not this projection's business
/// and are dropped. An event that does not decode is poison.
pub fn decode(events: &[RecordedEvent]) -> Result<Vec<Change>, PoisonEvent> {
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let decoded = e.decode().map_err(|err| {
            PoisonEvent::new(e, format!("{} does not decode: {err}", e.event_type))
        })?;
        match decoded {
            AnyEvent::User(event) => {
                let user_id = match &event {
                    UserEvent::UserRegistered { user_id, .. } => *user_id,
                    _ => Uuid::parse_str(&e.aggregate_id).map_err(|err| {
                        PoisonEvent::new(
                            e,
                            format!("user id `{}` is not a UUID: {err}", e.aggregate_id),
                        )
                    })?,
                };
                out.push(Change::User { user_id, event });
            }
            AnyEvent::Membership(event) => {
                out.push(Change::Membership {
                    event,
                    at: occurred_at(e)?,
                    key: e.position,
                });
            }
            AnyEvent::Community(_) | AnyEvent::Unknown => {}
        }
    }
    Ok(out)
}

/// What a batch must load before folding.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// Every user a change names (sorted: the lock order).
    pub users: BTreeSet<Uuid>,
    /// Every `(community, user)` a membership change names.
    pub members: BTreeSet<(Uuid, Uuid)>,
}

pub fn needs(changes: &[Change]) -> Needs {
    let mut needs = Needs::default();
    for change in changes {
        match change {
            Change::User { user_id, .. } => {
                needs.users.insert(*user_id);
            }
            Change::Membership { event, .. } => {
                let (c, u) = event.subject();
                needs.users.insert(u);
                needs.members.insert((c, u));
            }
        }
    }
    needs
}

/// The in-memory state of a batch: the loaded rows, folded forward, and what changed.
#[derive(Debug, Default)]
pub struct Fold {
    pub users: BTreeMap<Uuid, UserRow>,
    /// Loaded member rows; `None` for a pair with no row (yet).
    pub members: BTreeMap<(Uuid, Uuid), Option<MemberRow>>,
    pub dirty_users: BTreeSet<Uuid>,
    pub dirty_members: BTreeSet<(Uuid, Uuid)>,
    /// Users whose username this batch set: all their member rows take it.
    pub renamed: BTreeMap<Uuid, String>,
    /// Change of the active-member count per community. Every community a membership event
    /// names is present, also with 0, so that whether a `member_counts` row exists never depends
    /// on how events were split into batches (live and rebuild batch differently).
    pub count_delta: BTreeMap<Uuid, i64>,
}

impl Fold {
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::User { user_id, event } => self.apply_user(*user_id, event),
            Change::Membership { event, at, key } => self.apply_membership(event, *at, *key),
        }
    }

    fn apply_user(&mut self, user_id: Uuid, event: &UserEvent) {
        let row = self.users.entry(user_id).or_default();
        match event {
            UserEvent::UserRegistered { username, .. } => {
                row.username.clone_from(username);
                self.renamed.insert(user_id, username.clone());
                // Denormalised copies converge whichever of registration and membership arrives
                // first: rows already loaded take the name here, the rest in the batch's write.
                for ((_, u), member) in self.members.iter_mut() {
                    if let (true, Some(m)) = (*u == user_id, member.as_mut()) {
                        m.username.clone_from(username);
                    }
                }
            }
            UserEvent::PlatformIdentityLinked {
                platform,
                platform_user_id,
                username,
            } => {
                // One account per platform per user: a new link replaces the old one.
                row.identities.retain(|i| i.platform != *platform);
                row.identities.push(Identity {
                    platform: *platform,
                    platform_user_id: platform_user_id.clone(),
                    username: username.clone(),
                });
                sort_identities(&mut row.identities);
            }
            UserEvent::PlatformIdentityUnlinked {
                platform,
                platform_user_id,
            } => {
                row.identities.retain(|i| {
                    !(i.platform == *platform && &i.platform_user_id == platform_user_id)
                });
            }
        }
        self.dirty_users.insert(user_id);
    }

    fn apply_membership(&mut self, event: &MembershipEvent, at: DateTime<Utc>, key: LogPosition) {
        use MemberStatus as S;
        use MembershipEvent as E;
        let (community_id, user_id) = event.subject();
        let username = self
            .users
            .get(&user_id)
            .map(|u| u.username.clone())
            .unwrap_or_default();
        let slot = self.members.entry((community_id, user_id)).or_default();
        let was_active = slot.as_ref().is_some_and(|m| m.status == S::Active);
        let fresh = |status, role| MemberRow {
            username: username.clone(),
            role,
            status,
            joined_at: at,
            updated_at: at,
            key,
        };

        let changed = match (event, slot.as_mut()) {
            (E::MemberJoined { role, .. }, Some(m)) => {
                if !was_active {
                    // A rejoin starts a new membership.
                    m.joined_at = at;
                }
                m.status = S::Active;
                m.role = *role;
                true
            }
            (E::MemberJoined { role, .. }, None) => {
                *slot = Some(fresh(S::Active, *role));
                true
            }
            (E::JoinRequested { .. }, Some(m)) if m.status != S::Active => {
                m.status = S::Pending;
                m.role = Role::Member;
                true
            }
            (E::JoinRequested { .. }, None) => {
                *slot = Some(fresh(S::Pending, Role::Member));
                true
            }
            (E::MemberRoleChanged { to, .. }, Some(m)) => {
                m.role = *to;
                true
            }
            (E::MemberLeft { .. }, Some(m)) => {
                m.status = S::Left;
                true
            }
            (E::MemberRemoved { .. }, Some(m)) => {
                m.status = S::Removed;
                true
            }
            (E::MemberBanned { .. }, Some(m)) => {
                m.status = S::Banned;
                true
            }
            // Banning someone who never joined still has to keep them out.
            (E::MemberBanned { .. }, None) => {
                *slot = Some(fresh(S::Banned, Role::Member));
                true
            }
            (E::MemberUnbanned { .. }, Some(m)) if m.status == S::Banned => {
                m.status = S::Left;
                true
            }
            // The aggregate never emits these (its own order forbids them); ignoring keeps the
            // fold total.
            _ => false,
        };
        if changed {
            if let Some(m) = slot.as_mut() {
                m.updated_at = at;
                m.key = key;
                m.username = username;
            }
            self.dirty_members.insert((community_id, user_id));
        }
        let is_active = slot.as_ref().is_some_and(|m| m.status == S::Active);
        *self.count_delta.entry(community_id).or_insert(0) +=
            i64::from(is_active) - i64::from(was_active);
    }
}

/// Identities in a deterministic order: by platform name, then account id.
pub fn sort_identities(identities: &mut [Identity]) {
    identities.sort_by(|a, b| {
        (a.platform.as_str(), a.platform_user_id.as_str())
            .cmp(&(b.platform.as_str(), b.platform_user_id.as_str()))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: Uuid = Uuid::from_u128(1);
    const U: Uuid = Uuid::from_u128(2);

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_700_000_000 + s, 0).unwrap_or_default()
    }

    fn m(event: MembershipEvent, s: i64) -> Change {
        Change::Membership {
            event,
            at: t(s),
            key: LogPosition::new(100, s),
        }
    }

    #[test]
    fn rejoin_sets_a_new_joined_at_and_counts_once() {
        let mut f = Fold::default();
        f.apply(&m(
            MembershipEvent::MemberJoined {
                community_id: C,
                user_id: U,
                role: Role::Member,
            },
            1,
        ));
        f.apply(&m(
            MembershipEvent::MemberLeft {
                community_id: C,
                user_id: U,
            },
            2,
        ));
        f.apply(&m(
            MembershipEvent::MemberJoined {
                community_id: C,
                user_id: U,
                role: Role::Vip,
            },
            3,
        ));
        let row = f.members[&(C, U)].clone().unwrap_or_else(|| panic!("row"));
        assert_eq!(
            (row.status, row.role, row.joined_at, row.updated_at),
            (MemberStatus::Active, Role::Vip, t(3), t(3))
        );
        assert_eq!(f.count_delta[&C], 1);
    }

    #[test]
    fn registration_after_membership_fills_the_username() {
        let mut f = Fold::default();
        f.apply(&m(
            MembershipEvent::MemberJoined {
                community_id: C,
                user_id: U,
                role: Role::Member,
            },
            1,
        ));
        assert_eq!(
            f.members[&(C, U)].as_ref().map(|r| r.username.as_str()),
            Some("")
        );
        f.apply(&Change::User {
            user_id: U,
            event: UserEvent::UserRegistered {
                user_id: U,
                username: "ada".into(),
                email: "a@x".into(),
            },
        });
        assert_eq!(
            f.members[&(C, U)].as_ref().map(|r| r.username.as_str()),
            Some("ada")
        );
        assert_eq!(f.renamed.get(&U).map(String::as_str), Some("ada"));
    }

    #[test]
    fn identities_stay_sorted_and_one_per_platform() {
        let mut f = Fold::default();
        let link = |p, id: &str| Change::User {
            user_id: U,
            event: UserEvent::PlatformIdentityLinked {
                platform: p,
                platform_user_id: id.into(),
                username: id.into(),
            },
        };
        f.apply(&link(Platform::Twitch, "t1"));
        f.apply(&link(Platform::Discord, "d1"));
        f.apply(&link(Platform::Twitch, "t2"));
        let ids: Vec<_> = f.users[&U]
            .identities
            .iter()
            .map(|i| i.platform_user_id.as_str())
            .collect();
        assert_eq!(ids, ["d1", "t2"]);
    }
}
