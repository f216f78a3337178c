//! Test support: a fresh database and a private stream per test, an event writer that inserts
//! plain rows into `events`, a scenario generator, and helpers to compare tables.

use chrono::{DateTime, SecondsFormat, Utc};
use futures::future::BoxFuture;
use rookery_events::membership::membership_id;
use rookery_events::{
    Activity, ActivityEvent, CommunityEvent, Decimal4, JoinMode, JoinVia, LogPosition,
    MemberStatus, MembershipEvent, MessageEvent, Platform, RecordedEvent, ReputationPolicy, Role,
    SubTier, UserEvent,
};
use rookery_nats::{Bus, BusConfig, Relay, RelayConfig};
use rookery_projections::{Projection, TableNames, WorkerConfig};
use rookery_store::testing::TestDb;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

pub fn nats_url() -> String {
    rookery_store::testing::nats_url()
}

/// A test's world: its own database, pool and stream. Dropping it deletes both, also when the
/// test panics.
pub struct Env {
    pub pool: PgPool,
    pub bus: Bus,
    pub writer: Writer,
    bus_config: BusConfig,
    _db: TestDb,
}

impl Env {
    /// The commit-safe head is server-wide: a transaction open in another test holds it back
    /// for a moment. Waits until it covers `last`, so that a rebuild (which reads up to it) and
    /// counts taken from the log see every event written so far.
    pub async fn wait_for_head(&self, last: LogPosition) {
        eventually(Duration::from_secs(20), "the commit-safe head", || async {
            rookery_store::log::committed_head(&self.pool)
                .await
                .ok()
                .flatten()
                >= Some(last)
        })
        .await;
    }

    pub async fn new(partitions: u32) -> Env {
        init_logs();
        let db = TestDb::create().await.expect("test database");
        // More connections than TestDb's pool: workers, the relay, a rebuild and readers run at
        // once.
        let pool = PgPoolOptions::new()
            .max_connections(12)
            .acquire_timeout(Duration::from_secs(20))
            .connect(&db.url)
            .await
            .expect("pool");
        let id = Uuid::new_v4().simple().to_string();
        let mut config = BusConfig::new(nats_url(), format!("proj_{id}"), format!("proj_{id}"));
        config.partitions = partitions;
        let bus = Bus::connect(config.clone()).await.expect("bus");
        let writer = Writer::new(pool.clone());
        Env {
            pool,
            bus,
            writer,
            bus_config: config,
            _db: db,
        }
    }

    pub fn partitions(&self) -> u32 {
        self.bus_config.partitions
    }

    /// Publishes everything written so far (deterministic relay). An empty batch does not mean
    /// done: a transaction open anywhere on the server (another test) holds the commit-safe
    /// horizon back for a moment, so relay until the cursor reaches the last event.
    pub async fn relay_all(&self) {
        let relay = Relay::new(self.pool.clone(), self.bus.clone(), RelayConfig::default());
        let last: Option<(i64, i64)> = sqlx::query_as(
            "SELECT transaction_id::text::bigint, global_position FROM events
             ORDER BY events.transaction_id DESC, events.global_position DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await
        .expect("last event");
        let Some((t, g)) = last else { return };
        let target = LogPosition::from_db(t, g);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            relay.relay_once().await.expect("relay batch");
            let cursor = rookery_store::relay::load_cursor(&self.pool, &self.bus_config.stream)
                .await
                .expect("cursor");
            if cursor >= target {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "relay stuck at {cursor}, want {target}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let config = self.bus_config.clone();
        // Drop can run during a panic and inside the test's runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(bus) = Bus::connect(config).await {
                    let _ = bus.delete_stream().await;
                }
            });
        })
        .join();
    }
}

/// Logs to stderr when `TEST_LOG` is set (e.g. `TEST_LOG=rookery_projections=debug`).
pub fn init_logs() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

