use anyhow::Context as _;
use rookery_events::LogPosition;
use rookery_projections::{Projection, WorkerStats};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

use super::cpu::{peak_rss_kib, reset_peak_rss, Cpu};
use super::{COMMANDS_TARGET, MEMORY_TARGET};
use crate::env::{join, mint, Env, Template};
use crate::load::{closed_loop, LoopResult};
use crate::report::{Figure, Progress};
use crate::stats::{self, Latencies};
use crate::Plan;

// ---- commands and memory ----

/// The API's single-event commands/s against raw single-row commits/s, at each concurrency.
/// The raw limit is measured half before and half after the API window, so a drift of the disk
/// during the window affects both.
pub(super) async fn commands(
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
    let raw_pool = raw_pool(env).await?;

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
        let catch_up = catch_up(env, env.app(app).members.as_deref(), plan.commands_window).await?;
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
             every read model caught up {}",
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
        figures.push(against_raw(f, &api, &raw, "commands/s"));
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

/// A pool with the application's settings on the bench database, and the table raw commits
/// go to.
pub(super) async fn raw_pool(env: &Env) -> anyhow::Result<sqlx::PgPool> {
    let mut db = rookery_store::DbConfig::new(&env.config.database_url);
    db.max_connections = env.config.db_max_connections;
    let pool = rookery_store::connect(&db).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_raw_events (LIKE events INCLUDING ALL)")
        .execute(&pool)
        .await
        .context("creating the raw insert table")?;
    Ok(pool)
}

/// One pgbench-style commit: a single events-shaped row, autocommit.
pub(super) fn raw_insert_op(
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
pub(super) fn join_op(
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

/// A closed-loop figure against raw commits, finished: both loops' failures in its notes, and
/// missing (not zero) when no operation of the API's succeeded.
pub(super) fn against_raw(
    mut f: Figure,
    api: &LoopResult,
    raw: &LoopResult,
    unit: &'static str,
) -> Figure {
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
            unit,
            COMMANDS_TARGET,
            f.note.clone().unwrap_or_default(),
        );
    }
    f
}

/// How far the members read model trailed the log when a load window ended.
pub(super) struct CatchUp {
    /// Events applied after the window's end: those it left behind.
    backlog: u64,
    /// From the window's end until every event committed by then was applied; `None`: not
    /// within the deadline.
    took: Option<Duration>,
}

impl CatchUp {
    pub(super) fn describe(&self) -> String {
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

/// Waits (at most `deadline` in all) until every read model of the running application has
/// applied the whole log as it stands now, so that no model's backlog slows what is measured
/// next; the backlog is counted by `worker`.
pub(super) async fn catch_up(
    env: &Env,
    worker: Option<&WorkerStats>,
    deadline: Duration,
) -> anyhow::Result<CatchUp> {
    let start = Instant::now();
    let applied = || worker.map_or(0, |w| w.applied_total.load(Ordering::Relaxed));
    let before = applied();
    let head = rookery_store::log::committed_head(&env.pool)
        .await
        .context("reading the log's head")?
        .unwrap_or(LogPosition::ZERO);
    let all = rookery_projections::all();
    let models: Vec<&dyn Projection> = all.iter().map(|p| p.as_ref()).collect();
    let behind = rookery_projections::wait_for_models(
        &env.pool,
        &models,
        env.config.partitions,
        head,
        deadline,
    )
    .await?;
    let caught_up = behind.is_none();
    Ok(CatchUp {
        backlog: applied().saturating_sub(before),
        took: caught_up.then(|| start.elapsed()),
    })
}
