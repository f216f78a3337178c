//! The unit of work's optimistic concurrency (guarantee 6 in docs/architecture.md): a writer that loaded a stale version
//! gets a conflict, and nothing it staged — events or claims — is stored; group commit answers
//! each writer with its own outcome; a guarded change is written only while the aggregate it was
//! decided on is unchanged; postgres-es reads back what the store writes. A kept connection
//! (the committers', the relay reader's, a projection partition's) is reused, checked after
//! idleness, closed after a broken use, and given back to a shared pool that needs it.

use chrono::Utc;
use futures::future::join_all;
use rookery_domain::Community;
use rookery_events::{CommunityEvent, EventMetadata, JoinMode, Platform};
use rookery_store::testing::TestDb;
use rookery_store::{Changes, Claim, EventStore, KeptConn, StoreError};
use sqlx::postgres::PgPoolOptions;
use sqlx::Connection as _;
use std::time::Duration;
use tokio::time::Instant;
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

/// A claim-free change creating community `id`.
fn creation(id: Uuid, version: i64) -> Changes {
    let mut changes = Changes::default();
    changes
        .append::<Community>(
            &id.to_string(),
            version,
            &[created(id, &format!("c-{id}"))],
            &EventMetadata::new(Utc::now()),
        )
        .unwrap();
    changes
}

#[tokio::test]
async fn concurrent_commands_share_one_commit_and_each_learns_its_own_position() {
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let ids: Vec<Uuid> = (0..50).map(|_| Uuid::new_v4()).collect();

    // All 50 are queued before the committer first runs (this test's runtime is single-threaded).
    let outcomes = join_all(ids.iter().map(|id| store.commit(creation(*id, 0)))).await;

    let mut txids = std::collections::HashSet::new();
    for (id, outcome) in ids.iter().zip(outcomes) {
        let position = outcome.unwrap().position.expect("a position");
        txids.insert(position.txid);
        let stored: i64 = sqlx::query_scalar(
            "SELECT global_position FROM events WHERE aggregate_id = $1 AND sequence = 1",
        )
        .bind(id.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(
            position.gpos, stored,
            "each writer gets its own event's key"
        );
    }
    assert_eq!(txids.len(), 1, "one transaction for the whole group");
}

/// The group committers keep their connections between commits; one the server cut must not
/// stay in use. At most the commits that meet a dead connection fail, storing nothing, and the
/// next ones succeed.
#[tokio::test]
async fn commits_recover_after_the_server_cut_the_committers_connections() {
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    // The committer takes its connection.
    let warm = join_all((0..8).map(|_| store.commit(creation(Uuid::new_v4(), 0)))).await;
    assert!(warm.iter().all(Result::is_ok), "{warm:?}");

    let mut admin = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let terminate = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()";
    let cut: i64 = sqlx::query_scalar(terminate)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert!(cut >= 1, "the committer's connection was open ({cut} cut)");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_one(&mut admin)
        .await
        .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} backends outlived termination"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // One commit at a time, so the first meets the committer's cut connection.
    let mut failed = Vec::new();
    let mut succeeded = 0;
    for _ in 0..10 {
        let id = Uuid::new_v4();
        match store.commit(creation(id, 0)).await {
            Ok(_) => succeeded += 1,
            Err(StoreError::Database(_)) => failed.push(id),
            Err(other) => panic!("unexpected error: {other:?}"),
        }
    }
    assert!(
        failed.len() <= 1,
        "{} commits failed after the cut",
        failed.len()
    );
    assert_eq!(succeeded + failed.len(), 10);
    for id in failed {
        let loaded = store.load::<Community>(&id.to_string()).await.unwrap();
        assert_eq!(loaded.version, 0, "a failed commit stored nothing");
    }
}

#[tokio::test]
async fn a_conflict_in_a_group_fails_only_the_writer_that_lost() {
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let contested = Uuid::new_v4();
    let others: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();

    let mut changes: Vec<Changes> = others.iter().map(|id| creation(*id, 0)).collect();
    // Two writers both loaded `contested` at version 0, in the same group.
    changes.insert(5, creation(contested, 0));
    changes.push(creation(contested, 0));
    let outcomes = join_all(changes.into_iter().map(|c| store.commit(c))).await;

    let conflicts = outcomes
        .iter()
        .filter(|o| matches!(o, Err(StoreError::Conflict { .. })))
        .count();
    let committed = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!((committed, conflicts), (21, 1), "{outcomes:?}");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        stored, 21,
        "the loser wrote nothing, its neighbours everything"
    );
}

