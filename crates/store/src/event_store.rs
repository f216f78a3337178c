//! Loading aggregates and committing units of work.
//!
//! Writes go through [`UnitOfWork`]: one transaction that appends events for one or more
//! aggregates (optimistic concurrency on `(aggregate_type, aggregate_id, sequence)`), takes and
//! releases uniqueness claims, and may carry side rows (credentials). Because claims commit with
//! the events, a claim can never outlive a failed command.

use cqrs_es::persist::PersistedEventRepository;
use cqrs_es::{Aggregate, DomainEvent};
use postgres_es::PostgresEventRepository;
use rookery_events::{EventMetadata, LogPosition};
use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer appended to this aggregate first (→ 409).
    #[error("{aggregate_type} {aggregate_id} was changed concurrently; reload and retry")]
    Conflict {
        aggregate_type: String,
        aggregate_id: String,
    },
    /// A uniqueness claim is held by another aggregate (→ 409 naming the field).
    #[error("{kind} `{key}` is already taken")]
    ClaimTaken { kind: String, key: String },
    #[error("stored {aggregate_type} event could not be decoded")]
    Decode {
        aggregate_type: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("loading events")]
    Load(#[source] cqrs_es::persist::PersistenceError),
}

/// An aggregate with the version (last sequence, 0 when new) it was folded up to.
#[derive(Debug)]
pub struct Loaded<A> {
    pub aggregate: A,
    pub version: i64,
}

/// A uniqueness claim operation: `kind` names the namespace (e.g. `community_name`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    Take { kind: String, key: String },
    Release { kind: String, key: String },
}

/// What a committed unit of work produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitOutcome {
    /// Log key of the last event written (or `None` when nothing was appended).
    pub position: Option<LogPosition>,
}

#[derive(Clone)]
pub struct EventStore {
    pool: PgPool,
    repo: std::sync::Arc<PostgresEventRepository>,
}

impl EventStore {
    pub fn new(pool: PgPool) -> Self {
        let repo = std::sync::Arc::new(PostgresEventRepository::new(pool.clone()));
        Self { pool, repo }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Folds aggregate `id` from its events.
    #[tracing::instrument(skip_all, fields(aggregate_type = A::TYPE, aggregate_id = %id))]
    pub async fn load<A: Aggregate>(&self, id: &str) -> Result<Loaded<A>, StoreError> {
        let events = self
            .repo
            .get_events::<A>(id)
            .await
            .map_err(StoreError::Load)?;
        let mut aggregate = A::default();
        let mut version = 0i64;
        for event in events {
            let payload: A::Event =
                serde_json::from_value(event.payload).map_err(|source| StoreError::Decode {
                    aggregate_type: A::TYPE,
                    source,
                })?;
            aggregate.apply(payload);
            version = i64::try_from(event.sequence).unwrap_or(i64::MAX);
        }
        Ok(Loaded { aggregate, version })
    }

    pub async fn begin(&self) -> Result<UnitOfWork, StoreError> {
        Ok(UnitOfWork {
            tx: self.pool.begin().await?,
            rows: Rows::default(),
        })
    }
}

#[derive(Default)]
struct Rows {
    aggregate_type: Vec<String>,
    aggregate_id: Vec<String>,
    sequence: Vec<i64>,
    event_type: Vec<String>,
    event_version: Vec<String>,
    payload: Vec<Value>,
    metadata: Vec<Value>,
}

/// One transaction of writes. Dropping it without [`UnitOfWork::commit`] rolls everything back.
pub struct UnitOfWork {
    tx: Transaction<'static, Postgres>,
    rows: Rows,
}

impl UnitOfWork {
    /// Queues `events` for aggregate `id`, which was loaded at `version`; sequences continue from
    /// there, so a concurrent writer makes the commit fail with [`StoreError::Conflict`].
    pub fn append<A: Aggregate>(
        &mut self,
        id: &str,
        version: i64,
        events: &[A::Event],
        metadata: &EventMetadata,
    ) -> Result<i64, StoreError> {
        let meta =
            serde_json::to_value(metadata.to_map()).map_err(|source| StoreError::Decode {
                aggregate_type: A::TYPE,
                source,
            })?;
        let mut seq = version;
        for event in events {
            seq += 1;
            let payload = serde_json::to_value(event).map_err(|source| StoreError::Decode {
                aggregate_type: A::TYPE,
                source,
            })?;
            self.rows.aggregate_type.push(A::TYPE.to_string());
            self.rows.aggregate_id.push(id.to_string());
            self.rows.sequence.push(seq);
            self.rows.event_type.push(event.event_type());
            self.rows.event_version.push(event.event_version());
            self.rows.payload.push(payload);
            self.rows.metadata.push(meta.clone());
        }
        Ok(seq)
    }