pub fn test_worker_config() -> WorkerConfig {
    WorkerConfig {
        batch_size: 100,
        fetch_wait: Duration::from_millis(200),
        min_batch_interval: Duration::from_millis(1),
        relaxed_batch_interval: Duration::from_millis(1),
        max_attempts: 3,
        backoff_min: Duration::from_millis(5),
        backoff_max: Duration::from_millis(50),
        standby_retry: Duration::from_millis(50),
        lock_check_interval: Duration::from_millis(500),
        pause_poll: Duration::from_millis(20),
    }
}

/// An event to write.
#[derive(Clone, Debug)]
pub enum Ev {
    M(MembershipEvent),
    U(Uuid, UserEvent),
    C(Uuid, CommunityEvent),
    Msg(Uuid, MessageEvent),
    Act(Uuid, ActivityEvent),
}

pub fn joined(c: Uuid, u: Uuid, role: Role) -> Ev {
    Ev::M(MembershipEvent::MemberJoined {
        community_id: c,
        user_id: u,
        role,
        via: None,
    })
}

pub fn registered(u: Uuid, name: &str) -> Ev {
    Ev::U(
        u,
        UserEvent::UserRegistered {
            user_id: u,
            username: name.into(),
            email: format!("{name}@example.com"),
        },
    )
}

impl Ev {
    fn parts(&self) -> (&'static str, String, &'static str, serde_json::Value) {
        match self {
            Ev::M(e) => {
                let (c, u) = e.subject();
                let payload = serde_json::to_value(e).expect("event json");
                (
                    "membership",
                    membership_id(c, u).to_string(),
                    e.name(),
                    payload,
                )
            }
            Ev::U(u, e) => {
                let payload = serde_json::to_value(e).expect("event json");
                ("user", u.to_string(), e.name(), payload)
            }
            Ev::C(c, e) => {
                let payload = serde_json::to_value(e).expect("event json");
                ("community", c.to_string(), e.name(), payload)
            }
            Ev::Msg(id, e) => {
                let payload = serde_json::to_value(e).expect("event json");
                ("message", id.to_string(), e.name(), payload)
            }
            Ev::Act(id, e) => {
                let payload = serde_json::to_value(e).expect("event json");
                ("activity", id.to_string(), e.name(), payload)
            }
        }
    }
}

/// Base of the scenario clock: event times are a pure function of the write order.
pub fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp(1_767_225_600 + seconds, 0).expect("time")
}

pub fn metadata(at: DateTime<Utc>) -> serde_json::Value {
    serde_json::json!({ "occurred_at": at.to_rfc3339_opts(SecondsFormat::Micros, true) })
}

/// Inserts events with plain SQL (what postgres-es writes), one transaction per call, keeping
/// each aggregate's sequence.
#[derive(Clone)]
pub struct Writer {
    pool: PgPool,
    sequences: Arc<Mutex<HashMap<String, i64>>>,
    clock: Arc<AtomicI64>,
}

impl Writer {
    fn new(pool: PgPool) -> Self {
        Self {
            pool,
            sequences: Arc::default(),
            clock: Arc::new(AtomicI64::new(0)),
        }
    }

