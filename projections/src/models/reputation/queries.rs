//! Reads of the reputation model: one member's score and history, a community's leaderboard, a
//! hub user's global score.

use crate::support::paging::{self, Cursor, Page, QueryError};
use chrono::{DateTime, Utc};
use rookery_events::Decimal4;
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// A member's score in a community, with a page of its history (newest first).
#[derive(Clone, Debug, PartialEq)]
pub struct MemberReputation {
    pub user_id: Uuid,
    pub score: Decimal4,
    pub changes: i64,
    pub updated_at: DateTime<Utc>,
    pub history: Page<HistoryItem>,
}

/// One change of a score.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryItem {
    pub seq: i64,
    /// `chat_message`, `follow`, …, `adjust`, `set`.
    pub kind: String,
    /// The kind, or the admin's reason for `adjust` and `set`.
    pub reason: String,
    /// What it was worth under the policy then (for `set`: the score asked for).
    pub points: Decimal4,
    /// What it changed, after clamping.
    pub delta: Decimal4,
    /// The score after it.
    pub score: Decimal4,
    /// The event that made it (`aggregate_type/aggregate_id/sequence`).
    pub source_event: String,
    pub at: DateTime<Utc>,
}

/// A place on the leaderboard.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaderboardItem {
    pub user_id: Uuid,
    pub username: String,
    pub score: Decimal4,
}

/// A hub user's score over every community.
#[derive(Clone, Debug, PartialEq)]
pub struct GlobalScore {
    pub user_id: Uuid,
    pub score: Decimal4,
    pub changes: i64,
    pub updated_at: DateTime<Utc>,
}

const HISTORY: &str = "history";
const BOARD: &str = "leaderboard";

/// `user_id`'s reputation in `community_id` with a page of `limit` history items (before
/// `cursor`), if the model has the member.
pub async fn member_reputation(
    pool: &PgPool,
    community_id: Uuid,
    user_id: Uuid,
    limit: Option<u32>,
    cursor: Option<&str>,
) -> Result<Option<MemberReputation>, QueryError> {
    let limit = paging::limit(limit)?;
    let before = match cursor {
        Some(c) => {
            let c = Cursor::decode(c, HISTORY)?;
            if c.id != user_id {
                return Err(QueryError::BadCursor);
            }
            Some(c.key.parse::<i64>().map_err(|_| QueryError::BadCursor)?)
        }
        None => None,
    };
    let row = sqlx::query(
        "SELECT score_e4, changes, updated_at FROM reputation_scores
         WHERE community_id = $1 AND user_id = $2",
    )
    .bind(community_id)
    .bind(user_id)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let rows = sqlx::query(
        "SELECT seq, kind, reason, points_e4, delta_e4, score_e4, source_event, at
         FROM reputation_history
         WHERE community_id = $1 AND user_id = $2 AND seq < $3
         ORDER BY seq DESC LIMIT $4",
    )
    .bind(community_id)
    .bind(user_id)
    .bind(before.unwrap_or(i64::MAX))
    .bind(paging::fetch_size(limit))
    .fetch_all(pool)
    .await?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(HistoryItem {
                seq: r.try_get("seq")?,
                kind: r.try_get("kind")?,
                reason: r.try_get("reason")?,
                points: Decimal4::raw(r.try_get("points_e4")?),
                delta: Decimal4::raw(r.try_get("delta_e4")?),
                score: Decimal4::raw(r.try_get("score_e4")?),
                source_event: r.try_get("source_event")?,
                at: r.try_get("at")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let history = Page::from_rows(items, limit, |last| {
        Cursor::new(HISTORY, last.seq.to_string(), user_id).encode()
    });
    Ok(Some(MemberReputation {
        user_id,
        score: Decimal4::raw(row.try_get("score_e4")?),
        changes: row.try_get("changes")?,
        updated_at: row.try_get("updated_at")?,
        history,
    }))
}

/// A page of `community_id`'s active members by score, highest first (ties by user id).
pub async fn leaderboard(
    pool: &PgPool,
    community_id: Uuid,
    limit: Option<u32>,
    cursor: Option<&str>,
) -> Result<Page<LeaderboardItem>, QueryError> {
    let limit = paging::limit(limit)?;
    let after = cursor
        .map(|c| {
            let c = Cursor::decode(c, BOARD)?;
            let score: i64 = c.key.parse().map_err(|_| QueryError::BadCursor)?;
            Ok::<_, QueryError>((score, c.id))
        })
        .transpose()?;
    // Two statements rather than `$3 IS NULL OR …`, so the planner seeks the index to the cursor.
    let keyset = if after.is_some() {
        "AND (r.score_e4 < $3 OR (r.score_e4 = $3 AND r.user_id > $4))"
    } else {
        ""
    };
    let sql = format!(
        "SELECT r.user_id, r.score_e4, COALESCE(u.username, '') AS username
         FROM reputation_scores r
         JOIN members m ON m.community_id = r.community_id AND m.user_id = r.user_id
                       AND m.status = 'active'
         LEFT JOIN member_users u ON u.user_id = r.user_id
         WHERE r.community_id = $1 {keyset}
         ORDER BY r.score_e4 DESC, r.user_id LIMIT $2"
    );
    let mut q = sqlx::query(&sql)
        .bind(community_id)
        .bind(paging::fetch_size(limit));
    if let Some((score, user)) = after {
        q = q.bind(score).bind(user);
    }
    let items = q
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| {
            Ok(LeaderboardItem {
                user_id: r.try_get("user_id")?,
                username: r.try_get("username")?,
                score: Decimal4::raw(r.try_get("score_e4")?),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Page::from_rows(items, limit, |last| {
        Cursor::new(BOARD, last.score.0.to_string(), last.user_id).encode()
    }))
}

/// `user_id`'s global score, if the model has seen them.
pub async fn global_score(pool: &PgPool, user_id: Uuid) -> Result<Option<GlobalScore>, QueryError> {
    let row = sqlx::query(
        "SELECT score_e4, changes, updated_at FROM reputation_global WHERE user_id = $1",
    )
    .bind(user_id)
    .fetch_optional(pool)
    .await?;
    row.map(|r| {
        Ok(GlobalScore {
            user_id,
            score: Decimal4::raw(r.try_get("score_e4")?),
            changes: r.try_get("changes")?,
            updated_at: r.try_get("updated_at")?,
        })
    })
    .transpose()
}
