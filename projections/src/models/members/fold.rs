//! The members fold, pure: rows in, events in order, rows out. No I/O, no clock.

use crate::engine::{EventRef, PoisonEvent};
use crate::support::KeyHashState;
use chrono::{DateTime, Utc};
use rookery_events::recorded::AnyEvent;
use rookery_events::UserEvent;
use rookery_events::{LogPosition, MemberStatus, MembershipEvent, Platform, Role};
use serde::{Deserialize, Serialize};
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

/// A platform account linked to a hub user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// Decodes a batch (live deliveries or a rebuild's raw events alike); community events and
/// unknown aggregates are not this projection's business and are dropped. An event that does
/// not decode is poison.
pub fn decode<E: EventRef>(events: &[E]) -> Result<Vec<Change>, PoisonEvent> {
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let decoded = e
            .decode()
            .map_err(|err| e.poison(format!("{} does not decode: {err}", e.event_type())))?;
        match decoded {
            AnyEvent::User(event) => {
                let user_id = match &event {
                    UserEvent::UserRegistered { user_id, .. }
                    | UserEvent::ShadowUserCreated { user_id, .. } => *user_id,
                    _ => Uuid::parse_str(e.aggregate_id()).map_err(|err| {
                        e.poison(format!(
                            "user id `{}` is not a UUID: {err}",
                            e.aggregate_id()
                        ))
                    })?,
                };
                out.push(Change::User { user_id, event });
            }
            AnyEvent::Membership(event) => {
                out.push(Change::Membership {
                    event,
                    at: e.occurred_at()?,
                    key: e.position(),
                });
            }
            AnyEvent::Community(_)
            | AnyEvent::Message(_)
            | AnyEvent::Activity(_)
            | AnyEvent::Unknown => {}
        }
    }
    Ok(out)
}

/// What a batch must load before folding.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// Every user a change names, sorted (the lock order) and without repeats.
    pub users: Vec<Uuid>,
    /// Every `(community, user)` a membership change names, sorted and without repeats.
    pub members: Vec<(Uuid, Uuid)>,
}

pub fn needs(changes: &[Change]) -> Needs {
    let mut needs = Needs::default();
    for change in changes {
        match change {
            Change::User { user_id, .. } => {
                needs.users.push(*user_id);
            }
            Change::Membership { event, .. } => {
                let (c, u) = event.subject();
                needs.users.push(u);
                needs.members.push((c, u));
            }
        }
    }
    needs.users.sort_unstable();
    needs.users.dedup();
    needs.members.sort_unstable();
    needs.members.dedup();
    needs
}

/// The in-memory state of a batch (live) or of a rebuild chunk: the rows as loaded, folded
/// forward, and what changed.
///
/// Every row a change names must be loaded ([`Fold::load_user`], [`Fold::load_member`]) before
/// the change is applied: the fold takes a row it does not hold for one that does not exist.
#[derive(Debug, Default)]
pub struct Fold {
    users: HashMap<Uuid, UserSlot, KeyHashState>,
    members: HashMap<(Uuid, Uuid), MemberSlot, KeyHashState>,
    /// Communities of the member rows held, per user: a registration renames its user's rows
    /// without scanning every row held (a rebuild chunk holds hundreds of thousands).
    by_user: HashMap<Uuid, Communities, KeyHashState>,
    /// Change of the active-member count per community. Every community a membership event
    /// names is present, also with 0, so that whether a `member_counts` row exists never depends
    /// on how events were split into batches (live and rebuild batch differently).
    count_delta: BTreeMap<Uuid, i64>,
}

/// Communities of a user's member rows; most users have one, which needs no allocation.
#[derive(Debug)]
struct Communities {
    first: Uuid,
    rest: Vec<Uuid>,
}

impl Communities {
    fn iter(&self) -> impl Iterator<Item = &Uuid> {
        std::iter::once(&self.first).chain(&self.rest)
    }
}

/// A `member_users` row held by a [`Fold`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserSlot {
    pub row: UserRow,
    /// The row was loaded from the table; otherwise writing creates it.
    pub stored: bool,
    pub dirty: bool,
    /// Its username was set here: every member row of the user takes it, also rows not held.
    pub renamed: bool,
}

/// A `members` row held by a [`Fold`]; `row` is `None` for a pair with no row (yet).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberSlot {
    pub row: Option<MemberRow>,
    /// The row was loaded from the table; otherwise writing creates it.
    pub stored: bool,
    pub dirty: bool,
}

