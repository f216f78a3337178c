//! The unit of work's optimistic concurrency (DESIGN §3.6): a writer that loaded a stale version
//! gets a conflict, and nothing it staged — events or claims — is stored.

use chrono::Utc;
use rookery_domain::Community;
use rookery_events::{CommunityEvent, EventMetadata, JoinMode, Platform};
use rookery_store::testing::TestDb;
use rookery_store::{Claim, EventStore, StoreError};
use uuid::Uuid;

fn created(id: Uuid, name: &str) -> CommunityEvent {
    CommunityEvent::CommunityCreated {
        community_id: id,
        name: name.into(),
        display_name: name.into(),
        platform: Platform::Twitch,
        is_public: true,
        join_mode: JoinMode::Open,
        owner_id: Uuid::new_v4(),
    }
}

fn take(key: &str) -> Claim {
    Claim::Take {
        kind: "community_name".into(),
        key: key.into(),
    }
}

#[tokio::test]
async fn a_stale_writer_gets_a_conflict_and_stores_nothing() {
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let id = Uuid::new_v4();
    let key = id.to_string();
    let meta = EventMetadata::new(Utc::now());

    // Both writers loaded the aggregate at version 0.
    let mut first = store.begin().await.unwrap();
    let mut second = store.begin().await.unwrap();
    first
        .append::<Community>(&key, 0, &[created(id, "first-name")], &meta)
        .unwrap();
    first
        .claim("community", &key, &[take("first-name")])
        .await
        .unwrap();
    second
        .append::<Community>(&key, 0, &[created(id, "second-name")], &meta)
        .unwrap();
    second
        .claim("community", &key, &[take("second-name")])
        .await
        .unwrap();

    let outcome = first.commit().await.unwrap();
    assert!(outcome.position.is_some());
    let err = second.commit().await.expect_err("stale writer");
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");

    let loaded = store.load::<Community>(&key).await.unwrap();
    assert_eq!(loaded.version, 1);
    assert_eq!(loaded.aggregate.name, "first-name");
    let claims: Vec<String> = sqlx::query_scalar("SELECT key FROM claims ORDER BY key")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        claims,
        ["first-name"],
        "the loser's claim rolled back with its events"
    );
}
