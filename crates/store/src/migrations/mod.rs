//! The one migration set (`migrations/` at the workspace root), embedded in the binary, and
//! running it.
//!
//! # Layout
//! - this module: [`MIGRATOR`], [`migrate`], [`NewerSchema`].
//! - `rewritten`: databases migrated before some migration files were rewritten are adopted.

mod rewritten;

use sqlx::migrate::Migrator;
use sqlx::PgPool;

/// The one migration set (`migrations/` at the workspace root), embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// The database holds a migration this binary does not know: a newer Rookery migrated it.
#[derive(Debug, thiserror::Error)]
#[error(
    "the database was migrated by a newer version of Rookery (migration {0} is unknown to this \
     binary); run that version, or point DATABASE_URL at another database"
)]
pub struct NewerSchema(pub i64);

/// Runs pending migrations (idempotent; safe with several processes starting at once, sqlx
/// serialises them with an advisory lock).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    rewritten::adopt(pool).await?;
    match MIGRATOR.run(pool).await {
        Ok(()) => Ok(()),
        Err(sqlx::migrate::MigrateError::VersionMissing(v)) => Err(NewerSchema(v).into()),
        Err(e) => Err(anyhow::Error::new(e).context("running database migrations")),
    }
}