impl Fold {
    /// Holds a user's row as loaded, or for a user without one a new empty row (written even if
    /// no change touches it: it is the per-user lock row, see the module docs).
    pub fn load_user(&mut self, user_id: Uuid, row: Option<UserRow>) {
        let slot = match row {
            Some(row) => UserSlot {
                row,
                stored: true,
                dirty: false,
                renamed: false,
            },
            None => UserSlot {
                dirty: true,
                ..UserSlot::default()
            },
        };
        self.users.insert(user_id, slot);
    }

    /// Holds a member row as loaded, or that there is none.
    pub fn load_member(&mut self, key: (Uuid, Uuid), row: Option<MemberRow>) {
        let slot = MemberSlot {
            stored: row.is_some(),
            row,
            dirty: false,
        };
        if self.members.insert(key, slot).is_none() {
            self.index(key);
        }
    }

    fn index(&mut self, (community_id, user_id): (Uuid, Uuid)) {
        match self.by_user.entry(user_id) {
            Entry::Occupied(mut e) => e.get_mut().rest.push(community_id),
            Entry::Vacant(e) => {
                e.insert(Communities {
                    first: community_id,
                    rest: Vec::new(),
                });
            }
        }
    }

    /// Every user held.
    pub fn users(&self) -> impl Iterator<Item = (&Uuid, &UserSlot)> {
        self.users.iter()
    }

    pub fn user_slot(&self, user_id: &Uuid) -> Option<&UserSlot> {
        self.users.get(user_id)
    }

    pub fn member_slot(&self, key: &(Uuid, Uuid)) -> Option<&MemberSlot> {
        self.members.get(key)
    }

    pub fn user(&self, user_id: &Uuid) -> Option<&UserRow> {
        self.users.get(user_id).map(|s| &s.row)
    }

    pub fn member(&self, key: &(Uuid, Uuid)) -> Option<&MemberRow> {
        self.members.get(key).and_then(|s| s.row.as_ref())
    }

    /// Forgets every row, keeping the memory for the next chunk.
    pub fn clear(&mut self) {
        self.users.clear();
        self.members.clear();
        self.by_user.clear();
        self.count_delta.clear();
    }

    /// Rows held (users and member pairs).
    pub fn len(&self) -> usize {
        self.users.len() + self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.members.is_empty()
    }

