//! Prometheus metrics, rendered by hand in the text exposition format (a handful of series does
//! not justify a metrics crate). In-process series (histograms, counters) live in [`Metrics`];
//! gauges that describe the whole system (relay and projection lag) are computed from Postgres
//! at scrape time by the `/metrics` handler, so every replica reports the same truth.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Clone, Debug, Default)]
struct Histogram {
    /// Non-cumulative counts per bucket; the last slot is `+Inf`.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        let seconds = if seconds.is_finite() {
            seconds.max(0.0)
        } else {
            0.0
        };
        let slot = BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[slot] += 1;
        self.sum += seconds;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count;
            let le = BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// The process' metrics registry.
#[derive(Debug, Default)]
pub struct Metrics {
    /// `(command, ok)` → latency.
    commands: Mutex<BTreeMap<(&'static str, bool), Histogram>>,
    /// `(method, route)` → latency; `(method, route, status)` → count.
    http_latency: Mutex<BTreeMap<(String, String), Histogram>>,
    http_requests: Mutex<BTreeMap<(String, String, u16), u64>>,
}

fn outcome(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "error"
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one command execution (load, decide, commit) of `name`, e.g. `community.create`.
    pub fn observe_command(&self, name: &'static str, seconds: f64, ok: bool) {
        if let Ok(mut commands) = self.commands.lock() {
            commands.entry((name, ok)).or_default().observe(seconds);
        }
    }

    /// Records one HTTP request; `route` is the matched route template, never the raw path (which
    /// would make one series per id).
    pub fn observe_http(&self, method: &str, route: &str, status: u16, seconds: f64) {
        if let Ok(mut latency) = self.http_latency.lock() {
            latency
                .entry((method.to_string(), route.to_string()))
                .or_default()
                .observe(seconds);
        }
        if let Ok(mut requests) = self.http_requests.lock() {
            *requests
                .entry((method.to_string(), route.to_string(), status))
                .or_default() += 1;
        }
    }

    /// The in-process series in the text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(commands) = self.commands.lock() {
            header(
                &mut out,
                "rookery_command_duration_seconds",
                "histogram",
                "Command latency: load, decide, commit.",
            );
            for ((name, ok), h) in commands.iter() {
                let labels = format!("command=\"{}\",outcome=\"{}\"", escape(name), outcome(*ok));
                h.render(&mut out, "rookery_command_duration_seconds", &labels);
            }
            header(
                &mut out,
                "rookery_commands_total",
                "counter",
                "Commands executed, by outcome.",
            );
            for ((name, ok), h) in commands.iter() {
                let _ = writeln!(
                    out,
                    "rookery_commands_total{{command=\"{}\",outcome=\"{}\"}} {}",
                    escape(name),
                    outcome(*ok),
                    h.count
                );
            }
        }
        if let Ok(latency) = self.http_latency.lock() {
            header(
                &mut out,
                "rookery_http_request_duration_seconds",
                "histogram",
                "HTTP request latency by route.",
            );
            for ((method, route), h) in latency.iter() {
                let labels = format!("method=\"{}\",route=\"{}\"", escape(method), escape(route));
                h.render(&mut out, "rookery_http_request_duration_seconds", &labels);
            }
        }
        if let Ok(requests) = self.http_requests.lock() {
            header(
                &mut out,
                "rookery_http_requests_total",
                "counter",
                "HTTP requests by route and status.",
            );
            for ((method, route, status), n) in requests.iter() {
                let _ = writeln!(
                    out,
                    "rookery_http_requests_total{{method=\"{}\",route=\"{}\",status=\"{status}\"}} {n}",
                    escape(method),
                    escape(route)
                );
            }
        }
        out
    }
}

/// Appends a gauge family: `samples` are `(labels, value)` with labels as `(name, value)` pairs.
pub fn render_gauge(
    out: &mut String,
    name: &str,
    help: &str,
    samples: &[(Vec<(&str, String)>, f64)],
) {
    header(out, name, "gauge", help);
    for (labels, value) in samples {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        let _ = writeln!(out, "{name}{{{}}} {value}", labels.join(","));
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Label values escape `\`, `"` and newlines.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_histograms_are_cumulative_with_sum_and_count() {
        let m = Metrics::new();
        m.observe_command("community.create", 0.004, true);
        m.observe_command("community.create", 0.2, true);
        m.observe_command("community.create", 0.01, false);
        let text = m.render();
        let ok = "command=\"community.create\",outcome=\"ok\"";
        assert!(
            text.contains(&format!(
                "rookery_command_duration_seconds_bucket{{{ok},le=\"0.005\"}} 1"
            )),
            "{text}"
        );
        assert!(text.contains(&format!(
            "rookery_command_duration_seconds_bucket{{{ok},le=\"0.25\"}} 2"
        )));
        assert!(text.contains(&format!(
            "rookery_command_duration_seconds_bucket{{{ok},le=\"+Inf\"}} 2"
        )));
        assert!(text.contains(&format!("rookery_command_duration_seconds_count{{{ok}}} 2")));
        assert!(text
            .contains("rookery_commands_total{command=\"community.create\",outcome=\"error\"} 1"));
        assert!(text.contains("# TYPE rookery_command_duration_seconds histogram"));
    }

    #[test]
    fn http_series_use_route_templates_and_gauges_escape_labels() {
        let m = Metrics::new();
        m.observe_http("GET", "/v1/communities/{id}", 200, 0.003);
        let text = m.render();
        assert!(text.contains(
            "rookery_http_requests_total{method=\"GET\",route=\"/v1/communities/{id}\",status=\"200\"} 1"
        ));
        let mut out = String::new();
        render_gauge(
            &mut out,
            "rookery_x",
            "X.",
            &[(vec![("projection", "a\"b".to_string())], 2.5)],
        );
        assert!(
            out.contains("rookery_x{projection=\"a\\\"b\"} 2.5"),
            "{out}"
        );
    }
}
