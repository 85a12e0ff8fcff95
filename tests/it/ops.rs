//! Health, readiness, metrics, request ids, graceful shutdown.

use reqwest::StatusCode;

use crate::helpers::{json, patient, TestApp};

#[tokio::test]
async fn health_ready_and_metrics() {
    let app = TestApp::start().await;
    let r = app
        .client
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .client
        .get(app.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(r.status(), StatusCode::OK);
    app.put("/Patient/m", &patient("m")).await;
    app.get("/Patient/m").await;
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(text.contains("fhirgate_http_requests_total{"), "{text}");
    assert!(
        text.contains("route=\"/fhir/{type}/{id}\""),
        "route templates, not paths: {text}"
    );
    assert!(
        !text.contains("/fhir/Patient/m"),
        "no resource ids in labels"
    );
    assert!(
        text.contains("fhirgate_http_request_duration_seconds_bucket"),
        "latency histogram"
    );
    assert!(
        text.contains("fhirgate_store_operations_total{op=\"write\"}"),
        "store counters"
    );
    assert!(
        text.contains("fhirgate_store_operation_duration_seconds_bucket{op=\"read\""),
        "store latency"
    );
}

#[tokio::test]
async fn request_ids_are_accepted_and_returned() {
    let app = TestApp::start().await;
    let r = app
        .client
        .get(app.fhir("/metadata"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .expect("get");
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let r = app
        .client
        .get(app.fhir("/metadata"))
        .send()
        .await
        .expect("get");
    assert!(!r.headers()["x-request-id"].is_empty());
}

#[tokio::test]
async fn shutdown_closes_the_store_and_data_persists() {
    let app = TestApp::start().await;
    app.put("/Patient/keep", &patient("keep")).await;
    let dir = app.stop().await;
    let app = TestApp::start_with(|c| c.store.data_dir = dir.path().to_path_buf()).await;
    let (status, body) = json(app.get("/Patient/keep").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["id"], "keep");
    drop(app);
    drop(dir);
}
