//! Building blocks read models share, so that no model copies another's or reaches into the
//! engine's rebuild for them.
//!
//! # Layout
//! - [`chunks`]: a bulk fold's chunk being folded and the one being written ([`Chunks`]).
//! - [`copy`]: rows in PostgreSQL's binary `COPY` format ([`copy_in`]) for bulk folds, and
//!   [`Insert`], whether a write may use it.
//! - [`hash`]: a fast keyed hasher for rows held in memory and a Bloom filter of stored keys.
//! - [`paging`]: keyset pagination (limits, opaque cursors, [`Page`]) and the one
//!   [`QueryError`] every model's queries return.

pub mod chunks;
pub mod copy;
pub mod hash;
pub mod paging;

pub use chunks::Chunks;
pub use copy::{copy_in, CopyRows, Insert};
pub use hash::{key_hash, KeyFilter, KeyHashState};
pub use paging::{Cursor, Page, QueryError, DEFAULT_LIMIT, MAX_LIMIT};