    /// Changed users, in key order.
    pub fn dirty_users(&self) -> Vec<(Uuid, &UserSlot)> {
        let mut out: Vec<_> = self
            .users
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(k, s)| (*k, s))
            .collect();
        out.sort_unstable_by_key(|(k, _)| *k);
        out
    }

    /// Changed member rows, in key order, with whether each was loaded from the table.
    pub fn dirty_members(&self) -> Vec<((Uuid, Uuid), &MemberRow, bool)> {
        let mut out: Vec<_> = self
            .members
            .iter()
            .filter_map(|(k, s)| match (&s.row, s.dirty) {
                (Some(row), true) => Some((*k, row, s.stored)),
                _ => None,
            })
            .collect();
        out.sort_unstable_by_key(|(k, _, _)| *k);
        out
    }

    /// Users whose username was set here, in key order, with whether each was loaded from the
    /// table.
    pub fn renamed(&self) -> Vec<(Uuid, &str, bool)> {
        let mut out: Vec<_> = self
            .users
            .iter()
            .filter(|(_, s)| s.renamed)
            .map(|(k, s)| (*k, s.row.username.as_str(), s.stored))
            .collect();
        out.sort_unstable_by_key(|(k, _, _)| *k);
        out
    }

    pub fn count_delta(&self) -> &BTreeMap<Uuid, i64> {
        &self.count_delta
    }

    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::User { user_id, event } => self.apply_user(*user_id, event),
            Change::Membership { event, at, key } => self.apply_membership(event, *at, *key),
        }
    }

    fn apply_user(&mut self, user_id: Uuid, event: &UserEvent) {
        let slot = self.users.entry(user_id).or_default();
        let row = &mut slot.row;
        let renamed = match event {
            UserEvent::UserRegistered { username, .. } => {
                row.username.clone_from(username);
                Some(username)
            }
            UserEvent::ShadowUserCreated {
                platform,
                platform_user_id,
                username,
                ..
            } => {
                // The platform's name is the shadow user's name, its account its identity.
                row.username.clone_from(username);
                row.identities = vec![Identity {
                    platform: *platform,
                    platform_user_id: platform_user_id.clone(),
                    username: username.clone(),
                }];
                Some(username)
            }
            UserEvent::ShadowUserMerged { .. } => {
                row.identities.clear();
                None
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
                None
            }
            UserEvent::PlatformIdentityUnlinked {
                platform,
                platform_user_id,
            } => {
                row.identities.retain(|i| {
                    !(i.platform == *platform && &i.platform_user_id == platform_user_id)
                });
                None
            }
        };
        slot.dirty = true;
        if let Some(username) = renamed {
            slot.renamed = true;
            // Denormalised copies converge whichever of registration and membership arrives
            // first: rows already loaded take the name here, the rest in the batch's write.
            for c in self
                .by_user
                .get(&user_id)
                .into_iter()
                .flat_map(Communities::iter)
            {
                if let Some(m) = self
                    .members
                    .get_mut(&(*c, user_id))
                    .and_then(|s| s.row.as_mut())
                {
                    m.username.clone_from(username);
                }
            }
        }
    }

    fn apply_membership(&mut self, event: &MembershipEvent, at: DateTime<Utc>, key: LogPosition) {
        use MemberStatus as S;
        use MembershipEvent as E;
        let (community_id, user_id) = event.subject();
        let username = self
            .users
            .get(&user_id)
            .map(|u| u.row.username.clone())
            .unwrap_or_default();
        let pair = (community_id, user_id);
        if !self.members.contains_key(&pair) {
            self.index(pair);
        }
        let slot = self.members.entry(pair).or_default();
        let was_active = slot.row.as_ref().is_some_and(|m| m.status == S::Active);
        let fresh = |status, role| MemberRow {
            username: username.clone(),
            role,
            status,
            joined_at: at,
            updated_at: at,
            key,
        };

        let changed = match (event, slot.row.as_mut()) {
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
                slot.row = Some(fresh(S::Active, *role));
                true
            }
            (E::JoinRequested { .. }, Some(m)) if m.status != S::Active => {
                m.status = S::Pending;
                m.role = Role::Member;
                true
            }
            (E::JoinRequested { .. }, None) => {
                slot.row = Some(fresh(S::Pending, Role::Member));
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
            (E::MemberRemoved { .. } | E::MemberKicked { .. }, Some(m)) => {
                m.status = S::Removed;
                true
            }
            // The membership now belongs to the registered user who claimed the shadow's account.
            (E::MembershipMoved { .. }, Some(m)) => {
                m.status = S::Left;
                true
            }
            (E::MemberBanned { .. }, Some(m)) => {
                m.status = S::Banned;
                true
            }
            // Banning someone who never joined still has to keep them out.
            (E::MemberBanned { .. }, None) => {
                slot.row = Some(fresh(S::Banned, Role::Member));
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
            if let Some(m) = slot.row.as_mut() {
                m.updated_at = at;
                m.key = key;
                m.username = username;
            }
            slot.dirty = true;
        }
        let is_active = slot.row.as_ref().is_some_and(|m| m.status == S::Active);
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
                via: None,
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
                via: None,
            },
            3,
        ));
        let row = f.member(&(C, U)).cloned().unwrap_or_else(|| panic!("row"));
        assert_eq!(
            (row.status, row.role, row.joined_at, row.updated_at),
            (MemberStatus::Active, Role::Vip, t(3), t(3))
        );
        assert_eq!(f.count_delta()[&C], 1);
    }

    #[test]
    fn registration_after_membership_fills_the_username() {
        let mut f = Fold::default();
        f.apply(&m(
            MembershipEvent::MemberJoined {
                community_id: C,
                user_id: U,
                role: Role::Member,
                via: None,
            },
            1,
        ));
        assert_eq!(f.member(&(C, U)).map(|r| r.username.as_str()), Some(""));
        f.apply(&Change::User {
            user_id: U,
            event: UserEvent::UserRegistered {
                user_id: U,
                username: "ada".into(),
                email: "a@x".into(),
            },
        });
        assert_eq!(f.member(&(C, U)).map(|r| r.username.as_str()), Some("ada"));
        assert_eq!(f.renamed(), vec![(U, "ada", false)]);
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
        let ids: Vec<_> = f
            .user(&U)
            .map(|u| u.identities.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|i| i.platform_user_id.as_str())
            .collect();
        assert_eq!(ids, ["d1", "t2"]);
    }
}
