//! Reads of the members model: keyset-paginated lists, one member, the active count.

use super::fold::Identity;
use crate::support::paging::{self, Cursor, Page, QueryError};
use chrono::{DateTime, SecondsFormat, Utc};
use rookery_events::{Decimal4, MemberStatus, Role};
use serde::Deserialize;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// List order, tie-broken by user id, so pages never overlap or skip.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberSort {
    /// Longest-standing members first.
    #[default]
    JoinedAt,
    Username,
    /// Highest reputation first (members the reputation model has not scored yet last).
    Reputation,
}

impl MemberSort {
    /// Its name in cursors (and in the API).
    pub fn tag(self) -> &'static str {
        match self {
            MemberSort::JoinedAt => "joined_at",
            MemberSort::Username => "username",
            MemberSort::Reputation => "reputation",
        }
    }
}

/// Filters, order and page of a members list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct MemberQuery {
    pub role: Option<Role>,
    /// Defaults to `active`.
    pub status: Option<MemberStatus>,
    #[serde(default)]
    pub sort: MemberSort,
    /// 1 to [`paging::MAX_LIMIT`], default [`paging::DEFAULT_LIMIT`].
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A member as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    pub community_id: Uuid,
    pub user_id: Uuid,
    /// `''` until the user's registration reaches the read model.
    pub username: String,
    pub role: Role,
    pub status: MemberStatus,
    pub joined_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub identities: Vec<Identity>,
    /// The member's exact score, from the reputation model (`None` until it has one).
    pub reputation: Option<Decimal4>,
}

const COLUMNS: &str = "m.community_id, m.user_id, m.username, m.role, m.status, m.joined_at, \
     m.updated_at, COALESCE(u.identities, '[]'::jsonb) AS identities, r.score_e4";

/// The tables a member is shown from: its row, its user's, its score (another model's, read
/// here at query time only).
const FROM: &str = "members m LEFT JOIN member_users u ON u.user_id = m.user_id
     LEFT JOIN reputation_scores r ON r.community_id = m.community_id AND r.user_id = m.user_id";

/// A page of a community's members.
pub async fn list_members(
    pool: &PgPool,
    community_id: Uuid,
    query: &MemberQuery,
) -> Result<Page<MemberView>, QueryError> {
    let limit = paging::limit(query.limit)?;
    let after = query
        .cursor
        .as_deref()
        .map(|c| decode_cursor(c, query.sort))
        .transpose()?;
    let status = query.status.unwrap_or(MemberStatus::Active);
    let (order, keyset) = match query.sort {
        MemberSort::JoinedAt => (
            "m.joined_at, m.user_id",
            "(m.joined_at, m.user_id) > ($5::timestamptz, $6)",
        ),
        MemberSort::Username => (
            "m.username, m.user_id",
            "(m.username, m.user_id) > ($5::text, $6)",
        ),
        MemberSort::Reputation => (
            "COALESCE(r.score_e4, -1) DESC, m.user_id",
            "(COALESCE(r.score_e4, -1) < $5::bigint
              OR (COALESCE(r.score_e4, -1) = $5::bigint AND m.user_id > $6))",
        ),
    };
    // Two statements rather than `$5 IS NULL OR …`, so the planner can seek the index to the
    // cursor instead of filtering from the start of the community.
    let sql = format!(
        "SELECT {COLUMNS} FROM {FROM}
         WHERE m.community_id = $1 AND m.status = $2 AND ($3::text IS NULL OR m.role = $3) {}
         ORDER BY {order} LIMIT $4",
        if after.is_some() {
            format!("AND {keyset}")
        } else {
            String::new()
        }
    );
    let mut q = sqlx::query(&sql)
        .bind(community_id)
        .bind(status.as_str())
        .bind(query.role.map(Role::as_str))
        .bind(paging::fetch_size(limit));
    if let Some((key, user_id)) = &after {
        q = match key {
            SortKey::JoinedAt(t) => q.bind(*t),
            SortKey::Username(u) => q.bind(u.clone()),
            SortKey::Reputation(score) => q.bind(*score),
        };
        q = q.bind(*user_id);
    }
    let rows = q.fetch_all(pool).await?;
    let items = rows.iter().map(view).collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_rows(items, limit, |last| {
        encode_cursor(query.sort, last)
    }))
}

/// One member of a community (any status), if the read model has them.
pub async fn get_member(
    pool: &PgPool,
    community_id: Uuid,
    user_id: Uuid,
) -> Result<Option<MemberView>, QueryError> {
    let sql = format!("SELECT {COLUMNS} FROM {FROM} WHERE m.community_id = $1 AND m.user_id = $2");
    let row = sqlx::query(&sql)
        .bind(community_id)
        .bind(user_id)
        .fetch_optional(pool)
        .await?;
    Ok(row.as_ref().map(view).transpose()?)
}

