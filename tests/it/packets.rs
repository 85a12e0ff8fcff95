//! PA packets: a PDF readable with `pdftotext` (names in any script), a valid DocumentReference
//! whose hash and size are the PDF's, packets from a patient record with orders, and write-back
//! to an EHR double through the sync outbox.

use std::process::Command;

use base64::Engine;
use fhirgate::config::{ClientAuthMethod, DestinationConfig, DestinationKind, UpsertMode};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::ehr_double::{Auth, FhirDouble, Flavor, Options};
use crate::helpers::{assert_outcome, fixtures, json, read_json, TestApp};
use crate::sync::{finished_job, oauth};

fn referral() -> Value {
    read_json(&fixtures().join("davinci/pas-ig/Bundle-ReferralAuthorizationBundleExample.json"))
}

/// Submits `request` and returns the claim's id.
async fn submitted(app: &TestApp, request: &Value) -> String {
    let (status, response) = json(app.post("/Claim/$submit", request).await).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    response["entry"][0]["resource"]["id"]
        .as_str()
        .expect("ClaimResponse id")
        .to_owned()
}

async fn packet(app: &TestApp, body: &Value) -> (StatusCode, Value, Option<String>) {
    let response = app
        .client
        .post(app.url("/packets"))
        .json(body)
        .send()
        .await
        .expect("POST /packets");
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (status, value) = json(response).await;
    (status, value, location)
}

async fn pdf_bytes(app: &TestApp, location: &str) -> Vec<u8> {
    let response = app
        .client
        .get(app.url(location))
        .send()
        .await
        .expect("GET packet");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/pdf")
    );
    response.bytes().await.expect("pdf").to_vec()
}

