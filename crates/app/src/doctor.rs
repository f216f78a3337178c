//! `rookery doctor`: checks configuration, Postgres, NATS and the clock, and says how to fix what
//! is wrong. It only reads: it creates no database, stream or consumer.

use crate::config::Config;
use async_nats::jetstream;
use futures::TryStreamExt;
use rookery_nats::consumer::is_generation_of;
use rookery_store::db::redact;
use sqlx::Connection;
use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` so `{:<4}` aligns the columns.
        f.pad(match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
        })
    }
}

#[derive(Clone, Debug)]
pub struct Check {
    pub level: Level,
    pub name: &'static str,
    pub detail: String,
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            level: Level::Ok,
            name,
            detail: detail.into(),
            fix: None,
        }
    }
    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            level: Level::Warn,
            name,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            level: Level::Fail,
            name,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<4}  {:<12} {}", self.level, self.name, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n      {:<12} fix: {fix}", "")?;
        }
        Ok(())
    }
}

/// Runs every check; never fails itself (a failing dependency is a `fail` line).
pub async fn run(config: Result<Config, anyhow::Error>) -> Vec<Check> {
    let mut checks = Vec::new();
    let config = match config {
        Ok(c) => {
            checks.push(Check::ok("config", "environment parsed"));
            if c.jwt_secret.is_none() {
                checks.push(Check::warn(
                    "config",
                    "ROOKERY_JWT_SECRET is unset (a generated secret stored in the database is used)",
                    "set ROOKERY_JWT_SECRET to 32+ random characters in production",
                ));
            }
            c
        }
        Err(e) => {
            checks.push(Check::fail(
                "config",
                format!("{e:#}"),
                "correct the variable (see .env.sample)",
            ));
            return checks;
        }
    };
    checks.extend(postgres(&config).await);
    checks.extend(nats(&config).await);
    checks
}

async fn postgres(config: &Config) -> Vec<Check> {
    let url = redact(&config.database_url);
    let connect = tokio::time::timeout(
        Duration::from_secs(5),
        sqlx::PgConnection::connect(&config.database_url),
    )
    .await;
    let mut conn = match connect {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            return vec![Check::fail(
                "postgres",
                format!("cannot connect to {url}: {e}"),
                "start Postgres (`docker compose up -d postgres`) or correct DATABASE_URL; \
                 a missing database is created by `rookery migrate`",
            )]
        }
        Err(_) => {
            return vec![Check::fail(
                "postgres",
                format!("{url} did not answer within 5 s"),
                "check the host and port in DATABASE_URL",
            )]
        }
    };
    let mut checks = Vec::new();
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut conn)
        .await
        .unwrap_or_default();
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if major >= 14 {
        checks.push(Check::ok("postgres", format!("{url}, version {version}")));
    } else {
        checks.push(Check::fail(
            "postgres",
            format!("{url}, version {version}"),
            "Rookery needs PostgreSQL 14 or newer (xid8 and pg_current_snapshot)",
        ));
    }
    let applied: Result<Vec<(i64, bool)>, _> =
        sqlx::query_as("SELECT version, success FROM _sqlx_migrations")
            .fetch_all(&mut conn)
            .await;
    match applied {
        Err(_) => checks.push(Check::warn(
            "migrations",
            "no migrations applied yet",
            "run `rookery migrate` (or just `rookery up`, which migrates at start-up)",
        )),
        Ok(rows) => {
            let known: HashSet<i64> = rookery_store::MIGRATOR.iter().map(|m| m.version).collect();
            let newer: Vec<i64> = rows
                .iter()
                .map(|r| r.0)
                .filter(|v| !known.contains(v))
                .collect();
            let failed = rows.iter().any(|r| !r.1);
            let pending = known
                .len()
                .saturating_sub(rows.iter().filter(|r| known.contains(&r.0)).count());
            if !newer.is_empty() {
                checks.push(Check::fail(
                    "migrations",
                    format!("the database has migrations this binary does not know: {newer:?}"),
                    "run the newer rookery version that migrated this database",
                ));
            } else if failed {
                checks.push(Check::fail(
                    "migrations",
                    "a migration failed part-way",
                    "inspect _sqlx_migrations and the server log",
                ));
            } else if pending > 0 {
                checks.push(Check::warn(
                    "migrations",
                    format!("{pending} pending"),
                    "run `rookery migrate`",
                ));
            } else {
                checks.push(Check::ok(
                    "migrations",
                    format!("{} applied, none pending", rows.len()),
                ));
            }
        }
    }
    let skew: Option<f64> = sqlx::query_scalar("SELECT extract(epoch FROM now())::float8")
        .fetch_one(&mut conn)
        .await
        .ok()
        .map(|db_now: f64| {
            let local = chrono::Utc::now().timestamp_micros() as f64 / 1e6;
            (local - db_now).abs()
        });
    match skew {
        Some(s) if s > 2.0 => checks.push(Check::warn(
            "clock",
            format!("this machine and Postgres differ by {s:.1} s"),
            "sync both clocks with NTP (token expiry and event times depend on it)",
        )),
        Some(s) => checks.push(Check::ok("clock", format!("within {s:.3} s of Postgres"))),
        None => {}
    }
    let _ = conn.close().await;
    checks
}

async fn nats(config: &Config) -> Vec<Check> {
    let client = match tokio::time::timeout(
        Duration::from_secs(5),
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(3))
            .connect(config.nats_url.as_str()),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return vec![Check::fail(
                "nats",
                format!("cannot connect to {}: {e}", config.nats_url),
                "start NATS with JetStream (`nats-server -js` or `docker compose up -d nats`) or correct NATS_URL",
            )]
        }
        Err(_) => {
            return vec![Check::fail(
                "nats",
                format!("{} did not answer within 5 s", config.nats_url),
                "check the host and port in NATS_URL",
            )]
        }
    };
    let mut checks = Vec::new();
    let version = client.server_info().version;
    let parts: Vec<u32> = version.split('.').filter_map(|p| p.parse().ok()).collect();
    if parts.as_slice() >= [2, 9].as_slice() {
        checks.push(Check::ok(
            "nats",
            format!("{}, version {version}", config.nats_url),
        ));
    } else {
        checks.push(Check::fail(
            "nats",
            format!("{}, version {version}", config.nats_url),
            "Rookery needs nats-server 2.9 or newer",
        ));
    }
    if !client.server_info().jetstream {
        checks.push(Check::fail(
            "jetstream",
            "JetStream is not enabled",
            "start nats-server with -js (and a store directory: -sd DIR)",
        ));
        return checks;
    }
    checks.push(Check::ok("jetstream", "enabled"));
    let js = jetstream::new(client.clone());
    match js.get_stream(&config.stream).await {
        Ok(mut stream) => {
            let messages = stream.info().await.map(|i| i.state.messages).unwrap_or(0);
            checks.push(Check::ok(
                "stream",
                format!("{} ({messages} messages)", config.stream),
            ));
            let names: Vec<String> = stream
                .consumer_names()
                .try_collect()
                .await
                .unwrap_or_default();
            let missing: Vec<String> = rookery_projections::all()
                .iter()
                .flat_map(|p| {
                    (0..config.partitions)
                        .map(move |n| format!("{}_{}_p{n}", config.stream, p.name()))
                })
                .filter(|base| !names.iter().any(|n| is_generation_of(base, n)))
                .collect();
            if missing.is_empty() {
                checks.push(Check::ok("consumers", format!("{} present", names.len())));
            } else {
                checks.push(Check::warn(
                    "consumers",
                    format!("missing: {}", missing.join(", ")),
                    "start `rookery up` or `rookery work`; workers create their consumers",
                ));
            }
        }
        Err(_) => checks.push(Check::warn(
            "stream",
            format!("stream {} does not exist yet", config.stream),
            "start `rookery up` once; it creates the stream",
        )),
    }
    checks
}
