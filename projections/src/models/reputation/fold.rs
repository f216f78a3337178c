//! The reputation fold, pure: rows and events (in log order) in, rows out. No I/O, no clock.
//!
//! Every change is worth points under the community's policy in force at its place in the log;
//! the score moves by them and is clamped to `[min, max]` at once, so the effective delta may be
//! smaller than the points. The global score folds the same changes with the default weights
//! and range over every community.

use crate::engine::{EventRef, PoisonEvent};
use crate::support::KeyHashState;
use chrono::{DateTime, Utc};
use rookery_events::recorded::AnyEvent;
use rookery_events::{
    Activity, ActivityEvent, CommunityEvent, Decimal4, LogPosition, MembershipEvent, MessageEvent,
    ReputationPolicy, SubTier, UserEvent, Weights,
};
use std::collections::HashMap;
use uuid::Uuid;

/// What changes a score.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// The member exists from here on (a join); a row at the start score if there was none.
    Present,
    /// Worth `weight(kind) × quantity`; `reason` is the moderator's, for a moderation.
    Earned {
        kind: Earned,
        quantity: Decimal4,
        reason: Option<String>,
    },
    /// An admin moved the score by `delta`.
    Adjusted { delta: Decimal4, reason: String },
    /// An admin set the score.
    Set { score: Decimal4, reason: String },
}

/// The kinds of change the policy weighs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Earned {
    ChatMessage,
    CommandMessage,
    Follow,
    Subscription(SubTier),
    GiftSubscription,
    Donation,
    Cheer,
    Raid,
    Boost,
    Warn,
    Timeout,
    Kick,
    Ban,
}

impl Earned {
    pub fn name(self) -> &'static str {
        match self {
            Earned::ChatMessage => "chat_message",
            Earned::CommandMessage => "command_message",
            Earned::Follow => "follow",
            Earned::Subscription(_) => "subscription",
            Earned::GiftSubscription => "gift_subscription",
            Earned::Donation => "donation",
            Earned::Cheer => "cheer",
            Earned::Raid => "raid",
            Earned::Boost => "boost",
            Earned::Warn => "warn",
            Earned::Timeout => "timeout",
            Earned::Kick => "kick",
            Earned::Ban => "ban",
        }
    }

    /// Its weight (per unit of quantity) under `weights`.
    pub fn weight(self, weights: &Weights) -> Decimal4 {
        match self {
            Earned::ChatMessage => weights.chat_message,
            Earned::CommandMessage => weights.command_message,
            Earned::Follow => weights.follow,
            Earned::Subscription(SubTier::Tier1) => weights.subscription_1000,
            Earned::Subscription(SubTier::Tier2) => weights.subscription_2000,
            Earned::Subscription(SubTier::Tier3) => weights.subscription_3000,
            Earned::GiftSubscription => weights.gift_subscription,
            Earned::Donation => weights.donation,
            Earned::Cheer => weights.cheer,
            Earned::Raid => weights.raid,
            Earned::Boost => weights.boost,
            Earned::Warn => weights.warn,
            Earned::Timeout => weights.timeout,
            Earned::Kick => weights.kick,
            Earned::Ban => weights.ban,
        }
    }
}

/// Where a change came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    pub key: LogPosition,
    /// The event's message id (`aggregate_type/aggregate_id/sequence`).
    pub event: String,
    pub at: DateTime<Utc>,
}

/// One event, decoded into what the fold needs.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Policy {
        community_id: Uuid,
        policy: ReputationPolicy,
    },
    Member {
        community_id: Uuid,
        user_id: Uuid,
        effect: Effect,
        source: Source,
    },
    /// A shadow user's membership (`from`) moved to the registered user `to`.
    Moved {
        community_id: Uuid,
        from: Uuid,
        to: Uuid,
        source: Source,
    },
    /// A shadow user's global score goes to the registered user `into`.
    UserMerged {
        user_id: Uuid,
        into: Uuid,
        source: Source,
    },
}

/// Whether a message is a bot command rather than chat.
pub fn is_command(text: &str) -> bool {
    let text = text.trim_start();
    text.starts_with('!') || text.starts_with('/')
}

