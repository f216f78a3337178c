//! The reputation read model: each member's exact score in a community (shown rounded, with its
//! tier), the history of its changes, a leaderboard per community, each hub user's global
//! score, the policy in force per community, and the auto-ban crossings.
//!
//! Transactional: rows commit with the checkpoint. Folded **in log order** (one worker over
//! every partition, see [`Projection::in_log_order`]): a score is clamped after every change,
//! so a warn before or after a subscription that hits the maximum ends at different scores, and
//! the changes of one member come from different aggregates (membership, message, activity).
//! A policy applies to the events after it in the log.
//!
//! Batched as [`Freshness::Relaxed`]: under load the worker commits every 25 ms rather than
//! every 3 (`ROOKERY_RELAXED_BATCH_INTERVAL_MS`).
//!
//! A shadow user's membership moving to a registered user (`MembershipMoved`) folds both
//! histories again, in log order, from the start score under the policy then in force; the
//! global score of a merged shadow user is added to the registered one's.
//!
//! # Tables
//! - `reputation_scores (community_id, user_id) → score_e4, changes, updated_at`
//! - `reputation_history (community_id, user_id, seq) → key, source_event, kind, reason,
//!   points_e4, delta_e4, score_e4, at`
//! - `reputation_policies (community_id) → policy`
//! - `reputation_global (user_id) → score_e4, changes, updated_at`
//! - `reputation_crossings (community_id, user_id, txid, gpos) → score_e4, threshold_e4, at`

mod bulk;
pub mod fold;
mod queries;

pub use queries::{
    global_score, leaderboard, member_reputation, GlobalScore, HistoryItem, LeaderboardItem,
    MemberReputation,
};

use crate::engine::{BulkFold, BulkStart, Freshness, Projection, TableNames};
use crate::support::{copy_in, Insert};
use anyhow::Context as _;
use chrono::{DateTime, Utc};
use fold::{Change, Fold, GlobalRow, HistoryRow, ScoreRow};
use futures::future::BoxFuture;
use rookery_events::{Decimal4, LogPosition, RecordedEvent, ReputationPolicy};
use sqlx::{PgConnection, Row};
use std::collections::HashMap;
use uuid::Uuid;

/// The projection's name (checkpoints, status, CLI).
pub const NAME: &str = "reputation";

const TABLES: &[&str] = &[
    "reputation_scores",
    "reputation_history",
    "reputation_policies",
    "reputation_global",
    "reputation_crossings",
];

/// The reputation projection.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReputationProjection;

impl Projection for ReputationProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn version(&self) -> i32 {
        // 2: a moderation's history row carries the moderator's reason (1: the kind's name).
        2
    }

    fn tables(&self) -> &'static [&'static str] {
        TABLES
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["community", "membership", "message", "activity", "user"]
    }

    fn in_log_order(&self) -> bool {
        true
    }

    /// Scores are read as they stand, and the one in-order worker would otherwise commit as
    /// often as the members model does for every join it folds.
    fn freshness(&self) -> Freshness {
        Freshness::Relaxed
    }

    fn bulk_fold(&self, tables: &TableNames, start: BulkStart) -> Option<Box<dyn BulkFold>> {
        // Only shadow tables are ours alone; anything else gets the batch-by-batch `apply`.
        if !tables.exclusive() {
            return None;
        }
        let t = Tables::new(tables).ok()?;
        Some(Box::new(bulk::ReputationBulk::new(t, start)))
    }

    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        tables: &'a TableNames,
        events: &'a [RecordedEvent],
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(apply(conn, tables, events))
    }
}

/// Physical names of the tables, quoted.
#[derive(Clone, Debug)]
struct Tables {
    scores: String,
    history: String,
    policies: String,
    global: String,
    crossings: String,
}

impl Tables {
    fn new(t: &TableNames) -> anyhow::Result<Self> {
        Ok(Self {
            scores: t.get("reputation_scores")?,
            history: t.get("reputation_history")?,
            policies: t.get("reputation_policies")?,
            global: t.get("reputation_global")?,
            crossings: t.get("reputation_crossings")?,
        })
    }
}

