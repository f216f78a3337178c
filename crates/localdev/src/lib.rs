//! Private Postgres and NATS servers for a machine that has the binaries but runs neither: used
//! by `rookery up` (data kept under a directory, reused on the next start) and by the test
//! harnesses (a throwaway server per test process, stopped when the process exits).
//!
//! PostgreSQL refuses to run as root, so as root its commands run as the `postgres` system user.
//!
//! # Layout
//! - [`LocalServers`]: start, reuse and stop private servers under a data directory.
//! - [`test_postgres_url`], [`test_nats_url`]: the servers tests use, private ones when nothing
//!   answers at the usual local addresses.

use anyhow::{bail, Context};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The private servers this process started (or found running from an earlier start).
#[derive(Debug, Default)]
pub struct LocalServers {
    postgres: Option<PrivatePostgres>,
    nats: Option<PrivateNats>,
}

#[derive(Debug)]
struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    as_postgres_user: bool,
}

#[derive(Debug)]
struct PrivateNats {
    child: std::process::Child,
}

/// Whether `url`'s host and port accept a TCP connection within a second.
pub fn answers(url: &str, default_port: u16) -> bool {
    let Ok(parsed) = url::Url::parse(url) else {
        return false;
    };
    let host = parsed.host_str().unwrap_or("localhost").to_string();
    let port = parsed.port().unwrap_or(default_port);
    let Ok(addrs) = (host.as_str(), port).to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
}

