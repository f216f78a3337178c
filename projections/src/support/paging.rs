//! Keyset pagination for every model's lists: a page size, opaque cursors tied to their sort,
//! [`Page`], and the one [`QueryError`] queries return.
//!
//! A cursor is the last item's sort key and id; the next page starts strictly after that pair,
//! so pages never overlap or skip, however the table changes between them.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Page size when the request names none.
pub const DEFAULT_LIMIT: u32 = 50;
/// Largest page size a request may ask for.
pub const MAX_LIMIT: u32 = 200;

/// Why a read-model query was refused.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// Return 400 Bad Request: the cursor was not produced by this list with this sort.
    #[error("`cursor` is not valid for this list; pass the `next_cursor` of the previous page")]
    BadCursor,
    /// Return 422 Unprocessable Entity.
    #[error("`limit` must be between 1 and {MAX_LIMIT}")]
    BadLimit,
    /// Return 500 (log the cause chain).
    #[error("reading a read model")]
    Db(#[from] sqlx::Error),
}

/// The page size for `requested`: [`DEFAULT_LIMIT`] when absent, else 1 to [`MAX_LIMIT`].
pub fn limit(requested: Option<u32>) -> Result<u32, QueryError> {
    let limit = requested.unwrap_or(DEFAULT_LIMIT);
    if (1..=MAX_LIMIT).contains(&limit) {
        Ok(limit)
    } else {
        Err(QueryError::BadLimit)
    }
}

/// Rows to fetch for a page of `limit`: one more, which only says whether a next page exists.
pub fn fetch_size(limit: u32) -> i64 {
    i64::from(limit) + 1
}

/// One page of a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Where the next page starts; `None` on the last page.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// The page from up to [`fetch_size`]`(limit)` rows in list order; `cursor` makes the next
    /// page's cursor from the last item kept.
    pub fn from_rows(mut items: Vec<T>, limit: u32, cursor: impl FnOnce(&T) -> String) -> Self {
        let limit = limit as usize;
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(cursor)
        } else {
            None
        };
        Page { items, next_cursor }
    }

    /// The same page with every item converted (e.g. into a wire type).
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page {
            items: self.items.into_iter().map(f).collect(),
            next_cursor: self.next_cursor,
        }
    }
}

/// An opaque keyset cursor: base64url of `{"s": sort, "k": key, "u": id}`. Tagged with its sort
/// so it cannot be replayed against another order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    #[serde(rename = "s")]
    pub sort: String,
    /// The last item's sort key, as text.
    #[serde(rename = "k")]
    pub key: String,
    /// The last item's id (the tie-breaker).
    #[serde(rename = "u")]
    pub id: Uuid,
}

impl Cursor {
    pub fn new(sort: &str, key: impl Into<String>, id: Uuid) -> Self {
        Self {
            sort: sort.to_string(),
            key: key.into(),
            id,
        }
    }

    /// The token a client passes back.
    pub fn encode(&self) -> String {
        // Serializing three plain fields cannot fail; an empty cursor would only restart a list.
        let json = serde_json::to_vec(self).unwrap_or_default();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    /// The cursor in `token`, which must belong to the list order `sort`.
    pub fn decode(token: &str, sort: &str) -> Result<Self, QueryError> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.trim())
            .map_err(|_| QueryError::BadCursor)?;
        let cursor: Cursor = serde_json::from_slice(&bytes).map_err(|_| QueryError::BadCursor)?;
        if cursor.sort != sort {
            return Err(QueryError::BadCursor);
        }
        Ok(cursor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_belong_to_their_sort() {
        let token = Cursor::new("username", "ada", Uuid::from_u128(2)).encode();
        let back = Cursor::decode(&token, "username").expect("round trip");
        assert_eq!((back.key.as_str(), back.id), ("ada", Uuid::from_u128(2)));
        assert!(matches!(
            Cursor::decode(&token, "joined_at"),
            Err(QueryError::BadCursor)
        ));
        assert!(matches!(
            Cursor::decode("not a cursor!", "username"),
            Err(QueryError::BadCursor)
        ));
    }

    #[test]
    fn a_page_keeps_limit_items_and_says_where_the_next_starts() {
        let page = Page::from_rows(vec![1, 2, 3], 2, |last| format!("after {last}"));
        assert_eq!(page.items, vec![1, 2]);
        assert_eq!(page.next_cursor.as_deref(), Some("after 2"));
        let last = Page::from_rows(vec![1, 2], 2, |_| unreachable!("no next page"));
        assert_eq!((last.items.len(), last.next_cursor), (2, None));
    }

    #[test]
    fn limits_default_and_stay_in_range() {
        assert_eq!(limit(None).ok(), Some(DEFAULT_LIMIT));
        assert_eq!(limit(Some(MAX_LIMIT)).ok(), Some(MAX_LIMIT));
        assert!(matches!(limit(Some(0)), Err(QueryError::BadLimit)));
        assert!(matches!(
            limit(Some(MAX_LIMIT + 1)),
            Err(QueryError::BadLimit)
        ));
    }
}
