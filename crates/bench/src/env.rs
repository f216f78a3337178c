//! The bench's private world: a uniquely named database on the configured Postgres server, its
//! own streams and subject prefixes on the configured NATS, the real application in-process on
//! port 0, fixtures, and the removal of all of it.

use anyhow::{bail, Context as _};
use base64::Engine;
use rand::RngCore;
use rookery_api::auth::JwtKeys;
use rookery_api::AuthConfig;
use rookery_events::LogPosition;
use rookery_store::{DbConfig, PgPool};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Plan;
use crate::report::Progress;
use rookery_app::Config;
use rookery_app::{Application, Mode};

/// Communities the fixture creates; joins spread over them.
const COMMUNITIES: usize = 32;

/// A stored MemberJoined event used as the shape of bulk-inserted and raw-inserted events, with
/// the ids it contains (replaced per copy).
#[derive(Clone, Debug)]
pub struct Template {
    pub aggregate_type: String,
    pub event_type: String,
    pub event_version: String,
    pub payload: String,
    pub metadata: String,
    pub user_id: String,
    pub community_id: String,
}

impl Template {
    /// The template's payload and metadata for another user and aggregate.
    pub fn for_user(&self, user: Uuid) -> (String, String, String) {
        let u = user.to_string();
        let aggregate = rookery_events::membership::membership_id(
            self.community_id.parse().unwrap_or_default(),
            user,
        )
        .to_string();
        (
            aggregate,
            self.payload.replace(&self.user_id, &u),
            self.metadata.replace(&self.user_id, &u),
        )
    }
}

/// A stored MessagePosted event (hub chat: no platform fields), whose ids bulk inserts replace.
#[derive(Clone, Debug)]
pub struct MessageTemplate {
    pub event_version: String,
    pub payload: String,
    pub metadata: String,
}

pub struct Env {
    /// The application's configuration: the bench database, stream and prefix, port 0.
    pub config: Config,
    /// The bench's own small pool on the bench database (setup, observers, bulk inserts).
    pub pool: PgPool,
    pub keys: Arc<JwtKeys>,
    pub http: reqwest::Client,
    pub communities: Vec<Uuid>,
    /// Service tokens of the communities (same order): what a platform integration posts
    /// messages with.
    pub service_tokens: Vec<String>,
    pub template: Option<Template>,
    /// A stored hub-chat MessagePosted event: the shape of bulk-inserted messages.
    pub message_template: Option<MessageTemplate>,
    /// The server the bench database lives on (its maintenance database), for the drop.
    admin_url: String,
    db_name: String,
    /// Every stream created; deleted at the end.
    streams: Vec<String>,
    apps: Vec<RunningApp>,
    removed: bool,
    pub id: String,
}

