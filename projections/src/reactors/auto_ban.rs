//! The auto-ban reactor: for each crossing the reputation model recorded (a score falling below
//! the community's threshold while auto-ban was on), one `MemberBanned` with reason `auto_ban`,
//! issued as the system through the Membership aggregate — never for a crossing a rebuild
//! produced, never twice for one crossing (its cursor commits with the ban), and also when the
//! process died between the crossing and the ban (the crossing waits above the cursor).
//!
//! One reactor is active at a time (an advisory lock); others stand by.

use crate::engine::locks::LockSession;
use crate::engine::state;
use crate::models::reputation;
use anyhow::Context as _;
use chrono::Utc;
use rookery_domain::{Membership, MembershipCommand};
use rookery_events::membership::membership_id;
use rookery_events::{EventMetadata, LogPosition, Role};
use rookery_store::{EventStore, StoreError};
use sqlx::PgPool;
use std::future::Future;
use std::time::Duration;
use uuid::Uuid;

/// The reactor's name: its cursor row and its lock.
pub const NAME: &str = "auto_ban";

/// The reason of the bans it issues.
pub const REASON: &str = "auto_ban";

/// Crossings handled per round.
const BATCH: i64 = 100;

pub struct AutoBan {
    pool: PgPool,
    store: EventStore,
    /// How often an idle reactor looks for new crossings.
    pub interval: Duration,
}

/// A crossing to act on.
struct Crossing {
    community_id: Uuid,
    user_id: Uuid,
    key: LogPosition,
}

impl AutoBan {
    pub fn new(pool: PgPool) -> Self {
        Self {
            store: EventStore::new(pool.clone()),
            pool,
            interval: Duration::from_millis(500),
        }
    }

    /// Runs until `shutdown` resolves: stands by until it holds the reactor's lock, then acts
    /// on new crossings as they appear.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let locks = LockSession::new(&self.pool);
        let mut generation = None;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(self.interval) => {}
            }
            if generation.is_none_or(|g| locks.generation() != g) {
                generation = match locks.try_lock(NAME, 0).await {
                    Ok(Some(g)) => {
                        tracing::info!(reactor = NAME, "reactor active");
                        Some(g)
                    }
                    Ok(None) => None,
                    Err(e) => {
                        tracing::warn!(reactor = NAME, error = %e, "cannot take the reactor lock");
                        None
                    }
                };
            }
            if generation.is_none() {
                continue;
            }
            if let Err(e) = self.run_once().await {
                tracing::warn!(
                    reactor = NAME,
                    error = format!("{e:#}"),
                    "auto-ban round failed; retrying"
                );
            }
        }
        locks.unlock(NAME, 0).await;
        Ok(())
    }

    /// Acts on every crossing pending now; returns how many bans it issued. For tests and tools;
    /// the caller must be the only active reactor.
    #[tracing::instrument(skip_all, fields(reactor = NAME))]
    pub async fn run_once(&self) -> anyhow::Result<u64> {
        let mut banned = 0;
        loop {
            let pending = self.pending().await?;
            if pending.is_empty() {
                return Ok(banned);
            }
            for crossing in pending {
                banned += u64::from(self.act(&crossing).await?);
            }
        }
    }

    /// Crossings above both the cursor and the reputation model's last rebuild, oldest first.
    async fn pending(&self) -> anyhow::Result<Vec<Crossing>> {
        let cursor: Option<(i64, i64)> =
            sqlx::query_as("SELECT txid, gpos FROM reactor_cursors WHERE reactor = $1")
                .bind(NAME)
                .fetch_optional(&self.pool)
                .await
                .context("loading the reactor cursor")?;
        let cursor = cursor.map_or(LogPosition::ZERO, |(t, g)| LogPosition::from_db(t, g));
        let rebuilt = state::rebuilt_through(&self.pool, reputation::NAME).await?;
        let after = cursor.max(rebuilt);
        let rows: Vec<(Uuid, Uuid, i64, i64)> = sqlx::query_as(
            "SELECT community_id, user_id, txid, gpos FROM reputation_crossings
             WHERE (txid, gpos) > ($1, $2) ORDER BY txid, gpos LIMIT $3",
        )
        .bind(after.txid_i64())
        .bind(after.gpos)
        .bind(BATCH)
        .fetch_all(&self.pool)
        .await
        .context("reading crossings")?;
        Ok(rows
            .into_iter()
            .map(|(community_id, user_id, t, g)| Crossing {
                community_id,
                user_id,
                key: LogPosition::from_db(t, g),
            })
            .collect())
    }

    /// Bans the member of `crossing` (unless they are banned already, or the owner) and moves
    /// the cursor past it, in one transaction. Returns whether it banned. A concurrent write to
    /// the membership fails the transaction, and the next round tries again.
    async fn act(&self, crossing: &Crossing) -> anyhow::Result<bool> {
        let id = membership_id(crossing.community_id, crossing.user_id).to_string();
        let loaded = self.store.load::<Membership>(&id).await?;
        let ban = MembershipCommand::Ban {
            community_id: crossing.community_id,
            user_id: crossing.user_id,
            actor_id: Uuid::nil(),
            actor_role: Role::Owner,
            reason: Some(REASON.into()),
        };
        let events = match loaded.aggregate.decide(ban) {
            Ok(events) => events,
            Err(refused) => {
                // The owner cannot be banned: the crossing is handled by doing nothing.
                tracing::info!(reactor = NAME, community_id = %crossing.community_id, user_id = %crossing.user_id, reason = %refused, "not banned");
                Vec::new()
            }
        };
        let mut metadata = EventMetadata::new(Utc::now()).with_actor("system:auto_ban");
        metadata.causation_id = Some(crossing.key.to_string());
        let mut uow = self.store.begin().await?;
        if !events.is_empty() {
            uow.append::<Membership>(&id, loaded.version, &events, &metadata)?;
        }
        sqlx::query(
            "INSERT INTO reactor_cursors (reactor, txid, gpos, acted) VALUES ($1, $2, $3, $4)
             ON CONFLICT (reactor) DO UPDATE
             SET txid = EXCLUDED.txid, gpos = EXCLUDED.gpos,
                 acted = reactor_cursors.acted + EXCLUDED.acted, updated_at = now()",
        )
        .bind(NAME)
        .bind(crossing.key.txid_i64())
        .bind(crossing.key.gpos)
        .bind(i64::from(!events.is_empty()))
        .execute(uow.tx())
        .await
        .context("moving the reactor cursor")?;
        match uow.commit().await {
            Ok(_) => {
                if !events.is_empty() {
                    tracing::info!(reactor = NAME, community_id = %crossing.community_id, user_id = %crossing.user_id, "banned (auto-ban)");
                }
                Ok(!events.is_empty())
            }
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}
