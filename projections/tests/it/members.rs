//! The members fold and queries, applied straight to a database (no bus).

use crate::support::{at, metadata, ModelCopy};
use rookery_events::membership::membership_id;
use rookery_events::{
    LogPosition, MemberStatus, MembershipEvent, Platform, RecordedEvent, Role, UserEvent,
};
use rookery_projections::models::members::{self, MemberQuery, MemberSort, MembersProjection};
use rookery_projections::{Projection, QueryError, TableNames};
use rookery_store::testing::TestDb;
use sqlx::PgPool;
use std::sync::Arc;
use uuid::Uuid;

/// Builds recorded events with increasing keys and times.
struct Log {
    next: i64,
    events: Vec<RecordedEvent>,
}

impl Log {
    fn new() -> Self {
        Self {
            next: 1,
            events: Vec::new(),
        }
    }

    fn m(&mut self, e: MembershipEvent) -> &mut Self {
        let (c, u) = e.subject();
        let id = membership_id(c, u).to_string();
        let name = e.name().to_string();
        self.push(
            "membership",
            id,
            name,
            serde_json::to_value(&e).expect("json"),
        )
    }

    fn u(&mut self, user: Uuid, e: UserEvent) -> &mut Self {
        let name = e.name().to_string();
        self.push(
            "user",
            user.to_string(),
            name,
            serde_json::to_value(&e).expect("json"),
        )
    }

    fn push(&mut self, t: &str, id: String, name: String, payload: serde_json::Value) -> &mut Self {
        let n = self.next;
        self.next += 1;
        self.events.push(RecordedEvent {
            position: LogPosition::new(1_000 + n as u64, n),
            aggregate_type: t.into(),
            aggregate_id: id,
            sequence: n,
            event_type: name,
            event_version: "1.0".into(),
            payload,
            metadata: metadata(at(n)),
        });
        self
    }
}

async fn apply(pool: &PgPool, tables: &TableNames, events: &[RecordedEvent]) {
    let mut tx = pool.begin().await.expect("begin");
    MembersProjection
        .apply(&mut tx, tables, events)
        .await
        .expect("apply");
    tx.commit().await.expect("commit");
}

fn live() -> TableNames {
    TableNames::live(MembersProjection.tables())
}

async fn status(pool: &PgPool, c: Uuid, u: Uuid) -> Option<(MemberStatus, Role)> {
    members::get_member(pool, c, u)
        .await
        .expect("get")
        .map(|m| (m.status, m.role))
}

#[tokio::test]
async fn membership_lifecycle_folds_into_status_role_and_exact_count() {
    let db = TestDb::create().await.expect("db");
    let c = Uuid::new_v4();
    let [owner, mod_, leaver, stranger, asker] = [(); 5].map(|_| Uuid::new_v4());
    let mut log = Log::new();
    log.m(MembershipEvent::MemberJoined {
        community_id: c,
        user_id: owner,
        role: Role::Owner,
        via: None,
    })
    .m(MembershipEvent::MemberJoined {
        community_id: c,
        user_id: mod_,
        role: Role::Member,
        via: None,
    })
    .m(MembershipEvent::MemberRoleChanged {
        community_id: c,
        user_id: mod_,
        from: Role::Member,
        to: Role::Moderator,
    })
    .m(MembershipEvent::MemberJoined {
        community_id: c,
        user_id: leaver,
        role: Role::Member,
        via: None,
    })
    .m(MembershipEvent::MemberLeft {
        community_id: c,
        user_id: leaver,
    })
    .m(MembershipEvent::MemberBanned {
        community_id: c,
        user_id: mod_,
        reason: None,
    })
    .m(MembershipEvent::MemberUnbanned {
        community_id: c,
        user_id: mod_,
    })
    .m(MembershipEvent::MemberJoined {
        community_id: c,
        user_id: leaver,
        role: Role::Vip,
        via: None,
    })
    .m(MembershipEvent::MemberBanned {
        community_id: c,
        user_id: stranger,
        reason: Some("raid".into()),
    })
    .m(MembershipEvent::JoinRequested {
        community_id: c,
        user_id: asker,
    });
    // One event per transaction, as a slow live worker would see them.
    for e in &log.events {
        apply(&db.pool, &live(), std::slice::from_ref(e)).await;
    }

    assert_eq!(
        status(&db.pool, c, owner).await,
        Some((MemberStatus::Active, Role::Owner))
    );
    assert_eq!(
        status(&db.pool, c, mod_).await,
        Some((MemberStatus::Left, Role::Moderator))
    );
    assert_eq!(
        status(&db.pool, c, leaver).await,
        Some((MemberStatus::Active, Role::Vip))
    );
    assert_eq!(
        status(&db.pool, c, stranger).await,
        Some((MemberStatus::Banned, Role::Member))
    );
    assert_eq!(
        status(&db.pool, c, asker).await,
        Some((MemberStatus::Pending, Role::Member))
    );
    assert_eq!(members::member_count(&db.pool, c).await.expect("count"), 2);
    let rejoined = members::get_member(&db.pool, c, leaver)
        .await
        .expect("get")
        .expect("leaver");
    assert_eq!(
        rejoined.joined_at,
        at(8),
        "a rejoin starts a new membership"
    );

    // The same events as one batch (as a rebuild sees them) give byte-identical rows.
    let copy = ModelCopy::of(Arc::new(MembersProjection), "one_batch_");
    copy.create_tables(&db.pool).await;
    apply(&db.pool, &copy.names(), &log.events).await;
    copy.assert_same(&db.pool).await;
}

