//! The relay's durable state: its cursor per stream, and the advisory lock that keeps one relay
//! active at a time (others stand by until the holder's session ends).

use rookery_events::LogPosition;
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};

/// Advisory lock key space for relays: a fixed prefix plus a hash of the stream name, so relays
/// of different streams (e.g. parallel tests) never block each other.
fn lock_key(stream: &str) -> i64 {
    // FNV-1a: stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in stream.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(h.to_ne_bytes())
}

/// Holds the relay lock for as long as it lives (the lock belongs to its session).
pub struct RelayLock {
    conn: PoolConnection<Postgres>,
}

impl RelayLock {
    /// Tries to become the active relay for `stream`; `None` when another relay holds it.
    pub async fn try_acquire(pool: &PgPool, stream: &str) -> Result<Option<Self>, sqlx::Error> {
        let mut conn = pool.acquire().await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(lock_key(stream))
            .fetch_one(&mut *conn)
            .await?;
        if !got {
            return Ok(None);
        }
        // A relay task aborted without `release` must not return a lock-holding session to the
        // pool, where it would keep every other relay standing by.
        conn.close_on_drop();
        Ok(Some(Self { conn }))
    }

    /// Confirms the session still holds the lock (the connection may have been lost).
    pub async fn is_held(&mut self) -> bool {
        sqlx::query_scalar::<_, i32>("SELECT 1")
            .fetch_one(&mut *self.conn)
            .await
            .is_ok()
    }

    /// Releases the lock; the connection goes back to the pool.
    pub async fn release(mut self, stream: &str) {
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(lock_key(stream))
            .execute(&mut *self.conn)
            .await;
    }
}

/// The relay cursor: everything up to it is confirmed on the stream.
pub async fn load_cursor(pool: &PgPool, stream: &str) -> Result<LogPosition, sqlx::Error> {
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT txid, gpos FROM relay_cursors WHERE stream = $1")
            .bind(stream)
            .fetch_optional(pool)
            .await?;
    Ok(row
        .map(|(t, g)| LogPosition::from_db(t, g))
        .unwrap_or(LogPosition::ZERO))
}

/// Stores the cursor after JetStream acknowledged everything up to `position`; never moves it
/// backwards.
///
/// Committed without waiting for the WAL flush (`synchronous_commit` off for this transaction
/// only): a save lost in a Postgres crash leaves the cursor behind what the stream holds, so the
/// relay re-publishes a few events the stream de-duplicates by `Nats-Msg-Id`. Waiting for the
/// flush cost about 2 ms per save on a shared disk. Recovery replays the WAL in order, so the
/// cursor comes back as one of its earlier values, never ahead of what the stream confirmed.
pub async fn save_cursor(
    pool: &PgPool,
    stream: &str,
    position: LogPosition,
    published: i64,
) -> Result<(), sqlx::Error> {
    // `set_config(.., true)` in a CTE the INSERT reads from: a SET LOCAL inside the statement's
    // own implicit transaction, so no BEGIN/COMMIT round trips are needed for it.
    sqlx::query(
        "WITH async_commit AS (SELECT set_config('synchronous_commit', 'off', true))
         INSERT INTO relay_cursors (stream, txid, gpos, published, updated_at)
         SELECT $1, $2, $3, $4, now() FROM async_commit
         ON CONFLICT (stream) DO UPDATE SET txid = EXCLUDED.txid, gpos = EXCLUDED.gpos,
             published = relay_cursors.published + EXCLUDED.published, updated_at = now()
         WHERE (relay_cursors.txid, relay_cursors.gpos) <= (EXCLUDED.txid, EXCLUDED.gpos)",
    )
    .bind(stream)
    .bind(position.txid_i64())
    .bind(position.gpos)
    .bind(published)
    .execute(pool)
    .await?;
    Ok(())
}

/// Moves the cursor to `position`: the relay publishes again from there, and the stream
/// de-duplicates what it still holds (the bench and tests re-seed a stream this way).
pub async fn reset_cursor(
    pool: &PgPool,
    stream: &str,
    position: LogPosition,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO relay_cursors (stream, txid, gpos) VALUES ($1, $2, $3)
         ON CONFLICT (stream) DO UPDATE SET txid = EXCLUDED.txid, gpos = EXCLUDED.gpos, updated_at = now()",
    )
    .bind(stream)
    .bind(position.txid_i64())
    .bind(position.gpos)
    .execute(pool)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn lock_keys_differ_per_stream_and_are_stable() {
        assert_ne!(super::lock_key("a"), super::lock_key("b"));
        assert_eq!(super::lock_key("rookery"), super::lock_key("rookery"));
    }
}
