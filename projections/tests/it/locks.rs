//! The advisory locks: one active worker per `(projection, partition)` across processes, one
//! rebuild per projection, and projections never contending for each other's locks.

use rookery_projections::engine::locks::{rebuild_running, LockSession, RebuildLock};
use rookery_store::testing::TestDb;

#[tokio::test]
async fn partition_and_rebuild_locks_are_per_projection() {
    let db = TestDb::create().await.expect("db");
    // Two sessions, as two worker processes would have.
    let (a, b) = (LockSession::new(&db.pool), LockSession::new(&db.pool));
    assert!(a.try_lock("members", 0).await.expect("lock").is_some());
    assert!(
        b.try_lock("members", 0).await.expect("lock").is_none(),
        "a partition has one active worker"
    );
    assert!(
        b.try_lock("members", 1).await.expect("lock").is_some(),
        "other partitions of the same projection are free"
    );
    for other in ["reputation", "messages", "bot_scores", "webhook_deliveries"] {
        assert!(
            b.try_lock(other, 0).await.expect("lock").is_some(),
            "{other} partition 0 is not held by members'"
        );
    }

    // A rebuild's lock is neither a partition lock nor shared between projections.
    assert!(!rebuild_running(&db.pool, "members").await.expect("running"));
    let rebuild = RebuildLock::try_acquire(&db.pool, "members")
        .await
        .expect("rebuild lock")
        .expect("free while workers hold partitions");
    assert!(rebuild_running(&db.pool, "members").await.expect("running"));
    assert!(RebuildLock::try_acquire(&db.pool, "members")
        .await
        .expect("rebuild lock")
        .is_none());
    assert!(!rebuild_running(&db.pool, "reputation")
        .await
        .expect("running"));
    let other = RebuildLock::try_acquire(&db.pool, "reputation")
        .await
        .expect("rebuild lock");
    assert!(
        other.is_some(),
        "another projection rebuilds at the same time"
    );

    // Released locks are free again.
    a.unlock("members", 0).await;
    assert!(b.try_lock("members", 0).await.expect("lock").is_some());
    rebuild.release().await;
    // The server lets an advisory lock go when the session's backend has ended, a moment
    // after the client closed it.
    crate::support::eventually(
        std::time::Duration::from_secs(5),
        "the rebuild lock released",
        || async { !rebuild_running(&db.pool, "members").await.expect("running") },
    )
    .await;
}