#[tokio::test]
async fn count_stays_exact_through_every_transition() {
    let db = TestDb::create().await.expect("db");
    let c = Uuid::new_v4();
    let users: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    let mut log = Log::new();
    for u in &users {
        log.m(MembershipEvent::MemberJoined {
            community_id: c,
            user_id: *u,
            role: Role::Member,
            via: None,
        });
    }
    for u in &users[..5] {
        log.m(MembershipEvent::MemberLeft {
            community_id: c,
            user_id: *u,
        });
    }
    for u in &users[5..8] {
        log.m(MembershipEvent::MemberRemoved {
            community_id: c,
            user_id: *u,
            reason: None,
        });
    }
    for u in &users[8..10] {
        log.m(MembershipEvent::MemberBanned {
            community_id: c,
            user_id: *u,
            reason: None,
        });
        log.m(MembershipEvent::MemberUnbanned {
            community_id: c,
            user_id: *u,
        });
    }
    for u in &users[..2] {
        log.m(MembershipEvent::MemberJoined {
            community_id: c,
            user_id: *u,
            role: Role::Member,
            via: None,
        });
    }
    // Role changes and a pending request never move the count.
    log.m(MembershipEvent::MemberRoleChanged {
        community_id: c,
        user_id: users[15],
        from: Role::Member,
        to: Role::Admin,
    });
    log.m(MembershipEvent::JoinRequested {
        community_id: Uuid::new_v4(),
        user_id: users[0],
    });
    for chunk in log.events.chunks(7) {
        apply(&db.pool, &live(), chunk).await;
    }
    assert_eq!(
        members::member_count(&db.pool, c).await.expect("count"),
        20 - 5 - 3 - 2 + 2
    );
    let active = members::list_members(
        &db.pool,
        c,
        &MemberQuery {
            limit: Some(200),
            ..Default::default()
        },
    )
    .await
    .expect("list");
    assert_eq!(active.items.len(), 12);
}

#[tokio::test]
async fn registration_and_membership_converge_in_either_order() {
    let db = TestDb::create().await.expect("db");
    let (c, u) = (Uuid::new_v4(), Uuid::new_v4());
    let join = MembershipEvent::MemberJoined {
        community_id: c,
        user_id: u,
        role: Role::Member,
        via: None,
    };
    let register = UserEvent::UserRegistered {
        user_id: u,
        username: "ada".into(),
        email: "ada@example.com".into(),
    };
    let link = UserEvent::PlatformIdentityLinked {
        platform: Platform::Twitch,
        platform_user_id: "42".into(),
        username: "ada_tv".into(),
    };
    let link2 = UserEvent::PlatformIdentityLinked {
        platform: Platform::Discord,
        platform_user_id: "7".into(),
        username: "ada#7".into(),
    };

    // Live: the membership partition runs ahead of the user partition.
    let mut log = Log::new();
    log.m(join.clone())
        .u(u, register.clone())
        .u(u, link.clone())
        .u(u, link2.clone());
    let (membership, user) = log.events.split_at(1);
    apply(&db.pool, &live(), membership).await;
    let early = members::get_member(&db.pool, c, u)
        .await
        .expect("get")
        .expect("member");
    assert_eq!(
        early.username, "",
        "the registration has not been applied yet"
    );
    apply(&db.pool, &live(), user).await;

    // The other order, into a copy: user events first, then the membership.
    let copy = ModelCopy::of(Arc::new(MembersProjection), "other_order_");
    copy.create_tables(&db.pool).await;
    apply(&db.pool, &copy.names(), user).await;
    apply(&db.pool, &copy.names(), membership).await;

    let view = members::get_member(&db.pool, c, u)
        .await
        .expect("get")
        .expect("member");
    assert_eq!(view.username, "ada");
    let platforms: Vec<_> = view.identities.iter().map(|i| i.platform).collect();
    assert_eq!(
        platforms,
        [Platform::Discord, Platform::Twitch],
        "identities sorted by platform"
    );
    copy.assert_same(&db.pool).await;

    // Unlinking removes exactly that identity.
    let mut more = Log {
        next: 10,
        events: Vec::new(),
    };
    more.u(
        u,
        UserEvent::PlatformIdentityUnlinked {
            platform: Platform::Twitch,
            platform_user_id: "42".into(),
        },
    );
    apply(&db.pool, &live(), &more.events).await;
    let view = members::get_member(&db.pool, c, u)
        .await
        .expect("get")
        .expect("member");
    assert_eq!(view.identities.len(), 1);
}

