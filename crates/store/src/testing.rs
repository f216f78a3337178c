//! Test support (feature `testing`): a fresh, migrated database per test, dropped afterwards even
//! when the test panics, so tests run in parallel and leave nothing behind.

use crate::db::{connect, DbConfig};
use crate::migrations::migrate;
use sqlx::PgPool;

/// Base URL of the server tests create databases on: `TEST_DATABASE_URL`, else the local one,
/// else a private server for this test process (see `rookery-localdev`).
pub fn server_url() -> String {
    rookery_localdev::test_postgres_url()
}

/// The NATS URL tests use (`NATS_URL`, else the local one, else a private server).
pub fn nats_url() -> String {
    rookery_localdev::test_nats_url()
}

/// `server_url()` with the database name replaced.
pub fn database_url(name: &str) -> String {
    let base = server_url();
    match url::Url::parse(&base) {
        Ok(mut u) => {
            u.set_path(name);
            u.to_string()
        }
        Err(_) => base,
    }
}

/// A uniquely named database with all migrations applied.
pub struct TestDb {
    pub pool: PgPool,
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> anyhow::Result<Self> {
        let name = format!("rookery_test_{}", uuid::Uuid::new_v4().simple());
        let url = database_url(&name);
        let mut config = DbConfig::new(&url);
        config.max_connections = 8;
        let pool = connect(&config).await?;
        migrate(&pool).await?;
        Ok(Self { pool, name, url })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs in async contexts and during panics: use a thread with its own runtime. The
        // pool is not closed here: closing waits for connections that tasks on the (now blocked)
        // test runtime may hold; FORCE terminates them instead.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(admin) = sqlx::PgPool::connect(&server_url()).await else {
                    return;
                };
                let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                let _ = sqlx::query(&sql).execute(&admin).await;
                admin.close().await;
            });
        })
        .join();
    }
}