/// The communities `user_id` has a membership row in, with its status.
pub async fn memberships_of(
    pool: &PgPool,
    user_id: Uuid,
) -> Result<Vec<(Uuid, MemberStatus)>, QueryError> {
    let rows: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT community_id, status FROM members WHERE user_id = $1")
            .bind(user_id)
            .fetch_all(pool)
            .await?;
    rows.into_iter()
        .map(|(c, status)| {
            let status = status.parse::<MemberStatus>().map_err(|e| {
                QueryError::Db(sqlx::Error::ColumnDecode {
                    index: "status".into(),
                    source: e.into(),
                })
            })?;
            Ok((c, status))
        })
        .collect()
}

/// Active members of a community (0 when the read model knows none).
pub async fn member_count(pool: &PgPool, community_id: Uuid) -> Result<i64, QueryError> {
    let count: Option<i64> =
        sqlx::query_scalar("SELECT member_count FROM member_counts WHERE community_id = $1")
            .bind(community_id)
            .fetch_optional(pool)
            .await?;
    Ok(count.unwrap_or(0))
}

fn view(row: &PgRow) -> Result<MemberView, sqlx::Error> {
    let decode = |column: &str, e: String| sqlx::Error::ColumnDecode {
        index: column.to_string(),
        source: e.into(),
    };
    let role: String = row.try_get("role")?;
    let status: String = row.try_get("status")?;
    let identities: serde_json::Value = row.try_get("identities")?;
    Ok(MemberView {
        community_id: row.try_get("community_id")?,
        user_id: row.try_get("user_id")?,
        username: row.try_get("username")?,
        role: role
            .parse()
            .map_err(|e: rookery_events::types::UnknownValue| decode("role", e.to_string()))?,
        status: status
            .parse()
            .map_err(|e: rookery_events::types::UnknownValue| decode("status", e.to_string()))?,
        joined_at: row.try_get("joined_at")?,
        updated_at: row.try_get("updated_at")?,
        identities: serde_json::from_value(identities)
            .map_err(|e| decode("identities", e.to_string()))?,
        reputation: row
            .try_get::<Option<i64>, _>("score_e4")?
            .map(Decimal4::raw),
    })
}

enum SortKey {
    JoinedAt(DateTime<Utc>),
    Username(String),
    Reputation(i64),
}

fn encode_cursor(sort: MemberSort, last: &MemberView) -> String {
    let key = match sort {
        MemberSort::JoinedAt => last.joined_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        MemberSort::Username => last.username.clone(),
        MemberSort::Reputation => last.reputation.map_or(-1, |r| r.0).to_string(),
    };
    Cursor::new(sort.tag(), key, last.user_id).encode()
}

fn decode_cursor(token: &str, sort: MemberSort) -> Result<(SortKey, Uuid), QueryError> {
    let cursor = Cursor::decode(token, sort.tag())?;
    let key = match sort {
        MemberSort::JoinedAt => SortKey::JoinedAt(
            DateTime::parse_from_rfc3339(&cursor.key)
                .map_err(|_| QueryError::BadCursor)?
                .with_timezone(&Utc),
        ),
        MemberSort::Username => SortKey::Username(cursor.key),
        MemberSort::Reputation => {
            SortKey::Reputation(cursor.key.parse().map_err(|_| QueryError::BadCursor)?)
        }
    };
    Ok((key, cursor.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_are_tied_to_their_sort() {
        let view = MemberView {
            community_id: Uuid::from_u128(1),
            user_id: Uuid::from_u128(2),
            username: "ada".into(),
            role: Role::Member,
            status: MemberStatus::Active,
            joined_at: DateTime::<Utc>::from_timestamp(1_700_000_000, 123_456_000)
                .unwrap_or_default(),
            updated_at: DateTime::<Utc>::UNIX_EPOCH,
            identities: vec![],
            reputation: None,
        };
        let token = encode_cursor(MemberSort::JoinedAt, &view);
        match decode_cursor(&token, MemberSort::JoinedAt) {
            Ok((SortKey::JoinedAt(t), u)) => assert_eq!((t, u), (view.joined_at, view.user_id)),
            _ => panic!("cursor did not round-trip"),
        }
        assert!(matches!(
            decode_cursor(&token, MemberSort::Username),
            Err(QueryError::BadCursor)
        ));
        assert!(matches!(
            decode_cursor("not a cursor!", MemberSort::JoinedAt),
            Err(QueryError::BadCursor)
        ));
    }
}