    /// Takes every aggregate's sequence from the log again (after something else wrote to it).
    pub async fn resync(&self) {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT aggregate_type || '/' || aggregate_id, max(sequence) FROM events GROUP BY 1",
        )
        .fetch_all(&self.pool)
        .await
        .expect("sequences");
        *self.sequences.lock().expect("sequences") = rows.into_iter().collect();
    }

    /// Writes `events` in one transaction; returns the last one's log key.
    pub async fn write(&self, events: &[Ev]) -> LogPosition {
        let rows: Vec<_> = events
            .iter()
            .map(|e| {
                let (t, id, name, payload) = e.parts();
                let at = at(self.clock.fetch_add(1, Ordering::SeqCst));
                RawEvent {
                    aggregate_type: t.to_string(),
                    aggregate_id: id,
                    event_type: name.to_string(),
                    payload,
                    metadata: metadata(at),
                }
            })
            .collect();
        self.write_raw(rows).await
    }

    /// Writes arbitrary rows in one transaction.
    pub async fn write_raw(&self, rows: Vec<RawEvent>) -> LogPosition {
        let mut types = Vec::new();
        let mut ids = Vec::new();
        let mut sequences = Vec::new();
        let mut names = Vec::new();
        let mut payloads = Vec::new();
        let mut metadatas = Vec::new();
        {
            let mut seqs = self.sequences.lock().expect("sequences");
            for row in rows {
                let seq = seqs
                    .entry(format!("{}/{}", row.aggregate_type, row.aggregate_id))
                    .or_insert(0);
                *seq += 1;
                types.push(row.aggregate_type);
                ids.push(row.aggregate_id);
                sequences.push(*seq);
                names.push(row.event_type);
                payloads.push(row.payload);
                metadatas.push(row.metadata);
            }
        }
        let (txid, gpos): (i64, i64) = sqlx::query_as(
            "WITH inserted AS (
                INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
                SELECT t, id, s, n, '1.0', p, m
                FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::jsonb[], $6::jsonb[]) AS x(t, id, s, n, p, m)
                RETURNING global_position)
             SELECT pg_current_xact_id()::text::bigint, max(global_position) FROM inserted",
        )
        .bind(&types)
        .bind(&ids)
        .bind(&sequences)
        .bind(&names)
        .bind(&payloads)
        .bind(&metadatas)
        .fetch_one(&self.pool)
        .await
        .expect("insert events");
        LogPosition::from_db(txid, gpos)
    }
}

/// A row for `events`, as any writer could have stored it.
pub struct RawEvent {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: serde_json::Value,
    pub metadata: serde_json::Value,
}

/// Valid membership histories over a few communities and users, with registrations at random
/// points (before or after the user's memberships), and the expected final state.
pub struct Scenario {
    rng: u64,
    /// Also write community events: each community's creation before its first membership,
    /// and profile and join-mode changes now and then (every aggregate type a model may fold).
    mixed: bool,
    created: std::collections::BTreeSet<Uuid>,
    /// Messages posted so far (a moderator may delete one), with their community.
    messages: Vec<(Uuid, Uuid)>,
    pub communities: Vec<Uuid>,
    pub users: Vec<Uuid>,
    pub state: BTreeMap<(Uuid, Uuid), MemberStatus>,
    pub registered: BTreeMap<Uuid, String>,
    pub events: u64,
}

impl Scenario {
    pub fn new(seed: u64, communities: Vec<Uuid>, users: Vec<Uuid>) -> Self {
        Self {
            rng: seed | 1,
            mixed: false,
            created: Default::default(),
            messages: Vec::new(),
            communities,
            users,
            state: BTreeMap::new(),
            registered: BTreeMap::new(),
            events: 0,
        }
    }

    /// [`Scenario::new`] with community events too.
    pub fn mixed(seed: u64, communities: Vec<Uuid>, users: Vec<Uuid>) -> Self {
        Self {
            mixed: true,
            ..Self::new(seed, communities, users)
        }
    }

    fn next(&mut self, n: usize) -> usize {
        // xorshift64*: deterministic, no dependency.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
    }

