//! The `rookery` command: a thin clap front over `rookery-app` (running, migrating, doctor,
//! projections) and `rookery-bench` (`rookery bench`).

use clap::{Parser, Subcommand};
use rookery_app::exit::{self, Classified};
use rookery_app::{application::shutdown_signal, Application, Config, Mode};
use std::io::Write;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "rookery",
    version,
    about = "Event-sourced backend for multi-platform chat communities",
    long_about = "Event-sourced backend for multi-platform chat communities: commands become events in \
                  Postgres, are relayed to NATS JetStream and folded into read models.\n\n\
                  Configuration comes from the environment (DATABASE_URL, NATS_URL, ROOKERY_HTTP_ADDR, \
                  ...; see the README). Example: `rookery up`"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything in one process: API, relay and projection workers. Example: `rookery up`
    Up,
    /// Run the HTTP API only. Example: `ROOKERY_HTTP_ADDR=0.0.0.0:8080 rookery serve`
    Serve,
    /// Run the relay and projection workers only. Example: `rookery work`
    Work,
    /// Create the database if needed and apply migrations, then exit. Example: `rookery migrate`
    Migrate,
    /// Check configuration, Postgres, NATS and the clock; print ok/warn/fail with the fix.
    /// Example: `rookery doctor`
    Doctor,
    /// Measure every performance figure beside this machine's own limit (raw commits, raw
    /// JetStream publishes, a raw log scan), in a private database and stream removed afterwards.
    /// Example: `rookery bench --quick`
    Bench {
        /// A shorter run with smaller logs: under three minutes in all (the full run takes under 20).
        #[arg(long)]
        quick: bool,
        /// Print the figures as one JSON document on stdout instead of the table.
        #[arg(long)]
        json: bool,
        /// Run only these scenarios: commands, memory, latency, chat, relay, rebuild, inbound, scale.
        #[arg(long, num_args = 1.., value_name = "SCENARIO")]
        only: Vec<String>,
        /// Write the latency distribution (percentile curve, SVG) into this directory.
        #[arg(long, value_name = "DIR")]
        plot: Option<std::path::PathBuf>,
        /// Commands per second of the open-loop latency scenario.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
    },
    /// Inspect and rebuild read models. Example: `rookery projections status`
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
}

#[derive(Subcommand)]
enum ProjectionsCommand {
    /// List the projections this build knows. Example: `rookery projections list`
    List,
    /// Show each projection's position, lag and state. Example: `rookery projections status`
    Status,
    /// Rebuild a read model from the event log into shadow tables and switch atomically; reads
    /// keep working throughout. Example: `rookery projections rebuild members`
    Rebuild {
        /// Projection name (see `rookery projections list`).
        name: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Bench { .. }) {
        rookery_bench::init_telemetry();
    } else {
        rookery_app::telemetry::init();
    }
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line a person can act on; the exit code says which kind (see the README).
            eprintln!("error: {e:#}");
            ExitCode::from(exit::code_for(&e))
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::from_env();
    if let Command::Doctor = cli.command {
        return doctor(config).await;
    }
    let mut config = config.map_err(|e| Classified::new(exit::CONFIG, format!("{e:#}")))?;
    let mode = match cli.command {
        Command::Up => Mode::Up,
        Command::Serve => Mode::Serve,
        Command::Work => Mode::Work,
        Command::Migrate => return migrate(&config).await,
        Command::Projections { command } => return projections(&config, command).await,
        Command::Bench {
            quick,
            json,
            only,
            plot,
            rate,
        } => {
            let options = rookery_bench::Options {
                quick,
                json,
                only,
                plot,
                rate,
            };
            return rookery_bench::run(config, options).await;
        }
        Command::Doctor => return Ok(()),
    };
    // Only `up` is the everything-in-one-process developer mode that may start private servers.
    let servers = if mode == Mode::Up {
        let (servers, resolved) = tokio::task::spawn_blocking(move || {
            let servers = rookery_app::embedded::prepare(&mut config);
            (servers, config)
        })
        .await?;
        config = resolved;
        Some(servers?)
    } else {
        None
    };
    let result = async {
        let app = Application::build(config, mode).await?;
        app.run_until_stopped(shutdown_signal()).await
    }
    .await;
    if let Some(servers) = servers {
        tokio::task::spawn_blocking(move || drop(servers)).await?;
    }
    result
}

async fn doctor(config: anyhow::Result<Config>) -> anyhow::Result<()> {
    let checks = rookery_app::doctor::run(config).await;
    for check in &checks {
        println!("{check}");
    }
    let failed = checks
        .iter()
        .filter(|c| c.level == rookery_app::doctor::Level::Fail)
        .count();
    if failed > 0 {
        return Err(Classified::new(exit::FAILURE, format!("{failed} check(s) failed")).into());
    }
    Ok(())
}

async fn connect(config: &Config) -> anyhow::Result<rookery_store::PgPool> {
    let mut db = rookery_store::DbConfig::new(&config.database_url);
    db.max_connections = 4;
    let pool = rookery_store::connect(&db).await?;
    rookery_store::migrate(&pool).await?;
    Ok(pool)
}

async fn migrate(config: &Config) -> anyhow::Result<()> {
    let pool = connect(config).await?;
    let applied = rookery_store::MIGRATOR.iter().count();
    println!("database ready: {applied} migrations applied");
    pool.close().await;
    Ok(())
}

async fn projections(config: &Config, command: ProjectionsCommand) -> anyhow::Result<()> {
    match command {
        ProjectionsCommand::List => {
            for p in rookery_projections::all() {
                println!("{} (version {})", p.name(), p.version());
            }
            Ok(())
        }
        ProjectionsCommand::Status => {
            let pool = connect(config).await?;
            let rows = rookery_projections::status(&pool, config.partitions).await?;
            println!(
                "{:<16} {:<11} {:>8} {:>12} {:>10} {:>12}  position",
                "projection", "state", "version", "lag_events", "lag_secs", "dead_letters"
            );
            for s in rows {
                println!(
                    "{:<16} {:<11} {:>8} {:>12} {:>10.1} {:>12}  {}",
                    s.name,
                    s.state,
                    s.version,
                    s.lag_events,
                    s.lag_seconds,
                    s.dead_letters,
                    s.position
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "-".into())
                );
                if let Some(err) = s.last_error {
                    println!("  last error: {err}");
                }
            }
            pool.close().await;
            Ok(())
        }
        ProjectionsCommand::Rebuild { name } => {
            let projection = rookery_projections::all()
                .into_iter()
                .find(|p| p.name() == name)
                .ok_or_else(|| {
                    let known: Vec<_> = rookery_projections::all()
                        .iter()
                        .map(|p| p.name())
                        .collect();
                    anyhow::anyhow!("unknown projection `{name}`; known: {}", known.join(", "))
                })?;
            let pool = connect(config).await?;
            let mut stderr = std::io::stderr();
            let report = rookery_projections::rebuild(&pool, projection, config.partitions, |p| {
                let _ = write!(
                    stderr,
                    "\rrebuilding {name}: {}/{} events, {:.0} events/s, eta {:.0}s    ",
                    p.done,
                    p.total,
                    p.rate_per_sec,
                    p.eta.as_secs_f64()
                );
                let _ = stderr.flush();
            })
            .await?;
            eprintln!();
            println!("rebuilt {name}: {report}");
            pool.close().await;
            Ok(())
        }
    }
}