/// What `activity` earns, with its quantity; `None` for kinds worth nothing (stream events).
fn earned(activity: &Activity) -> Option<(Earned, Decimal4)> {
    let one = Decimal4::units(1);
    Some(match activity {
        Activity::Follow => (Earned::Follow, one),
        Activity::Subscription { tier } => (Earned::Subscription(*tier), one),
        Activity::GiftSubscription { count } => {
            (Earned::GiftSubscription, Decimal4::units(i64::from(*count)))
        }
        Activity::Cheer { bits } => (
            Earned::Cheer,
            // Per 100 bits, fractions kept: 150 bits are worth 1.5 weights.
            Decimal4::raw(i64::try_from(*bits).unwrap_or(i64::MAX).saturating_mul(100)),
        ),
        Activity::Raid { .. } => (Earned::Raid, one),
        Activity::Donation { amount, .. } => (Earned::Donation, *amount),
        Activity::Boost => (Earned::Boost, one),
        Activity::StreamOnline | Activity::StreamOffline => return None,
    })
}

/// Decodes a batch. An event that does not decode, or has no time, is poison.
pub fn decode<E: EventRef>(events: &[E]) -> Result<Vec<Change>, PoisonEvent> {
    use MembershipEvent as M;
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let decoded = e
            .decode()
            .map_err(|err| e.poison(format!("{} does not decode: {err}", e.event_type())))?;
        let source = || -> Result<Source, PoisonEvent> {
            Ok(Source {
                key: e.position(),
                event: e.message_id(),
                at: e.occurred_at()?,
            })
        };
        let member = |community_id, user_id, effect| -> Result<Change, PoisonEvent> {
            Ok(Change::Member {
                community_id,
                user_id,
                effect,
                source: source()?,
            })
        };
        let earn = |kind, reason| Effect::Earned {
            kind,
            quantity: Decimal4::units(1),
            reason,
        };
        let change = match decoded {
            AnyEvent::Community(CommunityEvent::ReputationPolicySet { policy }) => {
                let community_id = uuid_of(e)?;
                Change::Policy {
                    community_id,
                    policy,
                }
            }
            AnyEvent::Membership(event) => {
                let (c, u) = event.subject();
                match event {
                    M::MemberJoined { .. } => member(c, u, Effect::Present)?,
                    M::MemberWarned { reason, .. } => member(c, u, earn(Earned::Warn, reason))?,
                    M::MemberTimedOut { reason, .. } => {
                        member(c, u, earn(Earned::Timeout, reason))?
                    }
                    M::MemberKicked { reason, .. } => member(c, u, earn(Earned::Kick, reason))?,
                    M::MemberBanned { reason, .. } => member(c, u, earn(Earned::Ban, reason))?,
                    M::ReputationAdjusted { delta, reason, .. } => {
                        member(c, u, Effect::Adjusted { delta, reason })?
                    }
                    M::ReputationSet { score, reason, .. } => {
                        member(c, u, Effect::Set { score, reason })?
                    }
                    M::MembershipMoved { to_user_id, .. } => Change::Moved {
                        community_id: c,
                        from: u,
                        to: to_user_id,
                        source: source()?,
                    },
                    M::JoinRequested { .. }
                    | M::MemberRoleChanged { .. }
                    | M::MemberLeft { .. }
                    | M::MemberRemoved { .. }
                    | M::MemberUnbanned { .. } => continue,
                }
            }
            AnyEvent::Message(MessageEvent::MessagePosted {
                community_id,
                sender_id,
                text,
                ..
            }) => {
                let kind = if is_command(&text) {
                    Earned::CommandMessage
                } else {
                    Earned::ChatMessage
                };
                member(community_id, sender_id, earn(kind, None))?
            }
            AnyEvent::Activity(ActivityEvent::ActivityRecorded {
                community_id,
                user_id,
                activity,
                ..
            }) => match earned(&activity) {
                Some((kind, quantity)) => member(
                    community_id,
                    user_id,
                    Effect::Earned {
                        kind,
                        quantity,
                        reason: None,
                    },
                )?,
                None => continue,
            },
            AnyEvent::User(UserEvent::ShadowUserMerged { into, .. }) => Change::UserMerged {
                user_id: uuid_of(e)?,
                into,
                source: source()?,
            },
            _ => continue,
        };
        out.push(change);
    }
    Ok(out)
}

