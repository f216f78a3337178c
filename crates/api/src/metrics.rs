//! Prometheus metrics through the `metrics` facade.
//!
//! Every part of the process records into the one global recorder: the API its commands and
//! requests (here), the relay and the projection workers their batches, events, cursor and lag
//! (in their own crates, through the same facade). [`Metrics::install`] puts the Prometheus
//! recorder in place once per process and `/metrics` renders it, after setting the gauges that
//! describe the whole system (relay lag, projection lag, state and dead letters) from Postgres,
//! so every replica reports the same truth.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Upper bounds (seconds) of every latency histogram's buckets.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Renders what the process recorded.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
}

static INSTALLED: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

impl Metrics {
    /// The process's recorder, installed by the first call (later ones share it). When the
    /// embedding program installed a recorder of its own, this one records nothing and a
    /// warning says so.
    pub fn install() -> Self {
        let installed = INSTALLED.get_or_init(|| {
            let recorder = builder().build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    describe();
                    Some(handle)
                }
                Err(_) => None,
            }
        });
        match installed {
            Some(handle) => Self {
                handle: handle.clone(),
            },
            None => {
                tracing::warn!(
                    "another metrics recorder is installed; /metrics shows only what it is given"
                );
                Self::detached()
            }
        }
    }

    /// A recorder of its own, not installed: for rendering in tests under
    /// `metrics::with_local_recorder`.
    pub fn detached() -> Self {
        Self {
            handle: builder().build_recorder().handle(),
        }
    }

    /// Everything recorded, in the text exposition format.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

fn builder() -> PrometheusBuilder {
    // Only fails for an empty bucket list.
    PrometheusBuilder::new()
        .set_buckets(&BUCKETS)
        .unwrap_or_else(|_| PrometheusBuilder::new())
}

/// Help texts, once per process.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!(
        "rookery_command_duration_seconds",
        Unit::Seconds,
        "Command latency: load, decide, commit."
    );
    describe_counter!("rookery_commands_total", "Commands executed, by outcome.");
    describe_histogram!(
        "rookery_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request latency by route."
    );
    describe_counter!(
        "rookery_http_requests_total",
        "HTTP requests by route and status."
    );
    describe_counter!(
        "rookery_relay_events_published_total",
        "Events the relay stored on the stream (its rate is the relay's throughput)."
    );
    describe_counter!(
        "rookery_relay_events_confirmed_total",
        "Events confirmed on the stream, re-sent duplicates included."
    );
    describe_counter!(
        "rookery_relay_failed_batches_total",
        "Times relaying stopped short on an error (retried)."
    );
    describe_counter!(
        "rookery_relay_cursor_saves_total",
        "Relay cursor saves that reached Postgres."
    );
    describe_gauge!(
        "rookery_relay_cursor_txid",
        "Transaction id of the relay's stored cursor (the log key's first half)."
    );
    describe_gauge!(
        "rookery_relay_cursor_gpos",
        "Global position of the relay's stored cursor (the log key's second half)."
    );
    describe_gauge!(
        "rookery_relay_active",
        "1 while this process's relay is the active one."
    );
    describe_gauge!(
        "rookery_relay_last_batch_timestamp_seconds",
        "When the relay last confirmed a batch or found the log caught up (Unix time)."
    );
    describe_counter!(
        "rookery_projection_batches_total",
        "Projection batches committed, by projection."
    );
    describe_counter!(
        "rookery_projection_events_applied_total",
        "Events a projection applied (its rate is the projection's throughput)."
    );
    describe_counter!(
        "rookery_projection_events_skipped_total",
        "Deliveries a projection skipped as already applied (redeliveries, rebuilt ranges)."
    );
    describe_counter!(
        "rookery_projection_events_parked_total",
        "Poison events a projection parked."
    );
    describe_counter!(
        "rookery_projection_batch_failures_total",
        "Projection batches rolled back (retried)."
    );
    describe_histogram!(
        "rookery_projection_batch_duration_seconds",
        Unit::Seconds,
        "Time from a projection batch's fetch to its commit."
    );
    describe_gauge!(
        "rookery_projection_active_partitions",
        "Partitions of a projection this process is the active worker of."
    );
    describe_gauge!(
        "rookery_projection_lag_events",
        "Committed events a projection has not applied yet."
    );
    describe_gauge!(
        "rookery_projection_lag_seconds",
        "Age of the oldest committed event a projection has not applied yet (0 when none)."
    );
    describe_gauge!(
        "rookery_projection_dead_letters",
        "Poison events parked by a projection and not yet retried or skipped."
    );
    describe_gauge!(
        "rookery_projection_state",
        "A projection's state (1 for the current one)."
    );
    describe_gauge!(
        "rookery_relay_lag_events",
        "Committed events not yet confirmed on the bus."
    );
    describe_gauge!(
        "rookery_relay_lag_seconds",
        "Age of the oldest committed event not yet confirmed on the bus (0 when none)."
    );
    describe_gauge!(
        "rookery_nats_connected",
        "Whether this process is connected to NATS."
    );
}

fn outcome(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "error"
    }
}

/// Records one command execution (load, decide, commit) of `name`, e.g. `community.create`.
pub fn observe_command(name: &'static str, seconds: f64, ok: bool) {
    let labels = [("command", name), ("outcome", outcome(ok))];
    metrics::histogram!("rookery_command_duration_seconds", &labels).record(seconds);
    metrics::counter!("rookery_commands_total", &labels).increment(1);
}

/// Records one HTTP request; `route` is the matched route template, never the raw path (which
/// would make one series per id).
pub fn observe_http(method: &str, route: &str, status: u16, seconds: f64) {
    let (method, route) = (method.to_string(), route.to_string());
    metrics::histogram!(
        "rookery_http_request_duration_seconds",
        "method" => method.clone(),
        "route" => route.clone()
    )
    .record(seconds);
    metrics::counter!(
        "rookery_http_requests_total",
        "method" => method,
        "route" => route,
        "status" => status.to_string()
    )
    .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(f: impl FnOnce()) -> String {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, f);
        handle.render()
    }

    #[test]
    fn command_histograms_are_cumulative_with_sum_and_count() {
        let text = recorded(|| {
            observe_command("community.create", 0.004, true);
            observe_command("community.create", 0.2, true);
            observe_command("community.create", 0.01, false);
        });
        let ok = "command=\"community.create\",outcome=\"ok\"";
        for line in [
            format!("rookery_command_duration_seconds_bucket{{{ok},le=\"0.005\"}} 1"),
            format!("rookery_command_duration_seconds_bucket{{{ok},le=\"0.25\"}} 2"),
            format!("rookery_command_duration_seconds_bucket{{{ok},le=\"+Inf\"}} 2"),
            format!("rookery_command_duration_seconds_count{{{ok}}} 2"),
            "rookery_commands_total{command=\"community.create\",outcome=\"error\"} 1".into(),
        ] {
            assert!(text.contains(&line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn http_series_use_route_templates() {
        let text = recorded(|| observe_http("GET", "/v1/communities/{id}", 200, 0.003));
        assert!(
            text.contains(
                "rookery_http_requests_total{method=\"GET\",route=\"/v1/communities/{id}\",status=\"200\"} 1"
            ),
            "{text}"
        );
    }
}
