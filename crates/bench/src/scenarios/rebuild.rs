use anyhow::Context as _;
use futures::TryStreamExt;
use rookery_events::LogPosition;
use rookery_projections::models::members::MembersProjection;
use rookery_projections::RebuildProgress;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use super::cpu::Cpu;
use super::REBUILD_TARGET;
use crate::env::Env;
use crate::report::{Figure, Progress};
use crate::stats::{self};
use crate::Plan;

// ---- rebuild ----

/// Rebuilds the members projection over the whole log (N events), against a streaming scan of
/// the same events through the log reader. The scan runs first, so both read a warm cache.
pub(super) async fn rebuild(
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
