//! A read model that exists only for the tests: events counted per aggregate and event type,
//! with the first and last time each was seen. It is built exactly as a real model is — a
//! [`Projection`] with its tables, a pure fold, set-based writes — and registered in the
//! conformance suite, which it passes without a line of the engine knowing it.

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use rookery_events::RecordedEvent;
use rookery_projections::{EventRef, PoisonEvent, Projection, TableNames};
use sqlx::PgConnection;
use std::collections::BTreeMap;

/// Its one table. Real models get theirs from `migrations/`; this one from the suite's setup.
pub const DDL: &str = "CREATE TABLE test_event_counts (
    aggregate_type text        NOT NULL,
    event_type     text        NOT NULL,
    events         bigint      NOT NULL,
    first_at       timestamptz NOT NULL,
    last_at        timestamptz NOT NULL,
    PRIMARY KEY (aggregate_type, event_type)
)";

pub struct EventCounts;

/// What a batch adds to one row.
#[derive(Debug, PartialEq, Eq)]
struct Count {
    events: i64,
    first_at: DateTime<Utc>,
    last_at: DateTime<Utc>,
}

/// The fold, pure: counts per `(aggregate_type, event_type)`. An event whose payload does not
/// decode, or that has no time, is poison.
fn fold<E: EventRef>(events: &[E]) -> Result<BTreeMap<(String, String), Count>, PoisonEvent> {
    let mut counts: BTreeMap<(String, String), Count> = BTreeMap::new();
    for e in events {
        e.decode()
            .map_err(|err| e.poison(format!("does not decode: {err}")))?;
        let at = e.occurred_at()?;
        let key = (e.aggregate_type().to_string(), e.event_type().to_string());
        let count = counts.entry(key).or_insert(Count {
            events: 0,
            first_at: at,
            last_at: at,
        });
        count.events += 1;
        count.first_at = count.first_at.min(at);
        count.last_at = count.last_at.max(at);
    }
    Ok(counts)
}

impl Projection for EventCounts {
    fn name(&self) -> &'static str {
        "test_event_counts"
    }

    fn version(&self) -> i32 {
        1
    }

    fn tables(&self) -> &'static [&'static str] {
        &["test_event_counts"]
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["community", "membership", "user"]
    }

    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        tables: &'a TableNames,
        events: &'a [RecordedEvent],
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let counts = fold(events)?;
            let mut kinds = Vec::with_capacity(counts.len());
            let mut types = Vec::with_capacity(counts.len());
            let (mut n, mut first, mut last) = (Vec::new(), Vec::new(), Vec::new());
            for ((kind, ty), c) in counts {
                kinds.push(kind);
                types.push(ty);
                n.push(c.events);
                first.push(c.first_at);
                last.push(c.last_at);
            }
            // Key order: a stable lock order between concurrent partitions.
            sqlx::query(&format!(
                "INSERT INTO {t} AS c (aggregate_type, event_type, events, first_at, last_at)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::timestamptz[],
                                      $5::timestamptz[])
                 ORDER BY 1, 2
                 ON CONFLICT (aggregate_type, event_type) DO UPDATE
                 SET events = c.events + EXCLUDED.events,
                     first_at = LEAST(c.first_at, EXCLUDED.first_at),
                     last_at = GREATEST(c.last_at, EXCLUDED.last_at)",
                t = tables.get("test_event_counts")?
            ))
            .bind(&kinds)
            .bind(&types)
            .bind(&n)
            .bind(&first)
            .bind(&last)
            .execute(conn)
            .await?;
            Ok(())
        })
    }
}
