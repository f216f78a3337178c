use axum::http::{Method, StatusCode};

use crate::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_checks_postgres_and_migrations() {
    let app = App::new().await;
    let r = app.call(Method::GET, "/ready", None, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["checks"]["migrations"], "ok");
    sqlx::query(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)",
    )
    .execute(&app.db.pool)
    .await
    .expect("forget a migration");
    let r = app.call(Method::GET, "/ready", None, None).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(field(&r.body), "migrations");
}
