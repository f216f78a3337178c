use anyhow::Context as _;
use futures::TryStreamExt;
use rookery_events::LogPosition;
use rookery_projections::models::members::MembersProjection;
use rookery_projections::models::messages::MessagesProjection;
use rookery_projections::models::reputation::ReputationProjection;
use rookery_projections::{Projection, RebuildProgress};
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

/// Rebuilds members, reputation and messages over the whole log (joins, then chat), each
/// against a streaming scan of the whole log through the log reader. The scan runs first, so
/// all read a warm cache. Each rebuild gets an even share of what is left of `budget`, and
/// reports its rate so far when it runs out.
pub(super) async fn rebuild(
    env: &Env,
    plan: &Plan,
    progress: &Progress,
    budget: Duration,
) -> anyhow::Result<Vec<Figure>> {
    let started = Instant::now();
    env.fill_log(plan.rebuild_events, progress).await?;
    env.fill_chat(plan.rebuild_messages, progress).await?;
    let head = env.committed_head().await?;

    progress.status("rebuild: streaming scan of the log (limit)");
    let scan_started = Instant::now();
    let scanned = rookery_store::log::stream_committed(&env.pool, LogPosition::ZERO, head)
        .try_fold(0u64, |n, _| async move { Ok(n + 1) })
        .await
        .context("scanning the log")?;
    let scan_rate = stats::rate(scanned, scan_started.elapsed());

    let models: [(&str, Arc<dyn Projection>); 3] = [
        ("rebuild", Arc::new(MembersProjection)),
        ("rebuild_reputation", Arc::new(ReputationProjection)),
        ("rebuild_messages", Arc::new(MessagesProjection)),
    ];
    let mut figures = Vec::new();
    let n = models.len() as u32;
    for (i, (figure, projection)) in (0u32..).zip(models) {
        // An even share of what is left, so a slow rebuild leaves time for the later ones.
        let left = budget
            .saturating_sub(started.elapsed())
            .saturating_sub(Duration::from_secs(1))
            / (n - i);
        figures.push(
            rebuild_one(
                env,
                figure,
                projection,
                (scanned, scan_rate),
                left,
                progress,
            )
            .await?,
        );
    }
    Ok(figures)
}

/// One rebuild of `projection`, for at most `left`, as figure `figure`.
async fn rebuild_one(
    env: &Env,
    figure: &str,
    projection: Arc<dyn Projection>,
    (scanned, scan_rate): (u64, f64),
    left: Duration,
    progress: &Progress,
) -> anyhow::Result<Figure> {
    let name = projection.name();
    progress.status(&format!("rebuild: {name} over the log of {scanned} events"));
    let last: Arc<Mutex<Option<RebuildProgress>>> = Arc::default();
    let seen = last.clone();
    let rebuild_started = Instant::now();
    let cpu_before = Cpu::now();
    let outcome = tokio::time::timeout(
        left,
        rookery_projections::rebuild(&env.pool, projection, env.config.partitions, move |p| {
            progress.tick(&format!(
                "rebuild {name}: {}/{} events ({:.0}/s)",
                p.done, p.total, p.rate_per_sec
            ));
            if let Ok(mut l) = seen.lock() {
                *l = Some(p);
            }
        }),
    )
    .await;
    let mut note = format!(
        "{name} projection over a log of {scanned} events; limit: log::stream_committed over \
         the whole log"
    );
    if let (Some(a), Some(b), Ok(Ok(report))) = (cpu_before, Cpu::now(), &outcome) {
        note.push_str(&format!(
            "; CPU per 1000 events: {}",
            b.minus(&a).describe(report.events, 1000)
        ));
    }
    Ok(match outcome {
        Ok(Ok(report)) => Figure::new(
            figure,
            stats::rate(report.events, report.elapsed),
            "events/s",
            Some(scan_rate),
            REBUILD_TARGET,
        )
        .with_note(format!("{note}; {report}")),
        Ok(Err(e)) => return Err(e.context(format!("rebuilding {name}"))),
        Err(_) => {
            let done = last
                .lock()
                .ok()
                .and_then(|l| *l)
                .map(|p| p.done)
                .unwrap_or(0);
            Figure::new(
                figure,
                stats::rate(done, rebuild_started.elapsed()),
                "events/s",
                Some(scan_rate),
                REBUILD_TARGET,
            )
            .with_note(format!(
                "{note}; stopped at its time budget after {done} events: rate so far"
            ))
        }
    })
}
