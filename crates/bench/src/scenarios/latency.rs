use anyhow::Context as _;
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

use super::{P50_TARGET, P99_TARGET};
use crate::env::{join, mint, Env};
use crate::report::{Curves, Figure, Progress, Target};
use crate::stats::{self, Latencies};
use crate::Plan;

// ---- latency ----

/// One request on its way: `(community, key)` of the row it makes visible.
pub(super) type Sent = BoxFuture<'static, anyhow::Result<(Uuid, Uuid)>>;

/// What an open-loop scenario sends and where it looks for the effect.
pub(super) struct Probe {
    /// Figure names start with it (`latency` → `latency_p50`, …).
    pub prefix: &'static str,
    /// What one request is (`joins`) and the read model it shows in (`members`), for the notes.
    pub what: &'static str,
    pub seen_in: &'static str,
    pub p50_target: Target,
    /// Sends request `i`; on success the `(community, key)` whose row the read model will show.
    pub send: Arc<dyn Fn(u64) -> Sent + Send + Sync>,
    /// Of `$1` communities and `$2` keys (uuid arrays, pairwise), the keys visible now; one
    /// probe by primary key per pair.
    pub visible_sql: &'static str,
    /// The worker whose commits wake the observer.
    pub worker: Arc<rookery_projections::WorkerStats>,
}

/// Join command → visible in the members read model.
pub(super) async fn latency(
    env: &Env,
    app: usize,
    plan: &Plan,
    progress: &Progress,
) -> anyhow::Result<(Vec<Figure>, Curves)> {
    let (http, keys) = (env.http.clone(), env.keys.clone());
    let base: Arc<str> = env.app(app).base().into();
    let communities = Arc::new(env.communities.clone());
    let probe = Probe {
        prefix: "latency",
        what: "joins",
        seen_in: "members",
        p50_target: P50_TARGET,
        send: Arc::new(move |i| {
            let (http, keys, base) = (http.clone(), keys.clone(), base.clone());
            let community = communities[(i as usize) % communities.len().max(1)];
            Box::pin(async move {
                let user = Uuid::new_v4();
                let token = mint(&keys, user)?;
                join(&http, &base, &token, community).await?;
                Ok((community, user))
            })
        }),
        // By primary key, one probe per pending join: `user_id = ANY(…)` was planned as a
        // scan of the whole table, which grew through the window (1.1 → 1.6 ms a query,
        // the busiest statement on the server).
        visible_sql: "SELECT m.user_id FROM UNNEST($1::uuid[], $2::uuid[]) AS k(c, u)
                      CROSS JOIN LATERAL (SELECT user_id FROM members
                                          WHERE community_id = k.c AND user_id = k.u
                                          LIMIT 1) m",
        worker: env
            .app(app)
            .members
            .clone()
            .ok_or_else(|| anyhow::anyhow!("the bench application runs no members worker"))?,
    };
    open_loop(env, plan, progress, probe).await
}

/// A worker's committed batches, the events they applied and their time, as counted so far.
#[derive(Clone, Copy)]
struct BatchTotals {
    batches: u64,
    events: u64,
    micros: u64,
}

impl BatchTotals {
    fn of(stats: &rookery_projections::WorkerStats) -> Self {
        Self {
            batches: stats.batches_total.load(Ordering::Relaxed),
            events: stats.applied_total.load(Ordering::Relaxed),
            micros: stats.batch_micros_total.load(Ordering::Relaxed),
        }
    }

    fn since(self, before: Self) -> Self {
        Self {
            batches: self.batches.saturating_sub(before.batches),
            events: self.events.saturating_sub(before.events),
            micros: self.micros.saturating_sub(before.micros),
        }
    }
}