/// The text of a PDF, by poppler's `pdftotext`.
pub(crate) fn pdf_text(pdf: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("packet.pdf");
    std::fs::write(&path, pdf).expect("write");
    let output = Command::new("pdftotext")
        .arg("-enc")
        .arg("UTF-8")
        .arg(&path)
        .arg("-")
        .output()
        .expect("pdftotext (poppler-utils) must be installed");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

/// The DocumentReference with what changes from run to run replaced.
fn stable(mut document: Value) -> Value {
    for (path, mark) in [
        ("/id", "[id]"),
        ("/masterIdentifier/value", "[uuid]"),
        ("/identifier/0/value", "[uuid]"),
        ("/date", "[now]"),
        ("/meta/lastUpdated", "[now]"),
        ("/content/0/attachment/data", "[pdf]"),
        ("/content/0/attachment/hash", "[sha1]"),
        ("/content/0/attachment/creation", "[now]"),
        ("/context/related/1/reference", "ClaimResponse/[id]"),
    ] {
        if let Some(value) = document.pointer_mut(path) {
            *value = json!(mark);
        }
    }
    if let Some(size) = document.pointer_mut("/content/0/attachment/size") {
        *size = json!("[size]");
    }
    document
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_packet_is_a_readable_pdf_and_a_valid_document_reference() {
    let app = TestApp::start().await;
    let claim = submitted(&app, &referral()).await;
    let (status, document, location) = packet(&app, &json!({"claimId": claim})).await;
    assert_eq!(status, StatusCode::CREATED, "{document}");
    fhirgate::fhir::SchemaValidator::bundled()
        .expect("schema")
        .validate(&document)
        .expect("the DocumentReference is valid R4");
    let id = document["id"].as_str().expect("id");
    assert_eq!(location.as_deref(), Some(format!("/packets/{id}").as_str()));
    let pdf = pdf_bytes(&app, &format!("/packets/{id}")).await;
    assert!(pdf.starts_with(b"%PDF-"));
    assert!(pdf.len() <= 200 * 1024, "{} bytes", pdf.len());
    let attachment = &document["content"][0]["attachment"];
    assert_eq!(attachment["size"], pdf.len());
    use sha1::Digest;
    let engine = base64::engine::general_purpose::STANDARD;
    assert_eq!(attachment["hash"], engine.encode(sha1::Sha1::digest(&pdf)));
    assert_eq!(attachment["contentType"], "application/pdf");

    let text = pdf_text(&pdf);
    for expected in [
        "JOE SMITH",
        "1122334455",
        "Maryland Capital Insurance Company",
        "Consultation",
        "Approved (PA-",
        "[met]",
        "Claim/ReferralAuthorizationExample#diagnosis[0]",
        "DR. JOE SMITH CORPORATION",
        "8189991234",
        "Page 1 of",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from the packet:\n{text}"
        );
    }
    insta::assert_json_snapshot!("claim_packet_document_reference", stable(document));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_in_greek_and_chinese_come_out_of_the_pdf_exactly() {
    let app = TestApp::start().await;
    for (n, (given, family)) in [
        ("Αλεξάνδρα-Ευαγγελία", "Παπαδοπούλου-Κωνσταντινίδου"),
        ("娜娜", "欧阳"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut request = referral();
        request["entry"][0]["resource"]["identifier"][0]["value"] = json!(format!("names-{n}"));
        for entry in request["entry"].as_array_mut().expect("entries") {
            if entry["resource"]["resourceType"] == "Patient" {
                entry["resource"]["name"] = json!([{"family": family, "given": [given]}]);
            }
        }
        let claim = submitted(&app, &request).await;
        let (status, document, location) = packet(&app, &json!({"claimId": claim})).await;
        assert_eq!(status, StatusCode::CREATED, "{document}");
        let text = pdf_text(&pdf_bytes(&app, &location.expect("location")).await);
        let name = format!("{given} {family}");
        assert!(n > 0 || name.chars().count() >= 40, "a 40-character name");
        assert!(text.contains(&name), "{name} missing:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_from_a_patient_record_and_orders_shows_the_criteria() {
    let app = TestApp::start().await;
    let record = json!({"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "id": "p1", "name": [{"family": "Rivera", "given": ["Ana"]}], "birthDate": "1970-03-02"}},
        {"resource": {"resourceType": "Organization", "id": "acme", "name": "Acme Health Plan"}},
        {"resource": {"resourceType": "Coverage", "id": "cov", "status": "active", "subscriberId": "ACME-77",
            "beneficiary": {"reference": "Patient/p1"}, "payor": [{"reference": "Organization/acme"}]}},
        {"resource": {"resourceType": "Condition", "id": "lbp", "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M54.50"}]}}}
    ]});
    let order = json!({"resourceType": "ServiceRequest", "id": "mri", "status": "draft", "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "72148", "display": "MRI lumbar spine without contrast"}]}});
    let (status, document, location) =
        packet(&app, &json!({"bundle": record, "orders": [order]})).await;
    assert_eq!(status, StatusCode::CREATED, "{document}");
    assert_eq!(document["subject"]["reference"], "Patient/p1");
    assert_eq!(
        document["context"]["related"][0]["reference"],
        "ServiceRequest/mri"
    );
    let text = pdf_text(&pdf_bytes(&app, &location.expect("location")).await);
    for expected in [
        "Ana Rivera",
        "1970-03-02",
        "ACME-77",
        "72148",
        "Prior authorization needed",
        "[met]",
        "[unknown]",
    ] {
        assert!(text.contains(expected), "{expected:?} missing:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_is_written_back_to_the_chart_once() {
    let openemr = FhirDouble::start(
        Flavor::openemr(),
        Options {
            auth: Some(Auth::private_key_jwt("fhirgate-system")),
            ..Options::default()
        },
    )
    .await;
    let mut chart = DestinationConfig {
        upsert: UpsertMode::Create,
        batch_size: Some(1),
        ..DestinationConfig::new(DestinationKind::Fhir, Some(openemr.fhir_base()))
    };
    let mut auth = oauth(ClientAuthMethod::PrivateKeyJwt, "fhirgate-system", None);
    auth.token_url = Some(openemr.token_url());
    chart.auth = Some(auth);
    let app = TestApp::start_with(|config| {
        config.destinations.insert("openemr-chart".into(), chart);
    })
    .await;
    let claim = submitted(&app, &referral()).await;
    let (_, document, _) = packet(&app, &json!({"claimId": claim})).await;
    let id = document["id"].as_str().expect("id").to_owned();
    for _ in 0..2 {
        let (status, job) = json(
            app.client
                .post(app.url(&format!("/packets/{id}/write-back")))
                .json(&json!({"destination": "openemr-chart"}))
                .send()
                .await
                .expect("write-back"),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        let done = finished_job(&app.client, &app.base, job["id"].as_u64().expect("job")).await;
        assert_eq!(done["state"], "completed", "{done}");
    }
    // Created once with a POST guarded by If-None-Exist (the EHR assigns the id); the second
    // write-back finds this version delivered already and sends nothing.
    let creates: Vec<_> = openemr
        .recorded_requests()
        .into_iter()
        .filter(|r| r.method == reqwest::Method::POST && r.path.ends_with("/DocumentReference"))
        .collect();
    assert!(!creates.is_empty());
    assert!(creates
        .iter()
        .all(|r| r.headers.get("if-none-exist").is_some()));
    let stored: Vec<Value> = openemr
        .resources()
        .into_iter()
        .filter(|r| r["resourceType"] == "DocumentReference")
        .collect();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["identifier"], document["identifier"]);
    assert_eq!(stored[0]["content"], document["content"]);
}

#[tokio::test]
async fn bad_packet_requests_are_refused() {
    let app = TestApp::start().await;
    for (body, status, code) in [
        (json!({}), StatusCode::BAD_REQUEST, "required"),
        (
            json!({"claimId": "nope"}),
            StatusCode::NOT_FOUND,
            "not-found",
        ),
        (
            json!({"bundle": {"resourceType": "Patient"}, "orders": [{}]}),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            json!({"bundle": {"resourceType": "Bundle", "type": "collection"}, "orders": []}),
            StatusCode::BAD_REQUEST,
            "required",
        ),
        (json!({"claim": "x"}), StatusCode::BAD_REQUEST, "structure"),
    ] {
        let (got, outcome, _) = packet(&app, &body).await;
        assert_eq!(got, status, "{body}: {outcome}");
        assert_outcome(&outcome, code, None);
    }
    let (status, outcome) = json(
        app.client
            .get(app.url("/packets/nope"))
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_outcome(&outcome, "not-found", None);
    let claim = submitted(&app, &referral()).await;
    let (_, document, _) = packet(&app, &json!({"claimId": claim})).await;
    let id = document["id"].as_str().expect("id");
    let (status, outcome) = json(
        app.client
            .post(app.url(&format!("/packets/{id}/write-back")))
            .json(&json!({"destination": "nowhere"}))
            .send()
            .await
            .expect("post"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
    assert_outcome(&outcome, "invalid", None);
}
