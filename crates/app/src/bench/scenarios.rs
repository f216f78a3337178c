//! The scenarios. Each returns its figures; a scenario that fails or runs out of time returns
//! its figures as "not measured" with the reason, and the run goes on.

use anyhow::Context as _;
use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::TryStreamExt;
use rookery_events::LogPosition;
use rookery_nats::{headers, subject_token, Bus, BusConfig, Relay, RelayConfig};
use rookery_projections::{MembersProjection, RebuildProgress};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

use super::env::{join, mint, Env, Template};
use super::load::{closed_loop, LoopResult};
use super::report::{Curves, Figure, Progress, Report, Target};
use super::stats::{self, Latencies};
use super::{Plan, Scenario};
use crate::application::Mode;

/// Publishes awaiting their ack at once in the raw publish loop: the relay's own window, so the
/// limit differs from the relay only in what the relay adds (reading Postgres, chaining,
/// saving its cursor).
const RAW_PUBLISH_WINDOW: usize = 256;
/// Time kept back from the whole-run bound for removing the database and streams.
const CLEANUP_RESERVE: Duration = Duration::from_secs(4);

const COMMANDS_TARGET: Target = Target::RatioAtLeast(0.5);
const P50_TARGET: Target = Target::AtMost(10.0);
const P99_TARGET: Target = Target::AtMost(50.0);
const RELAY_TARGET: Target = Target::RatioAtLeast(0.5);
const REBUILD_TARGET: Target = Target::AtLeast(100_000.0);
const MEMORY_TARGET: Target = Target::AtMost(100.0);
const SCALE_TARGET: Target = Target::RatioAtMost(1.2);

pub async fn run_all(
    env: &mut Env,
    plan: &Plan,
    selected: &[Scenario],
    progress: &Progress,
) -> anyhow::Result<Report> {
    let deadline = Instant::now() + plan.total;
    let want = |s: Scenario| selected.contains(&s);
    let mut report = Report {
        machine: machine(env).await,
        ..Report::default()
    };

    // Fixtures through an API-only application, so no relay or projection worker is busy with
    // them while `scale` takes its first sample.
    let setup = env.start_app(Mode::Serve).await?;
    env.fixtures(setup, progress).await?;
    env.stop_app(setup).await?;

    // `scale`'s small log lives in a database of its own, so that both sizes can be measured
    // at the end in alternating windows, where the machine's drift between them cancels.
    let mut scale_small = None;
    if want(Scenario::Scale) {
        let budget = budget(plan.budget_scale / 2, deadline);
        scale_small = Some(bounded(budget, small_log(env, plan, progress)).await);
    }

    let app = env.start_app(Mode::Up).await?;
    if want(Scenario::Commands) || want(Scenario::Memory) {
        let budget = budget(plan.budget_commands, deadline);
        let figures = bounded(
            budget,
            commands(env, app, plan, progress, want(Scenario::Memory)),
        )
        .await;
        report.figures.extend(or_missing(figures, || {
            let mut specs: Vec<(String, &str, Target)> = plan
                .concurrency
                .iter()
                .map(|c| (format!("commands_c{c}"), "commands/s", COMMANDS_TARGET))
                .collect();
            if want(Scenario::Memory) {
                specs.push(("memory_peak_rss".into(), "MiB", MEMORY_TARGET));
            }
            specs
        }));
    }

    if want(Scenario::Latency) {
        let budget = budget(plan.budget_latency, deadline);
        match bounded(budget, latency(env, app, plan, progress)).await {
            Ok((figures, curves)) => {
                report.figures.extend(figures);
                report.plot_title = format!(
                    "rookery: join command → visible in the members read model, open loop at {}/s ({})",
                    plan.latency_rate,
                    if plan.quick { "quick" } else { "full" }
                );
                report.latency_curve = Some(curves);
            }
            Err(why) => report.figures.extend(missing_all(
                &[
                    ("latency_p50", "ms", P50_TARGET),
                    ("latency_p99", "ms", P99_TARGET),
                    ("latency_p999", "ms", Target::None),
                ],
                &why,
            )),
        }
    }
    // The relay and rebuild measure against a quiet system: the application (with its own relay
    // and projection workers) stops here.
    env.stop_app(app).await?;

    if want(Scenario::Relay) {
        let budget = budget(plan.budget_relay, deadline);
        let figures = bounded(budget, relay(env, plan, progress)).await;
        report.figures.extend(or_missing(figures, || {
            vec![("relay".into(), "events/s", RELAY_TARGET)]
        }));
    }
    if want(Scenario::Rebuild) {
        let budget = budget(plan.budget_rebuild, deadline);
        let figures = bounded(budget, rebuild(env, plan, progress, budget)).await;
        report.figures.extend(or_missing(figures, || {
            vec![("rebuild".into(), "events/s", REBUILD_TARGET)]
        }));
    }
    if want(Scenario::Inbound) {
        report.figures.push(Figure::missing(
            "inbound",
            "requests/s",
            Target::AtLeast(3000.0),
            "n/a (inbound webhooks not built); target also p99 <= 20 ms".into(),
        ));
    }
    match scale_small {
        Some(Ok(mut small)) => {
            let budget = budget(plan.budget_scale / 2, deadline);
            let points = bounded(budget, async {
                env.fill_log(plan.scale_large, progress).await?;
                scale_points(&mut small, env, plan, progress).await
            })
            .await;
            small.remove().await;
            report.figures.push(scale_figure(points));
        }
        Some(Err(why)) => report
            .figures
            .push(Figure::missing("scale", "ms", SCALE_TARGET, why)),
        None => {}
    }
    Ok(report)
}

