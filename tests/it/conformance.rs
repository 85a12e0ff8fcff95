//! Runs the request → expected-response cases in `conformance/cases/`.

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::{read_json, TestApp};

#[tokio::test]
async fn conformance_cases() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance/cases");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("cases")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 3);
    for file in files {
        let case = read_json(&file);
        let name = case["name"].as_str().expect("name");
        let app = TestApp::start().await;
        for (i, step) in case["steps"].as_array().expect("steps").iter().enumerate() {
            let request = &step["request"];
            let method = Method::from_bytes(request["method"].as_str().expect("method").as_bytes())
                .expect("method");
            let mut builder = app
                .client
                .request(method, app.url(request["path"].as_str().expect("path")));
            let mut has_content_type = false;
            for (k, v) in request["headers"].as_object().into_iter().flatten() {
                has_content_type |= k.eq_ignore_ascii_case("content-type");
                builder = builder.header(k.as_str(), v.as_str().expect("header value"));
            }
            if let Some(body) = request.get("body") {
                builder = builder.body(serde_json::to_vec(body).expect("json"));
            } else if let Some(raw) = request["raw"].as_str() {
                builder = builder.body(raw.to_owned());
            }
            if !has_content_type && (request.get("body").is_some() || request.get("raw").is_some())
            {
                builder = builder.header("content-type", "application/fhir+json");
            }
            let response = builder.send().await.expect("send");
            let expect = &step["expect"];
            let label = format!("{name}, step {i}");
            assert_eq!(
                response.status(),
                StatusCode::from_u16(expect["status"].as_u64().expect("status") as u16)
                    .expect("code"),
                "{label}"
            );
            for (k, v) in expect["headers"].as_object().into_iter().flatten() {
                assert_eq!(
                    response
                        .headers()
                        .get(k.as_str())
                        .and_then(|h| h.to_str().ok()),
                    v.as_str(),
                    "{label}: header {k}"
                );
            }
            let bytes = response.bytes().await.expect("body");
            if let Some(checks) = expect["json"].as_object() {
                let body: Value = serde_json::from_slice(&bytes).expect("JSON body");
                for (pointer, want) in checks {
                    assert_eq!(
                        body.pointer(pointer),
                        Some(want),
                        "{label}: {pointer} in {body}"
                    );
                }
            }
        }
    }
}