/// Directory with `initdb` and `pg_ctl`: PATH first, then the Debian/Ubuntu layout
/// `/usr/lib/postgresql/<version>/bin` (newest version first).
pub fn find_postgres_bin() -> Option<PathBuf> {
    if let Some(dir) = which("pg_ctl").and_then(|p| p.parent().map(Path::to_path_buf)) {
        if dir.join("initdb").exists() {
            return Some(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            (bin.join("pg_ctl").exists() && bin.join("initdb").exists()).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

pub fn find_nats_server() -> Option<PathBuf> {
    which("nats-server").or_else(|| {
        [
            "/usr/sbin/nats-server",
            "/usr/local/bin/nats-server",
            "/usr/bin/nats-server",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    })
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A free loopback port, preferring `preferred` (the one used last time).
fn free_port(preferred: Option<u16>) -> anyhow::Result<u16> {
    if let Some(p) = preferred {
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return Ok(p);
        }
    }
    let l = TcpListener::bind(("127.0.0.1", 0)).context("finding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

fn wait_for_port(port: u16, within: Duration) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn read_port(file: &Path) -> Option<u16> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// The message for a machine with neither a server nor the binaries to start one.
pub fn install_hint(what: &str) -> String {
    match what {
        "postgres" => "nothing answers at the default Postgres URL (localhost:5432) and no PostgreSQL \
             binaries are installed; start both servers with `docker compose up -d postgres nats`, \
             install them (Debian/Ubuntu: `sudo apt-get install postgresql nats-server`), or set \
             DATABASE_URL to a running server"
            .to_string(),
        _ => "nothing answers at the default NATS URL (localhost:4222) and no nats-server binary is \
             installed; start both servers with `docker compose up -d postgres nats`, install it \
             (Debian/Ubuntu: `sudo apt-get install nats-server`), or set NATS_URL to a running server"
            .to_string(),
    }
}

impl LocalServers {
    pub fn is_empty(&self) -> bool {
        self.postgres.is_none() && self.nats.is_none()
    }

    /// Starts (or reuses) a private Postgres under `data_dir/postgres`; returns its URL.
    pub fn start_postgres(&mut self, data_dir: &Path, database: &str) -> anyhow::Result<String> {
        let bin = find_postgres_bin().ok_or_else(|| anyhow::anyhow!(install_hint("postgres")))?;
        let data = data_dir.join("postgres");
        let port_file = data_dir.join("postgres.port");
        let as_postgres_user = is_root();
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let data = data
            .canonicalize()
            .with_context(|| format!("resolving {}", data.display()))?;
        if as_postgres_user {
            // The postgres user must own its data directory and reach it.
            run(
                Command::new("chown").arg("-R").arg("postgres:").arg(&data),
                "chown data dir",
            )?;
            let _ = Command::new("chmod").arg("0700").arg(&data).status();
        }
        let pg = PrivatePostgres {
            bin,
            data: data.clone(),
            as_postgres_user,
        };
        if !data.join("PG_VERSION").exists() {
            pg.run(
                "initdb",
                &[
                    "-D",
                    &path_str(&data)?,
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                ],
            )
            .context("initialising the private Postgres data directory")?;
        }
        let previous = read_port(&port_file);
        let running = previous.is_some_and(|p| {
            pg.run(
                "pg_ctl",
                &["-D", &path_str(&data).unwrap_or_default(), "status"],
            )
            .is_ok()
                && wait_for_port(p, Duration::from_millis(500))
        });
        let port = match (running, previous) {
            (true, Some(p)) => p,
            _ => {
                let port = free_port(previous)?;
                let options = format!(
                    "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
                );
                let log = data.join("server.log");
                pg.run(
                    "pg_ctl",
                    &[
                        "-D",
                        &path_str(&data)?,
                        "-o",
                        &options,
                        "-l",
                        &path_str(&log)?,
                        "-w",
                        "-t",
                        "60",
                        "start",
                    ],
                )
                .with_context(|| {
                    format!("starting the private Postgres (log: {})", log.display())
                })?;
                std::fs::write(&port_file, port.to_string())?;
                port
            }
        };
        self.postgres = Some(pg);
        Ok(format!("postgres://postgres@127.0.0.1:{port}/{database}"))
    }

    /// Starts a private nats-server with JetStream under `data_dir/nats`; returns its URL.
    pub fn start_nats(&mut self, data_dir: &Path) -> anyhow::Result<String> {
        let bin = find_nats_server().ok_or_else(|| anyhow::anyhow!(install_hint("nats")))?;
        let store = data_dir.join("nats");
        std::fs::create_dir_all(&store).with_context(|| format!("creating {}", store.display()))?;
        let port_file = data_dir.join("nats.port");
        let port = free_port(read_port(&port_file))?;
        let log = std::fs::File::create(data_dir.join("nats.log"))?;
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&store)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the private nats-server")?;
        self.nats = Some(PrivateNats { child });
        if !wait_for_port(port, Duration::from_secs(15)) {
            bail!(
                "the private nats-server did not start; see {}",
                data_dir.join("nats.log").display()
            );
        }
        std::fs::write(&port_file, port.to_string())?;
        Ok(format!("nats://127.0.0.1:{port}"))
    }

    /// Shell commands that stop these servers, for a watchdog that outlives this process.
    pub fn stop_script(&self) -> String {
        let mut script = Vec::new();
        if let Some(nats) = &self.nats {
            script.push(format!("kill -TERM {} 2>/dev/null", nats.child.id()));
        }
        if let Some(pg) = &self.postgres {
            let pg_ctl = pg.bin.join("pg_ctl");
            let prefix = if pg.as_postgres_user {
                "runuser -u postgres -- "
            } else {
                ""
            };
            script.push(format!(
                "{prefix}'{}' -D '{}' -m immediate -w stop >/dev/null 2>&1",
                pg_ctl.display(),
                pg.data.display()
            ));
        }
        script.join("; ")
    }

    /// Leaves the servers running (the caller arranged for them to be stopped).
    pub fn detach(mut self) {
        self.postgres = None;
        self.nats = None;
    }

    /// Stops what this process started.
    pub fn stop(&mut self) {
        if let Some(mut nats) = self.nats.take() {
            // SIGTERM lets nats-server flush JetStream; fall back to kill.
            let pid = nats.child.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if matches!(nats.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = nats.child.kill();
            let _ = nats.child.wait();
        }
        if let Some(pg) = self.postgres.take() {
            let data = path_str(&pg.data).unwrap_or_default();
            if let Err(e) = pg.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]) {
                tracing::warn!(error = %format!("{e:#}"), "stopping the private Postgres");
            }
        }
    }
}

impl Drop for LocalServers {
    fn drop(&mut self) {
        self.stop();
    }
}

impl PrivatePostgres {
    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args);
        run(&mut cmd, tool)
    }
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    bail!("{what} failed ({}): {line}", out.status)
}

fn path_str(p: &Path) -> anyhow::Result<String> {
    p.to_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("path {} is not UTF-8", p.display()))
}

mod testing;
pub use testing::{test_nats_url, test_postgres_url};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_port_does_not_answer() {
        let port = free_port(None).expect("free port");
        assert!(!answers(&format!("postgres://127.0.0.1:{port}/x"), 5432));
    }
}
