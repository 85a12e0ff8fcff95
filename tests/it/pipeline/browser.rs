//! The review page in headless Chromium (Debian `chromium`, npm `playwright-core`, both
//! installed by `.ci/run`): SMART launch → list → review → submit, with a screenshot saved to
//! `target/review-page.png`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::doubles::SmartDouble;
use super::{configure, ehr, eventually, note_attachment, sign_encounter, NOTE, PATIENT, TENANT};
use crate::helpers::TestApp;

fn chromium() -> PathBuf {
    let path = std::env::var_os("CHROMIUM_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "{} is missing: install Debian's chromium (apt-get install chromium), as .ci/run does",
        path.display()
    );
    path
}

#[tokio::test]
async fn a_clinician_launches_reviews_and_submits_in_the_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let browser_dir = root.join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "run `npm ci --prefix tests/browser` first (.ci/run does)"
    );
    let chromium = chromium();
    let double = ehr().await;
    sign_encounter(&double, "enc-1", PATIENT, Some(note_attachment(NOTE)));
    let smart = SmartDouble::start(PATIENT, "enc-1", "Practitioner/doc-1").await;
    let app = TestApp::start_with(|c| {
        configure(c, &double);
        if let Some(t) = c.pipeline.tenants.get_mut(TENANT) {
            t.smart_iss = Some(smart.iss());
        }
    })
    .await;
    let launch = app.url(&format!("/app/launch?iss={}&launch=launch-1", smart.iss()));
    let screenshot = root.join("target/review-page.png");
    let script = browser_dir.join("review.mjs");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(script)
            .env("CHROMIUM_PATH", chromium)
            .env("LAUNCH_URL", launch)
            .env("SCREENSHOT", &screenshot)
            .env("EXPECT_TITLE", "MRI of the lumbar spine")
            .output()
    })
    .await
    .expect("join")
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the browser run failed:\n{stdout}\n{stderr}"
    );
    let result: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no result line in:\n{stdout}"));
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["submitDisabledAfterClick"], true, "{result}");
    assert_eq!(
        result["consoleErrors"],
        Value::Array(Vec::new()),
        "{result}"
    );
    assert!(result["facts"].as_u64().unwrap_or(0) >= 1, "{result}");
    assert!(result["criteria"].as_u64().unwrap_or(0) >= 1, "{result}");
    assert!(root.join("target/review-page.png").is_file());
    assert!(smart.problems().is_empty(), "{:?}", smart.problems());
    let written = eventually("the DocumentReference at the EHR", || async {
        double
            .writes()
            .into_iter()
            .find(|w| w.resource_type == "DocumentReference")
    })
    .await;
    assert_eq!(
        written.body["content"][0]["attachment"]["contentType"],
        "application/pdf"
    );
}