fn uuid_of<E: EventRef>(e: &E) -> Result<Uuid, PoisonEvent> {
    Uuid::parse_str(e.aggregate_id()).map_err(|err| {
        e.poison(format!(
            "aggregate id `{}` is not a UUID: {err}",
            e.aggregate_id()
        ))
    })
}

/// A `reputation_scores` row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScoreRow {
    pub score: Decimal4,
    /// History rows so far: the last one's `seq`.
    pub changes: i64,
    pub updated_at: DateTime<Utc>,
}

/// A `reputation_global` row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalRow {
    pub score: Decimal4,
    pub changes: i64,
    pub updated_at: DateTime<Utc>,
}

/// A `reputation_history` row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryRow {
    pub community_id: Uuid,
    pub user_id: Uuid,
    pub seq: i64,
    pub key: LogPosition,
    pub source_event: String,
    pub kind: &'static str,
    pub reason: String,
    pub points: Decimal4,
    pub delta: Decimal4,
    pub score: Decimal4,
    pub at: DateTime<Utc>,
}

/// A `reputation_crossings` row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crossing {
    pub community_id: Uuid,
    pub user_id: Uuid,
    pub key: LogPosition,
    pub score: Decimal4,
    pub threshold: Decimal4,
    pub at: DateTime<Utc>,
}

/// A row as held by the fold: loaded (`stored`), changed (`dirty`).
#[derive(Clone, Debug)]
pub struct Slot<R> {
    pub row: Option<R>,
    pub stored: bool,
    pub dirty: bool,
}

impl<R> Default for Slot<R> {
    fn default() -> Self {
        Self {
            row: None,
            stored: false,
            dirty: false,
        }
    }
}

/// The global range and start: the default policy's.
fn global_policy() -> &'static ReputationPolicy {
    static DEFAULT: std::sync::OnceLock<ReputationPolicy> = std::sync::OnceLock::new();
    DEFAULT.get_or_init(ReputationPolicy::default)
}

/// The state of a batch (or a rebuild chunk): rows as loaded, folded forward, and what to write.
/// Every row a change names must be loaded first ([`Fold::load_score`] and friends).
#[derive(Debug, Default)]
pub struct Fold {
    pub policies: HashMap<Uuid, Slot<ReputationPolicy>, KeyHashState>,
    pub scores: HashMap<(Uuid, Uuid), Slot<ScoreRow>, KeyHashState>,
    pub globals: HashMap<Uuid, Slot<GlobalRow>, KeyHashState>,
    /// New history rows, in the order applied.
    pub history: Vec<HistoryRow>,
    pub crossings: Vec<Crossing>,
}

impl Fold {
    pub fn load_policy(&mut self, community_id: Uuid, policy: Option<ReputationPolicy>) {
        self.policies.entry(community_id).or_insert(Slot {
            stored: policy.is_some(),
            row: policy,
            dirty: false,
        });
    }

    pub fn load_score(&mut self, key: (Uuid, Uuid), row: Option<ScoreRow>) {
        self.scores.entry(key).or_insert(Slot {
            stored: row.is_some(),
            row,
            dirty: false,
        });
    }

    pub fn load_global(&mut self, user_id: Uuid, row: Option<GlobalRow>) {
        self.globals.entry(user_id).or_insert(Slot {
            stored: row.is_some(),
            row,
            dirty: false,
        });
    }

