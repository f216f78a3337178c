//! The messages rebuild's fast path ([`BulkFold`]): the same [`Fold`] as `apply`, held across a
//! chunk of many batches, and new messages created with `COPY`. Only an edit or a delete of a
//! message posted in an earlier chunk loads a row: from the chunk being written (taken, not yet
//! settled, so the tables cannot be asked) or else from the tables.

use super::fold::{self, Fold};
use super::{load, write, Tables};
use crate::engine::{BulkFold, BulkWrite, RawEvent};
use crate::support::{Chunks, Insert};
use futures::future::BoxFuture;
use sqlx::PgConnection;
use std::sync::Arc;

pub(super) struct MessagesBulk {
    t: Tables,
    chunks: Chunks<Fold>,
}

impl MessagesBulk {
    pub(super) fn new(t: Tables) -> Self {
        Self {
            t,
            chunks: Chunks::default(),
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
        let in_flight = self.chunks.in_flight();
        let current = &mut self.chunks.current;
        let mut lookup = Vec::new();
        for id in fold::needs(&changes) {
            if current.messages.contains_key(&id) {
                continue;
            }
            match in_flight.as_ref().and_then(|f| f.messages.get(&id)) {
                Some(row) => current.load(id, row.clone()),
                None => lookup.push(id),
            }
        }
        load(conn, &self.t, lookup, current).await?;
        for change in &changes {
            current.apply(change);
        }
        Ok(())
    }
}

impl BulkFold for MessagesBulk {
    fn fold<'a>(
        &'a mut self,
        conn: &'a mut PgConnection,
        events: &'a [RawEvent],
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(self.fold_batch(conn, events))
    }

    fn held(&self) -> usize {
        self.chunks.current.messages.len()
    }

    fn take(&mut self) -> anyhow::Result<Box<dyn BulkWrite>> {
        Ok(Box::new(MessagesWrite {
            t: self.t.clone(),
            chunk: self.chunks.take("messages", Fold::default())?,
        }))
    }

    fn settle(&mut self) {
        self.chunks.settle();
    }

    fn discard(&mut self) {
        self.chunks.discard(Fold::default());
    }
}

struct MessagesWrite {
    t: Tables,
    chunk: Arc<Fold>,
}

impl BulkWrite for MessagesWrite {
    fn write<'a>(self: Box<Self>, conn: &'a mut PgConnection) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move { write(conn, &self.t, &self.chunk, Insert::Copy).await })
    }
}
