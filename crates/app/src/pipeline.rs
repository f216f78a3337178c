//! The relay, the projection workers and the reactors: where they run and what they run on.
//!
//! In `rookery up` they share the process with the API. Tokio schedules tasks cooperatively, so
//! on the API's runtime a projection batch being decoded and folded held up the requests queued
//! behind it on that thread. Here they get a runtime, a Postgres pool and a NATS connection of
//! their own, on threads the operating system schedules against the API's (and, by default,
//! behind them: `ROOKERY_PIPELINE_NICE`). A command is answered first; the read models follow
//! a moment later when the cores are busy. In `rookery work` the pipeline is all the process
//! runs, so it uses the process's runtime and connections.

use crate::config::Config;
use anyhow::Context;
use rookery_nats::{Bus, Relay, RelayConfig};
use rookery_projections::reactors::AutoBan;
use rookery_projections::{ProjectionWorker, WorkerConfig};
use rookery_store::{DbConfig, PgPool};
use std::future::Future;
use tokio::runtime::{Handle, Runtime};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::task::AbortOnDropHandle;

/// Name of the threads of the pipeline's own runtime (Linux shows 15 characters).
pub const THREAD_NAME: &str = "rookery-pipe";

pub(crate) struct Pipeline {
    /// `None`: the pipeline runs on the caller's runtime and connections.
    runtime: Option<OwnRuntime>,
    pool: PgPool,
    bus: Bus,
    relay: RelayConfig,
    /// Built up front so their stats can be watched.
    pub(crate) workers: Vec<ProjectionWorker>,
}

/// A runtime that may be dropped from async code (an application task dropped by a test, a
/// build that failed half-way): its threads are let go instead of waited for.
struct OwnRuntime(Option<Runtime>);

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl Pipeline {
    /// The pipeline on the caller's runtime and connections (`rookery work`).
    pub(crate) fn shared(config: &Config, pool: PgPool, bus: Bus) -> Self {
        Self::new(config, None, pool, bus)
    }

    /// The pipeline on a runtime and connections of its own (`rookery up`), its threads
    /// `config.pipeline_nice` nice steps below the caller's.
    pub(crate) async fn isolated(
        config: &Config,
        db: &DbConfig,
        bus: &Bus,
    ) -> anyhow::Result<Self> {
        // Computed here, once: threads the runtime starts later (its blocking pool) are started
        // by its own, already lowered, threads and would otherwise be lowered again.
        let nice = lowered_nice(config.pipeline_nice);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name(THREAD_NAME)
            .on_thread_start(move || {
                if let Some(nice) = nice {
                    set_nice(nice);
                }
            })
            .enable_all()
            .build()
            .context("starting the pipeline's runtime")?;
        let handle = runtime.handle().clone();
        let runtime = OwnRuntime(Some(runtime));
        // Connected from inside, so their sockets are driven by the pipeline's threads. The
        // database and the stream exist by now: the caller's connections set them up.
        let db = DbConfig {
            create_if_missing: false,
            ..db.clone()
        };
        let bus = bus.clone();
        let (pool, bus) = handle
            .spawn(async move {
                let pool = rookery_store::connect(&db).await?;
                let bus = bus.another_connection().await?;
                anyhow::Ok((pool, bus))
            })
            .await
            .context("the pipeline's runtime stopped while connecting")??;
        Ok(Self::new(config, Some(runtime), pool, bus))
    }

    fn new(config: &Config, runtime: Option<OwnRuntime>, pool: PgPool, bus: Bus) -> Self {
        let worker_config = WorkerConfig {
            min_batch_interval: config.batch_interval,
            relaxed_batch_interval: config.relaxed_batch_interval,
            ..WorkerConfig::default()
        };
        let workers = rookery_projections::all()
            .into_iter()
            .map(|p| ProjectionWorker::new(pool.clone(), bus.clone(), p, worker_config.clone()))
            .collect();
        Self {
            runtime,
            pool,
            bus,
            relay: RelayConfig {
                min_read_interval: config.relay_interval,
                ..RelayConfig::default()
            },
            workers,
        }
    }

    /// Spawns the relay and every worker on the pipeline's runtime; each reports into `tasks`
    /// (on the caller's runtime) when it stops. Returns what must outlive them.
    pub(crate) fn spawn<F>(
        self,
        tasks: &mut JoinSet<(&'static str, anyhow::Result<()>)>,
        stop: impl Fn() -> F,
    ) -> Running
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = self
            .runtime
            .as_ref()
            .and_then(|own| own.0.as_ref())
            .map_or_else(Handle::current, |runtime| runtime.handle().clone());
        // Aborting a report (a drain that timed out) aborts its part on the pipeline's runtime.
        let mut report = |name: &'static str, part: JoinHandle<anyhow::Result<()>>| {
            let part = AbortOnDropHandle::new(part);
            tasks.spawn(async move {
                let result = match part.await {
                    Ok(result) => result,
                    Err(e) => Err(anyhow::anyhow!("{name} panicked: {e}")),
                };
                (name, result)
            });
        };
        let relay = Relay::new(self.pool.clone(), self.bus, self.relay);
        let stopped = stop();
        report("relay", handle.spawn(relay.run(stopped)));
        let auto_ban = AutoBan::new(self.pool.clone());
        let stopped = stop();
        report("auto-ban reactor", handle.spawn(auto_ban.run(stopped)));
        for worker in self.workers {
            let stopped = stop();
            report(
                "projection worker",
                handle.spawn(async move { worker.run(stopped).await }),
            );
        }
        Running {
            own: self.runtime.map(|runtime| (runtime, self.pool)),
        }
    }
}

/// The pipeline's own runtime and pool while its parts run.
pub(crate) struct Running {
    own: Option<(OwnRuntime, PgPool)>,
}

impl Running {
    /// After the parts stopped: closes the pipeline's own connections and lets its threads go.
    pub(crate) async fn close(self) {
        if let Some((_runtime, pool)) = self.own {
            pool.close().await;
        }
    }
}

/// The nice value `steps` steps below the calling thread's (Linux keeps one per thread), or
/// `None` when threads are to keep the priority they inherit.
fn lowered_nice(steps: i32) -> Option<i32> {
    if steps == 0 {
        return None;
    }
    #[cfg(target_os = "linux")]
    match rustix::process::getpriority_process(Some(rustix::thread::gettid())) {
        Ok(nice) => Some((nice + steps).min(19)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read this thread's priority; the pipeline keeps it");
            None
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        tracing::debug!(steps, "ROOKERY_PIPELINE_NICE applies on Linux only");
        None
    }
}

/// Sets the calling thread's nice value. Raising it needs no privilege; where it fails the
/// thread keeps the process's priority, which only costs the API some throughput when the cores
/// are busy.
#[cfg_attr(not(target_os = "linux"), allow(unused_variables))]
fn set_nice(nice: i32) {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice) {
        tracing::warn!(error = %e, nice, "could not lower the pipeline threads' priority");
    }
}