/// A scenario's budget: its own, cut to what the whole run has left.
fn budget(own: Duration, deadline: Instant) -> Duration {
    own.min(
        deadline
            .saturating_duration_since(Instant::now())
            .saturating_sub(CLEANUP_RESERVE),
    )
}

/// Runs `fut` for at most `budget`; the reason it produced nothing otherwise.
async fn bounded<T>(
    budget: Duration,
    fut: impl Future<Output = anyhow::Result<T>>,
) -> Result<T, String> {
    if budget.is_zero() {
        return Err("skipped: the run's time bound was reached".into());
    }
    match tokio::time::timeout(budget, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("failed: {e:#}")),
        Err(_) => Err(format!(
            "did not finish within its budget of {:.0}s",
            budget.as_secs_f64()
        )),
    }
}

fn or_missing(
    result: Result<Vec<Figure>, String>,
    specs: impl FnOnce() -> Vec<(String, &'static str, Target)>,
) -> Vec<Figure> {
    match result {
        Ok(figures) => figures,
        Err(why) => specs()
            .into_iter()
            .map(|(name, unit, target)| Figure::missing(name, unit, target, why.clone()))
            .collect(),
    }
}

fn missing_all(specs: &[(&str, &str, Target)], why: &str) -> Vec<Figure> {
    specs
        .iter()
        .map(|(name, unit, target)| Figure::missing(*name, unit, *target, why.to_string()))
        .collect()
}

/// Cores, memory, and the server versions and durability settings the figures depend on.
async fn machine(env: &Env) -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| proc_kib(&s, "MemTotal:"))
        .map(|kib| kib as f64 / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let pg: Option<(String, String, String)> = sqlx::query_as(
        "SELECT current_setting('server_version'), current_setting('synchronous_commit'), current_setting('fsync')",
    )
    .fetch_one(&env.pool)
    .await
    .ok();
    let nats = match async_nats::connect(env.config.nats_url.as_str()).await {
        Ok(client) => client.server_info().version,
        Err(_) => "?".into(),
    };
    let (pg_version, sync_commit, fsync) = pg.unwrap_or_default();
    format!(
        "{cores} cores, {mem_gib:.1} GiB memory; PostgreSQL {pg_version} (synchronous_commit={sync_commit}, fsync={fsync}); nats-server {nats}"
    )
}

fn proc_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

// ---- commands and memory ----

/// The API's single-event commands/s against raw single-row commits/s, at each concurrency.
/// The raw limit is measured half before and half after the API window, so a drift of the disk
/// during the window affects both.
async fn commands(
    env: &Env,
    app: usize,
    plan: &Plan,
    progress: &Progress,
    memory: bool,
) -> anyhow::Result<Vec<Figure>> {
    let template = Arc::new(
        env.template
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no template event"))?,
    );
    // The same pool settings as the application's.
    let mut db = rookery_store::DbConfig::new(&env.config.database_url);
    db.max_connections = env.config.db_max_connections;
    let raw_pool = rookery_store::connect(&db).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_raw_events (LIKE events INCLUDING ALL)")
        .execute(&raw_pool)
        .await
        .context("creating the raw insert table")?;

    let peak_reset = memory && reset_peak_rss();
    let mut figures = Vec::new();
    for &c in &plan.concurrency {
        progress.status(&format!("commands c{c}: raw single-row inserts (limit)"));
        let raw_op = raw_insert_op(raw_pool.clone(), template.clone());
        let cpu0 = Cpu::now();
        let raw1 = closed_loop(c, plan.warmup, plan.commands_window / 2, raw_op.clone()).await;
        progress.status(&format!("commands c{c}: joins through the HTTP API"));
        let cpu1 = Cpu::now();
        let api = closed_loop(c, plan.warmup, plan.commands_window, join_op(env, app)).await;
        // The API comes first when the cores are busy (`ROOKERY_PIPELINE_NICE`), so the read
        // model may trail the window. It catches up before the limit's second half, which it
        // would otherwise slow, and how long that takes is reported beside the figure; the CPU
        // it takes meanwhile is the joins'.
        let catch_up = catch_up(env, app, plan.commands_window).await?;
        let cpu2 = Cpu::now();
        progress.status(&format!("commands c{c}: raw single-row inserts (limit)"));
        let raw2 = closed_loop(c, Duration::ZERO, plan.commands_window / 2, raw_op).await;
        let cpu3 = Cpu::now();
        let raw = raw1.merge(raw2);
        let api_lat = Latencies::new(api.latencies.clone());
        let raw_lat = Latencies::new(raw.latencies.clone());
        let mut f = Figure::new(
            format!("commands_c{c}"),
            api.rate(),
            "commands/s",
            Some(raw.rate()),
            COMMANDS_TARGET,
        )
        .with_note(format!(
            "p50 {:.2} ms per join vs {:.2} ms per raw insert; {} joins, {} raw commits; \
             members caught up {}",
            api_lat.percentile(0.5).map(stats::ms).unwrap_or(0.0),
            raw_lat.percentile(0.5).map(stats::ms).unwrap_or(0.0),
            api.ops,
            raw.ops,
            catch_up.describe()
        ));
        // The warm-up's operations are inside the CPU windows too: add them at the window's rate.
        if let (Some(c0), Some(c1), Some(c2), Some(c3)) = (cpu0, cpu1, cpu2, cpu3) {
            let warm = |ops: u64, window: Duration| {
                ops + (ops as f64 * plan.warmup.as_secs_f64() / window.as_secs_f64().max(1e-3))
                    as u64
            };
            f = f.with_note(format!(
                "CPU per join: {}; per raw insert: {}",
                Cpu::per_op(&c1, &c2, warm(api.ops, plan.commands_window)),
                Cpu::per_op_pair(&c0, &c1, &c2, &c3, warm(raw.ops, plan.commands_window))
            ));
        }
        for note in [
            api.error_note(),
            raw.error_note().map(|n| format!("raw: {n}")),
        ]
        .into_iter()
        .flatten()
        {
            f = f.with_note(note);
        }
        if api.ops == 0 {
            f = Figure::missing(
                f.name.clone(),
                "commands/s",
                COMMANDS_TARGET,
                f.note.clone().unwrap_or_default(),
            );
        }
        figures.push(f);
    }
    raw_pool.close().await;
    if memory {
        match peak_rss_kib() {
            Some(kib) => {
                let mut f = Figure::new(
                    "memory_peak_rss",
                    kib as f64 / 1024.0,
                    "MiB",
                    None,
                    MEMORY_TARGET,
                )
                .with_note(
                    "VmHWM of the bench process, which serves the API, relay and projection \
                     workers and also runs the load generator and the raw-insert pool",
                );
                if !peak_reset {
                    f = f.with_note("peak since process start (clear_refs unavailable)");
                }
                figures.push(f);
            }
            None => figures.push(Figure::missing(
                "memory_peak_rss",
                "MiB",
                MEMORY_TARGET,
                "/proc/self/status has no VmHWM on this system".into(),
            )),
        }
    }
    Ok(figures)
}