async fn apply(
    conn: &mut PgConnection,
    tables: &TableNames,
    events: &[RecordedEvent],
) -> anyhow::Result<()> {
    let changes = fold::decode(events)?;
    let t = Tables::new(tables)?;
    // Moves and merges rewrite what was written before them: fold up to each, write, apply it.
    let mut from = 0;
    for (i, change) in changes.iter().enumerate() {
        match change {
            Change::Moved {
                community_id,
                from: shadow,
                to,
                source,
            } => {
                fold_and_write(conn, &t, &changes[from..i]).await?;
                move_member(conn, &t, *community_id, *shadow, *to, source.at)
                    .await
                    .context("moving a shadow user's reputation")?;
                from = i + 1;
            }
            Change::UserMerged {
                user_id,
                into,
                source,
            } => {
                fold_and_write(conn, &t, &changes[from..i]).await?;
                merge_global(conn, &t, *user_id, *into, source.at)
                    .await
                    .context("merging a shadow user's global score")?;
                from = i + 1;
            }
            _ => {}
        }
    }
    fold_and_write(conn, &t, &changes[from..]).await
}

async fn fold_and_write(
    conn: &mut PgConnection,
    t: &Tables,
    changes: &[Change],
) -> anyhow::Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    let needs = fold::needs(changes);
    let mut state = Fold::default();
    load(conn, t, &needs, &mut state)
        .await
        .context("loading reputation rows")?;
    for change in changes {
        state.apply(change);
    }
    write(conn, t, &state, Insert::Upsert).await
}

/// Loads every row `needs` names (one round trip); a missing row is held as absent.
async fn load(
    conn: &mut PgConnection,
    t: &Tables,
    needs: &fold::Needs,
    state: &mut Fold,
) -> anyhow::Result<()> {
    let (communities, users): (Vec<Uuid>, Vec<Uuid>) = needs.members.iter().copied().unzip();
    let rows = sqlx::query(&format!(
        "SELECT 's' AS kind, s.community_id, s.user_id, s.score_e4, s.changes, s.updated_at,
                NULL::jsonb AS policy
         FROM UNNEST($1::uuid[], $2::uuid[]) AS k(c, u)
         CROSS JOIN LATERAL (SELECT * FROM {scores} x
                             WHERE x.community_id = k.c AND x.user_id = k.u LIMIT 1) s
         UNION ALL
         SELECT 'p', p.community_id, NULL, NULL, NULL, NULL, p.policy
         FROM {policies} p WHERE p.community_id = ANY($3)
         UNION ALL
         SELECT 'g', NULL, g.user_id, g.score_e4, g.changes, g.updated_at, NULL
         FROM {global} g WHERE g.user_id = ANY($4)",
        scores = t.scores,
        policies = t.policies,
        global = t.global,
    ))
    .bind(&communities)
    .bind(&users)
    .bind(&needs.communities)
    .bind(&needs.users)
    .fetch_all(&mut *conn)
    .await?;
    let mut scores = HashMap::new();
    let mut policies = HashMap::new();
    let mut globals = HashMap::new();
    for row in rows {
        let kind: String = row.try_get("kind")?;
        match kind.as_str() {
            "s" => {
                scores.insert(
                    (row.try_get("community_id")?, row.try_get("user_id")?),
                    ScoreRow {
                        score: Decimal4::raw(row.try_get("score_e4")?),
                        changes: row.try_get("changes")?,
                        updated_at: row.try_get("updated_at")?,
                    },
                );
            }
            "p" => {
                let policy: serde_json::Value = row.try_get("policy")?;
                let policy: ReputationPolicy =
                    serde_json::from_value(policy).context("reputation_policies.policy")?;
                policies.insert(row.try_get::<Uuid, _>("community_id")?, policy);
            }
            _ => {
                globals.insert(
                    row.try_get::<Uuid, _>("user_id")?,
                    GlobalRow {
                        score: Decimal4::raw(row.try_get("score_e4")?),
                        changes: row.try_get("changes")?,
                        updated_at: row.try_get("updated_at")?,
                    },
                );
            }
        }
    }
    for key in &needs.members {
        state.load_score(*key, scores.remove(key));
    }
    for c in &needs.communities {
        state.load_policy(*c, policies.remove(c));
    }
    for u in &needs.users {
        state.load_global(*u, globals.remove(u));
    }
    Ok(())
}