/// The application running in-process.
pub struct RunningApp {
    pub addr: SocketAddr,
    /// The members worker's counters, when the app runs workers.
    pub members: Option<Arc<rookery_projections::WorkerStats>>,
    /// The messages worker's counters, when the app runs workers.
    pub messages: Option<Arc<rookery_projections::WorkerStats>>,
    stop: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl RunningApp {
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Env {
    pub async fn create(
        config: &Config,
        _plan: &Plan,
        progress: &Progress,
    ) -> anyhow::Result<Self> {
        let id = Uuid::new_v4().simple().to_string()[..12].to_string();
        let db_name = format!("rookery_bench_{id}");
        let mut url = url::Url::parse(&config.database_url).with_context(|| {
            format!(
                "DATABASE_URL `{}` is not a URL",
                rookery_store::db::redact(&config.database_url)
            )
        })?;
        url.set_path(&db_name);
        let bench_url = url.to_string();
        url.set_path("postgres");
        let admin_url = url.to_string();

        let mut secret = [0u8; 36];
        rand::thread_rng().fill_bytes(&mut secret);
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
        let app_config = Config {
            database_url: bench_url.clone(),
            database_url_explicit: true,
            nats_url_explicit: true,
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stream: format!("rookery_bench_{id}"),
            subject_prefix: format!("rookerybench{id}"),
            jwt_secret: Some(secret.clone()),
            ..config.clone()
        };
        progress.status(&format!("creating database {db_name}"));
        let mut env = Env {
            keys: Arc::new(JwtKeys::new(&AuthConfig::new(secret))),
            http: reqwest::Client::builder()
                .tcp_nodelay(true)
                .pool_max_idle_per_host(1024)
                .timeout(Duration::from_secs(30))
                .build()
                .context("building the HTTP client")?,
            pool: sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect_lazy(&admin_url)
                .context("DATABASE_URL")?,
            config: app_config,
            communities: Vec::new(),
            service_tokens: Vec::new(),
            template: None,
            message_template: None,
            admin_url,
            db_name,
            streams: vec![format!("rookery_bench_{id}")],
            apps: Vec::new(),
            removed: false,
            id,
        };
        // From here on `env` owns the names: dropping it (on an error below) removes them.
        let mut db = DbConfig::new(&bench_url);
        db.max_connections = 8;
        env.pool = rookery_store::connect(&db).await?;
        rookery_store::migrate(&env.pool).await?;
        Ok(env)
    }

    /// Registers a stream name for removal at the end.
    pub fn track_stream(&mut self, name: String) {
        if !self.streams.contains(&name) {
            self.streams.push(name);
        }
    }

    /// Starts the real application in `mode` on port 0 against the bench database and stream.
    pub async fn start_app(&mut self, mode: Mode) -> anyhow::Result<usize> {
        let app = Application::build(self.config.clone(), mode)
            .await
            .context("starting the application")?;
        let addr = app
            .local_addr()
            .ok_or_else(|| anyhow::anyhow!("the application does not listen"))?;
        let members = app.projection_stats(rookery_projections::models::members::NAME);
        let messages = app.projection_stats(rookery_projections::models::messages::NAME);
        let stop = CancellationToken::new();
        let handle = tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
        self.apps.push(RunningApp {
            addr,
            members,
            messages,
            stop,
            handle: Some(handle),
        });
        Ok(self.apps.len() - 1)
    }

    pub fn app(&self, index: usize) -> &RunningApp {
        &self.apps[index]
    }

    /// Stops an application gracefully (its workers finish their batches).
    pub async fn stop_app(&mut self, index: usize) -> anyhow::Result<()> {
        let app = &mut self.apps[index];
        app.stop.cancel();
        if let Some(handle) = app.handle.take() {
            match tokio::time::timeout(Duration::from_secs(40), handle).await {
                Ok(joined) => joined.context("application task")??,
                Err(_) => bail!("the application did not stop within 40s"),
            }
        }
        Ok(())
    }

    /// A signed access token for `user` (the bench mints tokens with the secret it gave the app,
    /// so password hashing, which is deliberately slow, stays out of every measured path).
    pub fn token(&self, user: Uuid) -> anyhow::Result<String> {
        mint(&self.keys, user)
    }

    /// Creates the communities joins go to, and one join whose stored event is the template
    /// for bulk and raw inserts.
    pub async fn fixtures(&mut self, app: usize, progress: &Progress) -> anyhow::Result<()> {
        progress.status(&format!("creating {COMMUNITIES} communities"));
        let base = self.app(app).base();
        let owner = Uuid::new_v4();
        let token = self.token(owner)?;
        for i in 0..COMMUNITIES {
            let resp = self
                .http
                .post(format!("{base}/v1/communities"))
                .bearer_auth(&token)
                .json(&json!({
                    "name": format!("bench-{}-{i}", self.id),
                    "display_name": format!("Bench community {i}"),
                    "platform": "twitch",
                    "is_public": true,
                    "join_mode": "open",
                }))
                .send()
                .await
                .context("creating a bench community")?;
            let status = resp.status();
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            if status != reqwest::StatusCode::CREATED {
                bail!("creating a bench community answered {status}: {body}");
            }
            let id = body["id"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("community id missing in {body}"))?;
            self.communities.push(id);
            self.service_tokens
                .push(mint_service(&self.keys, owner, id)?);
        }
        let user = Uuid::new_v4();
        join(&self.http, &base, &self.token(user)?, self.communities[0]).await?;
        // The bench's users are never registered (it mints their tokens), so the template is a
        // platform user's message with the platform fields taken out: hub chat's shape.
        post_message(
            &self.http,
            &base,
            &self.service_tokens[0],
            self.communities[0],
            &json!({"channel": "general", "text": "the bench's template message",
                    "platform": "twitch", "external_id": "template",
                    "sender": {"platform_user_id": "template", "username": "template"}}),
        )
        .await?;
        let row: (String, serde_json::Value, String) = sqlx::query_as(
            "SELECT event_version, payload, metadata::text FROM events
             WHERE event_type = 'MessagePosted' ORDER BY global_position DESC LIMIT 1",
        )
        .fetch_one(&self.pool)
        .await
        .context("reading the template message")?;
        let mut payload = row.1;
        if let Some(posted) = payload
            .get_mut("MessagePosted")
            .and_then(|p| p.as_object_mut())
        {
            for platform_field in ["platform", "external_id", "platform_user_id"] {
                posted.remove(platform_field);
            }
        }
        self.message_template = Some(MessageTemplate {
            event_version: row.0,
            payload: payload.to_string(),
            metadata: row.2,
        });
        let row: (String, String, String, String, String) = sqlx::query_as(
            "SELECT aggregate_type, event_type, event_version, payload::text, metadata::text
             FROM events WHERE event_type = 'MemberJoined' AND payload::text LIKE '%' || $1 || '%'
             ORDER BY global_position DESC LIMIT 1",
        )
        .bind(user.to_string())
        .fetch_one(&self.pool)
        .await
        .context("reading the template event")?;
        self.template = Some(Template {
            aggregate_type: row.0,
            event_type: row.1,
            event_version: row.2,
            payload: row.3,
            metadata: row.4,
            user_id: user.to_string(),
            community_id: self.communities[0].to_string(),
        });
        Ok(())
    }

    pub async fn event_count(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Appends MemberJoined events of fresh users over the fixture communities until the log
    /// holds `total` events, with one INSERT … SELECT generate_series per chunk (one transaction
    /// each), the way a busy system would have written them, only faster.
    pub async fn fill_log(&self, total: u64, progress: &Progress) -> anyhow::Result<u64> {
        let template = self
            .template
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no template event"))?;
        let have = u64::try_from(self.event_count().await?).unwrap_or(0);
        let missing = total.saturating_sub(have);
        let chunk: u64 = 50_000;
        let started = Instant::now();
        let mut done = 0;
        while done < missing {
            let n = chunk.min(missing - done);
            sqlx::query(
                "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
                 SELECT $1, md5(s.c::text || s.u::text)::uuid::text, 1, $2, $3,
                        replace(replace($4, $5, s.u::text), $6, s.c::text)::jsonb,
                        replace($7, $5, s.u::text)::jsonb
                 FROM (SELECT gen_random_uuid() AS u, ($8::uuid[])[1 + g % $9] AS c
                       FROM generate_series(1, $10::bigint) AS g) AS s",
            )
            .bind(&template.aggregate_type)
            .bind(&template.event_type)
            .bind(&template.event_version)
            .bind(&template.payload)
            .bind(&template.user_id)
            .bind(&template.community_id)
            .bind(&template.metadata)
            .bind(&self.communities)
            .bind(i64::try_from(self.communities.len()).unwrap_or(1))
            .bind(i64::try_from(n).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await
            .context("bulk-inserting events")?;
            done += n;
            progress.status(&format!(
                "filling the log: {}/{} events ({:.0}/s)",
                have + done,
                total,
                super::stats::rate(done, started.elapsed())
            ));
        }
        if missing > 0 {
            // Fresh statistics and a visibility map, as autovacuum would have by the time a real
            // log is this big — and so that autovacuum does not start on the bulk insert while
            // a scenario measures the stored state.
            progress.status(&format!("vacuuming the log ({} events)", have + done));
            sqlx::query("VACUUM (ANALYZE) events")
                .execute(&self.pool)
                .await
                .context("VACUUM (ANALYZE) events")?;
        }
        Ok(missing)
    }

    /// Appends hub-chat MessagePosted events until the log holds `total` of them, sent by up
    /// to 10,000 of the members the log holds (each in the community they joined), with one
    /// INSERT … SELECT generate_series per chunk like [`Env::fill_log`].
    pub async fn fill_chat(&self, total: u64, progress: &Progress) -> anyhow::Result<u64> {
        let template = self
            .message_template
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no template message"))?;
        let have: i64 =
            sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'MessagePosted'")
                .fetch_one(&self.pool)
                .await?;
        let missing = total.saturating_sub(u64::try_from(have).unwrap_or(0));
        if missing == 0 {
            return Ok(0);
        }
        let (senders, communities): (Vec<Uuid>, Vec<Uuid>) = sqlx::query_as::<_, (Uuid, Uuid)>(
            "SELECT (payload->'MemberJoined'->>'user_id')::uuid,
                    (payload->'MemberJoined'->>'community_id')::uuid
             FROM events WHERE event_type = 'MemberJoined' LIMIT 10000",
        )
        .fetch_all(&self.pool)
        .await
        .context("choosing the senders")?
        .into_iter()
        .unzip();
        if senders.is_empty() {
            bail!("no members to send messages");
        }
        let chunk: u64 = 50_000;
        let started = Instant::now();
        let mut done = 0;
        while done < missing {
            let n = chunk.min(missing - done);
            sqlx::query(
                "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
                 SELECT 'message', s.m::text, 1, 'MessagePosted', $1,
                        jsonb_set(jsonb_set(jsonb_set($2::jsonb,
                            '{MessagePosted,message_id}', to_jsonb(s.m::text)),
                            '{MessagePosted,sender_id}', to_jsonb(s.u::text)),
                            '{MessagePosted,community_id}', to_jsonb(s.c::text)),
                        $3::jsonb
                 FROM (SELECT gen_random_uuid() AS m, ($4::uuid[])[1 + g % $6] AS u,
                              ($5::uuid[])[1 + g % $6] AS c
                       FROM generate_series(1, $7::bigint) AS g) AS s",
            )
            .bind(&template.event_version)
            .bind(&template.payload)
            .bind(&template.metadata)
            .bind(&senders)
            .bind(&communities)
            .bind(i64::try_from(senders.len()).unwrap_or(1))
            .bind(i64::try_from(n).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await
            .context("bulk-inserting messages")?;
            done += n;
            progress.status(&format!(
                "filling the log with chat: {}/{} messages ({:.0}/s)",
                u64::try_from(have).unwrap_or(0) + done,
                total,
                super::stats::rate(done, started.elapsed())
            ));
        }
        progress.status("vacuuming the log");
        sqlx::query("VACUUM (ANALYZE) events")
            .execute(&self.pool)
            .await
            .context("VACUUM (ANALYZE) events")?;
        Ok(missing)
    }

    pub async fn committed_head(&self) -> anyhow::Result<LogPosition> {
        Ok(rookery_store::log::committed_head(&self.pool)
            .await?
            .unwrap_or(LogPosition::ZERO))
    }

    /// Stops every application and removes the database and the streams. Errors are reported,
    /// not returned: removal is best effort and must not hide the bench's own outcome.
    pub async fn remove(&mut self) {
        if self.removed {
            return;
        }
        for app in &mut self.apps {
            app.stop.cancel();
        }
        for app in &mut self.apps {
            if let Some(handle) = app.handle.take() {
                if tokio::time::timeout(Duration::from_secs(10), handle)
                    .await
                    .is_err()
                {
                    tracing::warn!("a bench application did not stop in time");
                }
            }
        }
        self.pool.close().await;
        if let Err(e) = drop_database(&self.admin_url, &self.db_name).await {
            eprintln!("warning: could not drop database {}: {e:#}", self.db_name);
        }
        if let Err(e) = delete_streams(&self.config.nats_url, &self.streams).await {
            eprintln!("warning: could not delete bench streams: {e:#}");
        }
        self.removed = true;
    }
}

impl Drop for Env {
    /// The fallback when `remove` did not run (a panic): remove from a thread with its own
    /// runtime, since the caller's runtime may be unwinding.
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        for app in &mut self.apps {
            app.stop.cancel();
            if let Some(h) = app.handle.take() {
                h.abort();
            }
        }
        let (admin, name, nats, streams) = (
            self.admin_url.clone(),
            self.db_name.clone(),
            self.config.nats_url.clone(),
            self.streams.clone(),
        );
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let _ = drop_database(&admin, &name).await;
                let _ = delete_streams(&nats, &streams).await;
            });
        })
        .join();
    }
}

