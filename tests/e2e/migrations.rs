//! Databases migrated before some migration files were rewritten (the read models' tables moved
//! into one migration per model; comments changed) start with the current binary: nothing is
//! re-created, nothing lost, and sqlx's checksums agree afterwards.

use rookery_store::testing::TestDb;
use rookery_store::MIGRATOR;
use sqlx::migrate::{Migration, MigrationType};
use sqlx::Connection;
use std::borrow::Cow;

/// The texts those databases applied (kept in the store crate for the adoption itself).
const EARLIER: [(i64, &str); 3] = [
    (
        20261122000001,
        include_str!("../../crates/store/legacy/20261122000001_event_store.sql"),
    ),
    (
        20261122000003,
        include_str!("../../crates/store/legacy/20261122000003_projections.sql"),
    ),
    (
        20261122000004,
        include_str!("../../crates/store/legacy/20261122000004_projection_dead_letters.sql"),
    ),
];
/// The members read model's own migration, which took its tables over from 0003.
const RM_MEMBERS: i64 = 20261207000001;

fn checksum(sql: &'static str) -> Vec<u8> {
    Migration::new(
        0,
        Cow::Borrowed(""),
        MigrationType::Simple,
        Cow::Borrowed(sql),
        false,
    )
    .checksum
    .into_owned()
}

async fn recorded(db: &TestDb) -> Vec<(i64, Vec<u8>)> {
    sqlx::query_as("SELECT version, checksum FROM _sqlx_migrations ORDER BY version")
        .fetch_all(&db.pool)
        .await
        .expect("migrations table")
}

#[tokio::test]
async fn a_database_migrated_before_the_rewrite_is_adopted_and_keeps_its_rows() {
    let db = TestDb::create().await.expect("db");
    let current = recorded(&db).await;
    // The same schema as a database migrated then: what sqlx recorded is what differs.
    for (version, sql) in EARLIER {
        sqlx::query("UPDATE _sqlx_migrations SET checksum = $2 WHERE version = $1")
            .bind(version)
            .bind(checksum(sql))
            .execute(&db.pool)
            .await
            .expect("record the earlier text");
    }
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(RM_MEMBERS)
        .execute(&db.pool)
        .await
        .expect("forget rm_members");
    sqlx::query(
        "INSERT INTO member_counts (community_id, member_count) VALUES (gen_random_uuid(), 3)",
    )
    .execute(&db.pool)
    .await
    .expect("a read-model row");

    // Without the adoption sqlx refuses the database. On a connection of its own: sqlx keeps
    // its migration lock when it fails, and the session must end to let it go.
    let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    let refused = MIGRATOR.run(&mut conn).await;
    conn.close().await.expect("close");
    assert!(
        matches!(refused, Err(sqlx::migrate::MigrateError::VersionMismatch(v)) if v == 20261122000001),
        "{refused:?}"
    );

    rookery_store::migrate(&db.pool).await.expect("adopted");
    assert_eq!(
        recorded(&db).await,
        current,
        "checksums as a fresh database has them"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM member_counts")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(rows, 1, "the read model's rows are kept");
    // And again: nothing left to adopt or run.
    rookery_store::migrate(&db.pool).await.expect("idempotent");
    assert_eq!(recorded(&db).await, current);
}
