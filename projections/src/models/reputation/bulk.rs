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
use crate::support::{Insert, KeyFilter};
use anyhow::{bail, Context as _};
use futures::future::BoxFuture;
use sqlx::PgConnection;
use std::sync::Arc;
use uuid::Uuid;

pub(super) struct ReputationBulk {
    t: Tables,
    current: Fold,
    in_flight: Option<Arc<Fold>>,
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
            current: Fold::default(),
            in_flight: None,
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
        let in_flight = self.in_flight.clone();
        let in_flight = in_flight.as_deref();
        let mut lookup = Needs::default();
        for key in needs.members {
            if self.current.scores.contains_key(&key) {
                continue;
            }
            match in_flight.and_then(|f| f.scores.get(&key)) {
                Some(slot) => self.current.load_score(key, slot.row.clone()),
                None if self.may_be_written(|w| w.scores.may_contain(&score_key(&key))) => {
                    lookup.members.push(key);
                }
                None => self.current.load_score(key, None),
            }
        }
        for user in needs.users {
            if self.current.globals.contains_key(&user) {
                continue;
            }
            match in_flight.and_then(|f| f.globals.get(&user)) {
                Some(slot) => self.current.load_global(user, slot.row.clone()),
                None if self.may_be_written(|w| w.globals.may_contain(user.as_bytes())) => {
                    lookup.users.push(user);
                }
                None => self.current.load_global(user, None),
            }
        }
        // Few, and written by policy events the fold may not have seen yet: always asked for.
        for community in needs.communities {
            if self.current.policies.contains_key(&community) {
                continue;
            }
            match in_flight.and_then(|f| f.policies.get(&community)) {
                Some(Slot { row: Some(p), .. }) => {
                    self.current.load_policy(community, Some(p.clone()));
                }
                _ => lookup.communities.push(community),
            }
        }
        if !lookup.is_empty() {
            load(conn, &self.t, &lookup, &mut self.current)
                .await
                .context("loading reputation rows")?;
        }
        for change in &changes {
            self.current.apply(change);
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
        self.current.scores.len() + self.current.globals.len() + self.current.history.len()
    }

    fn take(&mut self) -> anyhow::Result<Box<dyn BulkWrite>> {
        if self.in_flight.is_some() {
            bail!("the previous chunk of the reputation rebuild was not settled");
        }
        let chunk = Arc::new(std::mem::take(&mut self.current));
        if let Some(w) = &mut self.written {
            for (key, _) in chunk.scores.iter().filter(|(_, s)| created(s)) {
                w.scores.insert(&score_key(key));
            }
            for (user, _) in chunk.globals.iter().filter(|(_, s)| created(s)) {
                w.globals.insert(user.as_bytes());
            }
        }
        self.in_flight = Some(chunk.clone());
        Ok(Box::new(ReputationWrite {
            t: self.t.clone(),
            chunk,
        }))
    }

    fn settle(&mut self) {
        self.in_flight = None;
    }

    fn discard(&mut self) {
        // Keys of rows rolled back stay in the filters: that costs a lookup, not a wrong row.
        self.current = Fold::default();
        self.in_flight = None;
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
