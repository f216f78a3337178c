//! `rookery bench`: every performance figure measured beside the machine's own limit.
//!
//! Each figure of docs/architecture.md ("Performance targets") is measured in the same run as the limit it is compared with (raw
//! single-row commits, raw pipelined JetStream publishes, a raw scan of the log), so the several-fold
//! swings of a shared disk cancel out of the ratio. The bench creates its own database on the
//! configured Postgres server and its own streams on the configured NATS, and removes them
//! afterwards, also after an error or Ctrl-C. Every scenario has a time budget; `--quick` keeps the
//! whole run under three minutes, the full run under twenty.
//!
//! # Layout
//! - [`stats`]: percentiles and rates (unit-tested).
//! - `env`: the private database, streams, fixtures, the in-process application, cleanup.
//! - `load`: closed-loop and open-loop drivers.
//! - `scenarios/`: one module per scenario (`commands` with `memory`, `latency`, `relay`,
//!   `rebuild`, `scale`) and `cpu`, the CPU and memory accounting from `/proc`.
//! - `report`: the table, the JSON document and the progress line.
//! - `plot`: the latency percentile curve as a hand-written SVG.

mod env;
mod load;
mod plot;
mod report;
mod scenarios;
pub mod stats;

use anyhow::{bail, Context as _};
use std::path::PathBuf;
use std::time::Duration;
use tokio::time::Instant;

pub use report::{Figure, Report};
use rookery_app::Config;

/// What `rookery bench` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// Shorter runs and smaller logs: the whole bench in under three minutes.
    pub quick: bool,
    /// Print `{"figures":[…]}` on stdout instead of the table.
    pub json: bool,
    /// Run only these scenarios (empty: all).
    pub only: Vec<String>,
    /// Write the latency distribution as SVG into this directory.
    pub plot: Option<PathBuf>,
    /// Open-loop rate of the latency scenario, commands per second.
    pub rate: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            quick: false,
            json: false,
            only: Vec::new(),
            plot: None,
            rate: 1000,
        }
    }
}

/// The scenarios, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    Commands,
    Memory,
    Latency,
    Chat,
    Relay,
    Rebuild,
    Inbound,
    Scale,
}

impl Scenario {
    pub const ALL: [Scenario; 8] = [
        Scenario::Commands,
        Scenario::Memory,
        Scenario::Latency,
        Scenario::Chat,
        Scenario::Relay,
        Scenario::Rebuild,
        Scenario::Inbound,
        Scenario::Scale,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Commands => "commands",
            Scenario::Memory => "memory",
            Scenario::Latency => "latency",
            Scenario::Chat => "chat",
            Scenario::Relay => "relay",
            Scenario::Rebuild => "rebuild",
            Scenario::Inbound => "inbound",
            Scenario::Scale => "scale",
        }
    }

    fn parse(s: &str) -> anyhow::Result<Scenario> {
        Scenario::ALL
            .into_iter()
            .find(|sc| sc.name() == s.trim())
            .ok_or_else(|| {
                let names: Vec<_> = Scenario::ALL.iter().map(|s| s.name()).collect();
                anyhow::anyhow!(
                    "unknown scenario `{s}`; known: {} (e.g. `rookery bench --only commands latency`)",
                    names.join(", ")
                )
            })
    }
}

/// Sizes and time budgets of one run (quick or full).
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub quick: bool,
    /// Whole-run bound; each scenario also stops at its own budget.
    pub total: Duration,
    pub concurrency: Vec<usize>,
    /// Measured window of the API at each concurrency (the raw limit gets the same in total).
    pub commands_window: Duration,
    pub warmup: Duration,
    pub latency_rate: u32,
    pub latency_window: Duration,
    /// How long after the last scheduled request the latency scenario waits for visibility.
    pub latency_drain: Duration,
    pub relay_events: u64,
    pub rebuild_events: u64,
    /// Chat messages in the rebuilt log, on top of `rebuild_events` joins.
    pub rebuild_messages: u64,
    pub scale_small: u64,
    pub scale_large: u64,
    pub scale_window: Duration,
    pub budget_commands: Duration,
    pub budget_latency: Duration,
    pub budget_chat: Duration,
    pub budget_relay: Duration,
    pub budget_rebuild: Duration,
    pub budget_scale: Duration,
}

