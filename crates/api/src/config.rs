//! What the composition root tells the API.

use std::time::Duration;

/// Token issuing and checking.
#[derive(Clone)]
pub struct AuthConfig {
    /// HS256 signing secret. Long and random (the app generates one into `settings` when unset).
    pub jwt_secret: String,
    /// `iss` written into and required of every token.
    pub issuer: String,
    /// `aud` written into and required of every token.
    pub audience: String,
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
}

impl AuthConfig {
    pub fn new(jwt_secret: impl Into<String>) -> Self {
        Self {
            jwt_secret: jwt_secret.into(),
            issuer: "rookery".into(),
            audience: "rookery-api".into(),
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

// Hand-written so the secret never reaches a log line.
impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("jwt_secret", &"***")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("access_ttl", &self.access_ttl)
            .field("refresh_ttl", &self.refresh_ttl)
            .finish()
    }
}

#[derive(Clone, Debug)]
pub struct ApiConfig {
    pub auth: AuthConfig,
    /// The JetStream stream the relay publishes to (its cursor gives the relay lag metric).
    pub stream: String,
    /// Bus partitions; projections keep one checkpoint per partition.
    pub partitions: u32,
    /// How long a query with `min_position` waits for the read model before answering 503.
    pub read_wait: Duration,
    /// Largest accepted request body, in bytes.
    pub body_limit: usize,
}

impl ApiConfig {
    pub fn new(auth: AuthConfig, stream: impl Into<String>, partitions: u32) -> Self {
        Self {
            auth,
            stream: stream.into(),
            partitions,
            read_wait: Duration::from_secs(5),
            body_limit: 256 * 1024,
        }
    }
}