async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let admin = sqlx::PgPool::connect(admin_url)
        .await
        .context("connecting to the maintenance database")?;
    // FORCE ends the sessions of applications that are still winding down.
    let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
    sqlx::query(&sql).execute(&admin).await?;
    admin.close().await;
    Ok(())
}

async fn delete_streams(nats_url: &str, streams: &[String]) -> anyhow::Result<()> {
    let client = async_nats::connect(nats_url).await?;
    let js = async_nats::jetstream::new(client);
    for s in streams {
        // A stream that was never created is fine.
        let _ = js.delete_stream(s).await;
    }
    Ok(())
}

/// A signed access token for `user`.
pub fn mint(keys: &JwtKeys, user: Uuid) -> anyhow::Result<String> {
    keys.sign(&keys.claims_for(user, chrono::Utc::now()))
        .map_err(|e| anyhow::anyhow!("signing a bench token: {e}"))
}

/// A service token of `community` acting as `user` (its owner): what a platform integration
/// posts messages and activities with.
pub fn mint_service(keys: &JwtKeys, user: Uuid, community: Uuid) -> anyhow::Result<String> {
    let mut claims = keys.claims_for(user, chrono::Utc::now());
    claims.community_id = Some(community);
    claims.scope = Some("service".into());
    keys.sign(&claims)
        .map_err(|e| anyhow::anyhow!("signing a bench service token: {e}"))
}

