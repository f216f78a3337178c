//! The auto-ban reactor: one ban per crossing of the threshold, also when the process stopped
//! between the crossing and the ban, and none for what a rebuild produced.

use crate::support::{test_worker_config, Env, Ev};
use rookery_events::membership::membership_id;
use rookery_events::{CommunityEvent, Decimal4, MembershipEvent, ReputationPolicy, Role};
use rookery_projections::models::reputation::ReputationProjection;
use rookery_projections::reactors::AutoBan;
use rookery_projections::{rebuild, run_until_idle};
use std::sync::Arc;
use uuid::Uuid;

fn adjust(c: Uuid, u: Uuid, delta: i64) -> Ev {
    Ev::M(MembershipEvent::ReputationAdjusted {
        community_id: c,
        user_id: u,
        delta: Decimal4::units(delta),
        reason: "test".into(),
    })
}

async fn auto_bans(env: &Env, c: Uuid, u: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'MemberBanned'
           AND payload->'MemberBanned'->>'reason' = 'auto_ban'",
    )
    .bind(membership_id(c, u).to_string())
    .fetch_one(&env.pool)
    .await
    .expect("count bans")
}

async fn fold(env: &Env) {
    env.relay_all().await;
    run_until_idle(
        &env.pool,
        &env.bus,
        Arc::new(ReputationProjection),
        test_worker_config(),
    )
    .await
    .expect("reputation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crossing_bans_once_across_a_stop_a_rerun_and_a_rebuild() {
    let env = Env::new(1).await;
    let (c, u) = (Uuid::new_v4(), Uuid::new_v4());
    let mut policy = ReputationPolicy::default();
    policy.auto_ban.enabled = true;
    env.writer
        .write(&[
            Ev::C(c, CommunityEvent::ReputationPolicySet { policy }),
            Ev::M(MembershipEvent::MemberJoined {
                community_id: c,
                user_id: u,
                role: Role::Member,
                via: None,
            }),
        ])
        .await;
    // 600 → 400: below the 450 threshold.
    env.writer.write(&[adjust(c, u, -200)]).await;
    fold(&env).await;

    // The reactor was not running when the crossing was folded (as if the process had died
    // right after): it bans when it starts, and once.
    let reactor = AutoBan::new(env.pool.clone());
    assert_eq!(reactor.run_once().await.expect("reactor"), 1);
    assert_eq!(reactor.run_once().await.expect("reactor"), 0);
    assert_eq!(auto_bans(&env, c, u).await, 1);

    // The ban itself takes the score further down, which is no new crossing.
    env.writer.resync().await;
    fold(&env).await;
    assert_eq!(reactor.run_once().await.expect("reactor"), 0);

    // A rebuild folds the same crossing again, and one no live worker has folded yet (written
    // just before it): neither is acted on.
    let v = Uuid::new_v4();
    env.writer.resync().await;
    env.writer
        .write(&[Ev::M(MembershipEvent::MemberJoined {
            community_id: c,
            user_id: v,
            role: Role::Member,
            via: None,
        })])
        .await;
    let last = env.writer.write(&[adjust(c, v, -200)]).await;
    env.wait_for_head(last).await;
    rebuild(
        &env.pool,
        Arc::new(ReputationProjection),
        env.partitions(),
        |_| {},
    )
    .await
    .expect("rebuild");
    let crossings: i64 = sqlx::query_scalar("SELECT count(*) FROM reputation_crossings")
        .fetch_one(&env.pool)
        .await
        .expect("crossings");
    assert_eq!(crossings, 2, "the rebuild recorded both crossings");
    assert_eq!(reactor.run_once().await.expect("reactor"), 0);
    assert_eq!(auto_bans(&env, c, u).await, 1);
    assert_eq!(
        auto_bans(&env, c, v).await,
        0,
        "no ban for what a rebuild produced"
    );

    // After the rebuild, a new crossing (back above the threshold, then below) is acted on.
    env.writer.resync().await;
    env.writer
        .write(&[Ev::M(MembershipEvent::MemberUnbanned {
            community_id: c,
            user_id: u,
        })])
        .await;
    env.writer.write(&[adjust(c, u, 300)]).await;
    env.writer.write(&[adjust(c, u, -200)]).await;
    fold(&env).await;
    assert_eq!(reactor.run_once().await.expect("reactor"), 1);
    assert_eq!(auto_bans(&env, c, u).await, 2);
}
