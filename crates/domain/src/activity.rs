//! The `activity` aggregate: one platform activity (follow, subscription, cheer, raid, …), its
//! id from [`rookery_events::activity::activity_id`], so a re-delivered activity is a no-op.

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use rookery_events::{aggregate_types, Activity, ActivityEvent, Platform};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::decider::Decider;
use crate::validation::{
    validate_currency, validate_message_external_id, validate_platform_user_id,
    validate_platform_username,
};
use crate::DomainError;

#[derive(Default, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default)]
pub struct ActivityRecord {
    /// `None` until recorded.
    pub id: Option<Uuid>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ActivityCommand {
    /// A no-op when the activity exists (a platform re-delivering it).
    Record {
        activity_id: Uuid,
        community_id: Uuid,
        user_id: Uuid,
        platform: Platform,
        external_id: String,
        platform_user_id: String,
        username: String,
        activity: Activity,
        occurred_at: DateTime<Utc>,
    },
}

/// The data rules of each kind: a gift bundle of at least one, at least one bit, a positive
/// donation in a currency.
pub fn validate_activity(activity: &Activity) -> Result<(), DomainError> {
    match activity {
        Activity::GiftSubscription { count } if *count < 1 => {
            Err(DomainError::validation("data.count", "must be at least 1"))
        }
        Activity::Cheer { bits } if *bits < 1 => {
            Err(DomainError::validation("data.bits", "must be at least 1"))
        }
        Activity::Donation { amount, currency } => {
            if !amount.is_positive() {
                return Err(DomainError::validation(
                    "data.amount",
                    "must be more than 0",
                ));
            }
            if amount.has_more_places_than(2) {
                return Err(DomainError::validation(
                    "data.amount",
                    "must have at most two decimal places",
                ));
            }
            validate_currency(currency)
        }
        _ => Ok(()),
    }
}

impl ActivityRecord {
    /// All the rules: the events `command` produces from this state, without applying them.
    pub fn decide(&self, command: ActivityCommand) -> Result<Vec<ActivityEvent>, DomainError> {
        match command {
            ActivityCommand::Record {
                activity_id,
                community_id,
                user_id,
                platform,
                external_id,
                platform_user_id,
                username,
                activity,
                occurred_at,
            } => {
                validate_message_external_id(&external_id)?;
                validate_platform_user_id(&platform_user_id)?;
                validate_platform_username(&username)?;
                validate_activity(&activity)?;
                if self.id.is_some() {
                    return Ok(vec![]);
                }
                Ok(vec![ActivityEvent::ActivityRecorded {
                    activity_id,
                    community_id,
                    user_id,
                    platform,
                    external_id,
                    platform_user_id,
                    username: username.trim().to_string(),
                    activity,
                    occurred_at,
                }])
            }
        }
    }
}

impl Aggregate for ActivityRecord {
    const TYPE: &'static str = aggregate_types::ACTIVITY;
    type Command = ActivityCommand;
    type Event = ActivityEvent;
    type Error = DomainError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            ActivityEvent::ActivityRecorded { activity_id, .. } => self.id = Some(activity_id),
        }
    }
}

impl Decider for ActivityRecord {
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, DomainError> {
        ActivityRecord::decide(self, command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;
    use rookery_events::{Decimal4, SubTier};

    type Given = TestFramework<ActivityRecord>;

    fn record(activity: Activity) -> ActivityCommand {
        ActivityCommand::Record {
            activity_id: Uuid::from_u128(1),
            community_id: Uuid::from_u128(2),
            user_id: Uuid::from_u128(3),
            platform: Platform::Twitch,
            external_id: "a-1".into(),
            platform_user_id: "42".into(),
            username: "ferris".into(),
            activity,
            occurred_at: DateTime::<Utc>::UNIX_EPOCH,
        }
    }

    fn recorded(activity: Activity) -> ActivityEvent {
        ActivityEvent::ActivityRecorded {
            activity_id: Uuid::from_u128(1),
            community_id: Uuid::from_u128(2),
            user_id: Uuid::from_u128(3),
            platform: Platform::Twitch,
            external_id: "a-1".into(),
            platform_user_id: "42".into(),
            username: "ferris".into(),
            activity,
            occurred_at: DateTime::<Utc>::UNIX_EPOCH,
        }
    }

    #[test]
    fn an_activity_is_recorded_once() {
        let sub = Activity::Subscription {
            tier: SubTier::Tier3,
        };
        Given::with(())
            .given_no_previous_events()
            .when(record(sub.clone()))
            .then_expect_events(vec![recorded(sub.clone())]);
        Given::with(())
            .given(vec![recorded(sub.clone())])
            .when(record(sub))
            .then_expect_events(vec![]);
    }

    #[test]
    fn data_out_of_range_is_refused_naming_the_field() {
        for (activity, field) in [
            (Activity::GiftSubscription { count: 0 }, "data.count"),
            (Activity::Cheer { bits: 0 }, "data.bits"),
            (
                Activity::Donation {
                    amount: Decimal4::ZERO,
                    currency: "USD".into(),
                },
                "data.amount",
            ),
            (
                Activity::Donation {
                    amount: Decimal4::raw(1),
                    currency: "USD".into(),
                },
                "data.amount",
            ),
            (
                Activity::Donation {
                    amount: Decimal4::units(5),
                    currency: "".into(),
                },
                "data.currency",
            ),
        ] {
            let err = Given::with(())
                .given_no_previous_events()
                .when(record(activity))
                .inspect_result()
                .expect_err("refused");
            assert!(
                matches!(err, DomainError::Validation { field: f, .. } if f == field),
                "{err:?}"
            );
        }
    }
}