/// `POST /v1/communities/{community}/messages` with `body`; the new message's id.
pub async fn post_message(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    community: Uuid,
    body: &serde_json::Value,
) -> anyhow::Result<Uuid> {
    let resp = http
        .post(format!("{base}/v1/communities/{community}/messages"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .context("sending a message")?;
    let bytes = created(resp, "message").await?;
    #[derive(serde::Deserialize)]
    struct Id {
        id: Uuid,
    }
    let answer: Id = serde_json::from_slice(&bytes).context("a message's answer has no id")?;
    Ok(answer.id)
}

/// `POST /v1/communities/{community}/members` as `token`'s user: one MemberJoined event.
pub async fn join(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    community: Uuid,
) -> anyhow::Result<()> {
    let resp = http
        .post(format!("{base}/v1/communities/{community}/members"))
        .bearer_auth(token)
        .send()
        .await
        .context("sending a join")?;
    created(resp, "join").await.map(drop)
}

/// The body of a `201 Created` answer to a `what`; any other status is an error showing the
/// start of the body.
async fn created(resp: reqwest::Response, what: &str) -> anyhow::Result<bytes::Bytes> {
    let status = resp.status();
    let body = resp
        .bytes()
        .await
        .with_context(|| format!("reading a {what}'s answer"))?;
    if status != reqwest::StatusCode::CREATED {
        bail!(
            "{what} answered {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
    }
    Ok(body)
}
