use std::time::Duration;

use super::commands::join_op;
use super::SCALE_TARGET;
use crate::env::Env;
use crate::load::{closed_loop, LoopResult};
use crate::report::{Figure, Progress};
use crate::stats::{self, Latencies};
use crate::Plan;
use rookery_app::Mode;

// ---- scale ----

/// Closed-loop single joins at concurrency 1 against an API-only application, with the log as
/// it is now: the latency sample and how many events were stored.
/// A second bench database with the fixtures and `plan.scale_small` events: the small log.
pub(super) async fn small_log(env: &Env, plan: &Plan, progress: &Progress) -> anyhow::Result<Env> {
    let mut small = Env::create(&env.config, plan, progress).await?;
    let setup = small.start_app(Mode::Serve).await?;
    small.fixtures(setup, progress).await?;
    small.stop_app(setup).await?;
    small.fill_log(plan.scale_small, progress).await?;
    Ok(small)
}

/// Windows of single joins (API-only applications) alternating between the small and the
/// large log, `SCALE_ROUNDS` each; returns both sides with their log sizes.
pub(super) async fn scale_points(
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
pub(super) const SCALE_ROUNDS: u32 = 4;

pub(super) struct ScalePoints {
    small: (LoopResult, i64),
    large: (LoopResult, i64),
}

pub(super) fn scale_figure(points: Result<ScalePoints, String>) -> Figure {
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