    /// The next 1–3 events (one transaction's worth).
    pub fn step(&mut self) -> Vec<Ev> {
        use MemberStatus as S;
        if self.mixed && self.next(40) == 0 {
            if let Some(merge) = self.merge() {
                self.events += merge.len() as u64;
                return merge;
            }
        }
        let mut out = Vec::new();
        for _ in 0..1 + self.next(3) {
            let i = self.next(self.users.len());
            let u = self.users[i];
            if !self.registered.contains_key(&u) && self.next(4) == 0 {
                let name = format!("user-{}", &u.simple().to_string()[..8]);
                self.registered.insert(u, name.clone());
                out.push(registered(u, &name));
                continue;
            }
            let i = self.next(self.communities.len());
            let c = self.communities[i];
            if self.mixed && self.created.insert(c) {
                out.push(Ev::C(
                    c,
                    CommunityEvent::CommunityCreated {
                        community_id: c,
                        name: format!("c-{}", &c.simple().to_string()[..8]),
                        display_name: "Scenario".into(),
                        platform: Platform::Twitch,
                        is_public: true,
                        join_mode: JoinMode::Open,
                        owner_id: u,
                    },
                ));
                continue;
            }
            let active = self.state.get(&(c, u)) == Some(&MemberStatus::Active);
            if self.mixed && active && self.next(2) == 0 {
                out.push(self.chat_or_activity(c, u));
                continue;
            }
            if self.mixed && self.next(8) == 0 {
                let event = if self.next(5) == 0 {
                    let mut policy = ReputationPolicy::default();
                    policy.weights.chat_message = Decimal4::raw(1 + self.next(5000) as i64);
                    policy.weights.warn = Decimal4::units(-(self.next(100) as i64));
                    policy.max = Decimal4::units(700 + self.next(300) as i64);
                    policy.auto_ban.enabled = self.next(2) == 0;
                    policy.auto_ban.threshold = Decimal4::units(550);
                    CommunityEvent::ReputationPolicySet { policy }
                } else if self.next(2) == 0 {
                    CommunityEvent::JoinModeChanged {
                        join_mode: JoinMode::Approval,
                    }
                } else {
                    CommunityEvent::CommunityProfileUpdated {
                        display_name: Some(format!("Scenario {}", self.events)),
                        description: None,
                        is_public: None,
                    }
                };
                // One event per aggregate per transaction, as for memberships.
                if !out.iter().any(|e| matches!(e, Ev::C(x, _) if *x == c)) {
                    out.push(Ev::C(c, event));
                }
                continue;
            }
            let roll = self.next(10);
            let status = self.state.get(&(c, u)).copied();
            let (event, next) = match status {
                None | Some(S::Left | S::Removed) if roll == 0 => (
                    MembershipEvent::MemberBanned {
                        community_id: c,
                        user_id: u,
                        reason: None,
                    },
                    S::Banned,
                ),
                None | Some(S::Left | S::Removed) if roll < 3 => (
                    MembershipEvent::JoinRequested {
                        community_id: c,
                        user_id: u,
                    },
                    S::Pending,
                ),
                None | Some(S::Left | S::Removed | S::Pending) => (
                    MembershipEvent::MemberJoined {
                        community_id: c,
                        user_id: u,
                        role: Role::Member,
                        via: None,
                    },
                    S::Active,
                ),
                Some(S::Active) if roll < 3 => (
                    MembershipEvent::MemberRoleChanged {
                        community_id: c,
                        user_id: u,
                        from: Role::Member,
                        to: Role::Vip,
                    },
                    S::Active,
                ),
                Some(S::Active) if roll < 6 => (
                    MembershipEvent::MemberLeft {
                        community_id: c,
                        user_id: u,
                    },
                    S::Left,
                ),
                Some(S::Active) if roll < 8 => (
                    MembershipEvent::MemberRemoved {
                        community_id: c,
                        user_id: u,
                        reason: None,
                    },
                    S::Removed,
                ),
                Some(S::Active) => (
                    MembershipEvent::MemberBanned {
                        community_id: c,
                        user_id: u,
                        reason: Some("spam".into()),
                    },
                    S::Banned,
                ),
                Some(S::Banned) => (
                    MembershipEvent::MemberUnbanned {
                        community_id: c,
                        user_id: u,
                    },
                    S::Left,
                ),
            };
            // One event per aggregate per transaction keeps the bookkeeping simple.
            if out
                .iter()
                .any(|e| matches!(e, Ev::M(m) if m.subject() == (c, u)))
            {
                continue;
            }
            self.state.insert((c, u), next);
            out.push(Ev::M(event));
        }
        self.events += out.len() as u64;
        out
    }

