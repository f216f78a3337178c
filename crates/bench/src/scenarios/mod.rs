//! The scenarios. Each returns its figures; a scenario that fails or runs out of time returns
//! its figures as "not measured" with the reason, and the run goes on.
//!
//! # Layout
//! - this module: the run in order, budgets, the machine line, the targets.
//! - `commands`: commands/s against raw commits, and peak memory.
//! - `cpu`: CPU time and peak memory from `/proc`.
//! - `latency`: command → read model visible at a fixed rate (the open loop, shared with chat).
//! - `chat`: chat ingest against raw commits, and message → visible in history.
//! - `relay`: relay events/s against raw pipelined publishes.
//! - `rebuild`: members, reputation and messages rebuilds against a raw scan of the log.
//! - `scale`: command latency with a large log against a small one.

mod chat;
mod commands;
mod cpu;
mod latency;
mod rebuild;
mod relay;
mod scale;

use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

use crate::env::Env;
use crate::report::{Figure, Progress, Report, Target};
use crate::{Plan, Scenario};
use chat::{chat, CHAT_CONCURRENCY};
use commands::commands;
use latency::latency;
use rebuild::rebuild;
use relay::relay;
use rookery_app::Mode;
use scale::{scale_figure, scale_points, small_log};

/// Publishes awaiting their ack at once in the raw publish loop: the relay's own window, so the
/// limit differs from the relay only in what the relay adds (reading Postgres, chaining,
/// saving its cursor).
pub(super) const RAW_PUBLISH_WINDOW: usize = 256;
/// Time kept back from the whole-run bound for removing the database and streams.
pub(super) const CLEANUP_RESERVE: Duration = Duration::from_secs(4);

pub(super) const COMMANDS_TARGET: Target = Target::RatioAtLeast(0.5);
pub(super) const P50_TARGET: Target = Target::AtMost(10.0);
pub(super) const P99_TARGET: Target = Target::AtMost(50.0);
pub(super) const RELAY_TARGET: Target = Target::RatioAtLeast(0.5);
pub(super) const REBUILD_TARGET: Target = Target::AtLeast(100_000.0);
pub(super) const MEMORY_TARGET: Target = Target::AtMost(100.0);
pub(super) const SCALE_TARGET: Target = Target::RatioAtMost(1.2);

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
                report.plots.push((
                    "latency",
                    format!(
                        "rookery: join command → visible in the members read model, open loop at {}/s ({})",
                        plan.latency_rate,
                        if plan.quick { "quick" } else { "full" }
                    ),
                    curves,
                ));
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
    if want(Scenario::Chat) {
        let budget = budget(plan.budget_chat, deadline);
        match bounded(budget, chat(env, app, plan, progress)).await {
            Ok((figures, curves)) => {
                report.figures.extend(figures);
                report.plots.push((
                    "chat",
                    format!(
                        "rookery: chat message → visible in the history, open loop at {}/s ({})",
                        plan.latency_rate,
                        if plan.quick { "quick" } else { "full" }
                    ),
                    curves,
                ));
            }
            Err(why) => report.figures.extend(missing_all(
                &[
                    (
                        &format!("chat_ingest_c{CHAT_CONCURRENCY}"),
                        "messages/s",
                        COMMANDS_TARGET,
                    ),
                    ("chat_visible_p50", "ms", Target::None),
                    ("chat_visible_p99", "ms", P99_TARGET),
                    ("chat_visible_p999", "ms", Target::None),
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
            ["rebuild", "rebuild_reputation", "rebuild_messages"]
                .into_iter()
                .map(|name| (name.to_string(), "events/s", REBUILD_TARGET))
                .collect()
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
pub(super) fn budget(own: Duration, deadline: Instant) -> Duration {
    own.min(
        deadline
            .saturating_duration_since(Instant::now())
            .saturating_sub(CLEANUP_RESERVE),
    )
}

/// Runs `fut` for at most `budget`; the reason it produced nothing otherwise.
pub(super) async fn bounded<T>(
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

pub(super) fn or_missing(
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

pub(super) fn missing_all(specs: &[(&str, &str, Target)], why: &str) -> Vec<Figure> {
    specs
        .iter()
        .map(|(name, unit, target)| Figure::missing(*name, unit, *target, why.to_string()))
        .collect()
}

/// Cores, memory, and the server versions and durability settings the figures depend on.
pub(super) async fn machine(env: &Env) -> String {
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

pub(super) fn proc_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}
