//! The messages read model: chat history per community and channel, newest first, searchable
//! by sender and text. A moderator's delete shows [`fold::DELETED_TEXT`] here; the log keeps
//! what was said.
//!
//! Transactional: rows commit with the checkpoint. Partitioned like the log: a message's
//! events are one aggregate's, so they arrive in order, and a shadow user's merge only adds a
//! mapping, whichever order it comes in.
//!
//! # Tables
//! - `messages (message_id) → community_id, channel, sender, text, sent_at, edited_at, deleted,
//!   txid, gpos`
//! - `message_senders (sender_id) → user_id`: merged shadow users

mod bulk;
pub mod fold;
mod queries;

pub use queries::{list_messages, MessageQuery, MessageView};

use crate::engine::{BulkFold, BulkStart, Projection, TableNames};
use crate::support::{copy_in, Insert};
use anyhow::Context as _;
use chrono::{DateTime, Utc};
use fold::{Fold, MessageRow};
use futures::future::BoxFuture;
use rookery_events::{LogPosition, Platform, RecordedEvent};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

/// The projection's name (checkpoints, status, CLI).
pub const NAME: &str = "messages";

const TABLES: &[&str] = &["messages", "message_senders"];

/// The messages projection.
#[derive(Clone, Copy, Debug, Default)]
pub struct MessagesProjection;

impl Projection for MessagesProjection {
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
        &["message", "user"]
    }

    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        tables: &'a TableNames,
        events: &'a [RecordedEvent],
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(apply(conn, tables, events))
    }

    fn bulk_fold(&self, tables: &TableNames, _start: BulkStart) -> Option<Box<dyn BulkFold>> {
        // Only shadow tables are ours alone; anything else gets the batch-by-batch `apply`.
        if !tables.exclusive() {
            return None;
        }
        let t = Tables::new(tables).ok()?;
        Some(Box::new(bulk::MessagesBulk::new(t)))
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
    let mut state = Fold::default();
    load(conn, &t, fold::needs(&changes), &mut state).await?;
    for change in &changes {
        state.apply(change);
    }
    write(conn, &t, &state, Insert::Upsert).await
}

/// Physical names of the tables.
#[derive(Clone, Debug)]
struct Tables {
    messages: String,
    senders: String,
}

impl Tables {
    fn new(t: &TableNames) -> anyhow::Result<Self> {
        Ok(Self {
            messages: t.get("messages")?,
            senders: t.get("message_senders")?,
        })
    }
}

/// Loads the messages `ids` names (one round trip); a missing one is held as absent.
async fn load(
    conn: &mut PgConnection,
    t: &Tables,
    ids: Vec<Uuid>,
    state: &mut Fold,
) -> anyhow::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM {} WHERE message_id = ANY($1)",
        t.messages
    ))
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await
    .context("loading messages")?;
    for row in &rows {
        let (id, message) = message_row(row)?;
        state.load(id, Some(message));
    }
    for id in ids {
        state.load(id, None);
    }
    Ok(())
}

const COLUMNS: &str = "message_id, community_id, channel, sender_id, sender_username, platform, \
    platform_user_id, external_id, text, sent_at, edited_at, deleted, txid, gpos";

fn message_row(row: &sqlx::postgres::PgRow) -> anyhow::Result<(Uuid, MessageRow)> {
    let platform: Option<String> = row.try_get("platform")?;
    Ok((
        row.try_get("message_id")?,
        MessageRow {
            community_id: row.try_get("community_id")?,
            channel: row.try_get("channel")?,
            sender_id: row.try_get("sender_id")?,
            sender_username: row.try_get("sender_username")?,
            platform: platform.map(|p| p.parse::<Platform>()).transpose()?,
            platform_user_id: row.try_get("platform_user_id")?,
            external_id: row.try_get("external_id")?,
            text: row.try_get("text")?,
            sent_at: row.try_get("sent_at")?,
            edited_at: row.try_get("edited_at")?,
            deleted: row.try_get("deleted")?,
            key: LogPosition::from_db(row.try_get("txid")?, row.try_get("gpos")?),
        },
    ))
}