    /// A registered user claims the platform account of a user never registered (a shadow
    /// user) with active memberships, in one commit as the API does it: the shadow gives the
    /// account up, each of its memberships moves, and the claimer joins where they were not a
    /// member (unless banned there). The shadow does nothing afterwards.
    fn merge(&mut self) -> Option<Vec<Ev>> {
        use MemberStatus as S;
        let shadows: Vec<Uuid> = self
            .users
            .iter()
            .copied()
            .filter(|u| !self.registered.contains_key(u))
            .filter(|u| {
                self.state
                    .iter()
                    .any(|((_, x), s)| x == u && *s == S::Active)
            })
            .collect();
        let claimers: Vec<Uuid> = self.registered.keys().copied().collect();
        if shadows.is_empty() || claimers.is_empty() {
            return None;
        }
        let shadow = shadows[self.next(shadows.len())];
        let into = claimers[self.next(claimers.len())];
        let mut out = vec![Ev::U(
            shadow,
            UserEvent::ShadowUserMerged {
                into,
                platform: Platform::Twitch,
                platform_user_id: shadow.simple().to_string(),
            },
        )];
        let moved: Vec<Uuid> = self
            .state
            .iter()
            .filter(|((_, u), s)| *u == shadow && **s == S::Active)
            .map(|((c, _), _)| *c)
            .collect();
        for c in moved {
            out.push(Ev::M(MembershipEvent::MembershipMoved {
                community_id: c,
                user_id: shadow,
                to_user_id: into,
            }));
            self.state.insert((c, shadow), S::Left);
            if !matches!(self.state.get(&(c, into)), Some(S::Active | S::Banned)) {
                out.push(Ev::M(MembershipEvent::MemberJoined {
                    community_id: c,
                    user_id: into,
                    role: Role::Member,
                    via: Some(JoinVia::Merge),
                }));
                self.state.insert((c, into), S::Active);
            }
        }
        self.users.retain(|u| *u != shadow);
        Some(out)
    }

    /// A fresh id, deterministic in the seed.
    fn id(&mut self) -> Uuid {
        let hi = self.next(usize::MAX) as u128;
        Uuid::from_u128(
            (hi << 64) | u128::from(self.events as u32) << 32 | self.next(1 << 30) as u128,
        )
    }

    /// For an active member: a chat message (now and then a bot command), an activity of any
    /// kind, a moderator's warning, timeout or deletion, or an admin's adjustment.
    fn chat_or_activity(&mut self, c: Uuid, u: Uuid) -> Ev {
        let at =
            DateTime::<Utc>::from_timestamp(1_767_225_600 + self.events as i64, 0).expect("time");
        match self.next(12) {
            0..=5 => {
                let id = self.id();
                self.messages.push((id, c));
                let text = if self.next(4) == 0 {
                    "!uptime"
                } else {
                    "hello there"
                };
                Ev::Msg(
                    id,
                    MessageEvent::MessagePosted {
                        message_id: id,
                        community_id: c,
                        channel: "general".into(),
                        sender_id: u,
                        sender_username: "someone".into(),
                        platform: Some(Platform::Twitch),
                        external_id: Some(id.simple().to_string()),
                        platform_user_id: Some(u.simple().to_string()),
                        text: text.into(),
                        sent_at: at,
                    },
                )
            }
            6..=8 => {
                let activity = match self.next(7) {
                    0 => Activity::Follow,
                    1 => Activity::Subscription {
                        tier: [SubTier::Tier1, SubTier::Tier2, SubTier::Tier3][self.next(3)],
                    },
                    2 => Activity::GiftSubscription {
                        count: 1 + self.next(5) as u32,
                    },
                    3 => Activity::Cheer {
                        bits: 1 + self.next(500) as u64,
                    },
                    4 => Activity::Donation {
                        amount: Decimal4::raw(100 * (1 + self.next(2000) as i64)),
                        currency: "USD".into(),
                    },
                    5 => Activity::Raid { viewers: 12 },
                    _ => Activity::StreamOnline,
                };
                let id = self.id();
                Ev::Act(
                    id,
                    ActivityEvent::ActivityRecorded {
                        activity_id: id,
                        community_id: c,
                        user_id: u,
                        platform: Platform::Twitch,
                        external_id: id.simple().to_string(),
                        platform_user_id: u.simple().to_string(),
                        username: "someone".into(),
                        activity,
                        occurred_at: at,
                    },
                )
            }
            9 if !self.messages.is_empty() => {
                let i = self.next(self.messages.len());
                let (id, _) = self.messages.swap_remove(i);
                Ev::Msg(id, MessageEvent::MessageDeleted { reason: None })
            }
            10 => Ev::M(MembershipEvent::MemberWarned {
                community_id: c,
                user_id: u,
                reason: None,
            }),
            _ => Ev::M(MembershipEvent::ReputationAdjusted {
                community_id: c,
                user_id: u,
                delta: Decimal4::raw(-(self.next(500_000) as i64)),
                reason: "scenario".into(),
            }),
        }
    }