/// One pgbench-style commit: a single events-shaped row, autocommit.
fn raw_insert_op(
    pool: sqlx::PgPool,
    template: Arc<Template>,
) -> impl Fn(usize, u64) -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>
       + Clone
       + Send
       + Sync
       + 'static {
    move |_, _| {
        let pool = pool.clone();
        let template = template.clone();
        Box::pin(async move {
            let (aggregate_id, payload, metadata) = template.for_user(Uuid::new_v4());
            sqlx::query(
                "INSERT INTO bench_raw_events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
                 VALUES ($1, $2, 1, $3, $4, $5::jsonb, $6::jsonb)",
            )
            .bind(&template.aggregate_type)
            .bind(aggregate_id)
            .bind(&template.event_type)
            .bind(&template.event_version)
            .bind(payload)
            .bind(metadata)
            .execute(&pool)
            .await?;
            Ok(())
        })
    }
}

/// One join through the API by a fresh user: one MemberJoined event on a new membership, so no
/// aggregate grows during the run. Worker `w` joins community `w mod 32`.
fn join_op(
    env: &Env,
    app: usize,
) -> impl Fn(usize, u64) -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>
       + Clone
       + Send
       + Sync
       + 'static {
    let http = env.http.clone();
    let keys = env.keys.clone();
    let base: Arc<str> = env.app(app).base().into();
    let communities = Arc::new(env.communities.clone());
    move |w, _| {
        let (http, keys, base) = (http.clone(), keys.clone(), base.clone());
        let community = communities[w % communities.len().max(1)];
        Box::pin(async move {
            let token = mint(&keys, Uuid::new_v4())?;
            join(&http, &base, &token, community).await
        })
    }
}

/// How far the members read model trailed the log when a load window ended.
struct CatchUp {
    /// Events applied after the window's end: those it left behind.
    backlog: u64,
    /// From the window's end until every event committed by then was applied; `None`: not
    /// within the deadline.
    took: Option<Duration>,
}

impl CatchUp {
    fn describe(&self) -> String {
        match self.took {
            Some(t) => format!(
                "{:.0} ms after the window ({} events behind at its end)",
                stats::ms(t),
                self.backlog
            ),
            None => format!(
                "NOT within the deadline ({} events behind at the window's end)",
                self.backlog
            ),
        }
    }
}

/// Waits (at most `deadline`) until the members projection of application `app` has applied
/// the whole log as it stands now.
async fn catch_up(env: &Env, app: usize, deadline: Duration) -> anyhow::Result<CatchUp> {
    let start = Instant::now();
    let applied = || {
        env.app(app)
            .members
            .as_ref()
            .map_or(0, |m| m.applied_total.load(Ordering::Relaxed))
    };
    let before = applied();
    let head = rookery_store::log::committed_head(&env.pool)
        .await
        .context("reading the log's head")?
        .unwrap_or(LogPosition::ZERO);
    let caught_up = rookery_projections::consistency::wait_for_position(
        &env.pool,
        rookery_projections::members::NAME,
        env.config.partitions,
        head,
        deadline,
    )
    .await?;
    Ok(CatchUp {
        backlog: applied().saturating_sub(before),
        took: caught_up.then(|| start.elapsed()),
    })
}

/// CPU time of this process and of the whole machine, from /proc (Linux), in clock ticks of
/// 10 ms (USER_HZ is 100 on every mainstream Linux build).
#[derive(Clone, Copy, Debug)]
struct Cpu {
    process: u64,
    postgres: u64,
    nats: u64,
    busy: u64,
    total: u64,
}

impl Cpu {
    const TICK_MS: f64 = 10.0;