#[tokio::test]
async fn postgres_es_reads_back_what_the_store_writes() {
    use cqrs_es::persist::PersistedEventRepository;

    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let id = Uuid::new_v4();
    store.commit(creation(id, 0)).await.unwrap();

    let repo = postgres_es::PostgresEventRepository::new(db.pool.clone());
    let events = repo.get_events::<Community>(&id.to_string()).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].sequence, 1);
    assert_eq!(events[0].event_type, "CommunityCreated");
    let ours = store.load::<Community>(&id.to_string()).await.unwrap();
    assert_eq!(ours.version, 1);
    assert_eq!(ours.aggregate.name, format!("c-{id}"));
}

#[tokio::test]
async fn the_pool_talks_to_a_loopback_server_without_tls() {
    let db = TestDb::create().await.expect("test database");
    let url = url::Url::parse(&db.url).expect("url");
    let loopback = matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
    let pool = rookery_store::connect(&rookery_store::DbConfig::new(&db.url))
        .await
        .expect("pool");
    let ssl: Option<bool> =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_optional(&pool)
            .await
            .expect("pg_stat_ssl");
    if loopback && std::env::var_os("PGSSLMODE").is_none() {
        assert_eq!(ssl, Some(false), "TLS to {url}");
    }
    pool.close().await;
}

/// Creation of `id`, `events` times over (sequences 1..=events), written only while
/// `(guarded, version)` holds.
fn guarded_creation(id: Uuid, events: usize, guarded: Uuid, version: i64) -> Changes {
    let mut changes = Changes::default();
    let created: Vec<CommunityEvent> = (0..events).map(|_| created(id, "guarded")).collect();
    changes
        .append::<Community>(
            &id.to_string(),
            0,
            &created,
            &EventMetadata::new(Utc::now()),
        )
        .unwrap();
    changes.guard::<Community>(&guarded.to_string(), version);
    changes
}

async fn stored_positions(db: &TestDb, id: Uuid) -> Vec<(i64, i64)> {
    sqlx::query_as(
        "SELECT sequence, global_position FROM events WHERE aggregate_id = $1 ORDER BY sequence",
    )
    .bind(id.to_string())
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_guarded_change_is_written_only_while_its_guard_holds() {
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let read = Uuid::new_v4();
    store.commit(creation(read, 0)).await.unwrap();
    let (stale, current, fresh) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());

    let mut changes: Vec<Changes> = (0..20).map(|_| creation(Uuid::new_v4(), 0)).collect();
    // Decided on `read` at version 0, but it is at 1 now.
    changes.insert(3, guarded_creation(stale, 1, read, 0));
    // Decided on `read` as it is; three events, which must keep their order.
    changes.insert(7, guarded_creation(current, 3, read, 1));
    // Decided on `fresh` having no events, which holds.
    changes.push(guarded_creation(fresh, 1, fresh, 0));
    let outcomes = join_all(changes.into_iter().map(|c| store.commit(c))).await;

    assert!(
        matches!(&outcomes[3], Err(StoreError::Stale { aggregate_id, .. }) if *aggregate_id == read.to_string()),
        "{:?}",
        outcomes[3]
    );
    let txids: std::collections::HashSet<u64> = outcomes
        .iter()
        .enumerate()
        .filter(|(k, _)| *k != 3)
        .map(|(_, o)| {
            o.as_ref()
                .expect("committed")
                .position
                .expect("a position")
                .txid
        })
        .collect();
    assert_eq!(
        txids.len(),
        1,
        "the stale change did not break up the group"
    );
    assert!(
        stored_positions(&db, stale).await.is_empty(),
        "nothing of the stale change"
    );
    let current = stored_positions(&db, current).await;
    assert_eq!(current.len(), 3);
    assert!(
        current.windows(2).all(|w| w[0].1 < w[1].1),
        "one aggregate's events in sequence order: {current:?}"
    );
    assert_eq!(stored_positions(&db, fresh).await.len(), 1);

    // Alone (no group), a stale guard is refused the same way.
    let err = store
        .commit(guarded_creation(Uuid::new_v4(), 1, fresh, 0))
        .await
        .expect_err("fresh has an event now");
    assert!(matches!(err, StoreError::Stale { .. }), "{err:?}");
}

