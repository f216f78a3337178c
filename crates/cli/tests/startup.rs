//! The `rookery` binary as a newcomer meets it: private servers when nothing runs, and one clear
//! line with a documented exit code for each start-up failure.
#![allow(clippy::unwrap_used)]

use rookery_store::testing::TestDb;
use rookery_tests::free_port;
use serde_json::{json, Value};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_rookery");

fn nats_url() -> String {
    rookery_store::testing::nats_url()
}

/// `rookery` with a clean environment: only what the test sets (plus PATH and HOME).
fn rookery(args: &[&str], env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_clear().env("RUST_LOG", "warn");
    for key in ["PATH", "HOME"] {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null());
    cmd
}

fn run(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut child = rookery(args, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Every start-up error must end the process promptly, not hang.
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("rookery {args:?} did not exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// Asserts the failure is exactly one `error: …` line containing `needle`, with exit `code`.
fn assert_one_line_error(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit code; stderr:\n{stderr}"
    );
    assert_eq!(lines.len(), 1, "one line expected, got:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        lines[0].contains(needle),
        "`{needle}` missing from: {stderr}"
    );
    assert!(!stderr.contains("stack backtrace"), "{stderr}");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Stops a child with SIGTERM (graceful) and returns its exit code.
fn terminate(mut child: Child) -> Option<i32> {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn wait_ready(base: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = reqwest::get(format!("{base}/ready")).await {
            if r.status().is_success() {
                return;
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("rookery exited early: {status}");
        }
        assert!(Instant::now() < deadline, "rookery never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn post(base: &str, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    let mut rb = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(&body);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Removes a data directory (owned partly by the postgres user) when dropped.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir() -> TempDir {
    let dir =
        std::env::temp_dir().join(format!("rookery-startup-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

fn port_answers(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn read_port(dir: &Path, name: &str) -> u16 {
    std::fs::read_to_string(dir.join(name))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn up_starts_private_servers_when_nothing_answers_and_reuses_their_data() {
    let data = temp_dir();
    let http = free_port();
    let base = format!("http://127.0.0.1:{http}");
    // The built-in defaults point at closed ports, as on a machine where nothing runs.
    let env = vec![
        (
            "ROOKERY_DEFAULT_DATABASE_URL",
            format!("postgres://127.0.0.1:{}/rookery", free_port()),
        ),
        (
            "ROOKERY_DEFAULT_NATS_URL",
            format!("nats://127.0.0.1:{}", free_port()),
        ),
        ("ROOKERY_DATA_DIR", data.0.display().to_string()),
        ("ROOKERY_HTTP_ADDR", format!("127.0.0.1:{http}")),
        ("RUST_LOG", "info".to_string()),
    ];
    let rt = rt();

    let mut first = rookery(&["up"], &env)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    rt.block_on(wait_ready(&base, &mut first));
    let (pg_port, nats_port) = (
        read_port(&data.0, "postgres.port"),
        read_port(&data.0, "nats.port"),
    );
    let community = rt.block_on(async {
        let (s, _) = post(&base, "/v1/auth/register", None,
            json!({"email": "first@example.com", "username": "first", "password": "correct horse battery"})).await;
        assert_eq!(s, 201);
        let (s, login) = post(&base, "/v1/auth/login", None,
            json!({"email": "first@example.com", "password": "correct horse battery"})).await;
        assert_eq!(s, 200);
        let token = login["access_token"].as_str().unwrap().to_string();
        let (s, c) = post(&base, "/v1/communities", Some(&token), json!({"name": "kept-across-restarts",
            "display_name": "Kept", "platform": "kick", "is_public": true, "join_mode": "open"})).await;
        assert_eq!(s, 201, "{c}");
        c["id"].as_str().unwrap().to_string()
    });
    assert_eq!(terminate(first), Some(0), "graceful exit on SIGTERM");
    assert!(
        !port_answers(pg_port),
        "private Postgres stopped with rookery"
    );
    assert!(
        !port_answers(nats_port),
        "private NATS stopped with rookery"
    );

    // Second start: same data, the community is still there.
    let mut second = rookery(&["up"], &env)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    rt.block_on(async {
        wait_ready(&base, &mut second).await;
        let (s, login) = post(
            &base,
            "/v1/auth/login",
            None,
            json!({"email": "first@example.com", "password": "correct horse battery"}),
        )
        .await;
        assert_eq!(s, 200, "{login}");
        let token = login["access_token"].as_str().unwrap();
        let r = reqwest::Client::new()
            .get(format!("{base}/v1/communities/{community}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let c: Value = r.json().await.unwrap();
        assert_eq!(c["name"], "kept-across-restarts");
    });
    assert_eq!(terminate(second), Some(0));
}

#[test]
fn an_explicit_url_that_nothing_answers_is_a_clear_error_not_a_private_server() {
    let data = temp_dir();
    let out = run(
        &["up"],
        &[
            (
                "DATABASE_URL",
                format!("postgres://127.0.0.1:{}/rookery", free_port()),
            ),
            ("NATS_URL", nats_url()),
            ("ROOKERY_DATA_DIR", data.0.display().to_string()),
        ],
    );
    assert_one_line_error(&out, 4, "nothing answers at DATABASE_URL");
    assert!(
        !data.0.join("postgres").exists(),
        "no private server for an explicit URL"
    );
}

#[test]
fn port_in_use_is_one_line_with_exit_code_6() {
    let rt = rt();
    let db = rt.block_on(TestDb::create()).unwrap();
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let stream = format!("startup_{}", uuid::Uuid::new_v4().simple());
    let out = run(
        &["serve"],
        &[
            ("DATABASE_URL", db.url.clone()),
            ("NATS_URL", nats_url()),
            ("ROOKERY_HTTP_ADDR", addr),
            ("ROOKERY_STREAM", stream.clone()),
            ("ROOKERY_SUBJECT_PREFIX", stream.clone()),
        ],
    );
    assert_one_line_error(&out, 6, "ROOKERY_HTTP_ADDR");
    drop(db);
}

#[test]
fn jetstream_disabled_is_one_line_with_exit_code_5() {
    let rt = rt();
    let db = rt.block_on(TestDb::create()).unwrap();
    let port = free_port();
    let mut nats = Command::new(nats_server())
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !port_answers(port) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = run(
        &["serve"],
        &[
            ("DATABASE_URL", db.url.clone()),
            ("NATS_URL", format!("nats://127.0.0.1:{port}")),
            ("ROOKERY_HTTP_ADDR", format!("127.0.0.1:{}", free_port())),
        ],
    );
    let _ = nats.kill();
    let _ = nats.wait();
    assert_one_line_error(&out, 5, "JetStream is not enabled");
    drop(db);
}

fn nats_server() -> PathBuf {
    [
        "/usr/sbin/nats-server",
        "/usr/local/bin/nats-server",
        "/usr/bin/nats-server",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .unwrap_or_else(|| PathBuf::from("nats-server"))
}

#[test]
fn a_database_from_a_newer_version_is_one_line_with_exit_code_7() {
    let rt = rt();
    let db = rt.block_on(TestDb::create()).unwrap();
    rt.block_on(async {
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (99990101000000, 'from the future', true, '\\x00', 1)",
        )
        .execute(&db.pool)
        .await
        .unwrap();
    });
    let out = run(&["migrate"], &[("DATABASE_URL", db.url.clone())]);
    assert_one_line_error(&out, 7, "newer version of Rookery");
    drop(db);
}

#[test]
fn a_bad_setting_is_one_line_with_exit_code_3() {
    let out = run(&["migrate"], &[("ROOKERY_PARTITIONS", "lots".to_string())]);
    assert_one_line_error(&out, 3, "ROOKERY_PARTITIONS");
}

#[test]
fn help_explains_every_command_with_an_example() {
    for cmd in [
        vec!["--help"],
        vec!["up", "--help"],
        vec!["doctor", "--help"],
        vec!["projections", "rebuild", "--help"],
    ] {
        let out = run(&cmd, &[]);
        assert_eq!(out.status.code(), Some(0));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Example") || text.contains("example"),
            "{cmd:?}:\n{text}"
        );
    }
}

#[test]
fn doctor_reports_each_check_with_its_state() {
    let rt = rt();
    let db = rt.block_on(TestDb::create()).unwrap();
    let out = run(
        &["doctor"],
        &[("DATABASE_URL", db.url.clone()), ("NATS_URL", nats_url())],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for name in [
        "config",
        "postgres",
        "migrations",
        "clock",
        "nats",
        "jetstream",
        "stream",
    ] {
        assert!(
            stdout.lines().any(|l| l.contains(name)),
            "doctor lacks {name}:\n{stdout}"
        );
    }
    assert!(stdout.contains("ok  "), "{stdout}");
    assert_eq!(out.status.code(), Some(0), "{stdout}");

    let out = run(
        &["doctor"],
        &[
            ("DATABASE_URL", db.url.clone()),
            ("NATS_URL", format!("nats://127.0.0.1:{}", free_port())),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("fail") && l.contains("nats")),
        "{stdout}"
    );
    assert!(stdout.contains("fix:"), "{stdout}");
    assert_eq!(out.status.code(), Some(1));
    drop(db);
}

/// A private cluster that requires a password (the machine's own server trusts everyone).
struct PasswordPostgres {
    bin: PathBuf,
    dir: TempDir,
    port: u16,
}

impl PasswordPostgres {
    fn start() -> Self {
        let bin = rookery_app::embedded::find_postgres_bin().expect("PostgreSQL binaries");
        let dir = temp_dir();
        let data = dir.0.join("data");
        let pwfile = dir.0.join("pw");
        std::fs::write(&pwfile, "right-password\n").unwrap();
        let port = free_port();
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0"))
            .unwrap_or(false);
        if as_root {
            Command::new("chown")
                .arg("-R")
                .arg("postgres:")
                .arg(&dir.0)
                .status()
                .unwrap();
        }
        let pg = |tool: &str, args: &[&str]| {
            let mut c = if as_root {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
                c
            } else {
                Command::new(bin.join(tool))
            };
            let out = c.args(args).stdin(Stdio::null()).output().unwrap();
            assert!(
                out.status.success(),
                "{tool}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let data_s = data.display().to_string();
        pg(
            "initdb",
            &[
                "-D",
                &data_s,
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                "--pwfile",
                &pwfile.display().to_string(),
            ],
        );
        let opts = format!("-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''");
        pg(
            "pg_ctl",
            &[
                "-D",
                &data_s,
                "-o",
                &opts,
                "-l",
                &dir.0.join("log").display().to_string(),
                "-w",
                "start",
            ],
        );
        Self { bin, dir, port }
    }
}

impl Drop for PasswordPostgres {
    fn drop(&mut self) {
        let data = self.dir.0.join("data").display().to_string();
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
        let _ = Command::new(self.bin.join("pg_ctl"))
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
    }
}

#[test]
fn a_wrong_postgres_password_is_one_line_with_exit_code_4() {
    let pg = PasswordPostgres::start();
    let out = run(
        &["migrate"],
        &[(
            "DATABASE_URL",
            format!("postgres://postgres:wrong@127.0.0.1:{}/rookery", pg.port),
        )],
    );
    assert_one_line_error(&out, 4, "password authentication failed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains(":wrong@"),
        "the password is never printed: {stderr}"
    );
}