/// Writes the fold's rows (key order: a stable lock order): with [`Insert::Copy`], rows not
/// loaded and every history and crossing row by `COPY` first; the rest in one statement.
async fn write(
    conn: &mut PgConnection,
    t: &Tables,
    state: &Fold,
    insert: Insert,
) -> anyhow::Result<()> {
    let copy = insert == Insert::Copy;
    let policies = state.dirty_policies();
    let (p_ids, p_values): (Vec<Uuid>, Vec<serde_json::Value>) = policies
        .iter()
        .map(|(c, p)| Ok((*c, serde_json::to_value(p)?)))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    let (copy_scores, scores): (Vec<_>, Vec<_>) = state
        .dirty_scores()
        .into_iter()
        .partition(|(_, _, stored)| copy && !stored);
    let (copy_globals, globals): (Vec<_>, Vec<_>) = state
        .dirty_globals()
        .into_iter()
        .partition(|(_, _, stored)| copy && !stored);
    if copy {
        copy_rows(conn, t, &copy_scores, &copy_globals, state).await?;
    }
    let mut s = Columns::default();
    for ((c, u), row, _) in &scores {
        s.c.push(*c);
        s.u.push(*u);
        s.score.push(row.score.0);
        s.changes.push(row.changes);
        s.at.push(row.updated_at);
    }
    let mut g = Columns::default();
    for (u, row, _) in &globals {
        g.u.push(*u);
        g.score.push(row.score.0);
        g.changes.push(row.changes);
        g.at.push(row.updated_at);
    }
    let (history, crossings): (&[HistoryRow], &[fold::Crossing]) = if copy {
        (&[], &[])
    } else {
        (&state.history, &state.crossings)
    };
    let h = HistoryColumns::of(history);
    let mut x = Columns::default();
    let mut x_threshold = Vec::with_capacity(crossings.len());
    let (mut x_txid, mut x_gpos) = (Vec::new(), Vec::new());
    for crossing in crossings {
        x.c.push(crossing.community_id);
        x.u.push(crossing.user_id);
        x_txid.push(crossing.key.txid_i64());
        x_gpos.push(crossing.key.gpos);
        x.score.push(crossing.score.0);
        x_threshold.push(crossing.threshold.0);
        x.at.push(crossing.at);
    }

    let mut parts = Vec::new();
    if !p_ids.is_empty() {
        parts.push(format!(
            "p AS (INSERT INTO {} AS t (community_id, policy)
                   SELECT * FROM UNNEST($1::uuid[], $2::jsonb[])
                   ON CONFLICT (community_id) DO UPDATE SET policy = EXCLUDED.policy)",
            t.policies
        ));
    }
    if !s.c.is_empty() {
        parts.push(format!(
            "s AS (INSERT INTO {} AS t (community_id, user_id, score_e4, changes, updated_at)
                   SELECT * FROM UNNEST($3::uuid[], $4::uuid[], $5::bigint[], $6::bigint[],
                                        $7::timestamptz[])
                   ON CONFLICT (community_id, user_id) DO UPDATE
                   SET score_e4 = EXCLUDED.score_e4, changes = EXCLUDED.changes,
                       updated_at = EXCLUDED.updated_at)",
            t.scores
        ));
    }
    if !h.c.is_empty() {
        parts.push(format!(
            "h AS (INSERT INTO {} (community_id, user_id, seq, txid, gpos, source_event, kind,
                                   reason, points_e4, delta_e4, score_e4, at)
                   SELECT * FROM UNNEST($8::uuid[], $9::uuid[], $10::bigint[], $11::bigint[],
                                        $12::bigint[], $13::text[], $14::text[], $15::text[],
                                        $16::bigint[], $17::bigint[], $18::bigint[],
                                        $19::timestamptz[]))",
            t.history
        ));
    }
    if !g.u.is_empty() {
        parts.push(format!(
            "g AS (INSERT INTO {} AS t (user_id, score_e4, changes, updated_at)
                   SELECT * FROM UNNEST($20::uuid[], $21::bigint[], $22::bigint[],
                                        $23::timestamptz[])
                   ON CONFLICT (user_id) DO UPDATE
                   SET score_e4 = EXCLUDED.score_e4, changes = EXCLUDED.changes,
                       updated_at = EXCLUDED.updated_at)",
            t.global
        ));
    }
    if !x.c.is_empty() {
        parts.push(format!(
            "x AS (INSERT INTO {} (community_id, user_id, txid, gpos, score_e4, threshold_e4, at)
                   SELECT * FROM UNNEST($24::uuid[], $25::uuid[], $26::bigint[], $27::bigint[],
                                        $28::bigint[], $29::bigint[], $30::timestamptz[])
                   ON CONFLICT DO NOTHING)",
            t.crossings
        ));
    }
    if parts.is_empty() {
        return Ok(());
    }
    // Every parameter is bound (empty arrays for absent parts), so the numbering is fixed.
    sqlx::query(&format!("WITH {} SELECT 1", parts.join(",\n")))
        .bind(&p_ids)
        .bind(&p_values)
        .bind(&s.c)
        .bind(&s.u)
        .bind(&s.score)
        .bind(&s.changes)
        .bind(&s.at)
        .bind(&h.c)
        .bind(&h.u)
        .bind(&h.seq)
        .bind(&h.txid)
        .bind(&h.gpos)
        .bind(&h.source)
        .bind(&h.kind)
        .bind(&h.reason)
        .bind(&h.points)
        .bind(&h.delta)
        .bind(&h.score)
        .bind(&h.at)
        .bind(&g.u)
        .bind(&g.score)
        .bind(&g.changes)
        .bind(&g.at)
        .bind(&x.c)
        .bind(&x.u)
        .bind(&x_txid)
        .bind(&x_gpos)
        .bind(&x.score)
        .bind(&x_threshold)
        .bind(&x.at)
        .execute(&mut *conn)
        .await
        .context("writing reputation rows")?;
    Ok(())
}

