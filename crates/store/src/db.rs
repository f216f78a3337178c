//! Connecting to Postgres and running the embedded migrations.

use anyhow::Context;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection, PgPool};
use std::str::FromStr;
use std::time::Duration;

/// The one migration set (`migrations/` at the workspace root), embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

#[derive(Clone, Debug)]
pub struct DbConfig {
    pub url: String,
    pub max_connections: u32,
    /// Create the database named in `url` when it does not exist.
    pub create_if_missing: bool,
}

impl DbConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: 16,
            create_if_missing: true,
        }
    }
}

/// Opens a pool on `config.url`, creating the database first when it is missing.
pub async fn connect(config: &DbConfig) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(&config.url)
        .with_context(|| {
            format!(
                "DATABASE_URL `{}` is not a valid Postgres URL",
                redact(&config.url)
            )
        })?
        .log_statements(tracing::log::LevelFilter::Trace);
    let options = if plaintext_on_loopback(&config.url, std::env::var_os("PGSSLMODE").is_some()) {
        options.ssl_mode(PgSslMode::Disable)
    } else {
        options
    };
    if config.create_if_missing {
        ensure_database(&options).await?;
    }
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .with_context(|| format!("connecting to Postgres at {}", redact(&config.url)))
}

/// Whether to connect without TLS where nobody asked for a mode: TLS to a loopback address
/// protects nothing and costs every round trip an encryption at both ends (commands/s rose by a
/// third without it on the bench machine, whose Postgres has `ssl = on`). An `sslmode` in the URL or
/// `PGSSLMODE` is always obeyed; other hosts keep the default (`prefer`).
fn plaintext_on_loopback(url: &str, sslmode_in_env: bool) -> bool {
    let Ok(url) = url::Url::parse(url) else {
        return false;
    };
    if sslmode_in_env || url.query_pairs().any(|(k, _)| k == "sslmode") {
        return false;
    }
    match url.host() {
        // `postgres:` is not a special scheme, so its IPv4 hosts arrive as opaque names.
        Some(url::Host::Domain(name)) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

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
    match MIGRATOR.run(pool).await {
        Ok(()) => Ok(()),
        Err(sqlx::migrate::MigrateError::VersionMissing(v)) => Err(NewerSchema(v).into()),
        Err(e) => Err(anyhow::Error::new(e).context("running database migrations")),
    }
}

async fn ensure_database(options: &PgConnectOptions) -> anyhow::Result<()> {
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    let admin = options.clone().database("postgres");
    let mut conn = match sqlx::PgConnection::connect_with(&admin).await {
        Ok(conn) => conn,
        // No maintenance database to talk to: let the real connection report what is wrong.
        Err(_) => return Ok(()),
    };
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await
            .context("checking whether the database exists")?;
    if !exists {
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        match sqlx::query(&sql).execute(&mut conn).await {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another process created it first.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e).with_context(|| format!("creating database `{name}`")),
        }
    }
    conn.close().await.ok();
    Ok(())
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::plaintext_on_loopback;

    #[test]
    fn loopback_urls_without_a_mode_connect_in_plaintext() {
        for url in [
            "postgres://postgres@127.0.0.1:5432/rookery",
            "postgres://localhost/rookery",
            "postgres://u:p@[::1]:5433/db",
        ] {
            assert!(plaintext_on_loopback(url, false), "{url}");
        }
    }

    #[test]
    fn a_chosen_mode_or_another_host_keeps_the_default() {
        assert!(!plaintext_on_loopback(
            "postgres://127.0.0.1/rookery?sslmode=require",
            false
        ));
        assert!(!plaintext_on_loopback("postgres://127.0.0.1/rookery", true));
        assert!(!plaintext_on_loopback(
            "postgres://db.internal/rookery",
            false
        ));
        assert!(!plaintext_on_loopback("postgres://10.0.0.5/rookery", false));
        assert!(!plaintext_on_loopback("not a url", false));
    }
}
