//! The members rebuild's fast path ([`BulkFold`]): the same [`Fold`] as `apply`, held across a
//! chunk of many batches, loading only rows it neither holds nor can rule out, and creating rows
//! with `COPY`.
//!
//! A row is looked for, in order: in the chunk being folded; in the chunk being written (taken,
//! not yet settled: its transaction may not have committed, so the tables cannot be asked); in
//! the tables, unless it cannot be there: a user this rebuild has not stored (see [`Stored`]),
//! or a member row of such a user. In a rebuild from empty tables most rows are new, and finding
//! that out costs no query; as long as every row is new, `members` and `member_users` need not
//! even have their primary keys ([`BulkFold::keyless_tables`]).

use super::fold::{self, Fold};
use super::{load_members, load_users, write, Tables};
use crate::engine::{BulkFold, BulkStart, BulkWrite, NeedKeys, RawEvent};
use crate::support::{key_hash, Chunks, Insert, KeyFilter, KeyHashState};
use anyhow::Context as _;
use futures::future::BoxFuture;
use futures::TryStreamExt as _;
use sqlx::PgConnection;
use std::collections::HashSet;
use std::sync::Arc;
use uuid::Uuid;

pub(super) struct MembersBulk {
    t: Tables,
    chunks: Chunks<Fold>,
    /// A written chunk's fold, emptied: reusing its tables spares growing new ones (rehashing
    /// and faulting in fresh pages) for every chunk.
    spare: Option<Fold>,
    stored: Stored,
    /// `members` and `member_users` have their primary keys.
    keys: bool,
    /// Users the finished model may hold: sizes the filter.
    capacity: u64,
}

/// Which users have a `member_users` row. A member row is stored only if its user's row is
/// (both are created by the same write), so member rows need no bookkeeping of their own:
/// members of a user not stored are new, the others are looked up.
enum Stored {
    /// Exactly the users this fold created, by [`key_hash`] (a collision only costs a lookup):
    /// while the tables only grow and have no keys, so nothing may be looked up.
    Exact(HashSet<u64, KeyHashState>),
    /// Users that may be stored.
    Filter(KeyFilter),
    /// The tables hold users this fold did not create (a resumed rebuild): read them first.
    Unknown,
}

/// Users [`Stored::Exact`] holds at most (8 bytes each, twice that in the hash table); past
/// it the fold asks for the keys and keeps a [`KeyFilter`] instead.
const EXACT_USERS: usize = 1 << 21;

impl MembersBulk {
    pub(super) fn new(t: Tables, start: BulkStart) -> Self {
        Self {
            t,
            chunks: Chunks::default(),
            spare: None,
            stored: if start.empty {
                Stored::Exact(HashSet::default())
            } else {
                Stored::Unknown
            },
            keys: true,
            // At most one user per event.
            capacity: start.events,
        }
    }

    /// Whether the user may have a row in the tables (the rows held aside).
    fn may_be_stored(&self, user_id: &Uuid) -> bool {
        match &self.stored {
            Stored::Exact(users) => users.contains(&key_hash(user_id.as_bytes())),
            Stored::Filter(filter) => filter.may_contain(user_id.as_bytes()),
            Stored::Unknown => true,
        }
    }

    /// Once the keys exist, users are looked up when in doubt: a filter does, in bounded
    /// memory. A resumed rebuild's users are read into one.
    async fn know_stored(&mut self, conn: &mut PgConnection) -> anyhow::Result<()> {
        match &self.stored {
            Stored::Exact(users) if self.keys => {
                // Room for as many again as are stored already, at least.
                let users_now = u64::try_from(users.len()).unwrap_or(u64::MAX);
                let mut filter =
                    KeyFilter::with_capacity(self.capacity.max(users_now.saturating_mul(2)));
                for hash in users {
                    filter.insert_hash(*hash);
                }
                self.stored = Stored::Filter(filter);
            }
            Stored::Unknown => {
                let count = format!("SELECT count(*) FROM {}", self.t.users);
                let users_now: i64 = sqlx::query_scalar(&count).fetch_one(&mut *conn).await?;
                let users_now = u64::try_from(users_now).unwrap_or(0);
                let mut filter =
                    KeyFilter::with_capacity(self.capacity.max(users_now.saturating_mul(2)));
                let sql = format!("SELECT user_id FROM {}", self.t.users);
                let mut users = sqlx::query_scalar::<_, Uuid>(&sql).fetch(&mut *conn);
                while let Some(id) = users.try_next().await.context("reading the users stored")? {
                    filter.insert(id.as_bytes());
                }
                drop(users);
                // Rows held aside are not in the tables yet (there are none so early, but the
                // filter must never miss a user that is or will be stored).
                for fold in self.chunks.held() {
                    for (id, _) in fold.users() {
                        filter.insert(id.as_bytes());
                    }
                }
                self.stored = Stored::Filter(filter);
            }
            Stored::Exact(_) | Stored::Filter(_) => {}
        }
        Ok(())
    }