    fn now() -> Option<Cpu> {
        let own = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name (which may contain spaces) start at field 3 (state);
        // utime and stime are fields 14 and 15.
        let rest: Vec<&str> = own.rsplit_once(')')?.1.split_whitespace().collect();
        let process = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
        let sys = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = sys
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal
        let total: u64 = cpu.iter().take(8).sum();
        let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
        let (postgres, nats) = Self::servers();
        Some(Cpu {
            process,
            postgres,
            nats,
            busy: total.saturating_sub(idle),
            total,
        })
    }

    /// Ticks of every `postgres` and `nats-server` process (a backend that exits between two
    /// samples takes its share with it; pooled connections live through a window).
    fn servers() -> (u64, u64) {
        let (mut pg, mut nats) = (0, 0);
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return (0, 0);
        };
        for entry in dir.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let (Some(open), Some((head, rest))) = (stat.find('('), stat.rsplit_once(')')) else {
                continue;
            };
            let comm = head.get(open + 1..).unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            match comm {
                "postgres" => pg += ticks,
                "nats-server" => nats += ticks,
                _ => {}
            }
        }
        (pg, nats)
    }

    fn minus(&self, earlier: &Cpu) -> Cpu {
        Cpu {
            process: self.process.saturating_sub(earlier.process),
            postgres: self.postgres.saturating_sub(earlier.postgres),
            nats: self.nats.saturating_sub(earlier.nats),
            busy: self.busy.saturating_sub(earlier.busy),
            total: self.total.saturating_sub(earlier.total),
        }
    }

    fn plus(&self, other: &Cpu) -> Cpu {
        Cpu {
            process: self.process + other.process,
            postgres: self.postgres + other.postgres,
            nats: self.nats + other.nats,
            busy: self.busy + other.busy,
            total: self.total + other.total,
        }
    }

    /// CPU milliseconds per `per` operations of a window's difference, split by process.
    fn describe(&self, ops: u64, per: u64) -> String {
        let scale = Self::TICK_MS * per as f64 / ops.max(1) as f64;
        let rest = self
            .busy
            .saturating_sub(self.process + self.postgres + self.nats);
        format!(
            "{:.2} ms rookery process + {:.2} ms postgres + {:.2} ms nats-server + {:.2} ms other (machine {:.0}% busy)",
            self.process as f64 * scale,
            self.postgres as f64 * scale,
            self.nats as f64 * scale,
            rest as f64 * scale,
            100.0 * self.busy as f64 / (self.total as f64).max(1.0)
        )
    }

    fn per_op(a: &Cpu, b: &Cpu, ops: u64) -> String {
        b.minus(a).describe(ops, 1)
    }

    /// Over the two windows `a..b` and `c..d`.
    fn per_op_pair(a: &Cpu, b: &Cpu, c: &Cpu, d: &Cpu, ops: u64) -> String {
        b.minus(a).plus(&d.minus(c)).describe(ops, 1)
    }
}

/// Resets the kernel's peak-RSS mark of this process (Linux ≥ 4.0), so VmHWM covers only what
/// follows.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn peak_rss_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| proc_kib(&s, "VmHWM:"))
}

// ---- latency ----

