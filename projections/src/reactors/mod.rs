//! Reactors: side effects driven by what a read model produced (commands issued, later
//! webhooks sent). Side effects never replay: a reactor acts only on rows a read model wrote
//! live — above where its last rebuild switched in — and above its own cursor, which it moves in
//! the same transaction as the commands it issues, so a crash in between repeats nothing and
//! loses nothing.
//!
//! # Layout
//! - [`auto_ban`]: bans a member once when their reputation falls below the community's
//!   auto-ban threshold (the reputation model's crossings).

pub mod auto_ban;

pub use auto_ban::AutoBan;
