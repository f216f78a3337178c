//! Shared state of every handler: one `Arc`, cheap to clone per request.

use std::sync::Arc;

use rookery_nats::Bus;
use rookery_store::EventStore;
use sqlx::PgPool;

use crate::access::CommunityCache;
use crate::auth::JwtKeys;
use crate::config::ApiConfig;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    store: EventStore,
    keys: JwtKeys,
    config: ApiConfig,
    bus: Option<Bus>,
    metrics: Arc<Metrics>,
    communities: CommunityCache,
}

impl AppState {
    /// `bus` is `None` when the process runs without NATS (then `/ready` does not check it).
    pub fn new(pool: PgPool, bus: Option<Bus>, config: ApiConfig) -> Self {
        let keys = JwtKeys::new(&config.auth);
        Self {
            inner: Arc::new(Inner {
                store: EventStore::new(pool.clone()),
                pool,
                keys,
                config,
                bus,
                metrics: Arc::new(Metrics::default()),
                communities: CommunityCache::default(),
            }),
        }
    }

    /// The metrics registry `/metrics` renders; other components may record into it.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.inner.metrics.clone()
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    pub(crate) fn communities(&self) -> &CommunityCache {
        &self.inner.communities
    }

    pub fn store(&self) -> &EventStore {
        &self.inner.store
    }

    pub fn keys(&self) -> &JwtKeys {
        &self.inner.keys
    }

    pub fn config(&self) -> &ApiConfig {
        &self.inner.config
    }

    pub fn bus(&self) -> Option<&Bus> {
        self.inner.bus.as_ref()
    }
}
