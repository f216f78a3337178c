//! Configuration from the environment. Every variable has a default that works on a machine with
//! Postgres on localhost:5432 and NATS on localhost:4222; the README documents each one.

use anyhow::{bail, Context};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Config {
    /// `DATABASE_URL`; the database is created when missing.
    pub database_url: String,
    /// `ROOKERY_DB_MAX_CONNECTIONS`.
    pub db_max_connections: u32,
    /// `NATS_URL`.
    pub nats_url: String,
    /// `ROOKERY_HTTP_ADDR`.
    pub http_addr: SocketAddr,
    /// `ROOKERY_STREAM`: the JetStream stream name.
    pub stream: String,
    /// `ROOKERY_SUBJECT_PREFIX`: first subject token of every event message.
    pub subject_prefix: String,
    /// `ROOKERY_PARTITIONS`: bus partitions (one active puller each per projection).
    pub partitions: u32,
    /// `ROOKERY_JWT_SECRET`: HS256 secret; generated and stored in the database when unset.
    pub jwt_secret: Option<String>,
    /// `ROOKERY_READ_WAIT_MS`: how long a query with `min_position` waits for the read model.
    pub read_wait: Duration,
    /// `ROOKERY_ACK_WAIT_SECS`: JetStream ack wait for projection consumers.
    pub ack_wait: Duration,
    /// `ROOKERY_BATCH_INTERVAL_MS`: under load, a projection partition starts a batch at most
    /// this often and takes everything that arrived meanwhile (0: a batch per fetch).
    pub batch_interval: Duration,
    /// `ROOKERY_RELAXED_BATCH_INTERVAL_MS`: the same for read models whose rows are read as
    /// they stand rather than watched change (reputation).
    pub relaxed_batch_interval: Duration,
    /// `ROOKERY_RELAY_INTERVAL_MS`: the same for the relay's reads of the log.
    pub relay_interval: Duration,
    /// `ROOKERY_PIPELINE_NICE` (0–19): in `up`, how many nice steps the relay's and projection
    /// workers' threads run below the API's, so requests come first when the cores are busy
    /// (Linux).
    pub pipeline_nice: i32,
    /// Whether `DATABASE_URL` / `NATS_URL` were set: an explicit URL is never replaced by a
    /// private server.
    pub database_url_explicit: bool,
    pub nats_url_explicit: bool,
    /// `ROOKERY_DATA_DIR`: where private servers keep their data (default `./.rookery`).
    pub data_dir: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: "postgres://localhost:5432/rookery".into(),
            db_max_connections: 16,
            nats_url: "nats://127.0.0.1:4222".into(),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            stream: "rookery".into(),
            subject_prefix: "rookery".into(),
            partitions: rookery_nats::BusConfig::DEFAULT_PARTITIONS,
            jwt_secret: None,
            read_wait: Duration::from_secs(5),
            ack_wait: Duration::from_secs(30),
            batch_interval: rookery_projections::WorkerConfig::default().min_batch_interval,
            relaxed_batch_interval: rookery_projections::WorkerConfig::default()
                .relaxed_batch_interval,
            relay_interval: rookery_nats::RelayConfig::default().min_read_interval,
            pipeline_nice: 10,
            database_url_explicit: false,
            nats_url_explicit: false,
            data_dir: PathBuf::from(".rookery"),
        }
    }
}