    pub fn active_count(&self, community: Uuid) -> i64 {
        self.state
            .iter()
            .filter(|((c, _), s)| *c == community && **s == MemberStatus::Active)
            .count() as i64
    }
}

pub fn uuids(n: usize) -> Vec<Uuid> {
    (0..n).map(|_| Uuid::new_v4()).collect()
}

/// Every row of `table` as JSON text, sorted: equal dumps mean identical rows.
pub async fn dump(pool: &PgPool, table: &str) -> Vec<String> {
    sqlx::query_scalar(&format!(
        "SELECT row_to_json(t)::text AS r FROM \"{table}\" t ORDER BY r"
    ))
    .fetch_all(pool)
    .await
    .expect("dump")
}

/// Every table of `projection`, dumped.
pub async fn dump_model(pool: &PgPool, projection: &dyn Projection) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for t in projection.tables() {
        out.push((t.to_string(), dump(pool, t).await));
    }
    out
}

/// Polls `check` until it is true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A projection writing to `<prefix><table>` under a name of its own: a second, independent copy
/// of a model, built through the normal worker path, to compare the model against.
pub struct ModelCopy {
    inner: Arc<dyn Projection>,
    name: &'static str,
    prefix: &'static str,
}

impl ModelCopy {
    pub fn of(inner: Arc<dyn Projection>, prefix: &'static str) -> Self {
        // A test names a handful of copies: leaking their names is harmless.
        let name = Box::leak(format!("{}_{prefix}", inner.name()).into_boxed_str());
        Self {
            inner,
            name,
            prefix,
        }
    }

    pub async fn create_tables(&self, pool: &PgPool) {
        for t in self.inner.tables() {
            sqlx::query(&format!(
                "CREATE TABLE \"{}{t}\" (LIKE \"{t}\" INCLUDING ALL)",
                self.prefix
            ))
            .execute(pool)
            .await
            .expect("copy table");
        }
    }

    /// The copy's physical tables.
    pub fn names(&self) -> TableNames {
        TableNames::from_pairs(
            self.inner
                .tables()
                .iter()
                .map(|t| (*t, format!("{}{t}", self.prefix))),
        )
    }

    /// The model's tables equal this copy's, row for row.
    pub async fn assert_same(&self, pool: &PgPool) {
        for t in self.inner.tables() {
            let a = dump(pool, t).await;
            let b = dump(pool, &format!("{}{t}", self.prefix)).await;
            assert_eq!(a.len(), b.len(), "{t}: row counts differ");
            assert!(a == b, "{t} differs from {}{t}", self.prefix);
        }
    }
}

impl Projection for ModelCopy {
    fn name(&self) -> &'static str {
        self.name
    }
    fn version(&self) -> i32 {
        self.inner.version()
    }
    fn tables(&self) -> &'static [&'static str] {
        self.inner.tables()
    }
    fn aggregate_types(&self) -> &'static [&'static str] {
        self.inner.aggregate_types()
    }
    fn in_log_order(&self) -> bool {
        self.inner.in_log_order()
    }
    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        _tables: &'a TableNames,
        events: &'a [RecordedEvent],
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let names = self.names();
            self.inner.apply(conn, &names, events).await
        })
    }
}

/// Runs a rebuild, retrying while the lock of a just-killed one is still being released.
pub async fn retry_until_lock_free<F, Fut>(mut run: F) -> rookery_projections::RebuildReport
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<rookery_projections::RebuildReport>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match run().await {
            Ok(report) => return report,
            Err(e) if e.to_string().contains("already running") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("rebuild failed: {e:#}"),
        }
    }
}