/// Writes the changed rows and adds the merges: with [`Insert::Copy`], rows not loaded by
/// `COPY` first; the rest in one statement.
async fn write(
    conn: &mut PgConnection,
    t: &Tables,
    state: &Fold,
    insert: Insert,
) -> anyhow::Result<()> {
    let (copy, rows): (Vec<_>, Vec<_>) = state
        .dirty_rows()
        .into_iter()
        .partition(|(_, _, stored)| insert == Insert::Copy && !stored);
    if !copy.is_empty() {
        let sql = format!("COPY {} ({COLUMNS}) FROM STDIN (FORMAT binary)", t.messages);
        copy_in(conn, &sql, 14, copy, |out, (id, m, _)| {
            out.value(&id)?;
            out.value(&m.community_id)?;
            out.value(&m.channel)?;
            out.value(&m.sender_id)?;
            out.value(&m.sender_username)?;
            out.value(&m.platform.map(Platform::as_str))?;
            out.value(&m.platform_user_id)?;
            out.value(&m.external_id)?;
            out.value(&m.text)?;
            out.value(&m.sent_at)?;
            out.value(&m.edited_at)?;
            out.value(&m.deleted)?;
            out.value(&m.key.txid_i64())?;
            out.value(&m.key.gpos)
        })
        .await
        .context("copying messages")?;
    }
    let n = rows.len();
    let mut ids = Vec::with_capacity(n);
    let mut communities = Vec::with_capacity(n);
    let mut channels = Vec::with_capacity(n);
    let mut sender_ids = Vec::with_capacity(n);
    let mut usernames = Vec::with_capacity(n);
    let mut platforms: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut platform_user_ids = Vec::with_capacity(n);
    let mut external_ids = Vec::with_capacity(n);
    let mut texts = Vec::with_capacity(n);
    let mut sent: Vec<DateTime<Utc>> = Vec::with_capacity(n);
    let mut edited: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
    let mut deleted = Vec::with_capacity(n);
    let mut txids = Vec::with_capacity(n);
    let mut gposs = Vec::with_capacity(n);
    for (id, m, _) in &rows {
        ids.push(*id);
        communities.push(m.community_id);
        channels.push(m.channel.as_str());
        sender_ids.push(m.sender_id);
        usernames.push(m.sender_username.as_str());
        platforms.push(m.platform.map(Platform::as_str));
        platform_user_ids.push(m.platform_user_id.as_deref());
        external_ids.push(m.external_id.as_deref());
        texts.push(m.text.as_str());
        sent.push(m.sent_at);
        edited.push(m.edited_at);
        deleted.push(m.deleted);
        txids.push(m.key.txid_i64());
        gposs.push(m.key.gpos);
    }
    let (merged_senders, merged_into): (Vec<Uuid>, Vec<Uuid>) =
        state.merged.iter().copied().unzip();
    let mut parts = Vec::new();
    if !ids.is_empty() {
        parts.push(format!(
            "m AS (INSERT INTO {} AS t ({COLUMNS})
                   SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::uuid[], $5::text[],
                                        $6::text[], $7::text[], $8::text[], $9::text[],
                                        $10::timestamptz[], $11::timestamptz[], $12::bool[],
                                        $13::bigint[], $14::bigint[])
                   ON CONFLICT (message_id) DO UPDATE
                   SET text = EXCLUDED.text, edited_at = EXCLUDED.edited_at,
                       deleted = EXCLUDED.deleted, txid = EXCLUDED.txid, gpos = EXCLUDED.gpos)",
            t.messages
        ));
    }
    if !merged_senders.is_empty() {
        parts.push(format!(
            "s AS (INSERT INTO {} (sender_id, user_id)
                   SELECT * FROM UNNEST($15::uuid[], $16::uuid[])
                   ON CONFLICT (sender_id) DO UPDATE SET user_id = EXCLUDED.user_id)",
            t.senders
        ));
    }
    if parts.is_empty() {
        return Ok(());
    }
    // Every parameter is bound (empty arrays for absent parts), so the numbering is fixed.
    sqlx::query(&format!("WITH {} SELECT 1", parts.join(",\n")))
        .bind(&ids)
        .bind(&communities)
        .bind(&channels)
        .bind(&sender_ids)
        .bind(&usernames)
        .bind(&platforms)
        .bind(&platform_user_ids)
        .bind(&external_ids)
        .bind(&texts)
        .bind(&sent)
        .bind(&edited)
        .bind(&deleted)
        .bind(&txids)
        .bind(&gposs)
        .bind(&merged_senders)
        .bind(&merged_into)
        .execute(&mut *conn)
        .await
        .context("writing messages")?;
    Ok(())
}