    async fn fold_batch(
        &mut self,
        conn: &mut PgConnection,
        events: &[RawEvent],
    ) -> anyhow::Result<()> {
        // Decoding first: a poison event fails the batch before anything changed.
        let changes = fold::decode(events)?;
        if changes.is_empty() {
            return Ok(());
        }
        let needs = fold::needs(&changes);
        if self.keys {
            self.know_stored(conn).await?;
        } else if matches!(&self.stored, Stored::Exact(users) if users.len() > EXACT_USERS) {
            return Err(NeedKeys.into());
        }
        // Where each row not held comes from. Rows of the chunk being written are stored once
        // it commits, which is before this chunk's write.
        let in_flight = self.chunks.in_flight();
        let in_flight = in_flight.as_deref();
        let (mut flying_users, mut load_users_, mut new_users) =
            (Vec::new(), Vec::new(), Vec::new());
        for id in needs.users {
            if self.chunks.current.user_slot(&id).is_some() {
                continue;
            }
            if let Some(slot) = in_flight.and_then(|f| f.user_slot(&id)) {
                flying_users.push((id, slot.row.clone()));
            } else if self.may_be_stored(&id) {
                load_users_.push(id);
            } else {
                new_users.push(id);
            }
        }
        let (mut flying_members, mut other_members) = (Vec::new(), Vec::new());
        for key in needs.members {
            if self.chunks.current.member_slot(&key).is_some() {
                continue;
            }
            match in_flight.and_then(|f| f.member_slot(&key)) {
                Some(slot) => flying_members.push((key, slot.row.clone())),
                None => other_members.push(key),
            }
        }
        // Without keys, only rows certainly new may be touched (and nothing looked up).
        let certainly_new =
            flying_users.is_empty() && load_users_.is_empty() && flying_members.is_empty();
        if !self.keys && !certainly_new {
            return Err(NeedKeys.into());
        }
        for (id, row) in flying_users {
            self.chunks.current.load_user(id, Some(row));
        }
        for id in new_users {
            self.chunks.current.load_user(id, None);
        }
        load_users(conn, &self.t, &load_users_, &mut self.chunks.current)
            .await
            .context("loading member_users")?;
        for (key, row) in flying_members {
            self.chunks.current.load_member(key, row);
        }
        let mut load = Vec::new();
        for key in other_members {
            if self
                .chunks
                .current
                .user_slot(&key.1)
                .is_some_and(|u| u.stored)
            {
                load.push(key);
            } else {
                self.chunks.current.load_member(key, None);
            }
        }
        load_members(conn, &self.t, &load, &mut self.chunks.current)
            .await
            .context("loading members")?;
        for change in &changes {
            self.chunks.current.apply(change);
        }
        Ok(())
    }
}

impl BulkFold for MembersBulk {
    fn fold<'a>(
        &'a mut self,
        conn: &'a mut PgConnection,
        events: &'a [RawEvent],
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(self.fold_batch(conn, events))
    }

    fn held(&self) -> usize {
        self.chunks.current.len()
    }

    fn take(&mut self) -> anyhow::Result<Box<dyn BulkWrite>> {
        let next = self.spare.take().unwrap_or_default();
        let chunk = self.chunks.take("members", next)?;
        for (id, _) in chunk.users().filter(|(_, slot)| !slot.stored) {
            let hash = key_hash(id.as_bytes());
            match &mut self.stored {
                Stored::Exact(users) => {
                    users.insert(hash);
                }
                Stored::Filter(filter) => filter.insert_hash(hash),
                Stored::Unknown => {}
            }
        }
        Ok(Box::new(MembersWrite {
            t: self.t.clone(),
            chunk,
        }))
    }

    fn settle(&mut self) {
        // The write has finished with its share of the chunk by now, normally.
        if let Some(mut fold) = self.chunks.settle() {
            fold.clear();
            self.spare = Some(fold);
        }
    }

    fn discard(&mut self) {
        // Users of rows rolled back stay known as stored: that costs a lookup, not a wrong row.
        self.chunks.discard(Fold::default());
    }

    fn keyless_tables(&self) -> &'static [&'static str] {
        &["members", "member_users"]
    }

    fn set_keys(&mut self, present: bool) {
        self.keys = present;
    }
}

struct MembersWrite {
    t: Tables,
    chunk: Arc<Fold>,
}

impl BulkWrite for MembersWrite {
    fn write<'a>(self: Box<Self>, conn: &'a mut PgConnection) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move { write(conn, &self.t, &self.chunk, Insert::Copy).await })
    }
}