/// The rows a rebuild creates, by `COPY`: new scores and global scores, all history and
/// crossings.
async fn copy_rows(
    conn: &mut PgConnection,
    t: &Tables,
    scores: &[((Uuid, Uuid), &fold::ScoreRow, bool)],
    globals: &[(Uuid, &fold::GlobalRow, bool)],
    state: &Fold,
) -> anyhow::Result<()> {
    if !scores.is_empty() {
        let sql = format!(
            "COPY {} (community_id, user_id, score_e4, changes, updated_at)
             FROM STDIN (FORMAT binary)",
            t.scores
        );
        copy_in(conn, &sql, 5, scores, |rows, ((c, u), row, _)| {
            rows.value(c)?;
            rows.value(u)?;
            rows.value(&row.score.0)?;
            rows.value(&row.changes)?;
            rows.value(&row.updated_at)
        })
        .await
        .context("copying reputation_scores")?;
    }
    if !globals.is_empty() {
        let sql = format!(
            "COPY {} (user_id, score_e4, changes, updated_at) FROM STDIN (FORMAT binary)",
            t.global
        );
        copy_in(conn, &sql, 4, globals, |rows, (u, row, _)| {
            rows.value(u)?;
            rows.value(&row.score.0)?;
            rows.value(&row.changes)?;
            rows.value(&row.updated_at)
        })
        .await
        .context("copying reputation_global")?;
    }
    if !state.history.is_empty() {
        let sql = format!(
            "COPY {} (community_id, user_id, seq, txid, gpos, source_event, kind, reason,
                      points_e4, delta_e4, score_e4, at) FROM STDIN (FORMAT binary)",
            t.history
        );
        copy_in(conn, &sql, 12, &state.history, |rows, r| {
            rows.value(&r.community_id)?;
            rows.value(&r.user_id)?;
            rows.value(&r.seq)?;
            rows.value(&r.key.txid_i64())?;
            rows.value(&r.key.gpos)?;
            rows.value(&r.source_event)?;
            rows.value(&r.kind)?;
            rows.value(&r.reason)?;
            rows.value(&r.points.0)?;
            rows.value(&r.delta.0)?;
            rows.value(&r.score.0)?;
            rows.value(&r.at)
        })
        .await
        .context("copying reputation_history")?;
    }
    if !state.crossings.is_empty() {
        let sql = format!(
            "COPY {} (community_id, user_id, txid, gpos, score_e4, threshold_e4, at)
             FROM STDIN (FORMAT binary)",
            t.crossings
        );
        copy_in(conn, &sql, 7, &state.crossings, |rows, x| {
            rows.value(&x.community_id)?;
            rows.value(&x.user_id)?;
            rows.value(&x.key.txid_i64())?;
            rows.value(&x.key.gpos)?;
            rows.value(&x.score.0)?;
            rows.value(&x.threshold.0)?;
            rows.value(&x.at)
        })
        .await
        .context("copying reputation_crossings")?;
    }
    Ok(())
}

