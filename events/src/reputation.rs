//! Reputation as the event contract carries it: a community's [`ReputationPolicy`] (range,
//! start, weights per kind of event, auto-ban), set by `CommunityEvent::ReputationPolicySet` and
//! applied by read models from that event's place in the log on. [`Tier`] names a score.

use crate::decimal::Decimal4;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Points each kind of event is worth. Activities scale by their data: a gift bundle by its
/// count, a donation per currency unit, a cheer per 100 bits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Weights {
    pub chat_message: Decimal4,
    /// A message starting with `!` or `/` (a bot command).
    pub command_message: Decimal4,
    pub follow: Decimal4,
    /// Per tier: `1000`, `2000`, `3000`.
    pub subscription_1000: Decimal4,
    pub subscription_2000: Decimal4,
    pub subscription_3000: Decimal4,
    /// Per subscription given.
    pub gift_subscription: Decimal4,
    /// Per unit of the donation's currency.
    pub donation: Decimal4,
    /// Per 100 bits.
    pub cheer: Decimal4,
    pub raid: Decimal4,
    pub boost: Decimal4,
    pub warn: Decimal4,
    pub timeout: Decimal4,
    pub kick: Decimal4,
    pub ban: Decimal4,
}

impl Default for Weights {
    fn default() -> Self {
        let d = |x: f64| Decimal4::from_f64(x).unwrap_or_default();
        Self {
            chat_message: d(0.01),
            command_message: d(-0.1),
            follow: d(1.0),
            subscription_1000: d(5.0),
            subscription_2000: d(10.0),
            subscription_3000: d(20.0),
            gift_subscription: d(3.0),
            donation: d(1.0),
            cheer: d(1.0),
            raid: d(2.0),
            boost: d(5.0),
            warn: d(-25.0),
            timeout: d(-50.0),
            kick: d(-75.0),
            ban: d(-200.0),
        }
    }
}

/// Automatic bans when a score falls below a threshold (off by default).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AutoBan {
    pub enabled: bool,
    pub threshold: Decimal4,
}

impl Default for AutoBan {
    fn default() -> Self {
        Self {
            enabled: false,
            threshold: Decimal4::units(450),
        }
    }
}

/// A community's reputation rules. Scores start at `start` and are clamped to `[min, max]`
/// after every change; the fraction is kept, and shown rounded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ReputationPolicy {
    pub start: Decimal4,
    pub min: Decimal4,
    pub max: Decimal4,
    pub weights: Weights,
    pub auto_ban: AutoBan,
}

impl Default for ReputationPolicy {
    fn default() -> Self {
        Self {
            start: Decimal4::units(600),
            min: Decimal4::units(300),
            max: Decimal4::units(850),
            weights: Weights::default(),
            auto_ban: AutoBan::default(),
        }
    }
}

/// A score's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Exceptional,
    VeryGood,
    Good,
    Fair,
    Poor,
}

impl Tier {
    /// The tier of a score, by its rounded value: Exceptional from 800, Very Good from 740,
    /// Good from 670, Fair from 580, Poor below.
    pub fn of(score: Decimal4) -> Tier {
        match score.round() {
            800.. => Tier::Exceptional,
            740..=799 => Tier::VeryGood,
            670..=739 => Tier::Good,
            580..=669 => Tier::Fair,
            _ => Tier::Poor,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Exceptional => "exceptional",
            Tier::VeryGood => "very_good",
            Tier::Good => "good",
            Tier::Fair => "fair",
            Tier::Poor => "poor",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_start_at_their_boundaries_by_the_rounded_score() {
        let at = |x: f64| Tier::of(Decimal4::from_f64(x).expect("finite"));
        assert_eq!(at(850.0), Tier::Exceptional);
        assert_eq!(at(800.0), Tier::Exceptional);
        assert_eq!(at(799.5), Tier::Exceptional);
        assert_eq!(at(799.4), Tier::VeryGood);
        assert_eq!(at(740.0), Tier::VeryGood);
        assert_eq!(at(739.0), Tier::Good);
        assert_eq!(at(670.0), Tier::Good);
        assert_eq!(at(669.0), Tier::Fair);
        assert_eq!(at(580.0), Tier::Fair);
        assert_eq!(at(579.0), Tier::Poor);
        assert_eq!(at(300.0), Tier::Poor);
    }

    #[test]
    fn a_policy_with_absent_fields_takes_the_defaults() {
        let p: ReputationPolicy =
            serde_json::from_value(serde_json::json!({"start": 500, "weights": {"follow": 2}}))
                .expect("policy");
        assert_eq!(p.start, Decimal4::units(500));
        assert_eq!(p.max, Decimal4::units(850));
        assert_eq!(p.weights.follow, Decimal4::units(2));
        assert_eq!(p.weights.chat_message, Weights::default().chat_message);
        assert!(!p.auto_ban.enabled);
    }
}