#[tokio::test]
async fn a_stale_guard_in_a_unit_of_work_rolls_back_its_claims() {
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let read = Uuid::new_v4();
    store.commit(creation(read, 0)).await.unwrap();

    let id = Uuid::new_v4();
    let mut changes = guarded_creation(id, 1, read, 0);
    changes.claim("community", &id.to_string(), &[take("taken-while-stale")]);
    let err = store
        .begin_with(changes)
        .await
        .unwrap()
        .commit()
        .await
        .expect_err("stale");
    assert!(matches!(err, StoreError::Stale { .. }), "{err:?}");
    let claims: i64 = sqlx::query_scalar("SELECT count(*) FROM claims")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!((claims, stored_positions(&db, id).await.len()), (0, 0));
}

/// A pool of at most `max` connections on the test database.
async fn pool_of(db: &TestDb, max: u32) -> sqlx::PgPool {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&db.url)
        .await
        .unwrap()
}

async fn backend_pid(conn: &mut sqlx::PgConnection) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await
}

#[tokio::test]
async fn a_kept_connection_serves_the_next_use_until_an_error_breaks_it() {
    let db = TestDb::create().await.unwrap();
    let pool = pool_of(&db, 4).await;
    let mut kept = KeptConn::shared(pool.clone());

    let mut conn = kept.take().await.unwrap();
    let first = backend_pid(&mut conn).await.unwrap();
    kept.give_back(conn, None);
    assert!(kept.is_kept());
    let mut conn = kept.take().await.unwrap();
    assert_eq!(backend_pid(&mut conn).await.unwrap(), first);

    // The database refusing a statement leaves the connection fit for the next use.
    let refused = sqlx::query("SELECT * FROM no_such_table")
        .execute(&mut *conn)
        .await
        .unwrap_err();
    assert!(matches!(refused, sqlx::Error::Database(_)), "{refused:?}");
    kept.give_back(conn, Some(&refused));
    let mut conn = kept.take().await.unwrap();
    assert_eq!(backend_pid(&mut conn).await.unwrap(), first);

    // Any other error may have left it mid-protocol: it is closed, never kept.
    kept.give_back(conn, Some(&sqlx::Error::Protocol("cut off".into())));
    assert!(!kept.is_kept());
    let mut conn = kept.take().await.unwrap();
    assert_ne!(backend_pid(&mut conn).await.unwrap(), first);
}

#[tokio::test]
async fn a_kept_connection_idle_for_a_while_is_checked_and_replaced_when_cut() {
    let db = TestDb::create().await.unwrap();
    let pool = pool_of(&db, 4).await;
    let mut kept = KeptConn::dedicated(pool).check_if_idle_for(Duration::ZERO);
    let mut conn = kept.take().await.unwrap();
    let cut = backend_pid(&mut conn).await.unwrap();
    kept.give_back(conn, None);

    let mut admin = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(cut)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert!(terminated);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sqlx::query_scalar::<_, bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)",
    )
    .bind(cut)
    .fetch_one(&mut admin)
    .await
    .unwrap()
    {
        assert!(
            Instant::now() < deadline,
            "backend {cut} outlived termination"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Checked before the use, the cut connection is replaced instead of failing the use.
    let mut conn = kept.take().await.unwrap();
    let replacement = backend_pid(&mut conn).await.unwrap();
    assert_ne!(replacement, cut);
}

#[tokio::test]
async fn a_shared_pool_gets_its_connection_back_when_it_has_none_to_spare() {
    let db = TestDb::create().await.unwrap();
    let pool = pool_of(&db, 1).await;
    let mut shared = KeptConn::shared(pool.clone());
    let conn = shared.take().await.unwrap();
    shared.give_back(conn, None);
    assert!(!shared.is_kept(), "kept the pool's only connection");
    let other = tokio::time::timeout(Duration::from_secs(5), pool.acquire()).await;
    assert!(
        matches!(other, Ok(Ok(_))),
        "the pool had no connection for others"
    );
    drop(other);

    // A dedicated pool is the holder's own: its connection is kept.
    let mut dedicated = KeptConn::dedicated(pool);
    let conn = dedicated.take().await.unwrap();
    dedicated.give_back(conn, None);
    assert!(dedicated.is_kept());
}
