use anyhow::Context as _;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use super::commands::{against_raw, catch_up, raw_insert_op, raw_pool};
use super::latency::{open_loop, Probe, Sent};
use super::COMMANDS_TARGET;
use crate::env::{post_message, Env};
use crate::load::closed_loop;
use crate::report::{Curves, Figure, Progress, Target};
use crate::stats::{self, Latencies};
use crate::Plan;

// ---- chat ----

/// Chat ingest runs at this concurrency (the figure), against raw commits at the same.
pub(super) const CHAT_CONCURRENCY: usize = 32;
/// Platform users each load worker posts for, in turn: the first message of each makes a
/// shadow user and a membership, the rest are plain messages of a known member.
const SENDERS_PER_WORKER: u64 = 64;

/// The figures of the chat scenario, and the visibility curves of its open loop.
pub(super) async fn chat(
    env: &Env,
    app: usize,
    plan: &Plan,
    progress: &Progress,
) -> anyhow::Result<(Vec<Figure>, Curves)> {
    let mut figures = vec![ingest(env, app, plan, progress).await?];
    let (visible, curves) = visible(env, app, plan, progress).await?;
    figures.extend(visible);
    Ok((figures, curves))
}

/// `POST …/messages` through a service token from many platform senders, closed loop at
/// [`CHAT_CONCURRENCY`], against raw single-row commits at the same concurrency (half before,
/// half after, as for commands).
async fn ingest(env: &Env, app: usize, plan: &Plan, progress: &Progress) -> anyhow::Result<Figure> {
    let c = CHAT_CONCURRENCY;
    let template = Arc::new(
        env.template
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no template event"))?,
    );
    // A busy community's chat comes mostly from people who have chatted before: the senders
    // post their first message (which also makes a shadow user and a membership) first, and
    // how fast that goes is reported beside the figure.
    progress.status(&format!(
        "chat ingest c{c}: first messages of {} platform users",
        c as u64 * SENDERS_PER_WORKER
    ));
    let first = first_messages(env, app).await?;
    // Their shadow users and memberships are folded before the limit is measured.
    catch_up(env, None, plan.commands_window).await?;

    let raw_pool = raw_pool(env).await?;
    let raw_op = raw_insert_op(raw_pool.clone(), template);
    progress.status(&format!("chat ingest c{c}: raw single-row inserts (limit)"));
    let raw1 = closed_loop(c, plan.warmup, plan.commands_window / 2, raw_op.clone()).await;

    progress.status(&format!(
        "chat ingest c{c}: messages of platform users through the HTTP API"
    ));
    let send = message_sender(env, app, "ingest");
    let api = closed_loop(c, plan.warmup, plan.commands_window, move |w, n| {
        let sent = send(w as u64, n);
        async move { sent.await.map(|_| ()) }
    })
    .await;
    let caught_up = catch_up(env, env.app(app).messages.as_deref(), plan.commands_window).await?;
    progress.status(&format!("chat ingest c{c}: raw single-row inserts (limit)"));
    let raw2 = closed_loop(c, Duration::ZERO, plan.commands_window / 2, raw_op).await;
    raw_pool.close().await;
    let raw = raw1.merge(raw2);

    let senders = c as u64 * SENDERS_PER_WORKER;
    let api_lat = Latencies::new(api.latencies.clone());
    let raw_lat = Latencies::new(raw.latencies.clone());
    let f = Figure::new(
        format!("chat_ingest_c{c}"),
        api.rate(),
        "messages/s",
        Some(raw.rate()),
        COMMANDS_TARGET,
    )
    .with_note(format!(
        "p50 {:.2} ms per message vs {:.2} ms per raw insert; {} messages from {senders} platform \
         users known from their first message, {} raw commits; every read model \
         caught up {}; the first messages (each also a shadow user and a membership): \
         {senders} at {:.0}/s",
        api_lat.percentile(0.5).map(stats::ms).unwrap_or(0.0),
        raw_lat.percentile(0.5).map(stats::ms).unwrap_or(0.0),
        api.ops,
        raw.ops,
        caught_up.describe(),
        first,
    ));
    Ok(against_raw(f, &api, &raw, "messages/s"))
}

/// Every load worker posts the first message of each of its platform users, at
/// [`CHAT_CONCURRENCY`]; answers the rate.
async fn first_messages(env: &Env, app: usize) -> anyhow::Result<f64> {
    let send = Arc::new(message_sender(env, app, "first"));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..CHAT_CONCURRENCY as u64 {
        let send = send.clone();
        workers.spawn(async move {
            for n in 0..SENDERS_PER_WORKER {
                send(w, n).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done.context("a first-message worker stopped")??;
    }
    Ok(stats::rate(
        CHAT_CONCURRENCY as u64 * SENDERS_PER_WORKER,
        started.elapsed(),
    ))
}

/// Open loop at the latency rate: message → visible in the community's history (the messages
/// read model), from the platform users the ingest made known.
async fn visible(
    env: &Env,
    app: usize,
    plan: &Plan,
    progress: &Progress,
) -> anyhow::Result<(Vec<Figure>, Curves)> {
    let send = message_sender(env, app, "visible");
    let probe = Probe {
        prefix: "chat_visible",
        what: "messages",
        seen_in: "the message history",
        p50_target: Target::None,
        // Request `i` goes out as worker `i mod 32`'s message `i / 32`: the ingest's senders.
        send: Arc::new(move |i| {
            let c = CHAT_CONCURRENCY as u64;
            send(i % c, i / c)
        }),
        visible_sql: "SELECT m.message_id FROM UNNEST($1::uuid[], $2::uuid[]) AS k(c, id)
                      CROSS JOIN LATERAL (SELECT message_id FROM messages
                                          WHERE message_id = k.id AND community_id = k.c) m",
        worker: env
            .app(app)
            .messages
            .clone()
            .ok_or_else(|| anyhow::anyhow!("the bench application runs no messages worker"))?,
    };
    open_loop(env, plan, progress, probe).await
}

/// Posts message `n` of load worker `w`: in community `w mod 32`, from that worker's platform
/// user `n mod 64`, with an external id unique to `run`. Answers `(community, message id)`.
fn message_sender(env: &Env, app: usize, run: &'static str) -> impl Fn(u64, u64) -> Sent {
    let http = env.http.clone();
    let base: Arc<str> = env.app(app).base().into();
    let communities = Arc::new(env.communities.clone());
    let tokens = Arc::new(env.service_tokens.clone());
    move |w, n| {
        let (http, base, tokens) = (http.clone(), base.clone(), tokens.clone());
        let at = (w as usize) % communities.len().max(1);
        let community = communities[at];
        let sender = format!("bench-{w}-{}", n % SENDERS_PER_WORKER);
        let body = json!({
            "channel": "general",
            "text": format!("message {n} of {sender}"),
            "platform": "twitch",
            "external_id": format!("{run}-{w}-{n}"),
            "sender": {"platform_user_id": sender, "username": sender},
        });
        Box::pin(async move {
            let token = tokens
                .get(at)
                .ok_or_else(|| anyhow::anyhow!("no service token"))?;
            let id = post_message(&http, &base, token, community, &body).await?;
            Ok((community, id))
        })
    }
}
