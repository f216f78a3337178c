//! The servers tests talk to: the machine's own when they answer (or the ones named by
//! `TEST_DATABASE_URL` / `NATS_URL`), else a private server started once per test process and
//! stopped by a watchdog when that process exits — so the test command also works on a machine
//! with the packages installed but no server running, and leaves nothing behind.

use crate::{answers, LocalServers};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const DEFAULT_NATS: &str = "nats://127.0.0.1:4222";

/// A Postgres server URL (database `postgres`) tests may create databases on.
pub fn test_postgres_url() -> String {
    static PRIVATE: OnceLock<String> = OnceLock::new();
    if let Ok(url) = std::env::var("TEST_DATABASE_URL") {
        return url;
    }
    if answers(DEFAULT_POSTGRES, 5432) {
        return DEFAULT_POSTGRES.to_string();
    }
    PRIVATE
        .get_or_init(|| private("postgres", |s, dir| s.start_postgres(dir, "postgres")))
        .clone()
}

/// A NATS (JetStream) URL for tests.
pub fn test_nats_url() -> String {
    static PRIVATE: OnceLock<String> = OnceLock::new();
    if let Ok(url) = std::env::var("NATS_URL") {
        return url;
    }
    if answers(DEFAULT_NATS, 4222) {
        return DEFAULT_NATS.to_string();
    }
    PRIVATE
        .get_or_init(|| private("nats", |s, dir| s.start_nats(dir)))
        .clone()
}

fn private(
    kind: &str,
    start: impl FnOnce(&mut LocalServers, &std::path::Path) -> anyhow::Result<String>,
) -> String {
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "rookery-test-{kind}-{}-{}",
        std::process::id(),
        nanos()
    ));
    let mut servers = LocalServers::default();
    let url = match start(&mut servers, &dir) {
        Ok(url) => url,
        // Tests cannot run without it: say exactly what is missing.
        Err(e) => panic!("no {kind} server for the tests: {e:#}"),
    };
    // Statics are never dropped, so the server is stopped by a watchdog that waits for this
    // process to exit, then removes its data.
    let pid = std::process::id();
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.2; done; {}; rm -rf '{}'",
        servers.stop_script(),
        dir.display()
    );
    let watchdog = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match watchdog {
        Ok(_) => servers.detach(),
        // Without a watchdog, stop the server now rather than leak it.
        Err(e) => panic!("cannot start the watchdog for the private {kind} server: {e}"),
    }
    url
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
