//! The arithmetic every figure rests on: percentiles of a latency sample and rates over a window.
//! Kept apart (and unit-tested) so that a number in the table is never a formatting accident.

use std::time::Duration;

/// A latency sample, sorted once so percentiles are cheap to read.
#[derive(Clone, Debug, Default)]
pub struct Latencies {
    sorted: Vec<Duration>,
}

impl Latencies {
    pub fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Self { sorted: samples }
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// The nearest-rank percentile: the smallest sample with at least `q` (0..=1) of the sample
    /// at or below it. `None` for an empty sample.
    pub fn percentile(&self, q: f64) -> Option<Duration> {
        percentile(&self.sorted, q)
    }

    pub fn max(&self) -> Option<Duration> {
        self.sorted.last().copied()
    }

    pub fn mean(&self) -> Option<Duration> {
        if self.sorted.is_empty() {
            return None;
        }
        let total: Duration = self.sorted.iter().sum();
        Some(total / u32::try_from(self.sorted.len()).unwrap_or(u32::MAX))
    }

    /// `(q, latency)` points for a percentile curve: dense towards the tail, where latency
    /// distributions are interesting (0, 50, 75, 87.5, … percent, then 99.9, 99.99, max).
    pub fn curve(&self) -> Vec<(f64, Duration)> {
        let mut points = Vec::new();
        if self.sorted.is_empty() {
            return points;
        }
        // Halve the remaining tail each step until it holds fewer than one sample.
        let n = self.sorted.len() as f64;
        let mut tail = 1.0_f64;
        while tail * n >= 1.0 && tail > 1e-7 {
            let q = 1.0 - tail;
            if let Some(d) = self.percentile(q) {
                points.push((q, d));
            }
            tail /= 2.0;
        }
        if let Some(max) = self.max() {
            points.push((1.0, max));
        }
        points
    }
}

/// Nearest-rank percentile of an ascending slice: index `ceil(q·n) − 1`, clamped.
pub fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let q = q.clamp(0.0, 1.0);
    let n = sorted.len();
    // The epsilon keeps 0.99 × 100 (98.999…) from rounding up to the next rank.
    let rank = (q * n as f64 - 1e-9).ceil() as usize;
    Some(sorted[rank.clamp(1, n) - 1])
}

/// Operations per second over `elapsed`; zero for an empty window (never infinity or NaN).
pub fn rate(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        0.0
    } else {
        count as f64 / secs
    }
}

/// `value / limit`, or `None` when there is no usable limit.
pub fn ratio(value: f64, limit: f64) -> Option<f64> {
    (limit > 0.0 && value.is_finite() && limit.is_finite()).then(|| value / limit)
}

/// Milliseconds as a float, for the table.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The time at which the `i`th request of an open-loop run is due: `i / rate` after the start.
/// Latency is measured from here, not from when the request was actually sent, so a stalled
/// client cannot hide the stall (coordinated omission).
pub fn scheduled_offset(i: u64, per_second: f64) -> Duration {
    if per_second <= 0.0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(i as f64 / per_second)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms_vec(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|&v| Duration::from_millis(v)).collect()
    }

    #[test]
    fn nearest_rank_percentiles_of_one_to_a_hundred() {
        let l = Latencies::new(ms_vec(&(1..=100).rev().collect::<Vec<_>>()));
        assert_eq!(l.percentile(0.5), Some(Duration::from_millis(50)));
        assert_eq!(l.percentile(0.99), Some(Duration::from_millis(99)));
        assert_eq!(l.percentile(0.999), Some(Duration::from_millis(100)));
        assert_eq!(l.percentile(0.0), Some(Duration::from_millis(1)));
        assert_eq!(l.percentile(1.0), Some(Duration::from_millis(100)));
        assert_eq!(l.max(), Some(Duration::from_millis(100)));
        assert_eq!(l.mean(), Some(Duration::from_micros(50_500)));
    }

    #[test]
    fn a_single_slow_request_in_a_thousand_is_the_p999_not_the_p99() {
        let mut samples = vec![Duration::from_millis(2); 999];
        samples.push(Duration::from_millis(400));
        let l = Latencies::new(samples);
        assert_eq!(l.percentile(0.99), Some(Duration::from_millis(2)));
        assert_eq!(l.percentile(0.999), Some(Duration::from_millis(2)));
        assert_eq!(l.percentile(0.9999), Some(Duration::from_millis(400)));
    }

    #[test]
    fn empty_samples_have_no_percentiles_and_out_of_range_quantiles_clamp() {
        assert_eq!(Latencies::default().percentile(0.5), None);
        assert!(Latencies::default().curve().is_empty());
        let l = Latencies::new(ms_vec(&[7, 3]));
        assert_eq!(l.percentile(-1.0), Some(Duration::from_millis(3)));
        assert_eq!(l.percentile(2.0), Some(Duration::from_millis(7)));
    }

    #[test]
    fn rates_and_ratios_never_divide_by_zero() {
        assert_eq!(rate(500, Duration::from_millis(250)), 2000.0);
        assert_eq!(rate(10, Duration::ZERO), 0.0);
        assert_eq!(ratio(250.0, 1000.0), Some(0.25));
        assert_eq!(ratio(1.0, 0.0), None);
    }

    #[test]
    fn open_loop_schedule_is_evenly_spaced_from_the_start() {
        assert_eq!(scheduled_offset(0, 1000.0), Duration::ZERO);
        assert_eq!(scheduled_offset(1500, 1000.0), Duration::from_millis(1500));
        assert_eq!(scheduled_offset(3, 0.0), Duration::ZERO);
    }

    #[test]
    fn the_curve_ends_at_the_maximum_and_is_monotonic() {
        let l = Latencies::new(ms_vec(&(1..=1000).collect::<Vec<_>>()));
        let curve = l.curve();
        assert_eq!(curve.first().map(|p| p.0), Some(0.0));
        assert_eq!(curve.last(), Some(&(1.0, Duration::from_millis(1000))));
        assert!(curve
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }
}