    fn policy(&self, community_id: Uuid) -> ReputationPolicy {
        self.policies
            .get(&community_id)
            .and_then(|s| s.row.clone())
            .unwrap_or_default()
    }

    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::Policy {
                community_id,
                policy,
            } => {
                let slot = self.policies.entry(*community_id).or_default();
                slot.row = Some(policy.clone());
                slot.dirty = true;
            }
            Change::Member {
                community_id,
                user_id,
                effect,
                source,
            } => self.apply_member(*community_id, *user_id, effect, source),
            // Moves and merges rewrite stored rows; the caller applies them between folds.
            Change::Moved { .. } | Change::UserMerged { .. } => {}
        }
    }

    fn apply_member(
        &mut self,
        community_id: Uuid,
        user_id: Uuid,
        effect: &Effect,
        source: &Source,
    ) {
        let policy = self.policy(community_id);
        let slot = self.scores.entry((community_id, user_id)).or_default();
        let created = slot.row.is_none();
        let row = slot.row.get_or_insert(ScoreRow {
            score: policy.start,
            changes: 0,
            updated_at: source.at,
        });
        let before = row.score;
        let (kind, reason, points, target) = match effect {
            Effect::Present => {
                slot.dirty |= created;
                self.touch_global(user_id, None, source);
                return;
            }
            Effect::Earned {
                kind,
                quantity,
                reason,
            } => {
                let points = kind.weight(&policy.weights) * *quantity;
                (
                    kind.name(),
                    reason.clone().unwrap_or_else(|| kind.name().to_string()),
                    points,
                    before + points,
                )
            }
            Effect::Adjusted { delta, reason } => {
                ("adjust", reason.clone(), *delta, before + *delta)
            }
            Effect::Set { score, reason } => ("set", reason.clone(), *score, *score),
        };
        let after = target.clamp(policy.min, policy.max);
        row.score = after;
        row.changes += 1;
        row.updated_at = source.at;
        slot.dirty = true;
        self.history.push(HistoryRow {
            community_id,
            user_id,
            seq: row.changes,
            key: source.key,
            source_event: source.event.clone(),
            kind,
            reason,
            points,
            delta: after - before,
            score: after,
            at: source.at,
        });
        let threshold = policy.auto_ban.threshold;
        if policy.auto_ban.enabled && before >= threshold && after < threshold {
            self.crossings.push(Crossing {
                community_id,
                user_id,
                key: source.key,
                score: after,
                threshold,
                at: source.at,
            });
        }
        // Globally: the default weights for what was earned, the community's effect otherwise.
        let global_points = match effect {
            Effect::Earned { kind, quantity, .. } => {
                kind.weight(&global_policy().weights) * *quantity
            }
            _ => after - before,
        };
        self.touch_global(user_id, Some(global_points), source);
    }

    /// Moves the user's global score by `points` (clamped to the default range); `None`, a
    /// presence, only makes sure the row exists.
    fn touch_global(&mut self, user_id: Uuid, points: Option<Decimal4>, source: &Source) {
        let global = global_policy();
        let slot = self.globals.entry(user_id).or_default();
        let created = slot.row.is_none();
        let row = slot.row.get_or_insert(GlobalRow {
            score: global.start,
            changes: 0,
            updated_at: source.at,
        });
        if let Some(points) = points {
            row.score = (row.score + points).clamp(global.min, global.max);
            row.changes += 1;
            row.updated_at = source.at;
            slot.dirty = true;
        } else if created {
            slot.dirty = true;
        }
    }

    /// Rows to write, in key order (`(key, row, stored)`).
    pub fn dirty_scores(&self) -> Vec<((Uuid, Uuid), &ScoreRow, bool)> {
        let mut out: Vec<_> = self
            .scores
            .iter()
            .filter(|(_, s)| s.dirty)
            .filter_map(|(k, s)| s.row.as_ref().map(|r| (*k, r, s.stored)))
            .collect();
        out.sort_unstable_by_key(|(k, _, _)| *k);
        out
    }

    pub fn dirty_globals(&self) -> Vec<(Uuid, &GlobalRow, bool)> {
        let mut out: Vec<_> = self
            .globals
            .iter()
            .filter(|(_, s)| s.dirty)
            .filter_map(|(k, s)| s.row.as_ref().map(|r| (*k, r, s.stored)))
            .collect();
        out.sort_unstable_by_key(|(k, _, _)| *k);
        out
    }

    pub fn dirty_policies(&self) -> Vec<(Uuid, &ReputationPolicy)> {
        let mut out: Vec<_> = self
            .policies
            .iter()
            .filter(|(_, s)| s.dirty)
            .filter_map(|(k, s)| s.row.as_ref().map(|r| (*k, r)))
            .collect();
        out.sort_unstable_by_key(|(k, _)| *k);
        out
    }
}

/// What a batch must load: the pairs, communities and users its member changes name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Needs {
    pub members: Vec<(Uuid, Uuid)>,
    pub communities: Vec<Uuid>,
    pub users: Vec<Uuid>,
}

impl Needs {
    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.communities.is_empty() && self.users.is_empty()
    }
}