/// Open loop at a fixed rate: request `i` is due at `start + i/rate` whether or not earlier ones
/// answered, and its latency runs from then (not from when it was actually sent) until its row
/// is visible in the read model. One observer asks the read model for all outstanding keys at
/// once, so observing adds one cheap indexed query per millisecond rather than one per request.
pub(super) async fn open_loop(
    env: &Env,
    plan: &Plan,
    progress: &Progress,
    probe: Probe,
) -> anyhow::Result<(Vec<Figure>, Curves)> {
    let Probe {
        prefix,
        what,
        seen_in,
        p50_target,
        send,
        visible_sql,
        worker,
    } = probe;
    // No model still folding what came before competes with the window.
    super::commands::catch_up(env, None, plan.latency_drain).await?;
    let batches_before = BatchTotals::of(&worker);
    let watched = worker.clone();
    let rate = f64::from(plan.latency_rate);
    let total = (rate * plan.latency_window.as_secs_f64()).round() as u64;
    // Accepted requests not yet seen in the read model: key → (community, due time).
    let pending: Arc<Mutex<HashMap<Uuid, (Uuid, Instant)>>> = Arc::default();
    let accepted: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let errors = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let inflight = Arc::new(AtomicU64::new(0));
    let sent_all = Arc::new(AtomicBool::new(false));

    let start = Instant::now() + Duration::from_millis(50);
    let drain_deadline = start + plan.latency_window + plan.latency_drain;
    // Asks the read model after every committed batch (at most every 1 ms, at least
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
            let committed = worker.committed.notified();
            tokio::pin!(committed);
            let mut asked = Instant::now();
            loop {
                let _ = tokio::time::timeout(Duration::from_millis(5), committed.as_mut()).await;
                committed.set(worker.committed.notified());
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
                let found: Vec<Uuid> = sqlx::query_scalar(visible_sql)
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
        "{prefix}: open loop at {}/s for {:.0}s",
        plan.latency_rate,
        plan.latency_window.as_secs_f64()
    ));
    // The sends are timed by a thread of their own with the OS timer: the runtime's timer has
    // 1 ms ticks and its tasks queue behind the application's, and every bit of lateness of a
    // send would be counted against the system under test.
    let sent = Arc::new(AtomicU64::new(0));
    // Stops the sending thread when this scenario ends early (its budget ran out).
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let generator = {
        let stop = stop.0.clone();
        let runtime = tokio::runtime::Handle::current();
        let (sent, inflight) = (sent.clone(), inflight.clone());
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
                let request = send(i);
                let (pending, accepted, errors, first_error, in_flight) = (
                    pending.clone(),
                    accepted.clone(),
                    errors.clone(),
                    first_error.clone(),
                    inflight.clone(),
                );
                requests.push(runtime.spawn(async move {
                    match request.await {
                        Ok((community, key)) => {
                            let answered = Instant::now() - due;
                            if let Ok(mut a) = accepted.lock() {
                                a.push(answered);
                            }
                            if let Ok(mut p) = pending.lock() {
                                p.insert(key, (community, due));
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
            done = &mut generator => break done.context("the open-loop load generator")?,
            _ = tokio::time::sleep(Duration::from_millis(100)) => progress.tick(&format!(
                "{prefix}: {}/{total} sent, {} in flight",
                sent.load(Ordering::Relaxed),
                inflight.load(Ordering::Relaxed)
            )),
        }
    };
    let sent_for = Instant::now() - start;
    sent_all.store(true, Ordering::SeqCst);
    progress.status(&format!(
        "{prefix}: waiting for the last {what} to become visible"
    ));
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
    let batches = BatchTotals::of(&watched).since(batches_before);
    let late_sends = behind
        .iter()
        .filter(|b| **b > Duration::from_millis(1))
        .count();
    let behind = Latencies::new(behind);
    let (mut visible, unseen) = observer.await.context("the open-loop observer")??;
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
        "{total} {what} due at {}/s over {:.1}s (sent in {:.1}s, each behind its due time by p50 {:.3} ms / p99 {:.3} ms, {late_sends} by >1 ms); {n_visible} seen in {seen_in}; p50 {:.1} ms in the window's first quarter, {:.1} ms in its last",
        plan.latency_rate,
        plan.latency_window.as_secs_f64(),
        sent_for.as_secs_f64(),
        behind.percentile(0.5).map(stats::ms).unwrap_or(0.0),
        behind.percentile(0.99).map(stats::ms).unwrap_or(0.0),
        drift.0,
        drift.1,
    );
    if batches.batches > 0 {
        context.push_str(&format!(
            "; {seen_in} committed {} batches of {:.1} events in {:.2} ms on average",
            batches.batches,
            batches.events as f64 / batches.batches as f64,
            batches.micros as f64 / 1000.0 / batches.batches as f64,
        ));
    }
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
            None => Figure::missing(
                name,
                "ms",
                target,
                format!("none of the {what} became visible"),
            ),
        };
        figures.push(match note {
            Some(n) => f.with_note(n),
            None => f,
        });
    };
    let name = |suffix: &str| format!("{prefix}_{suffix}");
    push(&name("p50"), p(&lat, 0.5), p50_target, Some(context));
    push(&name("p99"), p(&lat, 0.99), P99_TARGET, None);
    push(
        &name("p999"),
        p(&lat, 0.999),
        Target::None,
        lat.max().map(|m| format!("max {:.1} ms", stats::ms(m))),
    );
    push(
        &name("accept_p50"),
        p(&acc, 0.5),
        Target::None,
        Some("due time → 201 from the API (the command's share of the above)".into()),
    );
    push(&name("accept_p99"), p(&acc, 0.99), Target::None, None);
    let curves = vec![
        (format!("due → visible in {seen_in}"), vis_curve),
        ("due → answered 201".to_string(), acc.curve()),
    ];
    Ok((figures, curves))
}

pub(super) struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