impl Plan {
    pub fn new(options: &Options) -> Self {
        let s = Duration::from_secs;
        let rate = options.rate.max(1);
        if options.quick {
            Plan {
                quick: true,
                total: s(170),
                concurrency: vec![1, 8, 32],
                commands_window: s(4),
                warmup: Duration::from_millis(300),
                latency_rate: rate,
                latency_window: s(5),
                latency_drain: s(5),
                relay_events: 50_000,
                rebuild_events: 100_000,
                rebuild_messages: 50_000,
                scale_small: 1_000,
                scale_large: 100_000,
                scale_window: s(2),
                budget_commands: s(45),
                budget_latency: s(20),
                budget_chat: s(35),
                budget_relay: s(25),
                budget_rebuild: s(40),
                budget_scale: s(15),
            }
        } else {
            Plan {
                quick: false,
                total: s(1150),
                concurrency: vec![1, 8, 32],
                commands_window: s(6),
                warmup: Duration::from_secs(1),
                latency_rate: rate,
                latency_window: s(20),
                latency_drain: s(10),
                relay_events: 200_000,
                rebuild_events: 1_000_000,
                rebuild_messages: 500_000,
                scale_small: 1_000,
                scale_large: 1_000_000,
                scale_window: s(5),
                budget_commands: s(150),
                budget_latency: s(60),
                budget_chat: s(90),
                budget_relay: s(120),
                budget_rebuild: s(420),
                budget_scale: s(60),
            }
        }
    }
}

/// Runs the bench and prints its report. Resources are removed on every way out, including
/// SIGINT/SIGTERM while a scenario runs.
pub async fn run(config: Config, options: Options) -> anyhow::Result<()> {
    let mut selected: Vec<Scenario> = if options.only.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        options
            .only
            .iter()
            .flat_map(|s| s.split(','))
            .filter(|s| !s.trim().is_empty())
            .map(Scenario::parse)
            .collect::<anyhow::Result<_>>()?
    };
    selected.sort();
    selected.dedup();
    if let Some(dir) = &options.plot {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the plot directory {}", dir.display()))?;
    }
    let plan = Plan::new(&options);
    let progress = report::Progress::new();
    let mut env = env::Env::create(&config, &plan, &progress)
        .await
        .context("setting up the bench database and streams")?;

    let started = Instant::now();
    let outcome = tokio::select! {
        outcome = scenarios::run_all(&mut env, &plan, &selected, &progress) => outcome,
        () = rookery_app::application::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
    };
    progress.status("removing the bench database and streams");
    env.remove().await;
    progress.clear();

    let report = match outcome {
        Ok(report) => report,
        Err(e) => return Err(e),
    };
    if let Some(dir) = &options.plot {
        if report.plots.is_empty() {
            eprintln!("--plot: no open-loop scenario ran; no plot written");
        }
        for (stem, title, curves) in &report.plots {
            let path = dir.join(format!("{stem}.svg"));
            std::fs::write(&path, plot::svg(curves, title))
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
    }
    if options.json {
        println!("{}", report.json()?);
    } else {
        print!("{}", report.table());
        println!(
            "\n{} run, {:.0}s; machine: {}",
            if plan.quick { "quick" } else { "full" },
            started.elapsed().as_secs_f64(),
            report.machine
        );
    }
    if report.figures.iter().all(|f| f.value.is_none()) && !report.figures.is_empty() {
        bail!("no figure could be measured (see the notes above)");
    }
    Ok(())
}

/// Quiet logging for the bench: its own output is the table; only warnings and errors of the
/// application it runs in-process are shown (override with `RUST_LOG`).
pub fn init_telemetry() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx=error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
