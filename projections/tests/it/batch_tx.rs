//! The batch transaction (`checkpoints::BatchTx`): its checkpoint statements ride with `BEGIN`
//! and `COMMIT`, so these tests prove what sqlx's own transaction would otherwise guarantee:
//! atomicity with the checkpoint, and no pooled connection left inside a transaction.

use rookery_events::LogPosition;
use rookery_projections::engine::checkpoints::{self, Advance, BatchTx};
use rookery_projections::engine::state;
use rookery_store::testing::TestDb;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

const NAME: &str = "batch_tx_test";

/// A pool of one connection, so a connection handed back inside a transaction would be the next
/// one used.
async fn one_connection(db: &TestDb) -> PgPool {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(20))
        .connect(&db.url)
        .await
        .expect("pool");
    checkpoints::ensure(&pool, NAME, 1, 1)
        .await
        .expect("checkpoint rows");
    pool
}

/// A batch on a connection from `pool`.
async fn begin(
    pool: &PgPool,
    name: &str,
    partition: u32,
) -> Result<(BatchTx, Option<(checkpoints::Checkpoint, bool)>), sqlx::Error> {
    BatchTx::begin(pool.acquire().await?, name, partition).await
}

async fn insert_user(conn: &mut sqlx::PgConnection, id: Uuid) {
    sqlx::query("INSERT INTO member_users (user_id, username) VALUES ($1, 'ada')")
        .bind(id)
        .execute(conn)
        .await
        .expect("insert");
}

async fn user_exists(pool: &PgPool, id: Uuid) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM member_users WHERE user_id = $1)")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("select")
}

#[tokio::test]
async fn commit_applies_the_writes_and_the_checkpoint_together() {
    let db = TestDb::create().await.expect("test database");
    let pool = one_connection(&db).await;
    let (mut tx, cp) = begin(&pool, NAME, 0).await.expect("begin");
    let (cp, paused) = cp.expect("the checkpoint row");
    assert_eq!((cp.stream_seq, paused), (0, false));
    let user = Uuid::new_v4();
    insert_user(tx.conn(), user).await;
    // Nobody else sees the row before the commit.
    assert!(!user_exists(&db.pool, user).await);
    let position = LogPosition::from_db(5, 7);
    let mut conn = tx
        .commit(Some(Advance {
            position,
            stream_seq: 3,
            applied: 1,
        }))
        .await
        .expect("commit");

    assert!(user_exists(&db.pool, user).await);
    let cp = checkpoints::load(&db.pool, NAME, 0).await.expect("load");
    assert_eq!((cp.position, cp.stream_seq, cp.applied), (position, 3, 1));
    // The connection it hands back, for the next batch, is outside any transaction.
    let fresh: bool = sqlx::query_scalar("SELECT pg_current_xact_id_if_assigned() IS NULL")
        .fetch_one(&mut *conn)
        .await
        .expect("select");
    assert!(
        fresh,
        "the handed-back connection is still inside a transaction"
    );
}

#[tokio::test]
async fn a_batch_dropped_midway_leaves_nothing_and_no_open_transaction() {
    let db = TestDb::create().await.expect("test database");
    let pool = one_connection(&db).await;
    let user = Uuid::new_v4();
    {
        let (mut tx, _) = begin(&pool, NAME, 0).await.expect("begin");
        insert_user(tx.conn(), user).await;
        // Dropped here, as on an error or a cancelled batch.
    }
    // The only connection the pool may hand out now must not be inside the dropped batch's
    // transaction, which holds a transaction id since its insert.
    let fresh: bool = sqlx::query_scalar("SELECT pg_current_xact_id_if_assigned() IS NULL")
        .fetch_one(&pool)
        .await
        .expect("select");
    assert!(fresh, "a pooled connection was left inside a transaction");
    assert!(!user_exists(&db.pool, user).await);
    // The checkpoint's row lock went with it: the next batch starts.
    let (tx, cp) = tokio::time::timeout(Duration::from_secs(10), begin(&pool, NAME, 0))
        .await
        .expect("the checkpoint row is still locked")
        .expect("begin");
    assert_eq!(cp.map(|(cp, _)| cp.stream_seq), Some(0));
    tx.rollback().await.expect("rollback");
}

#[tokio::test]
async fn rollback_discards_the_writes_and_reports_a_paused_projection() {
    let db = TestDb::create().await.expect("test database");
    let pool = one_connection(&db).await;
    assert!(state::set_paused(&pool, NAME, true).await.expect("pause"));
    let user = Uuid::new_v4();
    let (mut tx, cp) = begin(&pool, NAME, 0).await.expect("begin");
    assert_eq!(cp.map(|(_, paused)| paused), Some(true));
    insert_user(tx.conn(), user).await;
    tx.rollback().await.expect("rollback");
    assert!(!user_exists(&pool, user).await);

    // A partition without a checkpoint row reads as `None`.
    let (tx, cp) = begin(&pool, NAME, 7).await.expect("begin");
    assert!(cp.is_none());
    tx.rollback().await.expect("rollback");
}

#[tokio::test]
async fn a_projection_name_that_is_not_an_identifier_is_refused() {
    let db = TestDb::create().await.expect("test database");
    let pool = one_connection(&db).await;
    for name in ["", "members'; DROP TABLE events; --", "a b"] {
        match begin(&pool, name, 0).await {
            Err(sqlx::Error::InvalidArgument(_)) => {}
            Err(e) => panic!("{name:?}: unexpected error {e}"),
            Ok(_) => panic!("{name:?} was accepted"),
        }
    }
}
