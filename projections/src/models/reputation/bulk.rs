//! The reputation rebuild's fast path ([`BulkFold`]): the same [`Fold`] as `apply`, held across
//! a chunk of many batches, loading only rows it neither holds nor can rule out, and creating
//! rows with `COPY`.
//!
//! A row is looked for, in order: in the chunk being folded; in the chunk being written (taken,
//! not yet settled: its transaction may not have committed, so the tables cannot be asked); in
//! the tables, unless it cannot be there: while the tables hold only what this fold wrote (a
//! rebuild from empty tables), a score or global row whose key it never wrote is new, and
//! finding that out costs no query. A membership move or a shadow user's merge rewrites stored
//! history, so those go through `apply` ([`BulkFold::by_apply`]), after which every row not
//! held is looked up.

use super::fold::{self, Fold, Needs, Slot};
use super::{load, write, Tables};
use crate::engine::{BulkFold, BulkStart, BulkWrite, RawEvent};
use crate::support::{Chunks, Insert, KeyFilter};
use anyhow::Context as _;
use futures::future::BoxFuture;
use sqlx::PgConnection;
use std::sync::Arc;
use uuid::Uuid;

pub(super) struct ReputationBulk {
    t: Tables,
    chunks: Chunks<Fold>,
    /// Keys of the score and global rows this fold wrote, while the tables hold nothing else;
    /// `None`: look up every row not held.
    written: Option<Written>,
}

struct Written {
    scores: KeyFilter,
    globals: KeyFilter,
}

fn score_key((c, u): &(Uuid, Uuid)) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(c.as_bytes());
    key[16..].copy_from_slice(u.as_bytes());
    key
}

impl ReputationBulk {
    pub(super) fn new(t: Tables, start: BulkStart) -> Self {
        Self {
            t,
            chunks: Chunks::default(),
            // At most one member and one user per event.
            written: start.empty.then(|| Written {
                scores: KeyFilter::with_capacity(start.events),
                globals: KeyFilter::with_capacity(start.events),
            }),
        }
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
        let in_flight = self.chunks.in_flight();
        let in_flight = in_flight.as_deref();
        let mut lookup = Needs::default();
        for key in needs.members {
            if self.chunks.current.scores.contains_key(&key) {
                continue;
            }
            match in_flight.and_then(|f| f.scores.get(&key)) {
                Some(slot) => self.chunks.current.load_score(key, slot.row.clone()),
                None if self.may_be_written(|w| w.scores.may_contain(&score_key(&key))) => {
                    lookup.members.push(key);
                }
                None => self.chunks.current.load_score(key, None),
            }
        }
        for user in needs.users {
            if self.chunks.current.globals.contains_key(&user) {
                continue;
            }
            match in_flight.and_then(|f| f.globals.get(&user)) {
                Some(slot) => self.chunks.current.load_global(user, slot.row.clone()),
                None if self.may_be_written(|w| w.globals.may_contain(user.as_bytes())) => {
                    lookup.users.push(user);
                }
                None => self.chunks.current.load_global(user, None),
            }
        }
        // Few, and written by policy events the fold may not have seen yet: always asked for.
        for community in needs.communities {
            if self.chunks.current.policies.contains_key(&community) {
                continue;
            }
            match in_flight.and_then(|f| f.policies.get(&community)) {
                Some(Slot { row: Some(p), .. }) => {
                    self.chunks.current.load_policy(community, Some(p.clone()));
                }
                _ => lookup.communities.push(community),
            }
        }
        if !lookup.is_empty() {
            load(conn, &self.t, &lookup, &mut self.chunks.current)
                .await
                .context("loading reputation rows")?;
        }
        for change in &changes {
            self.chunks.current.apply(change);
        }
        Ok(())
    }

    fn may_be_written(&self, test: impl Fn(&Written) -> bool) -> bool {
        self.written.as_ref().is_none_or(test)
    }
}

impl BulkFold for ReputationBulk {
    fn fold<'a>(
        &'a mut self,
        conn: &'a mut PgConnection,
        events: &'a [RawEvent],
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(self.fold_batch(conn, events))
    }

    fn held(&self) -> usize {
        self.chunks.current.scores.len()
            + self.chunks.current.globals.len()
            + self.chunks.current.history.len()
    }

    fn take(&mut self) -> anyhow::Result<Box<dyn BulkWrite>> {
        let chunk = self.chunks.take("reputation", Fold::default())?;
        if let Some(w) = &mut self.written {
            for (key, _) in chunk.scores.iter().filter(|(_, s)| created(s)) {
                w.scores.insert(&score_key(key));
            }
            for (user, _) in chunk.globals.iter().filter(|(_, s)| created(s)) {
                w.globals.insert(user.as_bytes());
            }
        }
        Ok(Box::new(ReputationWrite {
            t: self.t.clone(),
            chunk,
        }))
    }

    fn settle(&mut self) {
        self.chunks.settle();
    }

    fn discard(&mut self) {
        // Keys of rows rolled back stay in the filters: that costs a lookup, not a wrong row.
        self.chunks.discard(Fold::default());
    }

    fn by_apply(&mut self, event: &RawEvent) -> bool {
        let rewrites = matches!(
            event.event_type.as_str(),
            "MembershipMoved" | "ShadowUserMerged"
        );
        if rewrites {
            self.written = None;
        }
        rewrites
    }
}

/// A row this chunk creates (rather than changes).
fn created<R>(slot: &Slot<R>) -> bool {
    !slot.stored && slot.row.is_some()
}

struct ReputationWrite {
    t: Tables,
    chunk: Arc<Fold>,
}

impl BulkWrite for ReputationWrite {
    fn write<'a>(self: Box<Self>, conn: &'a mut PgConnection) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move { write(conn, &self.t, &self.chunk, Insert::Copy).await })
    }
}
