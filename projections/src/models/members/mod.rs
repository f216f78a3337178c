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
//! row when missing) before writing their member rows, and takes each written row's username
//! from the locked user row: a registration and a membership of the same user never interleave.
//! (Member rows are read in the statement that takes the locks, so a row read before a lock
//! wait may carry an old username — which is exactly what the fold overwrites.)
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
    get_member, list_members, member_count, memberships_of, MemberQuery, MemberSort, MemberView,
};

use crate::engine::{BulkFold, BulkStart, Projection, TableNames};
use crate::support::{copy_in, Insert};
use anyhow::Context as _;
use chrono::{DateTime, Utc};
use fold::{Fold, MemberRow, UserRow};
use futures::future::BoxFuture;
use rookery_events::{LogPosition, MemberStatus, RecordedEvent, Role};
use sqlx::{PgConnection, Row};
use std::collections::HashMap;
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

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["membership", "user"]
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
    if tables.exclusive() {
        // A rebuild's shadow tables: nobody to lock against.
        load_users(conn, &t, &needs.users, &mut state)
            .await
            .context("loading member_users")?;
        load_members(conn, &t, &needs.members, &mut state)
            .await
            .context("loading members")?;
    } else {
        load_locked(conn, &t, &needs, &mut state)
            .await
            .context("locking member_users and loading members")?;
    }
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

/// Locks the `member_users` rows of a live batch in user-id order and loads them with the
/// `members` rows it needs, in one statement. A user without a row gets an empty one first, so
/// there is always a row to lock (see the module docs): the upsert's no-op update takes each
/// existing row's lock and returns it as last committed.
///
/// The member rows are read in the statement's snapshot, which may predate a lock wait on
/// their user: a registration that committed meanwhile renamed them. Only the username can be
/// stale (every other column is written by this partition alone, the membership aggregate
/// being the pair), and the fold gives every row it writes its user row's username.
async fn load_locked(
    conn: &mut PgConnection,
    t: &Tables,
    needs: &fold::Needs,
    state: &mut Fold,
) -> anyhow::Result<()> {
    if needs.users.is_empty() && needs.members.is_empty() {
        return Ok(());
    }
    let (communities, member_users): (Vec<Uuid>, Vec<Uuid>) = needs.members.iter().copied().unzip();
    let rows = sqlx::query(&format!(
        "WITH u AS (INSERT INTO {users} AS x (user_id, username)
                    SELECT u, '' FROM UNNEST($1::uuid[]) AS t(u) ORDER BY u
                    ON CONFLICT (user_id) DO UPDATE SET username = x.username
                    RETURNING user_id, username, identities)
         SELECT NULL::uuid AS community_id, user_id, username, identities, NULL::text AS role,
                NULL::text AS status, NULL::timestamptz AS joined_at,
                NULL::timestamptz AS updated_at, NULL::bigint AS txid, NULL::bigint AS gpos
         FROM u
         UNION ALL
         {}",
        member_lookup(&t.members, "$2", "$3"),
        users = t.users,
    ))
    .bind(&needs.users)
    .bind(&communities)
    .bind(&member_users)
    .fetch_all(&mut *conn)
    .await?;
    let mut users = HashMap::with_capacity(needs.users.len());
    let mut members = HashMap::with_capacity(needs.members.len());
    for row in rows {
        if row.try_get::<Option<Uuid>, _>("community_id")?.is_none() {
            let (id, user) = user_row(&row)?;
            users.insert(id, user);
        } else {
            let (key, member) = member_row(&row)?;
            members.insert(key, member);
        }
    }
    hold_users(state, &needs.users, users);
    hold_members(state, &needs.members, members);
    Ok(())
}