    /// Takes or releases uniqueness claims for aggregate `(aggregate_type, aggregate_id)`.
    pub async fn claim(
        &mut self,
        aggregate_type: &str,
        aggregate_id: &str,
        claims: &[Claim],
    ) -> Result<(), StoreError> {
        for claim in claims {
            match claim {
                Claim::Take { kind, key } => {
                    // DO NOTHING waits for a concurrent claimant's transaction, so exactly one wins.
                    let taken = sqlx::query(
                        "INSERT INTO claims (kind, key, aggregate_type, aggregate_id) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (kind, key) DO NOTHING",
                    )
                    .bind(kind)
                    .bind(key)
                    .bind(aggregate_type)
                    .bind(aggregate_id)
                    .execute(&mut *self.tx)
                    .await?
                    .rows_affected();
                    if taken == 0 {
                        let holder: Option<String> = sqlx::query_scalar(
                            "SELECT aggregate_id FROM claims WHERE kind = $1 AND key = $2",
                        )
                        .bind(kind)
                        .bind(key)
                        .fetch_optional(&mut *self.tx)
                        .await?;
                        if holder.as_deref() != Some(aggregate_id) {
                            return Err(StoreError::ClaimTaken {
                                kind: kind.clone(),
                                key: key.clone(),
                            });
                        }
                    }
                }
                Claim::Release { kind, key } => {
                    sqlx::query(
                        "DELETE FROM claims WHERE kind = $1 AND key = $2 AND aggregate_id = $3",
                    )
                    .bind(kind)
                    .bind(key)
                    .bind(aggregate_id)
                    .execute(&mut *self.tx)
                    .await?;
                }
            }
        }
        Ok(())
    }

    /// The transaction, for side rows that must commit with the events (e.g. credentials).
    pub fn tx(&mut self) -> &mut sqlx::PgConnection {
        &mut self.tx
    }

    /// Writes the queued events in one statement and commits.
    pub async fn commit(mut self) -> Result<CommitOutcome, StoreError> {
        let position = if self.rows.sequence.is_empty() {
            None
        } else {
            let r = std::mem::take(&mut self.rows);
            let row: (i64, i64) = sqlx::query_as(
                "WITH inserted AS (
                    INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
                    SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::jsonb[], $7::jsonb[])
                    RETURNING transaction_id, global_position)
                 SELECT pg_current_xact_id()::text::bigint, max(global_position) FROM inserted",
            )
            .bind(&r.aggregate_type)
            .bind(&r.aggregate_id)
            .bind(&r.sequence)
            .bind(&r.event_type)
            .bind(&r.event_version)
            .bind(&r.payload)
            .bind(&r.metadata)
            .fetch_one(&mut *self.tx)
            .await
            .map_err(|e| conflict_or(e, &r))?;
            Some(LogPosition::from_db(row.0, row.1))
        };
        self.tx.commit().await?;
        Ok(CommitOutcome { position })
    }
}

fn conflict_or(error: sqlx::Error, rows: &Rows) -> StoreError {
    if let sqlx::Error::Database(db) = &error {
        if db.constraint() == Some("events_pkey") {
            return StoreError::Conflict {
                aggregate_type: rows.aggregate_type.first().cloned().unwrap_or_default(),
                aggregate_id: rows.aggregate_id.first().cloned().unwrap_or_default(),
            };
        }
    }
    StoreError::Database(error)
}
