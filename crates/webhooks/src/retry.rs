//! When a failed outbound delivery is tried again: Svix's schedule (5 s, 5 min, 30 min, 2 h,
//! 5 h, 10 h, 10 h after the first attempt's failure and each one after),
//! each wait moved by up to ±20 % so that deliveries failing together do not return together,
//! and never sooner than a `Retry-After` the receiver asked for. After the last wait's attempt
//! fails the delivery is exhausted.

use rand::Rng;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The units of a schedule entry, largest first, in milliseconds.
const UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

/// How far a wait may move either way.
pub const JITTER: f64 = 0.2;

/// The waits before the second, third, … attempt (`ROOKERY_WEBHOOK_RETRY_SCHEDULE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetrySchedule(Vec<Duration>);

impl Default for RetrySchedule {
    fn default() -> Self {
        let m = 60;
        let h = 60 * m;
        Self(
            [5, 5 * m, 30 * m, 2 * h, 5 * h, 10 * h, 10 * h]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
        )
    }
}

impl RetrySchedule {
    /// Attempts a delivery gets in all: the first and one after each wait.
    pub fn attempts(&self) -> usize {
        self.0.len() + 1
    }

    /// The wait before the next attempt once `failures` attempts have failed (1 after the
    /// first), jittered with `rng` and at least `retry_after`; `None` when the delivery is
    /// exhausted.
    pub fn next_wait(
        &self,
        failures: usize,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Option<Duration> {
        let base = *self.0.get(failures.checked_sub(1)?)?;
        let jittered = base.mul_f64(1.0 + rng.gen_range(-JITTER..=JITTER));
        Some(retry_after.map_or(jittered, |r| r.max(jittered)))
    }
}

/// A schedule that does not parse, naming the entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "retry schedule entry `{0}`: expected a number with a unit (ms, s, m, h, d), like `5s,5m,30m`"
)]
pub struct BadSchedule(pub String);

impl FromStr for RetrySchedule {
    type Err = BadSchedule;

    /// `5s,5m,30m,2h,5h,10h,10h` (units `ms`, `s`, `m`, `h`, `d`), at least one entry.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let waits = s
            .split(',')
            .map(|entry| {
                let entry = entry.trim();
                let split = entry
                    .find(|c: char| !c.is_ascii_digit())
                    .ok_or_else(|| BadSchedule(entry.to_string()))?;
                let (number, unit) = entry.split_at(split);
                let n: u64 = number.parse().map_err(|_| BadSchedule(entry.to_string()))?;
                let millis = UNITS
                    .iter()
                    .find(|(name, _)| *name == unit)
                    .and_then(|(_, per)| n.checked_mul(*per))
                    .ok_or_else(|| BadSchedule(entry.to_string()))?;
                Ok(Duration::from_millis(millis))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self(waits))
    }
}

impl fmt::Display for RetrySchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for wait in &self.0 {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            let ms = wait.as_millis();
            // The largest unit the wait is a whole number of (`ms` divides everything).
            let (name, per) = UNITS
                .iter()
                .find(|(_, per)| ms % u128::from(*per) == 0)
                .copied()
                .unwrap_or(("ms", 1));
            write!(f, "{}{name}", ms / u128::from(per))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng as _;

    #[test]
    fn the_default_is_the_standard_schedule_and_round_trips() {
        let s = RetrySchedule::default();
        assert_eq!(s.to_string(), "5s,5m,30m,2h,5h,10h,10h");
        assert_eq!(s.attempts(), 8);
        assert_eq!("5s,5m,30m,2h,5h,10h,10h".parse(), Ok(s));
        assert_eq!(
            " 100ms, 1s ,2m"
                .parse::<RetrySchedule>()
                .map(|s| s.to_string()),
            Ok("100ms,1s,2m".to_string())
        );
    }

    #[test]
    fn bad_entries_are_named() {
        for (text, entry) in [
            ("5s,,5m", ""),
            ("5", "5"),
            ("5x", "5x"),
            ("s", "s"),
            ("1.5s", "1.5s"),
        ] {
            assert_eq!(
                text.parse::<RetrySchedule>(),
                Err(BadSchedule(entry.to_string())),
                "{text}"
            );
        }
        assert_eq!("".parse::<RetrySchedule>(), Err(BadSchedule(String::new())));
        assert!("99999999999999999d".parse::<RetrySchedule>().is_err());
    }

    /// Every wait within ±20 % of its entry, spread over that range; exhausted after the last;
    /// a `Retry-After` longer than the wait wins, a shorter one does not.
    #[test]
    fn waits_are_jittered_within_a_fifth_and_end_exhausted() {
        let s = RetrySchedule::default();
        let mut rng = StdRng::seed_from_u64(7);
        for (failures, base) in (1..).zip(s.0.clone()) {
            let waits: Vec<Duration> = (0..200)
                .map(|_| s.next_wait(failures, None, &mut rng).expect("a wait"))
                .collect();
            let (lo, hi) = (base.mul_f64(0.8), base.mul_f64(1.2));
            assert!(
                waits.iter().all(|w| *w >= lo && *w <= hi),
                "{failures}: {base:?}"
            );
            let below = waits.iter().filter(|w| **w < base).count();
            assert!(
                (50..150).contains(&below),
                "{failures}: {below} of 200 below"
            );
        }
        assert_eq!(s.next_wait(8, None, &mut rng), None);
        assert_eq!(s.next_wait(0, None, &mut rng), None);
        let hour = Duration::from_secs(3600);
        assert_eq!(s.next_wait(1, Some(hour), &mut rng), Some(hour));
        let wait = s
            .next_wait(3, Some(Duration::from_secs(1)), &mut rng)
            .expect("a wait");
        assert!(wait >= Duration::from_secs(24 * 60), "{wait:?}");
    }
}