/// Loads the `member_users` rows of `users` without locking them (a rebuild's).
async fn load_users(
    conn: &mut PgConnection,
    t: &Tables,
    users: &[Uuid],
    state: &mut Fold,
) -> anyhow::Result<()> {
    if users.is_empty() {
        return Ok(());
    }
    let rows = sqlx::query(&format!(
        "SELECT user_id, username, identities FROM {} WHERE user_id = ANY($1)",
        t.users
    ))
    .bind(users)
    .fetch_all(&mut *conn)
    .await?;
    let found = rows.iter().map(user_row).collect::<anyhow::Result<_>>()?;
    hold_users(state, users, found);
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
    let rows = sqlx::query(&member_lookup(&t.members, "$1", "$2"))
        .bind(&communities)
        .bind(&users)
        .fetch_all(&mut *conn)
        .await?;
    let found = rows.iter().map(member_row).collect::<anyhow::Result<_>>()?;
    hold_members(state, keys, found);
    Ok(())
}

/// The `members` rows of the keys in the parallel uuid arrays `communities` and `users` (two
/// placeholders), as [`MEMBER_COLUMNS`]. A lateral lookup per key: a plain join of the key
/// list may be planned (and the plan cached) as a scan of the whole table while it is small.
/// The `LIMIT` keeps the planner from flattening the lateral subquery back into such a join:
/// without it every live batch scanned all of `members` (hash join), measured growing with the
/// table until the projection's batches took most of a core.
fn member_lookup(members: &str, communities: &str, users: &str) -> String {
    format!(
        "SELECT {MEMBER_COLUMNS}
         FROM UNNEST({communities}::uuid[], {users}::uuid[]) AS k(c, u)
         CROSS JOIN LATERAL (SELECT * FROM {members} m
                             WHERE m.community_id = k.c AND m.user_id = k.u LIMIT 1) m"
    )
}

/// Hands the fold each of `ids` with its row from `found`; a missing one becomes the empty row
/// the locking path creates.
fn hold_users(state: &mut Fold, ids: &[Uuid], mut found: HashMap<Uuid, UserRow>) {
    for id in ids {
        state.load_user(*id, found.remove(id));
    }
}

fn hold_members(
    state: &mut Fold,
    keys: &[(Uuid, Uuid)],
    mut found: HashMap<(Uuid, Uuid), MemberRow>,
) {
    for key in keys {
        state.load_member(*key, found.remove(key));
    }
}

fn user_row(row: &sqlx::postgres::PgRow) -> anyhow::Result<(Uuid, UserRow)> {
    let identities: serde_json::Value = row.try_get("identities")?;
    let identities = serde_json::from_value(identities).context("member_users.identities")?;
    Ok((
        row.try_get("user_id")?,
        UserRow {
            username: row.try_get("username")?,
            identities,
        },
    ))
}

const MEMBER_COLUMNS: &str = "m.community_id, m.user_id, m.username, NULL::jsonb AS identities, \
    m.role, m.status, m.joined_at, m.updated_at, m.txid, m.gpos";

fn member_row(row: &sqlx::postgres::PgRow) -> anyhow::Result<((Uuid, Uuid), MemberRow)> {
    let role: String = row.try_get("role")?;
    let status: String = row.try_get("status")?;
    Ok((
        (row.try_get("community_id")?, row.try_get("user_id")?),
        MemberRow {
            username: row.try_get("username")?,
            role: role.parse::<Role>()?,
            status: status.parse::<MemberStatus>()?,
            joined_at: row.try_get("joined_at")?,
            updated_at: row.try_get("updated_at")?,
            key: LogPosition::from_db(row.try_get("txid")?, row.try_get("gpos")?),
        },
    ))
}