impl Config {
    /// Reads the environment over the defaults; a malformed value is an error naming the variable.
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let mut c = Config::default();
        let set = |key: &str| get(key).filter(|v| !v.trim().is_empty());
        // The built-in defaults can be moved (tests point them at closed ports); unlike the
        // explicit variables below they may still be replaced by private servers.
        if let Some(v) = set("ROOKERY_DEFAULT_DATABASE_URL") {
            c.database_url = v;
        }
        if let Some(v) = set("ROOKERY_DEFAULT_NATS_URL") {
            c.nats_url = v;
        }
        if let Some(v) = set("DATABASE_URL") {
            c.database_url = v;
            c.database_url_explicit = true;
        }
        if let Some(v) = set("NATS_URL") {
            c.nats_url = v;
            c.nats_url_explicit = true;
        }
        if let Some(v) = set("ROOKERY_DATA_DIR") {
            c.data_dir = PathBuf::from(v);
        }
        if let Some(v) = set("ROOKERY_HTTP_ADDR") {
            c.http_addr = v.parse().with_context(|| {
                format!("ROOKERY_HTTP_ADDR `{v}` is not a socket address like 127.0.0.1:8080")
            })?;
        }
        if let Some(v) = set("ROOKERY_STREAM") {
            c.stream = v;
        }
        if let Some(v) = set("ROOKERY_SUBJECT_PREFIX") {
            c.subject_prefix = v;
        }
        if let Some(v) = set("ROOKERY_PARTITIONS") {
            c.partitions = parse_num("ROOKERY_PARTITIONS", &v)?;
        }
        if let Some(v) = set("ROOKERY_DB_MAX_CONNECTIONS") {
            c.db_max_connections = parse_num("ROOKERY_DB_MAX_CONNECTIONS", &v)?;
        }
        if let Some(v) = set("ROOKERY_READ_WAIT_MS") {
            c.read_wait = Duration::from_millis(parse_num("ROOKERY_READ_WAIT_MS", &v)?);
        }
        if let Some(v) = set("ROOKERY_ACK_WAIT_SECS") {
            c.ack_wait = Duration::from_secs(parse_num("ROOKERY_ACK_WAIT_SECS", &v)?);
        }
        if let Some(v) = set("ROOKERY_BATCH_INTERVAL_MS") {
            c.batch_interval = Duration::from_millis(parse_num("ROOKERY_BATCH_INTERVAL_MS", &v)?);
        }
        if let Some(v) = set("ROOKERY_RELAXED_BATCH_INTERVAL_MS") {
            c.relaxed_batch_interval =
                Duration::from_millis(parse_num("ROOKERY_RELAXED_BATCH_INTERVAL_MS", &v)?);
        }
        if let Some(v) = set("ROOKERY_RELAY_INTERVAL_MS") {
            c.relay_interval = Duration::from_millis(parse_num("ROOKERY_RELAY_INTERVAL_MS", &v)?);
        }
        if let Some(v) = set("ROOKERY_PIPELINE_NICE") {
            c.pipeline_nice = parse_num("ROOKERY_PIPELINE_NICE", &v)?;
        }
        c.jwt_secret = set("ROOKERY_JWT_SECRET");
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let token_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        };
        if !token_ok(&self.stream) {
            bail!(
                "ROOKERY_STREAM `{}` must be letters, digits, '-' or '_'",
                self.stream
            );
        }
        if !token_ok(&self.subject_prefix) {
            bail!(
                "ROOKERY_SUBJECT_PREFIX `{}` must be letters, digits, '-' or '_'",
                self.subject_prefix
            );
        }
        if !(1..=256).contains(&self.partitions) {
            bail!(
                "ROOKERY_PARTITIONS must be between 1 and 256, not {}",
                self.partitions
            );
        }
        if !(0..=19).contains(&self.pipeline_nice) {
            bail!(
                "ROOKERY_PIPELINE_NICE must be between 0 and 19, not {}",
                self.pipeline_nice
            );
        }
        if let Some(secret) = &self.jwt_secret {
            if secret.len() < 32 {
                bail!("ROOKERY_JWT_SECRET must be at least 32 characters");
            }
        }
        Ok(())
    }
}

