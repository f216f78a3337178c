//! The members read model: per community, each member's role, status, join time and username;
//! active-member counts; hub users' usernames and linked platform identities.
//!
//! Transactional: rows commit with the checkpoint.
//!
//! Events of different aggregates reach the projection in different orders live (partitions
//! progress independently) and in a rebuild (log order), so the denormalised `members.username`
//! must converge either way: a membership applied before the user's registration takes `''`, and
//! the registration then fills every member row of that user. Under concurrency this holds
//! because every batch locks the `member_users` rows of the users it touches (creating an empty
//! row when missing) before reading or writing their member rows: a registration and a
//! membership of the same user never interleave.
//!
//! # Tables
//! - `members (community_id, user_id) → username, role, status, joined_at, updated_at, txid, gpos`
//! - `member_counts (community_id) → member_count` (active members)
//! - `member_users (user_id) → username, identities`

pub mod fold;
mod queries;

pub use fold::Identity;
pub use queries::{
    get_member, list_members, member_count, MemberPage, MemberQuery, MemberSort, MemberView,
    QueryError, DEFAULT_LIMIT, MAX_LIMIT,
};

use crate::projection::{Projection, TableNames};
use anyhow::Context as _;
use chrono::{DateTime, Utc};
use fold::{Fold, MemberRow, UserRow};
use futures::future::BoxFuture;
use rookery_events::{LogPosition, MemberStatus, RecordedEvent, Role};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

/// The projection's name (checkpoints, status, CLI).
pub const NAME: &str = "members";

const TABLES: &[&str] = &["members", "member_counts", "member_users"];

/// The members projection.
#[derive(Clone, Copy, Debug, Default)]
pub struct MembersProjection;

impl Projection for MembersProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn version(&self) -> i32 {
        1
    }

    fn tables(&self) -> &'static [&'static str] {
        TABLES
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

async fn apply(
    conn: &mut PgConnection,
    tables: &TableNames,
    events: &[RecordedEvent],
) -> anyhow::Result<()> {
    let changes = fold::decode(events)?;
    if changes.is_empty() {
        return Ok(());
    }
    let t = Tables {
        members: tables.get("members")?,
        counts: tables.get("member_counts")?,
        users: tables.get("member_users")?,
    };
    let needs = fold::needs(&changes);
    let mut state = Fold::default();
    load_users(conn, &t, tables.exclusive(), &needs.users, &mut state)
        .await
        .context("loading member_users")?;
    load_members(conn, &t, &needs.members, &mut state)
        .await
        .context("loading members")?;
    for change in &changes {
        state.apply(change);
    }
    write(conn, &t, &state).await
}

struct Tables {
    members: String,
    counts: String,
    users: String,
}

/// Loads (and locks, in user-id order) the `member_users` rows of every user the batch names,
/// creating empty ones first so there is always a row to lock. With exclusive tables (a
/// rebuild) there is nobody to lock against: missing rows are created by the batch's write.
async fn load_users(
    conn: &mut PgConnection,
    t: &Tables,
    exclusive: bool,
    users: &std::collections::BTreeSet<Uuid>,
    state: &mut Fold,
) -> anyhow::Result<()> {
    let ids: Vec<Uuid> = users.iter().copied().collect();
    if !exclusive {
        sqlx::query(&format!(
            "INSERT INTO {} (user_id, username)
             SELECT u, '' FROM UNNEST($1::uuid[]) AS t(u) ORDER BY u
             ON CONFLICT (user_id) DO NOTHING",
            t.users
        ))
        .bind(&ids)
        .execute(&mut *conn)
        .await?;
    }
    let lock = if exclusive {
        ""
    } else {
        "ORDER BY user_id FOR UPDATE"
    };
    let rows = sqlx::query(&format!(
        "SELECT user_id, username, identities FROM {} WHERE user_id = ANY($1) {lock}",
        t.users
    ))
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    for row in rows {
        let identities: serde_json::Value = row.try_get("identities")?;
        let identities = serde_json::from_value(identities).context("member_users.identities")?;
        state.users.insert(
            row.try_get("user_id")?,
            UserRow {
                username: row.try_get("username")?,
                identities,
            },
        );
    }
    for id in ids {
        if let std::collections::btree_map::Entry::Vacant(e) = state.users.entry(id) {
            // The same empty row the locking path inserts up front.
            e.insert(UserRow::default());
            state.dirty_users.insert(id);
        }
    }
    Ok(())
}

async fn load_members(
    conn: &mut PgConnection,
    t: &Tables,
    keys: &std::collections::BTreeSet<(Uuid, Uuid)>,
    state: &mut Fold,
) -> anyhow::Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let (communities, users): (Vec<Uuid>, Vec<Uuid>) = keys.iter().copied().unzip();
    for key in keys {
        state.members.insert(*key, None);
    }
    let rows = sqlx::query(&format!(
        "SELECT m.community_id, m.user_id, m.username, m.role, m.status, m.joined_at, m.updated_at,
                m.txid, m.gpos
         FROM {} m JOIN UNNEST($1::uuid[], $2::uuid[]) AS k(c, u)
           ON m.community_id = k.c AND m.user_id = k.u",
        t.members
    ))
    .bind(&communities)
    .bind(&users)
    .fetch_all(&mut *conn)
    .await?;
    for row in rows {
        let role: String = row.try_get("role")?;
        let status: String = row.try_get("status")?;
        let member = MemberRow {
            username: row.try_get("username")?,
            role: role.parse::<Role>()?,
            status: status.parse::<MemberStatus>()?,
            joined_at: row.try_get("joined_at")?,
            updated_at: row.try_get("updated_at")?,
            key: LogPosition::from_db(row.try_get("txid")?, row.try_get("gpos")?),
        };
        state.members.insert(
            (row.try_get("community_id")?, row.try_get("user_id")?),
            Some(member),
        );
    }
    Ok(())
}