/// Writes the changed rows back in key order (a stable lock order between concurrent
/// partitions): rows for `COPY` first, then one statement whose data-modifying parts upsert
/// users, upsert members, carry new usernames to member rows not held, and add to the counts.
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
        copy_in(
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
    let members = state.dirty_members();
    let (copy_members, upsert_members): (Vec<_>, Vec<_>) = members
        .into_iter()
        .partition(|(_, _, stored)| insert == Insert::Copy && !stored);
    if !copy_members.is_empty() {
        copy_in(
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

    let mut u_ids = Vec::with_capacity(upsert_users.len());
    let mut u_names = Vec::with_capacity(upsert_users.len());
    let mut u_identities = Vec::with_capacity(upsert_users.len());
    for (id, slot) in upsert_users {
        u_ids.push(id);
        u_names.push(slot.row.username.as_str());
        u_identities.push(serde_json::to_value(&slot.row.identities)?);
    }
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
    // Rows of a user that was not stored cannot exist either (a member row's user row is
    // written with it), so only stored users' rows not held here need the new name.
    let (r_ids, r_names): (Vec<Uuid>, Vec<&str>) = state
        .renamed()
        .into_iter()
        .filter(|(_, _, stored)| *stored)
        .map(|(id, name, _)| (id, name))
        .unzip();
    let (c_ids, c_deltas): (Vec<Uuid>, Vec<i64>) =
        state.count_delta().iter().map(|(k, v)| (*k, *v)).unzip();

    let mut parts: Vec<String> = Vec::with_capacity(4);
    if !u_ids.is_empty() {
        parts.push(format!(
            "u AS (INSERT INTO {} (user_id, username, identities)
                   SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[])
                   ON CONFLICT (user_id) DO UPDATE
                   SET username = EXCLUDED.username, identities = EXCLUDED.identities)",
            t.users
        ));
    }
    if !cs.is_empty() {
        parts.push(format!(
            "m AS (INSERT INTO {} (community_id, user_id, username, role, status, joined_at,
                                   updated_at, txid, gpos)
                   SELECT * FROM UNNEST($4::uuid[], $5::uuid[], $6::text[], $7::text[],
                                        $8::text[], $9::timestamptz[], $10::timestamptz[],
                                        $11::bigint[], $12::bigint[])
                   ON CONFLICT (community_id, user_id) DO UPDATE
                   SET username = EXCLUDED.username, role = EXCLUDED.role,
                       status = EXCLUDED.status, joined_at = EXCLUDED.joined_at,
                       updated_at = EXCLUDED.updated_at, txid = EXCLUDED.txid,
                       gpos = EXCLUDED.gpos)",
            t.members
        ));
    }
    if !r_ids.is_empty() {
        // Rows the upsert above writes already carry the name (one statement must not
        // modify a row twice).
        parts.push(format!(
            "r AS (UPDATE {m} SET username = r.username
                   FROM UNNEST($13::uuid[], $14::text[]) AS r(user_id, username)
                   WHERE {m}.user_id = r.user_id AND {m}.username IS DISTINCT FROM r.username
                     AND NOT EXISTS (SELECT 1 FROM UNNEST($4::uuid[], $5::uuid[]) AS w(c, u)
                                     WHERE w.c = {m}.community_id AND w.u = {m}.user_id))",
            m = t.members
        ));
    }
    if !c_ids.is_empty() {
        parts.push(format!(
            "c AS (INSERT INTO {c} (community_id, member_count)
                   SELECT * FROM UNNEST($15::uuid[], $16::bigint[]) AS d(community_id, delta)
                   ORDER BY 1
                   ON CONFLICT (community_id) DO UPDATE
                   SET member_count = {c}.member_count + EXCLUDED.member_count)",
            c = t.counts
        ));
    }
    if parts.is_empty() {
        return Ok(());
    }
    // Every parameter is bound (empty arrays for absent parts), so the numbering is fixed.
    sqlx::query(&format!("WITH {} SELECT 1", parts.join(",\n")))
        .bind(&u_ids)
        .bind(&u_names)
        .bind(&u_identities)
        .bind(&cs)
        .bind(&us)
        .bind(&names)
        .bind(&roles)
        .bind(&statuses)
        .bind(&joined)
        .bind(&updated)
        .bind(&txids)
        .bind(&gposs)
        .bind(&r_ids)
        .bind(&r_names)
        .bind(&c_ids)
        .bind(&c_deltas)
        .execute(&mut *conn)
        .await
        .context("writing members, member_users and member_counts")?;
    Ok(())
}