/// A membership batch that waits for its user's row lock while a registration commits read its
/// member row before the wait (member rows are read in one statement with the locking read of
/// their users), so without the new username: the row it writes must still carry it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_batch_waiting_on_a_registration_keeps_its_username() {
    let db = TestDb::create().await.expect("db");
    let (c, u) = (Uuid::new_v4(), Uuid::new_v4());
    let mut log = Log::new();
    log.m(MembershipEvent::MemberJoined {
        community_id: c,
        user_id: u,
        role: Role::Member,
        via: None,
    })
    .u(
        u,
        UserEvent::UserRegistered {
            user_id: u,
            username: "ada".into(),
            email: "ada@example.com".into(),
        },
    )
    .m(MembershipEvent::MemberRoleChanged {
        community_id: c,
        user_id: u,
        from: Role::Member,
        to: Role::Moderator,
    });
    apply(&db.pool, &live(), &log.events[..1]).await;

    // The registration's batch has locked the user's row (and written nothing yet).
    let mut registration = db.pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM member_users WHERE user_id = $1 FOR UPDATE")
        .bind(u)
        .execute(&mut *registration)
        .await
        .expect("lock");
    let role_change = {
        let (pool, events) = (db.pool.clone(), log.events[2..].to_vec());
        tokio::spawn(async move { apply(&pool, &live(), &events).await })
    };
    // Wait until the role change's batch is blocked on that lock, then let it go.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&db.pool)
        .await
        .expect("activity");
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the role change never waited for the lock"
        );
        tokio::task::yield_now().await;
    }
    MembersProjection
        .apply(&mut registration, &live(), &log.events[1..2])
        .await
        .expect("apply registration");
    registration.commit().await.expect("commit registration");
    role_change.await.expect("role change");

    let view = members::get_member(&db.pool, c, u)
        .await
        .expect("get")
        .expect("member");
    assert_eq!(
        (view.username.as_str(), view.role),
        ("ada", Role::Moderator)
    );
}