/// Writes the batch back: one statement per table, rows in key order (a stable lock order
/// between concurrent partitions).
async fn write(conn: &mut PgConnection, t: &Tables, state: &Fold) -> anyhow::Result<()> {
    if !state.dirty_users.is_empty() {
        let mut ids = Vec::new();
        let mut names = Vec::new();
        let mut identities = Vec::new();
        for id in &state.dirty_users {
            if let Some(u) = state.users.get(id) {
                ids.push(*id);
                names.push(u.username.clone());
                identities.push(serde_json::to_value(&u.identities)?);
            }
        }
        sqlx::query(&format!(
            "INSERT INTO {} (user_id, username, identities)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[])
             ON CONFLICT (user_id) DO UPDATE
             SET username = EXCLUDED.username, identities = EXCLUDED.identities",
            t.users
        ))
        .bind(&ids)
        .bind(&names)
        .bind(&identities)
        .execute(&mut *conn)
        .await
        .context("writing member_users")?;
    }

    if !state.dirty_members.is_empty() {
        let n = state.dirty_members.len();
        let mut cs = Vec::with_capacity(n);
        let mut us = Vec::with_capacity(n);
        let mut names = Vec::with_capacity(n);
        let mut roles = Vec::with_capacity(n);
        let mut statuses = Vec::with_capacity(n);
        let mut joined: Vec<DateTime<Utc>> = Vec::with_capacity(n);
        let mut updated: Vec<DateTime<Utc>> = Vec::with_capacity(n);
        let mut txids = Vec::with_capacity(n);
        let mut gposs = Vec::with_capacity(n);
        for key in &state.dirty_members {
            let Some(Some(m)) = state.members.get(key) else {
                continue;
            };
            cs.push(key.0);
            us.push(key.1);
            names.push(m.username.clone());
            roles.push(m.role.as_str());
            statuses.push(m.status.as_str());
            joined.push(m.joined_at);
            updated.push(m.updated_at);
            txids.push(m.key.txid_i64());
            gposs.push(m.key.gpos);
        }
        sqlx::query(&format!(
            "INSERT INTO {} (community_id, user_id, username, role, status, joined_at, updated_at, txid, gpos)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                                  $6::timestamptz[], $7::timestamptz[], $8::bigint[], $9::bigint[])
             ON CONFLICT (community_id, user_id) DO UPDATE
             SET username = EXCLUDED.username, role = EXCLUDED.role, status = EXCLUDED.status,
                 joined_at = EXCLUDED.joined_at, updated_at = EXCLUDED.updated_at,
                 txid = EXCLUDED.txid, gpos = EXCLUDED.gpos",
            t.members
        ))
        .bind(&cs)
        .bind(&us)
        .bind(&names)
        .bind(&roles)
        .bind(&statuses)
        .bind(&joined)
        .bind(&updated)
        .bind(&txids)
        .bind(&gposs)
        .execute(&mut *conn)
        .await
        .context("writing members")?;
    }

    if !state.renamed.is_empty() {
        let (ids, names): (Vec<Uuid>, Vec<String>) =
            state.renamed.iter().map(|(k, v)| (*k, v.clone())).unzip();
        sqlx::query(&format!(
            "UPDATE {m} SET username = r.username
             FROM UNNEST($1::uuid[], $2::text[]) AS r(user_id, username)
             WHERE {m}.user_id = r.user_id AND {m}.username IS DISTINCT FROM r.username",
            m = t.members
        ))
        .bind(&ids)
        .bind(&names)
        .execute(&mut *conn)
        .await
        .context("copying usernames to member rows")?;
    }

    if !state.count_delta.is_empty() {
        let (ids, deltas): (Vec<Uuid>, Vec<i64>) =
            state.count_delta.iter().map(|(k, v)| (*k, *v)).unzip();
        sqlx::query(&format!(
            "INSERT INTO {c} (community_id, member_count)
             SELECT * FROM UNNEST($1::uuid[], $2::bigint[]) AS d(community_id, delta) ORDER BY 1
             ON CONFLICT (community_id) DO UPDATE
             SET member_count = {c}.member_count + EXCLUDED.member_count",
            c = t.counts
        ))
        .bind(&ids)
        .bind(&deltas)
        .execute(&mut *conn)
        .await
        .context("writing member_counts")?;
    }
    Ok(())
}
