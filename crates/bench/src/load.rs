//! The closed-loop driver: `concurrency` workers, each sending its next operation as soon as the
//! previous one answered, for a fixed window after a warm-up (pools filled, caches warm).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::stats;

/// What one closed-loop window did.
#[derive(Clone, Debug, Default)]
pub struct LoopResult {
    /// Operations that started inside the window and succeeded.
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// From the window's start to the last of its operations' answers.
    pub elapsed: Duration,
    /// Latency of each successful operation in the window.
    pub latencies: Vec<Duration>,
}

impl LoopResult {
    pub fn rate(&self) -> f64 {
        stats::rate(self.ops, self.elapsed)
    }

    /// Two windows of the same load as one (the limit is measured before and after the figure).
    pub fn merge(mut self, other: LoopResult) -> LoopResult {
        self.ops += other.ops;
        self.errors += other.errors;
        self.first_error = self.first_error.or(other.first_error);
        self.elapsed += other.elapsed;
        self.latencies.extend(other.latencies);
        self
    }

    /// A note on failures, when there were any.
    pub fn error_note(&self) -> Option<String> {
        (self.errors > 0).then(|| {
            format!(
                "{} of {} operations failed (first: {})",
                self.errors,
                self.errors + self.ops,
                self.first_error.as_deref().unwrap_or("?")
            )
        })
    }
}

/// Runs `op(worker, n)` in `concurrency` closed loops: `warmup` unmeasured, then `window`
/// measured. Operations that start in the window count, however late they finish.
pub async fn closed_loop<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    window: Duration,
    op: F,
) -> LoopResult
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let op = Arc::new(op);
    let measure_from = Instant::now() + warmup;
    let end = measure_from + window;
    let mut workers = JoinSet::new();
    for w in 0..concurrency.max(1) {
        let op = op.clone();
        workers.spawn(async move {
            let mut r = LoopResult::default();
            let mut last = measure_from;
            let mut n = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let outcome = op(w, n).await;
                n += 1;
                let t1 = Instant::now();
                if t0 < measure_from {
                    continue;
                }
                last = last.max(t1);
                match outcome {
                    Ok(()) => {
                        r.ops += 1;
                        r.latencies.push(t1 - t0);
                    }
                    Err(e) => {
                        r.errors += 1;
                        r.first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            (r, last)
        });
    }
    let mut total = LoopResult::default();
    let mut last = measure_from;
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok((r, l)) => {
                last = last.max(l);
                total = total.merge(r);
            }
            Err(e) => {
                total.errors += 1;
                total
                    .first_error
                    .get_or_insert_with(|| format!("a load worker failed: {e}"));
            }
        }
    }
    // `merge` summed the workers' (zero) elapsed times; the window is shared.
    total.elapsed = last.saturating_duration_since(measure_from);
    total
}