/// Open loop at a fixed rate: request `i` is due at `start + i/rate` whether or not earlier ones
/// answered, and its latency runs from then (not from when it was actually sent) until its row
/// is visible in the members table. One observer polls the read model every millisecond for all
/// outstanding users at once, so observing adds one cheap indexed query per millisecond rather
/// than one per request.
async fn latency(
    env: &Env,
    app: usize,
    plan: &Plan,
    progress: &Progress,
) -> anyhow::Result<(Vec<Figure>, Curves)> {
    let rate = f64::from(plan.latency_rate);
    let total = (rate * plan.latency_window.as_secs_f64()).round() as u64;
    let base: Arc<str> = env.app(app).base().into();
    // Accepted joins not yet seen in the read model: user → (community, due time).
    let pending: Arc<Mutex<HashMap<Uuid, (Uuid, Instant)>>> = Arc::default();
    let accepted: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let errors = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let inflight = Arc::new(AtomicU64::new(0));
    let sent_all = Arc::new(AtomicBool::new(false));

    let start = Instant::now() + Duration::from_millis(50);
    let drain_deadline = start + plan.latency_window + plan.latency_drain;
    let members = env
        .app(app)
        .members
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the bench application runs no members worker"))?;
    // Asks the read model after every committed members batch (at most every 1 ms, at least
    // every 5 ms): polling it every millisecond would itself be a thousand queries per second
    // on the cores being measured.
    let observer = {
        let (pool, pending, inflight, sent_all) = (
            env.pool.clone(),
            pending.clone(),
            inflight.clone(),
            sent_all.clone(),
        );
        tokio::spawn(async move {
            let mut visible = Vec::new();
            let committed = members.committed.notified();
            tokio::pin!(committed);
            let mut asked = Instant::now();
            loop {
                let _ = tokio::time::timeout(Duration::from_millis(5), committed.as_mut()).await;
                committed.set(members.committed.notified());
                // Registered before the query, so a commit during it is not missed.
                committed.as_mut().enable();
                let next = asked + Duration::from_millis(1);
                if Instant::now() < next {
                    tokio::time::sleep_until(next).await;
                }
                asked = Instant::now();
                let (users, communities): (Vec<Uuid>, Vec<Uuid>) = match pending.lock() {
                    Ok(p) => p
                        .iter()
                        .map(|(user, (community, _))| (*user, *community))
                        .unzip(),
                    Err(_) => break,
                };
                if users.is_empty() {
                    if sent_all.load(Ordering::SeqCst) && inflight.load(Ordering::SeqCst) == 0 {
                        break;
                    }
                    continue;
                }
                if Instant::now() >= drain_deadline {
                    break;
                }
                // By primary key, one probe per pending join: `user_id = ANY(…)` was planned as a
                // scan of the whole table, which grew through the window (1.1 → 1.6 ms a query,
                // the busiest statement on the server).
                let found: Vec<Uuid> = sqlx::query_scalar(
                    "SELECT m.user_id FROM UNNEST($1::uuid[], $2::uuid[]) AS k(c, u)
                     CROSS JOIN LATERAL (SELECT user_id FROM members
                                         WHERE community_id = k.c AND user_id = k.u
                                         LIMIT 1) m",
                )
                .bind(&communities)
                .bind(&users)
                .fetch_all(&pool)
                .await?;
                let now = Instant::now();
                if let Ok(mut p) = pending.lock() {
                    for user in found {
                        if let Some((_, due)) = p.remove(&user) {
                            visible.push((due, now - due));
                        }
                    }
                }
            }
            let now = Instant::now();
            let unseen: Vec<Duration> = match pending.lock() {
                Ok(mut p) => p.drain().map(|(_, (_, due))| now - due).collect(),
                Err(_) => Vec::new(),
            };
            Ok::<_, anyhow::Error>((visible, unseen))
        })
    };

    progress.status(&format!(
        "latency: open loop at {}/s for {:.0}s",
        plan.latency_rate,
        plan.latency_window.as_secs_f64()
    ));
    let communities = Arc::new(env.communities.clone());
    // The sends are timed by a thread of their own with the OS timer: the runtime's timer has
    // 1 ms ticks and its tasks queue behind the application's, and every bit of lateness of a
    // send would be counted against the system under test.
    let sent = Arc::new(AtomicU64::new(0));
    // Stops the sending thread when this scenario ends early (its budget ran out).
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let generator = {
        let stop = stop.0.clone();
        let runtime = tokio::runtime::Handle::current();
        let (http, keys, sent, inflight) = (
            env.http.clone(),
            env.keys.clone(),
            sent.clone(),
            inflight.clone(),
        );
        let (pending, accepted, errors, first_error) = (
            pending.clone(),
            accepted.clone(),
            errors.clone(),
            first_error.clone(),
        );
        let start = start.into_std();
        tokio::task::spawn_blocking(move || {
            let mut requests = Vec::with_capacity(total as usize);
            let mut behind = Vec::with_capacity(total as usize);
            for i in 0..total {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let due = start + stats::scheduled_offset(i, rate);
                let now = std::time::Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                behind.push(std::time::Instant::now().saturating_duration_since(due));
                inflight.fetch_add(1, Ordering::SeqCst);
                let due = Instant::from_std(due);
                let (http, keys, base) = (http.clone(), keys.clone(), base.clone());
                let (pending, accepted, errors, first_error, in_flight) = (
                    pending.clone(),
                    accepted.clone(),
                    errors.clone(),
                    first_error.clone(),
                    inflight.clone(),
                );
                let community = communities[(i as usize) % communities.len().max(1)];
                requests.push(runtime.spawn(async move {
                    let user = Uuid::new_v4();
                    let outcome = async {
                        let token = mint(&keys, user)?;
                        join(&http, &base, &token, community).await
                    }
                    .await;
                    match outcome {
                        Ok(()) => {
                            let answered = Instant::now() - due;
                            if let Ok(mut a) = accepted.lock() {
                                a.push(answered);
                            }
                            if let Ok(mut p) = pending.lock() {
                                p.insert(user, (community, due));
                            }
                        }
                        Err(e) => {
                            errors.fetch_add(1, Ordering::SeqCst);
                            if let Ok(mut f) = first_error.lock() {
                                f.get_or_insert_with(|| format!("{e:#}"));
                            }
                        }
                    }
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                }));
                sent.store(i + 1, Ordering::Relaxed);
            }
            (requests, behind)
        })
    };
    tokio::pin!(generator);
    let (requests, behind) = loop {
        tokio::select! {
            done = &mut generator => break done.context("latency load generator")?,
            _ = tokio::time::sleep(Duration::from_millis(100)) => progress.tick(&format!(
                "latency: {}/{total} sent, {} in flight",
                sent.load(Ordering::Relaxed),
                inflight.load(Ordering::Relaxed)
            )),
        }
    };
    let sent_for = Instant::now() - start;
    sent_all.store(true, Ordering::SeqCst);
    progress.status("latency: waiting for the last commands to become visible");
    let aborts: Vec<_> = requests.iter().map(|r| r.abort_handle()).collect();
    let unanswered = match tokio::time::timeout(
        drain_deadline.saturating_duration_since(Instant::now()),
        futures::future::join_all(requests),
    )
    .await
    {
        Ok(_) => 0,
        Err(_) => {
            let left = aborts.iter().filter(|a| !a.is_finished()).count() as u64;
            aborts.iter().for_each(|a| a.abort());
            left
        }
    };
    let late_sends = behind
        .iter()
        .filter(|b| **b > Duration::from_millis(1))
        .count();
    let behind = Latencies::new(behind);
    let (mut visible, unseen) = observer.await.context("latency observer")??;
    // Whether latency drifts over the window: the first and the last quarter of the sends.
    visible.sort_unstable_by_key(|(due, _)| *due);
    let quarter = |q: &[(Instant, Duration)]| {
        Latencies::new(q.iter().map(|(_, l)| *l).collect())
            .percentile(0.5)
            .map(stats::ms)
            .unwrap_or(0.0)
    };
    let drift = (
        quarter(&visible[..visible.len() / 4]),
        quarter(&visible[visible.len() - visible.len() / 4..]),
    );
    let visible: Vec<Duration> = visible.into_iter().map(|(_, l)| l).collect();
    let accepted = accepted.lock().map(|a| a.clone()).unwrap_or_default();
    let errors = errors.load(Ordering::SeqCst);

    let n_visible = visible.len();
    let n_unseen = unseen.len();
    let vis_curve = Latencies::new(visible.clone()).curve();
    // Unseen commands count with the time they had waited: a lower bound, never dropped.
    let mut all = visible;
    all.extend(unseen);
    let lat = Latencies::new(all);
    let acc = Latencies::new(accepted);
    let p = |l: &Latencies, q: f64| l.percentile(q).map(stats::ms);

    let mut context = format!(
        "{total} joins due at {}/s over {:.1}s (sent in {:.1}s, each behind its due time by p50 {:.3} ms / p99 {:.3} ms, {late_sends} by >1 ms); {n_visible} seen in members; p50 {:.1} ms in the window's first quarter, {:.1} ms in its last",
        plan.latency_rate,
        plan.latency_window.as_secs_f64(),
        sent_for.as_secs_f64(),
        behind.percentile(0.5).map(stats::ms).unwrap_or(0.0),
        behind.percentile(0.99).map(stats::ms).unwrap_or(0.0),
        drift.0,
        drift.1,
    );
    if n_unseen > 0 || errors > 0 || unanswered > 0 {
        context.push_str(&format!(
            "; {n_unseen} not visible within {:.0}s of the end (counted with their wait so far), {errors} failed, {unanswered} unanswered",
            plan.latency_drain.as_secs_f64()
        ));
        if let Some(e) = first_error.lock().ok().and_then(|f| f.clone()) {
            context.push_str(&format!(" (first error: {e})"));
        }
    }
    let mut figures = Vec::new();
    let mut push = |name: &str, value: Option<f64>, target: Target, note: Option<String>| {
        let f = match value {
            Some(v) => Figure::new(name, v, "ms", None, target),
            None => Figure::missing(name, "ms", target, "no command became visible".into()),
        };
        figures.push(match note {
            Some(n) => f.with_note(n),
            None => f,
        });
    };
    push("latency_p50", p(&lat, 0.5), P50_TARGET, Some(context));
    push("latency_p99", p(&lat, 0.99), P99_TARGET, None);
    push(
        "latency_p999",
        p(&lat, 0.999),
        Target::None,
        lat.max().map(|m| format!("max {:.1} ms", stats::ms(m))),
    );
    push(
        "latency_accept_p50",
        p(&acc, 0.5),
        Target::None,
        Some("due time → 201 from the API (the command's share of the above)".into()),
    );
    push("latency_accept_p99", p(&acc, 0.99), Target::None, None);
    let curves = vec![
        ("due → visible in members".to_string(), vis_curve),
        ("due → answered 201".to_string(), acc.curve()),
    ];
    Ok((figures, curves))
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

// ---- relay ----

/// Relays N freshly stored events to a stream of their own with `Relay::relay_once` batches,
/// against raw pipelined publishes of the same messages (payloads, subjects, headers, a unique
/// message id each) to a scratch stream defined the same way. Half the raw publishes run before
/// the relay and half after.
async fn relay(env: &mut Env, plan: &Plan, progress: &Progress) -> anyhow::Result<Vec<Figure>> {
    let n = plan.relay_events;
    let nats = env.config.nats_url.clone();
    let partitions = env.config.partitions;
    let stream = format!("rookery_bench_{}_relay", env.id);
    let raw_stream = format!("rookery_bench_{}_raw", env.id);
    env.track_stream(stream.clone());
    env.track_stream(raw_stream.clone());
    let mut config = BusConfig::new(&nats, &stream, format!("rookerybench{}relay", env.id));
    config.partitions = partitions;
    let bus = Bus::connect(config).await?;
    let raw_prefix = format!("rookerybench{}raw", env.id);
    let mut raw_config = BusConfig::new(&nats, &raw_stream, &raw_prefix);
    raw_config.partitions = partitions;
    let raw_bus = Bus::connect(raw_config).await?;

    // The relay starts at the current head, so it relays exactly the events stored next.
    let head = env.committed_head().await?;
    rookery_store::relay::reset_cursor(&env.pool, &stream, head).await?;
    let have = u64::try_from(env.event_count().await?).unwrap_or(0);
    env.fill_log(have + n, progress).await?;

    let sample = rookery_store::log::read_committed(&env.pool, head, 1000).await?;
    if sample.is_empty() {
        anyhow::bail!("no events to relay");
    }
    let messages: Vec<(String, HeaderMap, Bytes)> = sample
        .iter()
        .map(|entry| {
            let e = &entry.event;
            let subject = format!(
                "{raw_prefix}.{}.{}.{}",
                entry.partition(partitions),
                subject_token(&e.aggregate_type),
                subject_token(&e.event_type)
            );
            let mut h = HeaderMap::new();
            h.insert(headers::POSITION, e.position.to_string().as_str());
            h.insert(headers::AGGREGATE_TYPE, e.aggregate_type.as_str());
            h.insert(headers::AGGREGATE_ID, e.aggregate_id.as_str());
            h.insert(headers::SEQUENCE, e.sequence.to_string().as_str());
            h.insert(headers::EVENT_TYPE, e.event_type.as_str());
            h.insert(
                headers::RECORDED_AT,
                entry
                    .recorded_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                    .as_str(),
            );
            let payload = serde_json::to_vec(e).map(Bytes::from)?;
            Ok((subject, h, payload))
        })
        .collect::<anyhow::Result<_>>()?;
    let avg_bytes = messages.iter().map(|m| m.2.len()).sum::<usize>() / messages.len();
    let js = jetstream::new(raw_bus.client().clone());

    progress.status(&format!("relay: raw publishes (limit), {} messages", n / 2));
    let raw1 = raw_publish(&js, &messages, n / 2, 0).await?;

    progress.status(&format!("relay: relaying {n} events Postgres → JetStream"));
    let relay = Relay::new(env.pool.clone(), bus.clone(), RelayConfig::default());
    let cpu_before = Cpu::now();
    let started = Instant::now();
    let mut relayed = 0u64;
    loop {
        let batch = relay.relay_once().await?;
        if batch == 0 {
            break;
        }
        relayed += batch;
        progress.tick(&format!(
            "relay: {relayed}/{n} events ({:.0}/s)",
            stats::rate(relayed, started.elapsed())
        ));
    }
    let relay_elapsed = started.elapsed();
    let cpu = cpu_before
        .zip(Cpu::now())
        .map(|(a, b)| b.minus(&a).describe(relayed, 1000))
        .unwrap_or_default();

    progress.status(&format!(
        "relay: raw publishes (limit), {} messages",
        n - n / 2
    ));
    let raw2 = raw_publish(&js, &messages, n - n / 2, n / 2).await?;
    let raw_rate = stats::rate(n, raw1 + raw2);
    // The Postgres share of the relay: reading the same events in the same batches, alone.
    let read_started = Instant::now();
    let mut cursor = head;
    loop {
        let batch = rookery_store::log::read_committed(
            &env.pool,
            cursor,
            RelayConfig::default().batch_size,
        )
        .await?;
        match batch.last() {
            Some(last) => cursor = last.event.position,
            None => break,
        }
    }
    let read_elapsed = read_started.elapsed();
    let stored = bus.stream_state().await?.messages;

    let mut f = Figure::new(
        "relay",
        stats::rate(relayed, relay_elapsed),
        "events/s",
        Some(raw_rate),
        RELAY_TARGET,
    )
    .with_note(format!(
        "{relayed} events in {:.2}s ({stored} on the stream), batches of {}; reading them alone with \
         read_committed takes {:.2}s; raw: {n} publishes of the same ~{avg_bytes}-byte messages \
         with ids, {RAW_PUBLISH_WINDOW} acks outstanding, in {:.2}s",
        relay_elapsed.as_secs_f64(),
        RelayConfig::default().batch_size,
        read_elapsed.as_secs_f64(),
        (raw1 + raw2).as_secs_f64()
    ));
    if !cpu.is_empty() {
        f = f.with_note(format!("CPU per 1000 relayed events: {cpu}"));
    }
    if relayed != n {
        f = f.with_note(format!("expected {n} events relayed, got {relayed}"));
    }
    Ok(vec![f])
}

/// `count` publishes with unique message ids, `RAW_PUBLISH_WINDOW` acks outstanding.
async fn raw_publish(
    js: &jetstream::Context,
    messages: &[(String, HeaderMap, Bytes)],
    count: u64,
    first_id: u64,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut window = VecDeque::with_capacity(RAW_PUBLISH_WINDOW);
    for i in 0..count {
        if window.len() >= RAW_PUBLISH_WINDOW {
            if let Some(ack) = window.pop_front() {
                let _: jetstream::publish::PublishAck = ack_result(ack).await?;
            }
        }
        let (subject, headers, payload) = &messages[(i as usize) % messages.len()];
        let mut h = headers.clone();
        h.insert(headers::MSG_ID, format!("raw/{}", first_id + i).as_str());
        let ack = js
            .publish_with_headers(subject.clone(), h, payload.clone())
            .await
            .context("raw publish")?;
        window.push_back(ack);
    }
    while let Some(ack) = window.pop_front() {
        ack_result(ack).await?;
    }
    Ok(started.elapsed())
}

async fn ack_result(
    ack: jetstream::context::PublishAckFuture,
) -> anyhow::Result<jetstream::publish::PublishAck> {
    ack.await.context("raw publish ack")
}

// ---- rebuild ----

/// Rebuilds the members projection over the whole log (N events), against a streaming scan of
/// the same events through the log reader. The scan runs first, so both read a warm cache.
async fn rebuild(
    env: &Env,
    plan: &Plan,
    progress: &Progress,
    budget: Duration,
) -> anyhow::Result<Vec<Figure>> {
    let started = Instant::now();
    env.fill_log(plan.rebuild_events, progress).await?;
    let head = env.committed_head().await?;

    progress.status("rebuild: streaming scan of the log (limit)");
    let scan_started = Instant::now();
    let scanned = rookery_store::log::stream_committed(&env.pool, LogPosition::ZERO, head)
        .try_fold(0u64, |n, _| async move { Ok(n + 1) })
        .await
        .context("scanning the log")?;
    let scan_rate = stats::rate(scanned, scan_started.elapsed());

    progress.status(&format!("rebuild: members over {scanned} events"));
    let last: Arc<Mutex<Option<RebuildProgress>>> = Arc::default();
    let seen = last.clone();
    // Leave a little of the budget to report a partial rate rather than nothing.
    let left = budget
        .saturating_sub(started.elapsed())
        .saturating_sub(Duration::from_secs(1));
    let rebuild_started = Instant::now();
    let cpu_before = Cpu::now();
    let outcome = tokio::time::timeout(
        left,
        rookery_projections::rebuild(
            &env.pool,
            Arc::new(MembersProjection),
            env.config.partitions,
            move |p| {
                progress.tick(&format!(
                    "rebuild: {}/{} events ({:.0}/s)",
                    p.done, p.total, p.rate_per_sec
                ));
                if let Ok(mut l) = seen.lock() {
                    *l = Some(p);
                }
            },
        ),
    )
    .await;
    let mut note = format!(
        "members projection, {scanned} events; limit: log::stream_committed over the same events"
    );
    if let (Some(a), Some(b), Ok(Ok(report))) = (cpu_before, Cpu::now(), &outcome) {
        note.push_str(&format!(
            "; CPU per 1000 events: {}",
            b.minus(&a).describe(report.events, 1000)
        ));
    }
    Ok(vec![match outcome {
        Ok(Ok(report)) => Figure::new(
            "rebuild",
            stats::rate(report.events, report.elapsed),
            "events/s",
            Some(scan_rate),
            REBUILD_TARGET,
        )
        .with_note(format!("{note}; {report}")),
        Ok(Err(e)) => return Err(e.context("rebuilding members")),
        Err(_) => {
            let done = last
                .lock()
                .ok()
                .and_then(|l| *l)
                .map(|p| p.done)
                .unwrap_or(0);
            Figure::new(
                "rebuild",
                stats::rate(done, rebuild_started.elapsed()),
                "events/s",
                Some(scan_rate),
                REBUILD_TARGET,
            )
            .with_note(format!(
                "{note}; stopped at its time budget after {done} events: rate so far"
            ))
        }
    }])
}

// ---- scale ----

/// Closed-loop single joins at concurrency 1 against an API-only application, with the log as
/// it is now: the latency sample and how many events were stored.
/// A second bench database with the fixtures and `plan.scale_small` events: the small log.
async fn small_log(env: &Env, plan: &Plan, progress: &Progress) -> anyhow::Result<Env> {
    let mut small = Env::create(&env.config, plan, progress).await?;
    let setup = small.start_app(Mode::Serve).await?;
    small.fixtures(setup, progress).await?;
    small.stop_app(setup).await?;
    small.fill_log(plan.scale_small, progress).await?;
    Ok(small)
}

/// Windows of single joins (API-only applications) alternating between the small and the
/// large log, `SCALE_ROUNDS` each; returns both sides with their log sizes.
async fn scale_points(
    small: &mut Env,
    large: &mut Env,
    plan: &Plan,
    progress: &Progress,
) -> anyhow::Result<ScalePoints> {
    let sizes = (small.event_count().await?, large.event_count().await?);
    progress.status(&format!(
        "scale: join latency with {} events stored vs {}, alternating",
        sizes.1, sizes.0
    ));
    let (app_small, app_large) = (
        small.start_app(Mode::Serve).await?,
        large.start_app(Mode::Serve).await?,
    );
    let window = plan.scale_window / SCALE_ROUNDS;
    let (mut s, mut l) = (LoopResult::default(), LoopResult::default());
    for round in 0..SCALE_ROUNDS {
        let warmup = if round == 0 {
            plan.warmup
        } else {
            Duration::ZERO
        };
        s = s.merge(closed_loop(1, warmup, window, join_op(small, app_small)).await);
        l = l.merge(closed_loop(1, warmup, window, join_op(large, app_large)).await);
    }
    small.stop_app(app_small).await?;
    large.stop_app(app_large).await?;
    for (side, result) in [("small", &s), ("large", &l)] {
        if result.ops == 0 {
            anyhow::bail!(
                "no join succeeded on the {side} log: {}",
                result.error_note().unwrap_or_default()
            );
        }
    }
    Ok(ScalePoints {
        small: (s, sizes.0),
        large: (l, sizes.1),
    })
}

/// Alternations per side in `scale`.
const SCALE_ROUNDS: u32 = 4;

struct ScalePoints {
    small: (LoopResult, i64),
    large: (LoopResult, i64),
}

fn scale_figure(points: Result<ScalePoints, String>) -> Figure {
    match points {
        Ok(ScalePoints {
            small: (small, n_small),
            large: (large, n_large),
        }) => {
            let (s, l) = (
                Latencies::new(small.latencies),
                Latencies::new(large.latencies),
            );
            let p50 = |x: &Latencies| x.percentile(0.5).map(stats::ms).unwrap_or(0.0);
            let mean = |x: &Latencies| x.mean().map(stats::ms).unwrap_or(0.0);
            Figure::new("scale", p50(&l), "ms", Some(p50(&s)), SCALE_TARGET).with_note(format!(
                "p50 of single joins (concurrency 1) with {n_large} events stored vs {n_small}, \
                 in {SCALE_ROUNDS} alternating windows each; \
                 means {:.2} vs {:.2} ms, p99 {:.2} vs {:.2} ms",
                mean(&l),
                mean(&s),
                l.percentile(0.99).map(stats::ms).unwrap_or(0.0),
                s.percentile(0.99).map(stats::ms).unwrap_or(0.0),
            ))
        }
        Err(why) => Figure::missing("scale", "ms", SCALE_TARGET, why),
    }
}
