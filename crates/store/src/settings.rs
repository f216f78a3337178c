//! Settings the system generates for itself and keeps in the database.

use sqlx::PgPool;

/// Returns the stored value of `key`, storing `generate()` first when absent. Safe when several
/// processes start at once: the first insert wins and everyone reads it.
pub async fn get_or_init(
    pool: &PgPool,
    key: &str,
    generate: impl FnOnce() -> String,
) -> Result<(String, bool), sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
    )
    .bind(key)
    .bind(generate())
    .execute(pool)
    .await?
    .rows_affected()
        == 1;
    let value: String = sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
        .bind(key)
        .fetch_one(pool)
        .await?;
    Ok((value, inserted))
}