fn parse_num<T: std::str::FromStr>(key: &str, value: &str) -> anyhow::Result<T> {
    value
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("{key} `{value}` is not a valid number"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> anyhow::Result<Config> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_need_no_environment() {
        let c = from(&[]).expect("defaults are valid");
        assert_eq!(c.database_url, "postgres://localhost:5432/rookery");
        assert_eq!(c.nats_url, "nats://127.0.0.1:4222");
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8080");
        assert!(c.jwt_secret.is_none());
    }

    #[test]
    fn malformed_values_name_their_variable() {
        let err = from(&[("ROOKERY_HTTP_ADDR", "nope")]).expect_err("bad addr");
        assert!(err.to_string().contains("ROOKERY_HTTP_ADDR"));
        let err = from(&[("ROOKERY_PARTITIONS", "0")]).expect_err("zero partitions");
        assert!(err.to_string().contains("ROOKERY_PARTITIONS"));
        let err = from(&[("ROOKERY_STREAM", "a.b")]).expect_err("dotted stream");
        assert!(err.to_string().contains("ROOKERY_STREAM"));
        let err = from(&[("ROOKERY_JWT_SECRET", "short")]).expect_err("short secret");
        assert!(err.to_string().contains("ROOKERY_JWT_SECRET"));
        let err = from(&[("ROOKERY_PIPELINE_NICE", "20")]).expect_err("nice above 19");
        assert!(err.to_string().contains("ROOKERY_PIPELINE_NICE"));
        let err = from(&[("ROOKERY_PIPELINE_NICE", "-5")]).expect_err("negative nice");
        assert!(err.to_string().contains("ROOKERY_PIPELINE_NICE"));
        for key in [
            "ROOKERY_BATCH_INTERVAL_MS",
            "ROOKERY_RELAXED_BATCH_INTERVAL_MS",
            "ROOKERY_RELAY_INTERVAL_MS",
        ] {
            let err = from(&[(key, "10ms")]).expect_err("unit in a number");
            assert!(err.to_string().contains(key));
        }
    }

    /// Every variable the configuration reads is in `.env.sample` and the README, and the
    /// sample's values are the defaults it says they are.
    #[test]
    fn every_variable_is_documented_with_its_default() {
        let read = std::cell::RefCell::new(Vec::new());
        Config::from_lookup(|k| {
            read.borrow_mut().push(k.to_string());
            None
        })
        .expect("defaults");
        let sample = include_str!("../../../.env.sample");
        let readme = include_str!("../../../README.md");
        let internal = ["ROOKERY_DEFAULT_DATABASE_URL", "ROOKERY_DEFAULT_NATS_URL"];
        for key in read
            .borrow()
            .iter()
            .filter(|k| !internal.contains(&k.as_str()))
        {
            assert!(
                sample.contains(&format!("{key}=")),
                "{key} missing from .env.sample"
            );
            assert!(
                readme.contains(&format!("`{key}`")),
                "{key} missing from the README"
            );
        }
        let values: HashMap<&str, &str> = sample
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .collect();
        let mut from_sample =
            Config::from_lookup(|k| values.get(k).map(|v| v.to_string())).expect("sample");
        from_sample.database_url_explicit = false;
        from_sample.nats_url_explicit = false;
        assert_eq!(
            format!("{from_sample:?}"),
            format!("{:?}", Config::default()),
            ".env.sample shows other values than the defaults"
        );
    }

    #[test]
    fn batching_defaults_and_overrides() {
        let c = from(&[]).expect("defaults");
        assert_eq!(c.partitions, 1);
        assert_eq!(c.batch_interval, Duration::from_millis(3));
        assert_eq!(c.relaxed_batch_interval, Duration::from_millis(25));
        assert_eq!(c.relay_interval, Duration::from_millis(1));
        assert_eq!(c.pipeline_nice, 10);
        let c = from(&[
            ("ROOKERY_BATCH_INTERVAL_MS", "0"),
            ("ROOKERY_RELAXED_BATCH_INTERVAL_MS", "100"),
            ("ROOKERY_RELAY_INTERVAL_MS", "25"),
            ("ROOKERY_PIPELINE_NICE", "0"),
        ])
        .expect("intervals");
        assert_eq!(c.batch_interval, Duration::ZERO);
        assert_eq!(c.relaxed_batch_interval, Duration::from_millis(100));
        assert_eq!(c.relay_interval, Duration::from_millis(25));
        assert_eq!(c.pipeline_nice, 0);
    }
}
