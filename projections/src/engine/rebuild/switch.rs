//! The switch: one transaction that locks every checkpoint of the projection (live batches wait),
//! folds the rest of the log, swaps the shadow tables in, raises the floors and marks the
//! projection running. A switch that times out on a table lock rolls back whole and is tried
//! again.

use super::indexes::table_indexes;
use super::{checkpoints, log, state, Guarded, Rebuild, RebuildProgress};
use anyhow::{bail, Context as _};
use rookery_events::LogPosition;
use sqlx::PgConnection;

impl<F: FnMut(RebuildProgress) + Send> Rebuild<'_, F> {
    /// it timed out waiting for table locks behind long readers.
    pub(super) async fn switch_with_retries(
        &mut self,
        cursor: LogPosition,
    ) -> anyhow::Result<LogPosition> {
        let mut attempt = 1;
        loop {
            // A failed switch rolled back, poison it parked included: forget what it learnt.
            let saved = (self.done, self.folded, self.parked, self.excluded.clone());
            match self.switch(cursor).await {
                Ok(head) => return Ok(head),
                Err(e) if attempt < 3 && is_lock_timeout(&e) => {
                    tracing::warn!(
                        projection = self.projection.name(),
                        attempt,
                        "switch timed out on a table lock; trying again"
                    );
                    (self.done, self.folded, self.parked, self.excluded) = saved;
                    if let Some(bulk) = self.bulk.as_mut() {
                        bulk.discard();
                    }
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The switch: one transaction. Returns the head the floors were raised to.
    pub(super) async fn switch(&mut self, cursor: LogPosition) -> anyhow::Result<LogPosition> {
        let p = self.projection;
        let name = p.name();
        self.pass += 1;
        let mut conn = Guarded::acquire(self.pool).await?;
        let mut tx = sqlx::Connection::begin(&mut *conn.0).await?;
        sqlx::query(&format!(
            "SET LOCAL lock_timeout = {}",
            self.config.lock_timeout.as_millis()
        ))
        .execute(&mut *tx)
        .await?;
        // From here on no live batch of this projection can commit: they all start by locking
        // their checkpoint row.
        let locked = checkpoints::lock_all(&mut tx, name)
            .await
            .context("locking the checkpoints")?;
        let head = log::committed_head(&mut *tx)
            .await?
            .unwrap_or(cursor)
            .max(cursor);
        if let Some(ahead) = locked.iter().find(|c| c.position > head) {
            // Live workers only apply relayed events, which are below the committed head; a
            // checkpoint beyond it means the log was tampered with.
            bail!(
                "partition {} has applied {} beyond the committed head {head}",
                ahead.partition,
                ahead.position
            );
        }
        let remaining = log::count_after(self.pool, cursor).await.unwrap_or(0);
        self.total = self.done + u64::try_from(remaining).unwrap_or(0);
        if head > cursor {
            self.fold(Some(&mut *tx), cursor, head).await?;
        }
        self.swap_tables(&mut tx).await?;
        checkpoints::raise_floor_all(&mut tx, name, self.partitions, head).await?;
        state::finish_rebuild(&mut tx, name, p.version(), head).await?;
        tx.commit().await.context("committing the switch")?;
        conn.keep();
        Ok(head)
    }

    pub(super) async fn swap_tables(&self, conn: &mut PgConnection) -> anyhow::Result<()> {
        for (live, shadow) in self.shadow.iter() {
            // The shadow's indexes got generated names; give them the live ones afterwards so
            // names do not drift with every rebuild.
            let live_indexes = table_indexes(conn, live).await?;
            let shadow_indexes = table_indexes(conn, shadow).await?;
            let old = format!("{live}__old");
            sqlx::query(&format!("ALTER TABLE \"{live}\" RENAME TO \"{old}\""))
                .execute(&mut *conn)
                .await?;
            sqlx::query(&format!("ALTER TABLE \"{shadow}\" RENAME TO \"{live}\""))
                .execute(&mut *conn)
                .await?;
            sqlx::query(&format!("DROP TABLE \"{old}\""))
                .execute(&mut *conn)
                .await?;
            for index in &shadow_indexes {
                let Some(live_index) = live_indexes
                    .iter()
                    .find(|l| l.definition == index.definition)
                else {
                    continue;
                };
                if live_index.name != index.name {
                    sqlx::query(&format!(
                        "ALTER INDEX \"{}\" RENAME TO \"{}\"",
                        index.name, live_index.name
                    ))
                    .execute(&mut *conn)
                    .await?;
                }
            }
        }
        Ok(())
    }
}

pub(super) fn is_lock_timeout(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(cause.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::Database(db)) if db.code().as_deref() == Some("55P03"))
    })
}
