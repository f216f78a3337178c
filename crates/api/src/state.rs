//! Shared state of every handler: one `Arc`, cheap to clone per request.
//!
//! Extractors that need only a part of it take that part as a sub-state ([`FromRef`]): the JWT
//! keys for [`AuthUser`](crate::auth::AuthUser), the community reader for access checks. So
//! neither `auth` nor `access` depends on this module, and this module depends on both.

use std::sync::Arc;

use axum::extract::FromRef;
use rookery_nats::Bus;
use rookery_store::EventStore;
use sqlx::PgPool;

use crate::access::Communities;
use crate::auth::JwtKeys;
use crate::config::ApiConfig;
use crate::directory::Directory;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    store: EventStore,
    keys: Arc<JwtKeys>,
    config: ApiConfig,
    bus: Option<Bus>,
    metrics: Metrics,
    communities: Communities,
    directory: Directory,
}

impl AppState {
    /// `bus` is `None` when the process runs without NATS (then `/ready` does not check it).
    /// `metrics` renders what the process records (see [`Metrics`]).
    pub fn new(pool: PgPool, bus: Option<Bus>, config: ApiConfig, metrics: Metrics) -> Self {
        let keys = Arc::new(JwtKeys::new(&config.auth));
        let store = EventStore::new(pool.clone());
        Self {
            inner: Arc::new(Inner {
                communities: Communities::new(store.clone()),
                store,
                pool,
                keys,
                config,
                bus,
                metrics,
                directory: Directory::default(),
            }),
        }
    }

    /// What `/metrics` renders.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Communities as access checks load them (with the cache a first join is decided on).
    pub(crate) fn communities(&self) -> &Communities {
        &self.inner.communities
    }

    /// Platform accounts' hub users and known memberships, as this process last saw them.
    pub(crate) fn directory(&self) -> &Directory {
        &self.inner.directory
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

impl FromRef<AppState> for Arc<JwtKeys> {
    fn from_ref(state: &AppState) -> Self {
        state.inner.keys.clone()
    }
}

impl FromRef<AppState> for Communities {
    fn from_ref(state: &AppState) -> Self {
        state.inner.communities.clone()
    }
}
