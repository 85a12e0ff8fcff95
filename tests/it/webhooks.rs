//! Signed webhooks: an EHR double's change notification syncs the named resources; bad
//! signatures, stale timestamps and replays are refused (or not processed again) and audited.

use fhirgate::config::Secret;
use fhirgate::config::{SourceKind, WebhookConfig};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::ehr_double::{FhirDouble, Flavor, Options};
use crate::helpers::{json, patient, TestApp};
use crate::sync::{finished_job, source_for};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// Posts `body` to the EHR's webhook, signed with `secret` at `timestamp` as `id`.
async fn deliver(
    app: &TestApp,
    id: &str,
    timestamp: i64,
    secret: &str,
    body: &Value,
) -> (StatusCode, Value) {
    let bytes = serde_json::to_vec(body).expect("json");
    let signature = fhirgate::webhooks::sign(secret, id, timestamp, &bytes).expect("sign");
    let response = reqwest::Client::new()
        .post(app.url("/webhooks/ehr"))
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .header("content-type", "application/json")
        .body(bytes)
        .send()
        .await
        .expect("webhook");
    json(response).await
}

#[tokio::test]
async fn a_signed_notification_syncs_what_it_names_once() {
    let ehr = FhirDouble::start(Flavor::Plain, Options::default()).await;
    ehr.put_resource(patient("wh-1"));
    ehr.put_resource(json!({
        "resourceType": "Observation", "id": "wh-obs", "status": "final",
        "code": {"text": "heart rate"}, "subject": {"reference": "Patient/wh-1"},
    }));
    let app = TestApp::start_with(|config| {
        config
            .sources
            .insert("ehr".into(), source_for(&ehr, SourceKind::Fhir, None));
        config.sync.default_destination = Some("local".into());
        config.webhooks.insert(
            "ehr".into(),
            WebhookConfig {
                secret: Secret::new(SECRET.into()),
                destination: None,
                tolerance_secs: 300,
            },
        );
    })
    .await;
    let notification = json!({
        "resourceType": "Bundle", "type": "history",
        "entry": [
            {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Parameters", "parameter": [
                {"name": "notification-event", "part": [
                    {"name": "focus", "valueReference": {"reference": format!("{}/Observation/wh-obs", ehr.fhir_base())}}
                ]}
            ]}},
        ]
    });
    let (status, answer) = deliver(&app, "evt-1", now(), SECRET, &notification).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let job = answer["job"].as_u64().expect("job");
    let finished = finished_job(&app.client, &app.base, job).await;
    assert_eq!(finished["state"], "completed", "{finished}");
    assert_eq!(app.get("/Observation/wh-obs").await.status(), 200);

    // The same delivery again (a replay, or the sender's retry) is not processed again.
    let (status, answer) = deliver(&app, "evt-1", now(), SECRET, &notification).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["status"], "duplicate");

    let listed = json!({"resources": ["Patient/wh-1"]});
    // Wrong secret, tampered body, stale and future timestamps, missing headers.
    let other = "whsec_c2VjcmV0LW9mLXNvbWVvbmUtZWxzZQ==";
    let (status, outcome) = deliver(&app, "evt-2", now(), other, &listed).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{outcome}");
    assert_eq!(outcome["issue"][0]["code"], "security");
    let timestamp = now();
    let bytes = serde_json::to_vec(&listed).expect("json");
    let signature = fhirgate::webhooks::sign(SECRET, "evt-3", timestamp, &bytes).expect("sign");
    let tampered = reqwest::Client::new()
        .post(app.url("/webhooks/ehr"))
        .header("webhook-id", "evt-3")
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", &signature)
        .body(br#"{"resources": ["Patient/someone-else"]}"#.to_vec())
        .send()
        .await
        .expect("post");
    assert_eq!(tampered.status(), StatusCode::UNAUTHORIZED);
    // Ten seconds beyond the 300 s window either way, so a second ticking over mid-test
    // cannot bring a timestamp back inside it.
    for stale in [now() - 310, now() + 310] {
        let (status, outcome) = deliver(&app, "evt-4", stale, SECRET, &listed).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{outcome}");
        assert!(outcome["issue"][0]["diagnostics"]
            .as_str()
            .expect("diagnostics")
            .contains("too far from now"));
    }
    let unsigned = reqwest::Client::new()
        .post(app.url("/webhooks/ehr"))
        .body(bytes.clone())
        .send()
        .await
        .expect("post");
    assert_eq!(unsigned.status(), StatusCode::BAD_REQUEST);
    let unknown = reqwest::Client::new()
        .post(app.url("/webhooks/nowhere"))
        .body(bytes)
        .send()
        .await
        .expect("post");
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let (status, _) = deliver(&app, "evt-5", now(), SECRET, &json!({"hello": "world"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // Every call is in the audit log, with why it was refused or what it started.
    let (status, bundle) = json(
        app.get("/AuditEvent?subtype=create&agent=webhook:ehr")
            .await,
    )
    .await;
    assert_eq!(status, 200, "{bundle}");
    let events: Vec<&Value> = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| &e["resource"])
        .collect();
    let descriptions: Vec<&str> = events
        .iter()
        .filter_map(|e| e["outcomeDesc"].as_str())
        .collect();
    assert_eq!(events.len(), 8, "{descriptions:#?}");
    assert!(
        descriptions
            .iter()
            .any(|d| d.contains(&format!("sync job {job} for 1 resources"))),
        "{descriptions:#?}"
    );
    assert!(
        descriptions.iter().any(|d| d.contains("replay of evt-1")),
        "{descriptions:#?}"
    );
    assert_eq!(
        descriptions
            .iter()
            .filter(|d| d.contains("signature does not match"))
            .count(),
        2,
        "{descriptions:#?}"
    );
    assert_eq!(
        descriptions
            .iter()
            .filter(|d| d.contains("too far from now"))
            .count(),
        2,
        "{descriptions:#?}"
    );
}