/// Parallel arrays of one table's rows, for `UNNEST`.
#[derive(Default)]
struct Columns {
    c: Vec<Uuid>,
    u: Vec<Uuid>,
    score: Vec<i64>,
    changes: Vec<i64>,
    at: Vec<DateTime<Utc>>,
}

#[derive(Default)]
struct HistoryColumns<'a> {
    c: Vec<Uuid>,
    u: Vec<Uuid>,
    seq: Vec<i64>,
    txid: Vec<i64>,
    gpos: Vec<i64>,
    source: Vec<&'a str>,
    kind: Vec<&'a str>,
    reason: Vec<&'a str>,
    points: Vec<i64>,
    delta: Vec<i64>,
    score: Vec<i64>,
    at: Vec<DateTime<Utc>>,
}

impl<'a> HistoryColumns<'a> {
    fn of(rows: &'a [HistoryRow]) -> Self {
        let mut h = HistoryColumns::default();
        for r in rows {
            h.c.push(r.community_id);
            h.u.push(r.user_id);
            h.seq.push(r.seq);
            h.txid.push(r.key.txid_i64());
            h.gpos.push(r.key.gpos);
            h.source.push(&r.source_event);
            h.kind.push(r.kind);
            h.reason.push(&r.reason);
            h.points.push(r.points.0);
            h.delta.push(r.delta.0);
            h.score.push(r.score.0);
            h.at.push(r.at);
        }
        h
    }
}

