//! Connecting to Postgres (creating the database when missing) and keeping a connection between
//! uses ([`KeptConn`]).

use anyhow::Context;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgDatabaseError, PgPoolOptions, PgSeverity, PgSslMode};
use sqlx::{ConnectOptions, Connection, PgPool, Postgres};
use std::str::FromStr;
use std::time::{Duration, Instant};

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

/// A kept connection idle at least this long is checked with a round trip before its next use.
const CHECK_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// One connection kept from one use to the next, for a loop that needs one at a time (a group
/// committer, the relay's reader, a projection partition).
///
/// Taking a connection from the pool for every statement costs two round trips more than the
/// statement: sqlx checks a connection when it is acquired and again when it is released. On
/// the pipeline those checks were more than half of all round trips. A kept connection is
/// checked only after a second or more of idleness, when a broken one is likeliest; one handed
/// back after an error that is not the database refusing a statement (or that ends the session)
/// is closed instead.
///
/// A use that is cancelled or fails with `?` simply drops the connection it took: the pool's own
/// release check then recovers or closes it, and the next [`take`](Self::take) acquires another.
#[derive(Debug)]
pub struct KeptConn {
    pool: PgPool,
    held: Option<PoolConnection<Postgres>>,
    kept_at: Instant,
    check_if_idle_for: Duration,
    /// The pool is shared with others: a connection is not kept while others wait for one.
    shared: bool,
}

impl KeptConn {
    /// For a pool that exists for this holder and its like alone (every holder keeps one).
    pub fn dedicated(pool: PgPool) -> Self {
        Self::new(pool, false)
    }

    /// For a pool others use too: a connection is kept only while the pool has another to spare
    /// (one idle, or room to open one), so holders never starve the others.
    pub fn shared(pool: PgPool) -> Self {
        Self::new(pool, true)
    }

    fn new(pool: PgPool, shared: bool) -> Self {
        Self {
            pool,
            held: None,
            kept_at: Instant::now(),
            check_if_idle_for: CHECK_IF_IDLE_FOR,
            shared,
        }
    }

    /// Checks the kept connection before a use that follows `idle` or more of idleness (one
    /// second unless set).
    pub fn check_if_idle_for(mut self, idle: Duration) -> Self {
        self.check_if_idle_for = idle;
        self
    }

    /// The kept connection (checked first if it has been idle a while), or one from the pool.
    pub async fn take(&mut self) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        if let Some(mut conn) = self.held.take() {
            if self.kept_at.elapsed() < self.check_if_idle_for || conn.ping().await.is_ok() {
                return Ok(conn);
            }
            conn.close_on_drop();
        }
        self.pool.acquire().await
    }

    /// Hands `conn` back after a use that ended with `error` (if any), to be kept for the next.
    pub fn give_back(&mut self, mut conn: PoolConnection<Postgres>, error: Option<&sqlx::Error>) {
        if error.is_some_and(ends_the_session) {
            // The connection may be broken or mid-protocol: never reuse it.
            conn.close_on_drop();
            return;
        }
        if self.shared && self.pool_exhausted() {
            return;
        }
        self.held = Some(conn);
        self.kept_at = Instant::now();
    }

    /// Gives the kept connection back to the pool (a holder about to idle).
    pub fn release(&mut self) {
        self.held = None;
    }

    /// Whether a connection is kept.
    pub fn is_kept(&self) -> bool {
        self.held.is_some()
    }

    fn pool_exhausted(&self) -> bool {
        self.pool.num_idle() == 0 && self.pool.size() >= self.pool.options().get_max_connections()
    }
}

/// Whether `error` may have left its connection unusable: anything but the database refusing a
/// statement, and a refusal that ends the session (a `FATAL` such as the server terminating the
/// backend, which the client reads at its next statement).
fn ends_the_session(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(e) => e
            .try_downcast_ref::<PgDatabaseError>()
            .is_some_and(|e| matches!(e.severity(), PgSeverity::Fatal | PgSeverity::Panic)),
        _ => true,
    }
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
