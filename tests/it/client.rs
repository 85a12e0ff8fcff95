//! A real third-party client, npm `fhir-kit-client`, can use the server.
//!
//! The test installs the client from the npm registry into Cargo's test scratch folder the
//! first time (so `cargo test` needs no manual step), then runs `tests/clients/fhir-kit-client.mjs`
//! with Node against a live server.

use std::path::PathBuf;
use std::process::Command;

use crate::helpers::TestApp;

fn client_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fhir-kit-client");
    let installed = dir.join("node_modules/fhir-kit-client/package.json");
    if !installed.exists() {
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let status = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
            .arg(&dir)
            .arg("fhir-kit-client@2")
            .status()
            .expect("npm is needed for the third-party client test (Node.js 18+)");
        assert!(status.success(), "npm install fhir-kit-client failed");
    }
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/fhir-kit-client.mjs"
        ),
        dir.join("check.mjs"),
    )
    .expect("copy script");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fhir_kit_client_reads_creates_searches_and_pages() {
    let app = TestApp::start().await;
    let dir = tokio::task::spawn_blocking(client_dir)
        .await
        .expect("install");
    let base = app.fhir("");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(dir.join("check.mjs"))
            .env("FHIR_BASE", base)
            .env("FHIR_TOKEN", crate::helpers::TEST_ADMIN_KEY)
            .output()
            .expect("node is needed for the third-party client test")
    })
    .await
    .expect("node ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "fhir-kit-client checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(report["ok"], true);
    assert_eq!(report["checks"].as_array().map(Vec::len), Some(9));
}