#[tokio::test]
async fn lists_page_with_keyset_cursors_filters_and_sorts() {
    let db = TestDb::create().await.expect("db");
    let c = Uuid::new_v4();
    let mut log = Log::new();
    let names = ["mia", "bo", "zed", "ada", "kim", "lu", "eve"];
    let mut ids = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let u = Uuid::new_v4();
        ids.push(u);
        let role = if i == 0 {
            Role::Owner
        } else if i % 3 == 0 {
            Role::Moderator
        } else {
            Role::Member
        };
        log.u(
            u,
            UserEvent::UserRegistered {
                user_id: u,
                username: (*name).into(),
                email: format!("{name}@x.io"),
            },
        )
        .m(MembershipEvent::MemberJoined {
            community_id: c,
            user_id: u,
            role,
            via: None,
        });
    }
    log.m(MembershipEvent::MemberLeft {
        community_id: c,
        user_id: ids[2],
    });
    apply(&db.pool, &live(), &log.events).await;

    // By join time, three per page, no overlap, nothing skipped.
    let mut seen = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let q = MemberQuery {
            limit: Some(3),
            cursor: cursor.clone(),
            ..Default::default()
        };
        let page = members::list_members(&db.pool, c, &q).await.expect("page");
        pages += 1;
        seen.extend(page.items.iter().map(|m| m.username.clone()));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, 2);
    assert_eq!(
        seen,
        ["mia", "bo", "ada", "kim", "lu", "eve"],
        "active members by join time"
    );

    let by_name = MemberQuery {
        sort: MemberSort::Username,
        limit: Some(4),
        ..Default::default()
    };
    let first = members::list_members(&db.pool, c, &by_name)
        .await
        .expect("page");
    let names: Vec<_> = first.items.iter().map(|m| m.username.as_str()).collect();
    assert_eq!(names, ["ada", "bo", "eve", "kim"]);
    let next = MemberQuery {
        cursor: first.next_cursor.clone(),
        ..by_name.clone()
    };
    let second = members::list_members(&db.pool, c, &next)
        .await
        .expect("page");
    let names: Vec<_> = second.items.iter().map(|m| m.username.as_str()).collect();
    assert_eq!(names, ["lu", "mia"]);
    assert!(second.next_cursor.is_none());

    let mods = MemberQuery {
        role: Some(Role::Moderator),
        ..Default::default()
    };
    let page = members::list_members(&db.pool, c, &mods)
        .await
        .expect("page");
    assert_eq!(
        page.items
            .iter()
            .map(|m| m.username.as_str())
            .collect::<Vec<_>>(),
        ["ada", "eve"]
    );
    let left = MemberQuery {
        status: Some(MemberStatus::Left),
        ..Default::default()
    };
    let page = members::list_members(&db.pool, c, &left)
        .await
        .expect("page");
    assert_eq!(
        page.items
            .iter()
            .map(|m| m.username.as_str())
            .collect::<Vec<_>>(),
        ["zed"]
    );

    // A cursor from the other sort, garbage, or a bad limit is the caller's error.
    let wrong_sort = MemberQuery {
        cursor: first.next_cursor.clone(),
        ..Default::default()
    };
    assert!(matches!(
        members::list_members(&db.pool, c, &wrong_sort).await,
        Err(QueryError::BadCursor)
    ));
    let garbage = MemberQuery {
        cursor: Some("%%%".into()),
        ..Default::default()
    };
    assert!(matches!(
        members::list_members(&db.pool, c, &garbage).await,
        Err(QueryError::BadCursor)
    ));
    let zero = MemberQuery {
        limit: Some(0),
        ..Default::default()
    };
    assert!(matches!(
        members::list_members(&db.pool, c, &zero).await,
        Err(QueryError::BadLimit)
    ));
    assert_eq!(
        members::member_count(&db.pool, Uuid::new_v4())
            .await
            .expect("count"),
        0
    );
}

/// Applies `events` as one live batch on `conn`; returns how many sequential scans of `members`
/// the batch's transaction made.
async fn apply_counting_scans(conn: &mut sqlx::PgConnection, events: &[RecordedEvent]) -> i64 {
    let mut tx = sqlx::Connection::begin(conn).await.expect("begin");
    MembersProjection
        .apply(&mut tx, &live(), events)
        .await
        .expect("apply");
    let scans = sqlx::query_scalar(
        "SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'members'",
    )
    .fetch_one(&mut *tx)
    .await
    .expect("scan count");
    tx.commit().await.expect("commit");
    scans
}

/// A live batch finds its member rows by key, however large `members` has grown since its
/// statements were first planned (while the table was empty and never analysed).
#[tokio::test]
async fn a_batch_looks_members_up_by_key_after_the_table_grew() {
    let db = TestDb::create().await.expect("db");
    let mut conn = db.pool.acquire().await.expect("connection");
    let c = Uuid::new_v4();
    let mut log = Log::new();
    let batch = |log: &mut Log| {
        let start = log.events.len();
        log.m(MembershipEvent::MemberJoined {
            community_id: c,
            user_id: Uuid::new_v4(),
            role: Role::Member,
            via: None,
        });
        log.events[start..].to_vec()
    };
    // More than five runs on one connection: enough for Postgres to cache a generic plan.
    for _ in 0..8 {
        apply_counting_scans(&mut conn, &batch(&mut log)).await;
    }
    sqlx::query(
        "INSERT INTO members (community_id, user_id, username, role, status, joined_at,
                              updated_at, txid, gpos)
         SELECT gen_random_uuid(), gen_random_uuid(), '', 'member', 'active', now(), now(), 0, 0
         FROM generate_series(1, 20000)",
    )
    .execute(&mut *conn)
    .await
    .expect("grow members");

    let scans = apply_counting_scans(&mut conn, &batch(&mut log)).await;
    assert_eq!(scans, 0, "the batch scanned all of members");
    assert_eq!(members::member_count(&db.pool, c).await.expect("count"), 9);
}
