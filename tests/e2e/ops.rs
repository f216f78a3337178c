use reqwest::{Method, StatusCode};
use rookery_tests::{spawn_app, spawn_app_in, Mode};
use std::time::Duration;

#[tokio::test]
async fn health_ready_metrics_openapi_and_docs_are_served() {
    let app = spawn_app().await;
    let owner = app.user("ops").await;
    app.community(&owner, "observed", true).await;

    let (status, _) = app.send(Method::GET, "/health", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, ready) = app.send(Method::GET, "/ready", None, None).await;
    assert_eq!(status, StatusCode::OK, "{ready}");

    let metrics = app
        .request(Method::GET, "/metrics", None)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "rookery_command_duration_seconds",
        "rookery_relay_lag_events",
        "rookery_projection_lag_events",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}:\n{metrics}");
    }

    let (status, spec) = app.send(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"));
    for path in [
        "/v1/auth/register",
        "/v1/communities/{id}/members",
        "/v1/communities/{id}/members/{user_id}/ban",
    ] {
        assert!(spec["paths"].get(path).is_some(), "spec lacks {path}");
    }

    // The docs page and every asset it loads come from the binary (works offline).
    let html = get_text(&app, "/docs").await;
    assert!(
        !html.contains("://"),
        "docs page must not load anything remote:\n{html}"
    );
    let init = get_text(&app, "/docs/swagger-initializer.js").await;
    assert!(init.contains("/openapi.json"), "{init}");
    let bundle = get_text(&app, "/docs/swagger-ui-bundle.js").await;
    assert!(
        bundle.len() > 100_000,
        "the embedded swagger-ui bundle is served"
    );
}

#[tokio::test]
async fn min_position_not_yet_applied_times_out_with_503_and_retry_after() {
    // The API alone: no relay or workers, so nothing reaches the read model.
    let app = spawn_app_in(Mode::Serve, |c| c.read_wait = Duration::from_millis(300)).await;
    let owner = app.user("patient").await;
    let (c, created) = app.community(&owner, "waiting-room", true).await;
    let position = created["position"].as_str().unwrap();
    let resp = app
        .request(
            Method::GET,
            &format!("/v1/communities/{c}/members?min_position={position}"),
            Some(&owner.token),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().get("retry-after").is_some());

    let (status, p) = app
        .send(
            Method::GET,
            &format!("/v1/communities/{c}/members?min_position=bogus"),
            Some(&owner.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(p.to_string().contains("min_position"), "{p}");
}

/// The value of the series `name{labels}` in a Prometheus text exposition (`labels` as rendered,
/// e.g. `projection="members"`).
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// `/metrics` carries what the pipeline did, not only what the API did: per projection its
/// batches, applied events and lag; the relay's published events (their rate is its
/// throughput) and its cursor, at the position of the last command.
#[tokio::test]
async fn metrics_show_projection_batches_applied_events_lag_and_the_relay() {
    let app = spawn_app().await;
    let owner = app.user("metered").await;
    let (c, created) = app.community(&owner, "metered-community", true).await;
    let position = created["position"].as_str().unwrap().to_string();
    let (status, _) = app
        .send(
            Method::GET,
            &format!("/v1/communities/{c}/members?min_position={position}"),
            Some(&owner.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (txid, gpos) = position.split_once('.').unwrap();
    let (txid, gpos): (f64, f64) = (txid.parse().unwrap(), gpos.parse().unwrap());

    // The relay saves its cursor a moment after publishing: wait for the gauge to get there.
    let stream = format!("stream=\"{}\"", app.config.stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = get_text(&app, "/metrics").await;
        let cursor = (
            sample(&text, "rookery_relay_cursor_txid", &stream),
            sample(&text, "rookery_relay_cursor_gpos", &stream),
        );
        if cursor.0 > Some(txid) || (cursor.0 == Some(txid) && cursor.1 >= Some(gpos)) {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay cursor {cursor:?} never reached {position}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let members = "projection=\"members\"";
    let at_least = |name: &str, labels: &str, min: f64| {
        let value = sample(&text, name, labels);
        assert!(
            value >= Some(min),
            "{name}{{{labels}}} = {value:?}:\n{text}"
        );
    };
    // A registration, the community's creation and the owner's join.
    at_least("rookery_projection_batches_total", members, 1.0);
    at_least("rookery_projection_events_applied_total", members, 3.0);
    at_least("rookery_relay_events_published_total", &stream, 3.0);
    at_least("rookery_relay_active", &stream, 1.0);
    assert_eq!(
        sample(&text, "rookery_projection_lag_events", members),
        Some(0.0),
        "{text}"
    );
    assert!(text.contains("# TYPE rookery_projection_batch_duration_seconds histogram"));
    assert!(text.contains("# HELP rookery_relay_events_published_total"));
}

async fn get_text(app: &rookery_tests::TestApp, path: &str) -> String {
    let resp = app.request(Method::GET, path, None).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{path}");
    resp.text().await.unwrap()
}
