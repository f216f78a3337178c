//! Projection batches commit without waiting for their WAL flush (`synchronous_commit = off`).
//! A Postgres crash can then lose the last batches after their deliveries were acked; the
//! worker must notice (the checkpoint is behind what it committed) and replay them, or those
//! events would be missing from the read model for good (guarantee 1 in docs/architecture.md).

use reqwest::{Method, StatusCode};
use rookery_projections::by_name;
use rookery_tests::{spawn_app, TestApp, TestUser};
use serde_json::{json, Value};
use uuid::Uuid;

async fn join(app: &TestApp, community: Uuid, user: &TestUser) -> String {
    let (status, body) = app
        .send(
            Method::POST,
            &format!("/v1/communities/{community}/members"),
            Some(&user.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["position"].as_str().expect("position").to_string()
}

async fn members(app: &TestApp, community: Uuid, owner: &TestUser, position: &str) -> Vec<Value> {
    let (status, page) = app
        .send(
            Method::GET,
            &format!("/v1/communities/{community}/members?limit=200&min_position={position}"),
            Some(&owner.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["items"].as_array().expect("items").clone()
}

#[tokio::test]
async fn commits_postgres_lost_after_the_ack_are_replayed() {
    let app = spawn_app().await;
    let pool = &app.db.pool;
    let owner = app.user("owner").await;
    let (community, _) = app.community(&owner, "lost-commits", true).await;
    let mut users = Vec::new();
    for i in 0..11 {
        users.push(app.user(&format!("member{i}")).await);
    }

    let mut position = String::new();
    for user in &users[..5] {
        position = join(&app, community, user).await;
    }
    assert_eq!(members(&app, community, &owner, &position).await.len(), 6);

    // What Postgres will still have after the "crash": the read model and checkpoints as of now.
    let tables = by_name("members").expect("members projection").tables();
    for table in tables {
        sqlx::query(&format!(
            "CREATE TABLE snap_{table} AS SELECT * FROM {table}"
        ))
        .execute(pool)
        .await
        .unwrap();
    }
    sqlx::query(
        "CREATE TABLE snap_checkpoints AS
         SELECT * FROM projection_checkpoints WHERE projection = 'members'",
    )
    .execute(pool)
    .await
    .unwrap();

    for user in &users[5..10] {
        position = join(&app, community, user).await;
    }
    assert_eq!(members(&app, community, &owner, &position).await.len(), 11);

    // The crash: every batch committed since the snapshot is gone, its deliveries long acked.
    let mut tx = pool.begin().await.unwrap();
    for table in tables {
        let restore =
            format!("DELETE FROM {table}; INSERT INTO {table} SELECT * FROM snap_{table}");
        sqlx::raw_sql(&restore).execute(&mut *tx).await.unwrap();
    }
    sqlx::raw_sql(
        "DELETE FROM projection_checkpoints WHERE projection = 'members';
         INSERT INTO projection_checkpoints SELECT * FROM snap_checkpoints",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();

    // One more join; reading at its position must show everyone, the lost five included.
    let last = join(&app, community, &users[10]).await;
    let listed = members(&app, community, &owner, &last).await;
    let mut ids: Vec<String> = listed
        .iter()
        .map(|m| m["user_id"].as_str().unwrap_or_default().to_string())
        .collect();
    ids.sort();
    let mut expected: Vec<String> = users
        .iter()
        .chain(std::iter::once(&owner))
        .map(|u| u.id.to_string())
        .collect();
    expected.sort();
    assert_eq!(ids, expected, "every member is back after the lost commits");
    app.stop().await.unwrap();
}
