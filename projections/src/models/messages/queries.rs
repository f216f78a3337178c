//! Reads of the messages model: a community's history, newest first, by channel, sender and
//! text.

use crate::support::paging::{self, Cursor, Page, QueryError};
use chrono::{DateTime, SecondsFormat, Utc};
use rookery_events::Platform;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// Filters and page of a history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageQuery {
    pub channel: Option<String>,
    /// A hub user: their messages, also those sent as a shadow user they absorbed.
    pub sender: Option<Uuid>,
    /// Words the text must contain (full-text, any order).
    pub text: Option<String>,
    /// `next_cursor` of the previous page: older messages than its last.
    pub before: Option<String>,
    pub limit: Option<u32>,
}

/// A message as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageView {
    pub message_id: Uuid,
    pub community_id: Uuid,
    pub channel: String,
    /// The hub user now behind the sender (a registered user who claimed a shadow's account).
    pub sender_id: Uuid,
    pub sender_username: String,
    pub platform: Option<Platform>,
    pub platform_user_id: Option<String>,
    pub text: String,
    pub sent_at: DateTime<Utc>,
    pub edited_at: Option<DateTime<Utc>>,
    pub deleted: bool,
}

const ORDER: &str = "sent_at";

/// A page of `community_id`'s messages, newest first.
pub async fn list_messages(
    pool: &PgPool,
    community_id: Uuid,
    query: &MessageQuery,
) -> Result<Page<MessageView>, QueryError> {
    let limit = paging::limit(query.limit)?;
    let before = query
        .before
        .as_deref()
        .map(|c| {
            let c = Cursor::decode(c, ORDER)?;
            let at = DateTime::parse_from_rfc3339(&c.key)
                .map_err(|_| QueryError::BadCursor)?
                .with_timezone(&Utc);
            Ok::<_, QueryError>((at, c.id))
        })
        .transpose()?;
    let text = query
        .text
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty());
    // Each filter is written in only when given, so the planner sees which index serves it.
    let mut filters = vec!["m.community_id = $1".to_string()];
    if query.channel.is_some() {
        filters.push("m.channel = $3".into());
    }
    if query.sender.is_some() {
        filters.push(
            "(m.sender_id = $4 OR m.sender_id IN
                 (SELECT sender_id FROM message_senders WHERE user_id = $4))"
                .into(),
        );
    }
    if text.is_some() {
        filters.push("to_tsvector('simple', m.text) @@ plainto_tsquery('simple', $5)".into());
    }
    if before.is_some() {
        filters.push("(m.sent_at, m.message_id) < ($6, $7)".into());
    }
    let sql = format!(
        "SELECT m.message_id, m.community_id, m.channel,
                COALESCE(s.user_id, m.sender_id) AS sender_id, m.sender_username, m.platform,
                m.platform_user_id, m.text, m.sent_at, m.edited_at, m.deleted
         FROM messages m LEFT JOIN message_senders s ON s.sender_id = m.sender_id
         WHERE {}
         ORDER BY m.sent_at DESC, m.message_id DESC LIMIT $2",
        filters.join(" AND ")
    );
    let (before_at, before_id) = before.unzip();
    let rows = sqlx::query(&sql)
        .bind(community_id)
        .bind(paging::fetch_size(limit))
        .bind(query.channel.as_deref())
        .bind(query.sender)
        .bind(text)
        .bind(before_at)
        .bind(before_id)
        .fetch_all(pool)
        .await?;
    let items = rows.iter().map(view).collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_rows(items, limit, |last| {
        Cursor::new(
            ORDER,
            last.sent_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            last.message_id,
        )
        .encode()
    }))
}

fn view(row: &PgRow) -> Result<MessageView, sqlx::Error> {
    let platform: Option<String> = row.try_get("platform")?;
    let platform = platform
        .map(|p| p.parse::<Platform>())
        .transpose()
        .map_err(|e| sqlx::Error::ColumnDecode {
            index: "platform".into(),
            source: e.into(),
        })?;
    Ok(MessageView {
        message_id: row.try_get("message_id")?,
        community_id: row.try_get("community_id")?,
        channel: row.try_get("channel")?,
        sender_id: row.try_get("sender_id")?,
        sender_username: row.try_get("sender_username")?,
        platform,
        platform_user_id: row.try_get("platform_user_id")?,
        text: row.try_get("text")?,
        sent_at: row.try_get("sent_at")?,
        edited_at: row.try_get("edited_at")?,
        deleted: row.try_get("deleted")?,
    })
}