/// Folds `from`'s history into `to`'s in `community_id` (see [`fold::refold`]): `to` ends with
/// both histories in log order and the score they give; `from` has no rows left.
async fn move_member(
    conn: &mut PgConnection,
    t: &Tables,
    community_id: Uuid,
    from: Uuid,
    to: Uuid,
    at: DateTime<Utc>,
) -> anyhow::Result<()> {
    let rows = sqlx::query(&format!(
        "SELECT user_id, seq, txid, gpos, source_event, kind, reason, points_e4, at
         FROM {} WHERE community_id = $1 AND user_id = ANY($2)",
        t.history
    ))
    .bind(community_id)
    .bind(vec![from, to])
    .fetch_all(&mut *conn)
    .await?;
    let present: Vec<Uuid> = sqlx::query_scalar(&format!(
        "SELECT user_id FROM {} WHERE community_id = $1 AND user_id = ANY($2)",
        t.scores
    ))
    .bind(community_id)
    .bind(vec![from, to])
    .fetch_all(&mut *conn)
    .await?;
    if present.is_empty() {
        return Ok(());
    }
    let policy: Option<serde_json::Value> = sqlx::query_scalar(&format!(
        "SELECT policy FROM {} WHERE community_id = $1",
        t.policies
    ))
    .bind(community_id)
    .fetch_optional(&mut *conn)
    .await?;
    let policy: ReputationPolicy = match policy {
        Some(p) => serde_json::from_value(p).context("reputation_policies.policy")?,
        None => ReputationPolicy::default(),
    };
    let history = rows
        .iter()
        .map(|row| {
            Ok(HistoryRow {
                community_id,
                user_id: row.try_get("user_id")?,
                seq: row.try_get("seq")?,
                key: LogPosition::from_db(row.try_get("txid")?, row.try_get("gpos")?),
                source_event: row.try_get("source_event")?,
                kind: kind_name(&row.try_get::<String, _>("kind")?),
                reason: row.try_get("reason")?,
                points: Decimal4::raw(row.try_get("points_e4")?),
                delta: Decimal4::ZERO,
                score: Decimal4::ZERO,
                at: row.try_get("at")?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (merged, score) = fold::refold(history, community_id, to, &policy);
    // Separate statements: an insert in the statement that deletes the same keys would still
    // find them.
    sqlx::query(&format!(
        "WITH d AS (DELETE FROM {} WHERE community_id = $1 AND user_id = ANY($2))
         DELETE FROM {} WHERE community_id = $1 AND user_id = $3",
        t.history, t.scores
    ))
    .bind(community_id)
    .bind(vec![from, to])
    .bind(from)
    .execute(&mut *conn)
    .await?;
    let h = HistoryColumns::of(&merged);
    sqlx::query(&format!(
        "WITH s AS (INSERT INTO {scores} AS t (community_id, user_id, score_e4, changes, updated_at)
                    VALUES ($1, $2, $3, $4, $5)
                    ON CONFLICT (community_id, user_id) DO UPDATE
                    SET score_e4 = EXCLUDED.score_e4, changes = EXCLUDED.changes,
                        updated_at = EXCLUDED.updated_at)
         INSERT INTO {history} (community_id, user_id, seq, txid, gpos, source_event, kind,
                                reason, points_e4, delta_e4, score_e4, at)
         SELECT * FROM UNNEST($6::uuid[], $7::uuid[], $8::bigint[], $9::bigint[],
                              $10::bigint[], $11::text[], $12::text[], $13::text[],
                              $14::bigint[], $15::bigint[], $16::bigint[], $17::timestamptz[])",
        history = t.history,
        scores = t.scores,
    ))
    .bind(community_id)
    .bind(to)
    .bind(score.0)
    .bind(merged.len() as i64)
    .bind(at)
    .bind(&h.c)
    .bind(&h.u)
    .bind(&h.seq)
    .bind(&h.txid)
    .bind(&h.gpos)
    .bind(&h.source)
    .bind(&h.kind)
    .bind(&h.reason)
    .bind(&h.points)
    .bind(&h.delta)
    .bind(&h.score)
    .bind(&h.at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The history `kind` names this build writes, as `'static` strings.
fn kind_name(kind: &str) -> &'static str {
    use fold::Earned as E;
    [
        E::ChatMessage,
        E::CommandMessage,
        E::Follow,
        E::Subscription(rookery_events::SubTier::Tier1),
        E::GiftSubscription,
        E::Donation,
        E::Cheer,
        E::Raid,
        E::Boost,
        E::Warn,
        E::Timeout,
        E::Kick,
        E::Ban,
    ]
    .iter()
    .map(|e| e.name())
    .chain(["adjust", "set"])
    .find(|k| *k == kind)
    .unwrap_or("other")
}

/// A merged shadow user's global score goes to `into`: its gain or loss over the start is
/// added (clamped to the default range), and its row goes.
async fn merge_global(
    conn: &mut PgConnection,
    t: &Tables,
    shadow: Uuid,
    into: Uuid,
    at: DateTime<Utc>,
) -> anyhow::Result<()> {
    let policy = ReputationPolicy::default();
    sqlx::query(&format!(
        "WITH s AS (DELETE FROM {g} WHERE user_id = $1 RETURNING score_e4, changes)
         INSERT INTO {g} AS t (user_id, score_e4, changes, updated_at)
         SELECT $2, LEAST($4, GREATEST($5, $3 + (s.score_e4 - $3))), s.changes, $6 FROM s
         ON CONFLICT (user_id) DO UPDATE
         SET score_e4 = LEAST($4, GREATEST($5, t.score_e4 + (EXCLUDED.score_e4 - $3))),
             changes = t.changes + EXCLUDED.changes, updated_at = EXCLUDED.updated_at",
        g = t.global
    ))
    .bind(shadow)
    .bind(into)
    .bind(policy.start.0)
    .bind(policy.max.0)
    .bind(policy.min.0)
    .bind(at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
