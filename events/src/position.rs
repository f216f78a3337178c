//! The log key: `(transaction_id, global_position)`.
//!
//! A bigint position alone is not enough: a later `global_position` can commit before an earlier
//! one. Ordering by the committing transaction's id first, and reading only transactions older than
//! every in-flight one, gives an order in which nothing can appear behind a reader. The same key is
//! the relay cursor, the projection checkpoint and the `position` token clients hold.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A point in the global log. Ordered by transaction id, then global position.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LogPosition {
    /// `events.transaction_id` (xid8).
    pub txid: u64,
    /// `events.global_position`.
    pub gpos: i64,
}

impl LogPosition {
    /// Before every event.
    pub const ZERO: LogPosition = LogPosition { txid: 0, gpos: 0 };

    pub fn new(txid: u64, gpos: i64) -> Self {
        Self { txid, gpos }
    }

    /// `txid` as Postgres' bigint; xid8 values stay far below 2^63 in practice (epoch × 2^32).
    pub fn txid_i64(&self) -> i64 {
        i64::try_from(self.txid).unwrap_or(i64::MAX)
    }

    pub fn from_db(txid: i64, gpos: i64) -> Self {
        Self {
            txid: u64::try_from(txid).unwrap_or(0),
            gpos,
        }
    }
}

/// The opaque token form `"<txid>.<gpos>"`.
impl fmt::Display for LogPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.txid, self.gpos)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a position token (expected the `position` string a command returned)")]
pub struct ParsePositionError(pub String);

impl FromStr for LogPosition {
    type Err = ParsePositionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParsePositionError(s.chars().take(64).collect());
        let (t, g) = s.split_once('.').ok_or_else(err)?;
        let txid = t.parse::<u64>().map_err(|_| err())?;
        let gpos = g.parse::<i64>().map_err(|_| err())?;
        if gpos < 0 || i64::try_from(txid).is_err() {
            return Err(err());
        }
        Ok(Self { txid, gpos })
    }
}

impl Serialize for LogPosition {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for LogPosition {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_by_transaction_first() {
        let early_commit = LogPosition::new(10, 7);
        let late_commit = LogPosition::new(11, 3);
        assert!(early_commit < late_commit);
    }

    #[test]
    fn token_round_trips_and_rejects_garbage() {
        let p = LogPosition::new(123_456, 42);
        assert_eq!(p.to_string(), "123456.42");
        assert_eq!("123456.42".parse::<LogPosition>(), Ok(p));
        for bad in ["", "12", "a.b", "1.-2", "18446744073709551615.1"] {
            assert!(bad.parse::<LogPosition>().is_err(), "{bad}");
        }
    }
}