pub fn needs(changes: &[Change]) -> Needs {
    let mut n = Needs::default();
    for change in changes {
        match change {
            Change::Policy { community_id, .. } => n.communities.push(*community_id),
            Change::Member {
                community_id,
                user_id,
                ..
            } => {
                n.members.push((*community_id, *user_id));
                n.communities.push(*community_id);
                n.users.push(*user_id);
            }
            Change::Moved { .. } | Change::UserMerged { .. } => {}
        }
    }
    for v in [&mut n.communities, &mut n.users] {
        v.sort_unstable();
        v.dedup();
    }
    n.members.sort_unstable();
    n.members.dedup();
    n
}

/// The history of a member who absorbed another's (a move), folded again in log order from the
/// start score with the policy now in force: `rows` are both members' rows, any order; the
/// result is the absorbing member's, numbered from 1, and their final score.
pub fn refold(
    rows: Vec<HistoryRow>,
    community_id: Uuid,
    user_id: Uuid,
    policy: &ReputationPolicy,
) -> (Vec<HistoryRow>, Decimal4) {
    let mut rows = rows;
    rows.sort_by_key(|r| (r.key, r.user_id, r.seq));
    let mut score = policy.start;
    for (i, row) in rows.iter_mut().enumerate() {
        let target = if row.kind == "set" {
            row.points
        } else {
            score + row.points
        };
        let after = target.clamp(policy.min, policy.max);
        row.delta = after - score;
        row.score = after;
        score = after;
        row.community_id = community_id;
        row.user_id = user_id;
        row.seq = i as i64 + 1;
    }
    (rows, score)
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: Uuid = Uuid::from_u128(1);
    const U: Uuid = Uuid::from_u128(2);

    fn d(x: f64) -> Decimal4 {
        Decimal4::from_f64(x).unwrap_or_default()
    }

    fn source(n: i64) -> Source {
        Source {
            key: LogPosition::new(10, n),
            event: format!("membership/x/{n}"),
            at: DateTime::<Utc>::from_timestamp(1_700_000_000 + n, 0).unwrap_or_default(),
        }
    }

    fn earn(kind: Earned, quantity: f64, n: i64) -> Change {
        Change::Member {
            community_id: C,
            user_id: U,
            effect: Effect::Earned {
                kind,
                quantity: d(quantity),
                reason: None,
            },
            source: source(n),
        }
    }

    fn score_after(changes: &[Change], policy: Option<ReputationPolicy>) -> Decimal4 {
        let mut fold = Fold::default();
        fold.load_policy(C, policy);
        fold.load_score((C, U), None);
        fold.load_global(U, None);
        for c in changes {
            fold.apply(c);
        }
        fold.scores[&(C, U)]
            .row
            .as_ref()
            .map(|r| r.score)
            .unwrap_or_default()
    }

    /// Every weight of DESIGN's table, from the start score of 600.
    #[test]
    fn each_kind_is_worth_its_weight() {
        let cases: &[(Change, f64)] = &[
            (earn(Earned::ChatMessage, 1.0, 1), 600.01),
            (earn(Earned::CommandMessage, 1.0, 1), 599.9),
            (earn(Earned::Follow, 1.0, 1), 601.0),
            (earn(Earned::Subscription(SubTier::Tier1), 1.0, 1), 605.0),
            (earn(Earned::Subscription(SubTier::Tier2), 1.0, 1), 610.0),
            (earn(Earned::Subscription(SubTier::Tier3), 1.0, 1), 620.0),
            (earn(Earned::GiftSubscription, 5.0, 1), 615.0),
            (earn(Earned::Donation, 12.5, 1), 612.5),
            // 300 bits: three times the per-100-bits weight.
            (earn(Earned::Cheer, 3.0, 1), 603.0),
            (earn(Earned::Raid, 1.0, 1), 602.0),
            (earn(Earned::Boost, 1.0, 1), 605.0),
            (earn(Earned::Warn, 1.0, 1), 575.0),
            (earn(Earned::Timeout, 1.0, 1), 550.0),
            (earn(Earned::Kick, 1.0, 1), 525.0),
            (earn(Earned::Ban, 1.0, 1), 400.0),
        ];
        for (change, expected) in cases {
            assert_eq!(
                score_after(std::slice::from_ref(change), None),
                d(*expected),
                "{change:?}"
            );
        }
    }

    #[test]
    fn bits_count_per_hundred_with_fractions() {
        let quantity = earned(&Activity::Cheer { bits: 150 }).map(|(_, q)| q);
        assert_eq!(quantity, Some(d(1.5)));
        assert_eq!(earned(&Activity::StreamOnline), None);
        assert!(is_command("  !uptime"));
        assert!(is_command("/me waves"));
        assert!(!is_command("hi !"));
    }

    #[test]
    fn both_clamps_hold_after_every_change_and_keep_the_fraction() {
        let bans: Vec<Change> = (1..=3).map(|n| earn(Earned::Ban, 1.0, n)).collect();
        assert_eq!(score_after(&bans, None), d(300.0));
        let subs: Vec<Change> = (1..=20)
            .map(|n| earn(Earned::Subscription(SubTier::Tier3), 1.0, n))
            .collect();
        assert_eq!(score_after(&subs, None), d(850.0));
        // Clamped at 850 first, so the warn takes it to 825, not to 845.
        let mut after_max = subs.clone();
        after_max.push(earn(Earned::Warn, 1.0, 21));
        assert_eq!(score_after(&after_max, None), d(825.0));
        let chats: Vec<Change> = (1..=250)
            .map(|n| earn(Earned::ChatMessage, 1.0, n))
            .collect();
        assert_eq!(score_after(&chats, None), d(602.5));
    }

    #[test]
    fn a_policy_applies_from_where_it_was_set() {
        let mut generous = ReputationPolicy::default();
        generous.weights.follow = d(10.0);
        generous.max = d(1000.0);
        let changes = vec![
            earn(Earned::Follow, 1.0, 1),
            Change::Policy {
                community_id: C,
                policy: generous,
            },
            earn(Earned::Follow, 1.0, 3),
        ];
        assert_eq!(score_after(&changes, None), d(611.0));
    }

    #[test]
    fn adjust_and_set_clamp_and_record_the_effective_delta() {
        let set = Change::Member {
            community_id: C,
            user_id: U,
            effect: Effect::Set {
                score: d(900.0),
                reason: "appeal".into(),
            },
            source: source(1),
        };
        let mut fold = Fold::default();
        fold.load_policy(C, None);
        fold.load_score((C, U), None);
        fold.load_global(U, None);
        fold.apply(&set);
        let row = &fold.history[0];
        assert_eq!(
            (row.kind, row.points, row.delta, row.score),
            ("set", d(900.0), d(250.0), d(850.0))
        );
        assert_eq!(row.seq, 1);
    }

    #[test]
    fn a_crossing_below_the_threshold_is_recorded_once_when_auto_ban_is_on() {
        let mut policy = ReputationPolicy::default();
        policy.auto_ban.enabled = true;
        let mut fold = Fold::default();
        fold.load_policy(C, Some(policy));
        fold.load_score((C, U), None);
        fold.load_global(U, None);
        for n in 1..=3 {
            fold.apply(&earn(Earned::Ban, 1.0, n));
        }
        // 600 → 400 crosses 450; 400 → 300 stays below.
        assert_eq!(fold.crossings.len(), 1);
        assert_eq!(fold.crossings[0].score, d(400.0));
        let off = score_after(&[earn(Earned::Ban, 1.0, 1)], None);
        assert_eq!(off, d(400.0));
    }

    #[test]
    fn a_refold_merges_two_histories_in_log_order() {
        let row = |user: u128, n: i64, kind: &'static str, points: f64| HistoryRow {
            community_id: C,
            user_id: Uuid::from_u128(user),
            seq: n,
            key: LogPosition::new(10, n),
            source_event: String::new(),
            kind,
            reason: String::new(),
            points: d(points),
            delta: Decimal4::ZERO,
            score: Decimal4::ZERO,
            at: source(n).at,
        };
        let rows = vec![
            row(2, 2, "follow", 1.0),
            row(9, 1, "subscription", 20.0),
            row(9, 3, "set", 700.0),
            row(2, 4, "warn", -25.0),
        ];
        let (merged, score) = refold(rows, C, U, &ReputationPolicy::default());
        assert_eq!(score, d(675.0));
        assert_eq!(
            merged.iter().map(|r| (r.seq, r.score)).collect::<Vec<_>>(),
            vec![(1, d(620.0)), (2, d(621.0)), (3, d(700.0)), (4, d(675.0))]
        );
        assert!(merged.iter().all(|r| r.user_id == U));
    }
}
