//! Building and running Rookery's parts in one process.

use crate::config::Config;
use crate::pipeline::Pipeline;
use anyhow::Context;
use base64::Engine;
use rand::RngCore;
use rookery_api::{ApiConfig, AppState, AuthConfig, Metrics};
use rookery_nats::{Bus, BusConfig};
use rookery_projections::{ProjectionWorker, WorkerStats};
use rookery_store::{DbConfig, PgPool};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Which parts run in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// API, relay and projection workers.
    Up,
    /// The HTTP API only.
    Serve,
    /// Relay and projection workers only.
    Work,
}

impl Mode {
    fn serves_http(self) -> bool {
        matches!(self, Mode::Up | Mode::Serve)
    }
}

pub struct Application {
    config: Config,
    mode: Mode,
    pool: PgPool,
    bus: Bus,
    listener: Option<TcpListener>,
    state: Option<AppState>,
    /// The relay and projection workers, when this mode runs them.
    pipeline: Option<Pipeline>,
}

/// How long running parts get to drain after shutdown is requested.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

impl Application {
    /// Connects to Postgres (creating the database, running migrations) and NATS (creating the
    /// stream), and binds the HTTP listener.
    pub async fn build(config: Config, mode: Mode) -> anyhow::Result<Self> {
        config.validate()?;
        // Before anything records: handles the relay and workers register now are live.
        let metrics = Metrics::install();
        // Bound first: a taken port fails start-up before anything is created elsewhere.
        let listener = if mode.serves_http() {
            Some(TcpListener::bind(config.http_addr).await.with_context(|| {
                format!(
                    "cannot listen on {} (ROOKERY_HTTP_ADDR); is another process using the port?",
                    config.http_addr
                )
            })?)
        } else {
            None
        };
        let mut db = DbConfig::new(&config.database_url);
        db.max_connections = config.db_max_connections;
        let pool = rookery_store::connect(&db).await?;
        rookery_store::migrate(&pool).await?;

        let mut bus_config =
            BusConfig::new(&config.nats_url, &config.stream, &config.subject_prefix);
        bus_config.partitions = config.partitions;
        bus_config.ack_wait = config.ack_wait;
        let bus = Bus::connect(bus_config).await?;

        let state = if mode.serves_http() {
            let secret = jwt_secret(&pool, &config).await?;
            let api = ApiConfig {
                auth: AuthConfig {
                    jwt_secret: secret,
                    issuer: "rookery".into(),
                    audience: "rookery-api".into(),
                    access_ttl: Duration::from_secs(15 * 60),
                    refresh_ttl: Duration::from_secs(7 * 24 * 3600),
                },
                stream: config.stream.clone(),
                partitions: config.partitions,
                read_wait: config.read_wait,
                body_limit: 256 * 1024,
            };
            Some(AppState::new(pool.clone(), Some(bus.clone()), api, metrics))
        } else {
            None
        };
        let pipeline = match mode {
            Mode::Up => Some(Pipeline::isolated(&config, &db, &bus).await?),
            Mode::Work => Some(Pipeline::shared(&config, pool.clone(), bus.clone())),
            Mode::Serve => None,
        };
        Ok(Self {
            config,
            mode,
            pool,
            bus,
            listener,
            state,
            pipeline,
        })
    }

    /// The counters of the live worker of projection `name`, when this mode runs it; its
    /// `committed` notifies after every batch.
    pub fn projection_stats(&self, name: &str) -> Option<Arc<WorkerStats>> {
        self.pipeline
            .iter()
            .flat_map(|p| &p.workers)
            .find(|w| w.projection_name() == name)
            .map(ProjectionWorker::stats)
    }

    /// The bound HTTP address (when this mode serves HTTP).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn port(&self) -> Option<u16> {
        self.local_addr().map(|a| a.port())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Runs every part of this mode until `shutdown` resolves or one part fails; then lets the
    /// others finish their in-flight work (batches commit or roll back, never half-written).
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let token = CancellationToken::new();
        let mut tasks: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();

        if let (Some(listener), Some(state)) = (self.listener, self.state) {
            let app = rookery_api::router(state);
            let stop = token.clone().cancelled_owned();
            tracing::info!(addr = %listener.local_addr()?, "HTTP API listening");
            tasks.spawn(async move {
                let result = axum::serve(listener, app.into_make_service())
                    .with_graceful_shutdown(stop)
                    .await
                    .context("HTTP server failed");
                ("api", result)
            });
        }
        let pipeline = self
            .pipeline
            .map(|p| p.spawn(&mut tasks, || token.clone().cancelled_owned()));
        tracing::info!(mode = ?self.mode, stream = %self.config.stream, "rookery running");

        let mut outcome = Ok(());
        tokio::select! {
            () = shutdown => tracing::info!("shutdown requested; draining"),
            Some(joined) = tasks.join_next() => {
                outcome = report_exit(joined);
                tracing::warn!("a part stopped; stopping the others");
            }
        }
        token.cancel();
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while let Some(joined) = tasks.join_next().await {
                let result = report_exit(joined);
                if outcome.is_ok() {
                    outcome = result;
                }
            }
        })
        .await;
        if drained.is_err() {
            tasks.abort_all();
            tracing::error!("parts did not stop within {DRAIN_TIMEOUT:?}; aborted them");
        }
        if let Some(pipeline) = pipeline {
            pipeline.close().await;
        }
        self.pool.close().await;
        outcome
    }
}

fn report_exit(
    joined: Result<(&'static str, anyhow::Result<()>), tokio::task::JoinError>,
) -> anyhow::Result<()> {
    match joined {
        Ok((name, Ok(()))) => {
            tracing::info!(part = name, "stopped");
            Ok(())
        }
        Ok((name, Err(e))) => {
            tracing::error!(part = name, error = %format!("{e:#}"), "failed");
            Err(e.context(format!("{name} failed")))
        }
        Err(e) => {
            tracing::error!(error = %e, "a part panicked or was cancelled");
            Err(anyhow::anyhow!("a part panicked: {e}"))
        }
    }
}

/// `ROOKERY_JWT_SECRET`, or one generated once and kept in the database so every process and
/// restart agrees on it.
async fn jwt_secret(pool: &PgPool, config: &Config) -> anyhow::Result<String> {
    if let Some(secret) = &config.jwt_secret {
        return Ok(secret.clone());
    }
    let (secret, generated) = rookery_store::settings::get_or_init(pool, "jwt_secret", || {
        let mut bytes = [0u8; 48];
        rand::thread_rng().fill_bytes(&mut bytes);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    })
    .await
    .context("loading the generated JWT secret")?;
    if generated {
        tracing::warn!("ROOKERY_JWT_SECRET is unset: generated a secret and stored it in the database; set ROOKERY_JWT_SECRET in production");
    } else {
        tracing::warn!("ROOKERY_JWT_SECRET is unset: using the secret generated earlier and stored in the database");
    }
    Ok(secret)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
