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
//! Rebuilds fold through the `bulk` module (the same [`Fold`], held across chunks of many
//! batches, new rows written with `COPY`); live batches through `apply`.
//!
//! # Tables
//! - `members (community_id, user_id) → username, role, status, joined_at, updated_at, txid, gpos`
//! - `member_counts (community_id) → member_count` (active members)
//! - `member_users (user_id) → username, identities`

mod bulk;
pub mod fold;
mod queries;

pub use fold::Identity;
pub use queries::{
    get_member, list_members, member_count, MemberPage, MemberQuery, MemberSort, MemberView,
    QueryError, DEFAULT_LIMIT, MAX_LIMIT,
};

use crate::projection::{BulkFold, BulkStart, Projection, TableNames};
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

    fn bulk_fold(&self, tables: &TableNames, start: BulkStart) -> Option<Box<dyn BulkFold>> {
        // Only shadow tables are ours alone; anything else gets the batch-by-batch `apply`.
        if !tables.exclusive() {
            return None;
        }
        let t = Tables::new(tables).ok()?;
        Some(Box::new(bulk::MembersBulk::new(t, start)))
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
    let t = Tables::new(tables)?;
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
    write(conn, &t, &state, Insert::Upsert).await
}

/// Physical names of the tables, quoted.
#[derive(Clone, Debug)]
struct Tables {
    members: String,
    counts: String,
    users: String,
}

impl Tables {
    fn new(tables: &TableNames) -> anyhow::Result<Self> {
        Ok(Self {
            members: tables.get("members")?,
            counts: tables.get("member_counts")?,
            users: tables.get("member_users")?,
        })
    }
}

/// Loads (and locks, in user-id order) the `member_users` rows of `users` (sorted), creating
/// empty ones first so there is always a row to lock. With exclusive tables (a rebuild) there
/// is nobody to lock against: missing rows are created by the batch's write.
async fn load_users(
    conn: &mut PgConnection,
    t: &Tables,
    exclusive: bool,
    users: &[Uuid],
    state: &mut Fold,
) -> anyhow::Result<()> {
    if users.is_empty() {
        return Ok(());
    }
    if !exclusive {
        sqlx::query(&format!(
            "INSERT INTO {} (user_id, username)
             SELECT u, '' FROM UNNEST($1::uuid[]) AS t(u) ORDER BY u
             ON CONFLICT (user_id) DO NOTHING",
            t.users
        ))
        .bind(users)
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
    .bind(users)
    .fetch_all(&mut *conn)
    .await?;
    let mut found = std::collections::HashMap::with_capacity(rows.len());
    for row in rows {
        let identities: serde_json::Value = row.try_get("identities")?;
        let identities = serde_json::from_value(identities).context("member_users.identities")?;
        found.insert(
            row.try_get::<Uuid, _>("user_id")?,
            UserRow {
                username: row.try_get("username")?,
                identities,
            },
        );
    }
    for id in users {
        // A missing row becomes the same empty row the locking path inserts up front.
        state.load_user(*id, found.remove(id));
    }
    Ok(())
}

async fn load_members(
    conn: &mut PgConnection,
    t: &Tables,
    keys: &[(Uuid, Uuid)],
    state: &mut Fold,
) -> anyhow::Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let (communities, users): (Vec<Uuid>, Vec<Uuid>) = keys.iter().copied().unzip();
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
    let mut found = std::collections::HashMap::with_capacity(rows.len());
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
        found.insert(
            (
                row.try_get::<Uuid, _>("community_id")?,
                row.try_get::<Uuid, _>("user_id")?,
            ),
            member,
        );
    }
    for key in keys {
        state.load_member(*key, found.remove(key));
    }
    Ok(())
}

/// How [`write`] creates rows that were not loaded from the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Insert {
    /// `INSERT … ON CONFLICT DO UPDATE`, like every other row.
    Upsert,
    /// `COPY`: only for tables nobody else writes, where a row not loaded is certainly absent.
    Copy,
}

/// Writes the changed rows back: one statement per table (two with `COPY`), rows in key order
/// (a stable lock order between concurrent partitions).
async fn write(
    conn: &mut PgConnection,
    t: &Tables,
    state: &Fold,
    insert: Insert,
) -> anyhow::Result<()> {
    let users = state.dirty_users();
    let (copy_users, upsert_users): (Vec<_>, Vec<_>) = users
        .into_iter()
        .partition(|(_, slot)| insert == Insert::Copy && !slot.stored);
    if !copy_users.is_empty() {
        crate::rebuild::copy_in(
            conn,
            &format!(
                "COPY {} (user_id, username, identities) FROM STDIN (FORMAT binary)",
                t.users
            ),
            3,
            copy_users,
            |rows, (id, slot)| {
                rows.value(&id)?;
                rows.value(&slot.row.username)?;
                rows.value(&serde_json::to_value(&slot.row.identities)?)
            },
        )
        .await
        .context("copying member_users")?;
    }
    if !upsert_users.is_empty() {
        let mut ids = Vec::with_capacity(upsert_users.len());
        let mut names = Vec::with_capacity(upsert_users.len());
        let mut identities = Vec::with_capacity(upsert_users.len());
        for (id, slot) in upsert_users {
            ids.push(id);
            names.push(slot.row.username.as_str());
            identities.push(serde_json::to_value(&slot.row.identities)?);
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

    let members = state.dirty_members();
    let (copy_members, upsert_members): (Vec<_>, Vec<_>) = members
        .into_iter()
        .partition(|(_, _, stored)| insert == Insert::Copy && !stored);
    if !copy_members.is_empty() {
        crate::rebuild::copy_in(
            conn,
            &format!(
                "COPY {} (community_id, user_id, username, role, status, joined_at, updated_at,
                          txid, gpos) FROM STDIN (FORMAT binary)",
                t.members
            ),
            9,
            copy_members,
            |rows, (key, m, _)| {
                rows.value(&key.0)?;
                rows.value(&key.1)?;
                rows.value(&m.username)?;
                rows.value(&m.role.as_str())?;
                rows.value(&m.status.as_str())?;
                rows.value(&m.joined_at)?;
                rows.value(&m.updated_at)?;
                rows.value(&m.key.txid_i64())?;
                rows.value(&m.key.gpos)
            },
        )
        .await
        .context("copying members")?;
    }
    if !upsert_members.is_empty() {
        let n = upsert_members.len();
        let mut cs = Vec::with_capacity(n);
        let mut us = Vec::with_capacity(n);
        let mut names = Vec::with_capacity(n);
        let mut roles = Vec::with_capacity(n);
        let mut statuses = Vec::with_capacity(n);
        let mut joined: Vec<DateTime<Utc>> = Vec::with_capacity(n);
        let mut updated: Vec<DateTime<Utc>> = Vec::with_capacity(n);
        let mut txids = Vec::with_capacity(n);
        let mut gposs = Vec::with_capacity(n);
        for (key, m, _) in upsert_members {
            cs.push(key.0);
            us.push(key.1);
            names.push(m.username.as_str());
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

    // Rows of a user that was not stored cannot exist either (a member row's user row is
    // written with it), so only stored users' rows not held here need the new name.
    let (ids, names): (Vec<Uuid>, Vec<&str>) = state
        .renamed()
        .into_iter()
        .filter(|(_, _, stored)| *stored)
        .map(|(id, name, _)| (id, name))
        .unzip();
    if !ids.is_empty() {
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

    if !state.count_delta().is_empty() {
        let (ids, deltas): (Vec<Uuid>, Vec<i64>) =
            state.count_delta().iter().map(|(k, v)| (*k, *v)).unzip();
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
