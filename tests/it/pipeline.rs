//! The signed-encounter pipeline end to end: an EHR double with a finished encounter for a
//! Synthea patient → a Ready transaction, an SSE event, a packet → Submit → the EHR receives
//! the DocumentReference with the PDF. Faults: the EHR down or throttling, encounters seen
//! twice, no Coverage, odd notes, the model failing, Submit twice, bad launches, a restart
//! between Ready and Submitted, drafts expiring.

mod browser;
mod doubles;

use std::time::Duration;

use base64::Engine;
use fhirgate::config::{Config, DestinationConfig, DestinationKind, LlmConfig, TenantConfig};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::ehr_double::{FhirDouble, Flavor, Options};
use crate::helpers::{fixtures, TestApp};
use crate::sync::source_for_url;
use doubles::{LlmDouble, LlmMode, SmartDouble};

const TENANT: &str = "clinic";
const CPT: &str = "http://www.ama-assn.org/go/cpt";
const SYNTHEA: &str = "synthea/Andy_Schaden_d630c6ca-046c-470a-8f3a-4dbc3850e7ae.json";
const PATIENT: &str = "9afe28dc-7ad5-4e90-b6a6-16123eae98c3";
const NOTE: &str = "Patient: Andy Schaden  DOB: 06/09/1932  MRN: S99935541  Phone: 555-759-5889\n\
HPI: Low back pain radiating to the left leg for 4 months. Completed 8 weeks of PT with \
minimal relief. Took ibuprofen for 6 weeks. Denies saddle anesthesia, bowel or bladder changes.\n\
Plan: MRI lumbar spine.";

fn now_minus(seconds: i64) -> String {
    let at = time::OffsetDateTime::now_utc() - time::Duration::seconds(seconds);
    at.format(&time::format_description::well_known::Rfc3339)
        .expect("format")
}

/// An EHR double holding the Synthea patient, with Acme coverage and a low-back-pain problem.
async fn ehr() -> FhirDouble {
    let double = FhirDouble::start(Flavor::Plain, Options::default()).await;
    double.load_synthea(fixtures().join(SYNTHEA));
    double.put_resource(
        json!({"resourceType": "Organization", "id": "acme", "name": "Acme Health Plan"}),
    );
    double.put_resource(
        json!({"resourceType": "Coverage", "id": "cov-1", "status": "active",
        "beneficiary": {"reference": format!("Patient/{PATIENT}")},
        "payor": [{"reference": "Organization/acme"}], "subscriberId": "ACME-1001"}),
    );
    double.put_resource(json!({"resourceType": "Condition", "id": "lbp",
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M54.50"}]},
        "subject": {"reference": format!("Patient/{PATIENT}")}}));
    double
}

fn note_attachment(text: &str) -> Value {
    json!({"contentType": "text/plain; charset=utf-8",
        "data": base64::engine::general_purpose::STANDARD.encode(text)})
}

/// A signed encounter with a lumbar MRI order and a note with `attachment`.
fn sign_encounter(double: &FhirDouble, id: &str, patient: &str, attachment: Option<Value>) {
    double.put_resource(
        json!({"resourceType": "Encounter", "id": id, "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": format!("Patient/{patient}")},
        "participant": [{"individual": {"reference": "Practitioner/doc-1"}}],
        "period": {"start": now_minus(1800), "end": now_minus(60)}}),
    );
    double.put_resource(json!({"resourceType": "ServiceRequest", "id": format!("{id}-mri"),
        "status": "active", "intent": "order",
        "code": {"coding": [{"system": CPT, "code": "72148", "display": "MRI lumbar spine without contrast"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "encounter": {"reference": format!("Encounter/{id}")}}));
    if let Some(attachment) = attachment {
        double.put_resource(
            json!({"resourceType": "DocumentReference", "id": format!("{id}-note"),
            "status": "current", "date": now_minus(120),
            "type": {"text": "Progress note"},
            "subject": {"reference": format!("Patient/{patient}")},
            "context": {"encounter": [{"reference": format!("Encounter/{id}")}]},
            "content": [{"attachment": attachment}]}),
        );
    }
}

/// The EHR as a source and as the write-back destination, polled every second.
fn configure(config: &mut Config, double: &FhirDouble) {
    config
        .sources
        .insert(TENANT.into(), source_for_url(&double.fhir_base()));
    config.destinations.insert(
        "clinic-chart".into(),
        DestinationConfig::new(DestinationKind::Fhir, Some(double.fhir_base())),
    );
    config.pipeline.tenants.insert(
        TENANT.into(),
        TenantConfig {
            poll_interval_secs: 1,
            write_back: Some("clinic-chart".into()),
            ..TenantConfig::default()
        },
    );
    config.pipeline.app.dev_login = true;
    config.sync.backoff_base_ms = 50;
    config.sync.backoff_max_ms = 200;
}

/// A client that keeps the review session cookie and does not follow redirects.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// Opens a development review session for the patient; answers the cookie header.
async fn dev_session(app: &TestApp, patient: &str) -> String {
    let response = browser()
        .get(app.url(&format!(
            "/app/dev?tenant={TENANT}&patient={patient}&practitioner=Practitioner/doc-1"
        )))
        .send()
        .await
        .expect("dev login");
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let cookie = response.headers()["set-cookie"].to_str().expect("cookie");
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    cookie.split(';').next().expect("pair").to_owned()
}

async fn api(
    app: &TestApp,
    cookie: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = browser()
        .request(method, app.url(path))
        .header("cookie", cookie);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .json(&body);
    }
    let response = request.send().await.expect("api call");
    let status = response.status();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Waits (up to a generous bound, so a slow machine does not fail) until `check` answers.
/// The `name=value` pair of a response's `Set-Cookie`.
fn cookie_pair(response: &reqwest::Response) -> String {
    response.headers()["set-cookie"]
        .to_str()
        .expect("cookie")
        .split(';')
        .next()
        .expect("pair")
        .to_owned()
}

/// Where a redirect points.
fn location(response: &reqwest::Response) -> String {
    response.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned()
}

async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..600 {
        if let Some(found) = check().await {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("gave up waiting for {what}");
}

/// The patient's items on the review page.
async fn items(app: &TestApp, cookie: &str) -> Vec<Value> {
    let (status, body) = api(
        app,
        cookie,
        reqwest::Method::GET,
        "/app/api/transactions",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["items"].as_array().cloned().unwrap_or_default()
}

async fn item_with_status(app: &TestApp, cookie: &str, status: &str) -> Value {
    let seen = std::sync::Mutex::new(Vec::new());
    let found = tokio::time::timeout(
        Duration::from_secs(60),
        eventually(&format!("an item {status}"), || async {
            let all = items(app, cookie).await;
            *seen.lock().expect("lock") = all.clone();
            all.into_iter().find(|i| i["status"] == status)
        }),
    )
    .await;
    found.unwrap_or_else(|_| panic!("no item {status}; items: {:?}", seen.lock().expect("lock")))
}

/// An open `GET /events` stream.
struct Events {
    response: reqwest::Response,
    buffer: String,
}

impl Events {
    async fn open(app: &TestApp, cookie: &str, last_event_id: Option<&str>) -> Self {
        let mut request = browser().get(app.url("/events")).header("cookie", cookie);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.expect("events");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event named `name`: (id, data).
    async fn next(&mut self, name: &str) -> (Option<String>, Value) {
        let wait = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                while let Some(end) = self.buffer.find("\n\n") {
                    let block: String = self.buffer.drain(..end + 2).collect();
                    let field = |f: &str| {
                        block
                            .lines()
                            .find_map(|l| l.strip_prefix(f).map(|v| v.trim().to_owned()))
                    };
                    if field("event:").as_deref() == Some(name) {
                        let data = field("data:").unwrap_or_default();
                        return (
                            field("id:"),
                            serde_json::from_str(&data).expect("event data"),
                        );
                    }
                }
                let chunk = self
                    .response
                    .chunk()
                    .await
                    .expect("stream")
                    .expect("open stream");
                self.buffer.push_str(&String::from_utf8_lossy(&chunk));
            }
        });
        wait.await.unwrap_or_else(|_| panic!("no {name} event"))
    }
}

#[tokio::test]
async fn a_signed_encounter_becomes_a_packet_for_review_and_goes_back_to_the_chart() {
    let double = ehr().await;
    sign_encounter(&double, "enc-1", PATIENT, Some(note_attachment(NOTE)));
    let app = TestApp::start_with(|c| configure(c, &double)).await;
    let cookie = dev_session(&app, PATIENT).await;
    let mut events = Events::open(&app, &cookie, None).await;

    let (ready_id, ready) = events.next("transaction.ready").await;
    assert!(ready_id.is_some());
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["title"], "MRI of the lumbar spine");
    assert_eq!(ready["payer"], "Acme Health Plan");
    assert_eq!(ready["priorAuth"], "satisfied", "{ready}");
    let id = ready["id"].as_str().expect("id").to_owned();

    let (status, detail) = api(
        &app,
        &cookie,
        reqwest::Method::GET,
        &format!("/app/api/transactions/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{detail}");
    assert_eq!(detail["extractor"], "rules");
    let facts = detail["facts"].as_array().expect("facts");
    let pt = facts
        .iter()
        .find(|f| f["kind"] == "conservative_therapy" && f["value"] == "physical_therapy")
        .expect("physical therapy found in the note");
    assert_eq!(pt["days"], 56);
    assert_eq!(pt["note"], "DocumentReference/enc-1-note");
    let start = pt["start"].as_u64().expect("start") as usize;
    let end = pt["end"].as_u64().expect("end") as usize;
    assert_eq!(&NOTE[start..end], pt["text"].as_str().expect("text"));
    assert!(
        !facts.iter().any(|f| f["kind"] == "red_flag"),
        "denied red flags are not facts: {facts:?}"
    );
    let determination = &detail["determinations"][0];
    assert_eq!(determination["order"], "ServiceRequest/enc-1-mri");
    assert_eq!(
        determination["criteria"]["status"], "met",
        "{determination}"
    );
    assert!(detail["rationale"]
        .as_str()
        .expect("rationale")
        .contains("physical therapy, 8 weeks"));

    let pdf = browser()
        .get(app.url(&format!("/app/api/transactions/{id}/packet.pdf")))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("pdf");
    assert_eq!(pdf.status(), StatusCode::OK);
    assert_eq!(pdf.headers()["content-type"], "application/pdf");
    assert!(pdf.bytes().await.expect("bytes").starts_with(b"%PDF-"));

    // The clinician edits the rationale, then clicks Submit twice.
    let edited = "Eight weeks of supervised physical therapy failed; MRI requested.";
    let (status, body) = api(
        &app,
        &cookie,
        reqwest::Method::PUT,
        &format!("/app/api/transactions/{id}/rationale"),
        Some(json!({"rationale": edited})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rationale"], edited);
    let submit = format!("/app/api/transactions/{id}/submit");
    let (first, body) = api(
        &app,
        &cookie,
        reqwest::Method::POST,
        &submit,
        Some(json!({"rationale": edited})),
    )
    .await;
    assert_eq!(first, StatusCode::ACCEPTED, "{body}");
    let (second, body) = api(
        &app,
        &cookie,
        reqwest::Method::POST,
        &submit,
        Some(json!({"rationale": "changed my mind"})),
    )
    .await;
    assert_eq!(second, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "submitted");
    let (_, submitted) = events.next("transaction.submitted").await;
    assert_eq!(submitted["id"], id.as_str());

    let written = eventually("the DocumentReference at the EHR", || async {
        double
            .writes()
            .into_iter()
            .find(|w| w.resource_type == "DocumentReference")
    })
    .await;
    let document = &written.body;
    assert_eq!(
        document["subject"]["reference"],
        format!("Patient/{PATIENT}")
    );
    assert_eq!(
        document["context"]["encounter"][0]["reference"],
        "Encounter/enc-1"
    );
    let attachment = &document["content"][0]["attachment"];
    assert_eq!(attachment["contentType"], "application/pdf");
    let pdf = base64::engine::general_purpose::STANDARD
        .decode(attachment["data"].as_str().expect("data"))
        .expect("base64");
    assert!(pdf.starts_with(b"%PDF-"));
    let text = crate::packets::pdf_text(&pdf);
    assert!(
        text.contains("Eight weeks of supervised physical therapy failed"),
        "the edited rationale is in the packet"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let documents = double
        .writes()
        .iter()
        .filter(|w| w.resource_type == "DocumentReference")
        .count();
    assert_eq!(documents, 1, "Submit twice writes once");

    // Nothing of the patient is kept in the transaction record; the metrics saw it through.
    let metrics = crate::helpers::metrics(&app).await;
    assert!(
        metrics.contains("fhirgate_pipeline_ready_seconds"),
        "{metrics}"
    );
    if let Some(line) = metrics
        .lines()
        .find(|l| l.starts_with("fhirgate_pipeline_ready_seconds_sum"))
    {
        println!("poller → Ready: {line}");
    }
}

#[tokio::test]
async fn an_encounter_seen_in_two_polls_is_processed_once_and_others_are_skipped() {
    let double = ehr().await;
    sign_encounter(&double, "enc-1", PATIENT, Some(note_attachment(NOTE)));
    // A patient without Coverage, and an encounter without orders.
    double.put_resource(json!({"resourceType": "Patient", "id": "uninsured"}));
    sign_encounter(&double, "enc-2", "uninsured", Some(note_attachment(NOTE)));
    double.put_resource(
        json!({"resourceType": "Encounter", "id": "enc-3", "status": "finished",
        "subject": {"reference": format!("Patient/{PATIENT}")},
        "period": {"start": now_minus(600), "end": now_minus(300)}}),
    );
    let app = TestApp::start_with(|c| configure(c, &double)).await;
    let cookie = dev_session(&app, PATIENT).await;
    item_with_status(&app, &cookie, "ready").await;
    // Let several more polls see the same encounters.
    let polls = || {
        double
            .recorded_requests()
            .iter()
            .filter(|r| r.path.ends_with("/Encounter"))
            .count()
    };
    // A later version of the signed encounter (an addendum) makes no second packet.
    sign_encounter(&double, "enc-1", PATIENT, Some(note_attachment(NOTE)));
    let before = polls();
    eventually("two more polls", || async {
        (polls() >= before + 2).then_some(())
    })
    .await;
    let all = items(&app, &cookie).await;
    assert_eq!(all.len(), 1, "{all:?}");
    let uninsured = dev_session(&app, "uninsured").await;
    assert!(
        items(&app, &uninsured).await.is_empty(),
        "no Coverage, no item"
    );
    let searches = double.recorded_requests();
    let poll = searches
        .iter()
        .find(|r| r.path.ends_with("/Encounter"))
        .expect("a poll");
    assert_eq!(poll.query_value("status"), Some("finished"));
    assert!(poll
        .query_value("date")
        .is_some_and(|d| d.starts_with("gt")));
}

#[tokio::test]
async fn a_throttling_or_failing_ehr_delays_the_packet_but_loses_nothing() {
    let double = ehr().await;
    sign_encounter(&double, "enc-1", PATIENT, Some(note_attachment(NOTE)));
    // The first requests are throttled (429 with Retry-After 1).
    double.throttle_next(3, 1);
    let app = TestApp::start_with(|c| configure(c, &double)).await;
    let cookie = dev_session(&app, PATIENT).await;
    let ready = item_with_status(&app, &cookie, "ready").await;
    assert_eq!(ready["encounter"], "Encounter/enc-1");
    assert!(double.requests_with_status(429) >= 3);
    let app_dir = app.stop().await;

    // A second encounter while fhirgate is stopped, then an EHR outage while it polls.
    sign_encounter(&double, "enc-4", PATIENT, Some(note_attachment(NOTE)));
    double.throttle_next(2, 0);
    let app = TestApp::start_in(app_dir, |c| configure(c, &double)).await;
    let cookie = dev_session(&app, PATIENT).await;
    eventually("both items", || async {
        let all = items(&app, &cookie).await;
        (all.iter().filter(|i| i["status"] == "ready").count() == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn notes_in_html_latin1_binary_or_huge_are_read_and_empty_ones_are_skipped() {
    let double = ehr().await;
    let html = "<html><body><h2>HPI</h2><p>Back pain for 3 months.</p>\
        <p>Completed 8&nbsp;weeks of physical therapy &amp; a home exercise program.</p></body></html>";
    sign_encounter(
        &double,
        "enc-html",
        PATIENT,
        Some(json!({"contentType": "text/html",
        "data": base64::engine::general_purpose::STANDARD.encode(html)})),
    );
    // Latin-1 without a charset, fetched as a Binary by URL.
    let latin1: Vec<u8> =
        "Patient reports pain since caf\u{e9} closed; completed 7 weeks of chiropractic care."
            .chars()
            .map(|c| c as u8)
            .collect();
    double.put_resource(
        json!({"resourceType": "Binary", "id": "note-bin", "contentType": "text/plain",
        "data": base64::engine::general_purpose::STANDARD.encode(&latin1)}),
    );
    sign_encounter(
        &double,
        "enc-bin",
        PATIENT,
        Some(json!({"contentType": "text/plain", "url": "Binary/note-bin"})),
    );
    // 5 MB of note text.
    let huge = format!(
        "{}Completed 9 weeks of PT.",
        "Routine follow-up, no changes. ".repeat(170_000)
    );
    sign_encounter(&double, "enc-huge", PATIENT, Some(note_attachment(&huge)));
    sign_encounter(&double, "enc-empty", PATIENT, Some(note_attachment("   ")));
    let app = TestApp::start_with(|c| configure(c, &double)).await;
    let cookie = dev_session(&app, PATIENT).await;
    let by_encounter = eventually("four ready items", || async {
        let all = items(&app, &cookie).await;
        (all.iter().filter(|i| i["status"] == "ready").count() == 4).then_some(all)
    })
    .await;
    let mut days = std::collections::BTreeMap::new();
    for item in by_encounter {
        let id = item["id"].as_str().expect("id");
        let (_, detail) = api(
            &app,
            &cookie,
            reqwest::Method::GET,
            &format!("/app/api/transactions/{id}"),
            None,
        )
        .await;
        let therapy: Vec<(String, u64)> = detail["facts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| f["kind"] == "conservative_therapy")
            .map(|f| {
                (
                    f["value"].as_str().unwrap_or_default().to_owned(),
                    f["days"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        days.insert(
            item["encounter"].as_str().expect("encounter").to_owned(),
            therapy,
        );
    }
    assert!(
        days["Encounter/enc-html"].contains(&("physical_therapy".into(), 56)),
        "{days:?}"
    );
    assert!(
        days["Encounter/enc-bin"].contains(&("chiropractic".into(), 49)),
        "{days:?}"
    );
    assert!(
        days["Encounter/enc-huge"].contains(&("physical_therapy".into(), 63)),
        "{days:?}"
    );
    assert!(days["Encounter/enc-empty"].is_empty(), "{days:?}");
}

/// The first Ready item's detail, as the review page gets it.
async fn ready_detail(app: &TestApp, cookie: &str) -> Value {
    let ready = item_with_status(app, cookie, "ready").await;
    let path = format!(
        "/app/api/transactions/{}",
        ready["id"].as_str().expect("id")
    );
    let (status, detail) = api(app, cookie, reqwest::Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK, "{detail}");
    detail
}

/// An EHR with one signed encounter and fhirgate polling it (`more` changes the
/// configuration further); answers the EHR, the server and a review session's cookie.
async fn signed_encounter_app(more: impl FnOnce(&mut Config)) -> (FhirDouble, TestApp, String) {
    let double = ehr().await;
    sign_encounter(&double, "enc-1", PATIENT, Some(note_attachment(NOTE)));
    let app = TestApp::start_with(|c| {
        configure(c, &double);
        more(c);
    })
    .await;
    let cookie = dev_session(&app, PATIENT).await;
    (double, app, cookie)
}

fn llm_config(double: &LlmDouble) -> LlmConfig {
    LlmConfig {
        enabled: true,
        base_url: double.base_url.clone(),
        // Any variable every environment has: the double does not check the key's value.
        api_key_env: "PATH".into(),
        timeout_secs: 1,
        retries: 1,
        ..LlmConfig::default()
    }
}

#[tokio::test]
async fn the_model_reads_masked_notes_and_only_facts_it_can_quote_are_kept() {
    let llm = LlmDouble::start(LlmMode::Facts(vec![
        json!({"kind": "conservative_therapy", "value": "physical_therapy", "days": 56, "date": null,
            "quote": "Completed 8 weeks of PT"}),
        json!({"kind": "red_flag", "value": "malignancy", "days": null, "date": null,
            "quote": "history of metastatic prostate cancer"}),
    ]))
    .await;
    let (_double, app, cookie) = signed_encounter_app(|c| c.extract.llm = llm_config(&llm)).await;
    let detail = ready_detail(&app, &cookie).await;
    assert_eq!(detail["extractor"], "llm");
    let facts = detail["facts"].as_array().expect("facts");
    assert_eq!(
        facts.len(),
        1,
        "the invented red flag is dropped: {facts:?}"
    );
    assert_eq!(facts[0]["text"], "Completed 8 weeks of PT");

    let requests = llm.requests();
    let (headers, request) = &requests[0];
    assert!(headers["authorization"]
        .to_str()
        .expect("auth")
        .starts_with("Bearer "));
    assert_eq!(request["temperature"], 0.0);
    assert_eq!(request["response_format"]["type"], "json_schema");
    assert_eq!(request["response_format"]["json_schema"]["strict"], true);
    let sent = request["messages"].to_string();
    assert!(sent.contains("Completed 8 weeks of PT"));
    for phi in [
        "Andy",
        "Schaden",
        "06/09/1932",
        "1932-06-09",
        "S99935541",
        "555-759-5889",
        "999-21-8417",
        "Mills Brook",
        "Reading",
    ] {
        assert!(!sent.contains(phi), "{phi} was sent to the model");
    }
}

#[tokio::test]
async fn a_failing_model_falls_back_to_the_rules_and_says_so() {
    for mode in [LlmMode::NotJson, LlmMode::Slow(Duration::from_secs(5))] {
        let llm = LlmDouble::start(mode.clone()).await;
        let (_double, app, cookie) =
            signed_encounter_app(|c| c.extract.llm = llm_config(&llm)).await;
        let detail = ready_detail(&app, &cookie).await;
        let extractor = detail["extractor"].as_str().expect("extractor");
        assert!(
            extractor.starts_with("rules (the LLM failed"),
            "{mode:?}: {extractor}"
        );
        assert!(detail["facts"]
            .as_array()
            .expect("facts")
            .iter()
            .any(|f| f["value"] == "physical_therapy"));
        // A timeout is tried again; an answer that is not JSON would only come again.
        let calls = if matches!(mode, LlmMode::NotJson) {
            1
        } else {
            2
        };
        assert_eq!(llm.requests().len(), calls, "{mode:?}");
    }
}

#[tokio::test]
async fn a_ready_item_survives_a_restart_and_submits_after_it() {
    let double = ehr().await;
    sign_encounter(&double, "enc-1", PATIENT, Some(note_attachment(NOTE)));
    let app = TestApp::start_with(|c| configure(c, &double)).await;
    let cookie = dev_session(&app, PATIENT).await;
    let ready = item_with_status(&app, &cookie, "ready").await;
    let dir = app.stop().await;
    let app = TestApp::start_in(dir, |c| configure(c, &double)).await;
    let cookie = dev_session(&app, PATIENT).await;
    let all = items(&app, &cookie).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["status"], "ready");
    let (status, body) = api(
        &app,
        &cookie,
        reqwest::Method::POST,
        &format!(
            "/app/api/transactions/{}/submit",
            ready["id"].as_str().expect("id")
        ),
        Some(json!({})),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "an empty object is not a rationale: {body}"
    );
    let (status, body) = api(
        &app,
        &cookie,
        reqwest::Method::POST,
        &format!(
            "/app/api/transactions/{}/submit",
            ready["id"].as_str().expect("id")
        ),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "not JSON: {body}");
    let response = browser()
        .post(app.url(&format!(
            "/app/api/transactions/{}/submit",
            ready["id"].as_str().expect("id")
        )))
        .header("cookie", &cookie)
        .header("content-type", "application/json")
        .body("")
        .send()
        .await
        .expect("submit");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    eventually("the write-back", || async {
        double
            .writes()
            .into_iter()
            .find(|w| w.resource_type == "DocumentReference")
    })
    .await;
}

#[tokio::test]
async fn drafts_expire_and_other_patients_items_stay_out_of_sight() {
    let (_double, app, cookie) = signed_encounter_app(|c| c.pipeline.draft_ttl_secs = 1).await;
    let ready = item_with_status(&app, &cookie, "ready").await;
    let id = ready["id"].as_str().expect("id");
    let other = dev_session(&app, "someone-else").await;
    let (status, _) = api(
        &app,
        &other,
        reqwest::Method::GET,
        &format!("/app/api/transactions/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let failed = item_with_status(&app, &cookie, "failed").await;
    assert_eq!(failed["reason"], "not reviewed before the draft expired");
    let (status, _) = api(
        &app,
        &cookie,
        reqwest::Method::GET,
        &format!("/app/api/transactions/{id}/packet.pdf"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = api(
        &app,
        &cookie,
        reqwest::Method::POST,
        &format!("/app/api/transactions/{id}/submit"),
        Some(json!({"rationale": "x"})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, _) = api(
        &app,
        "fhirgate_review=00",
        reqwest::Method::GET,
        "/app/api/transactions",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn sse_resumes_from_the_last_event_id() {
    let (_double, app, cookie) = signed_encounter_app(|c| c.pipeline.heartbeat_secs = 1).await;
    let mut events = Events::open(&app, &cookie, None).await;
    let (id, ready) = events.next("transaction.ready").await;
    events.next("heartbeat").await;
    drop(events);
    let submit = format!(
        "/app/api/transactions/{}/submit",
        ready["id"].as_str().expect("id")
    );
    let (status, _) = api(
        &app,
        &cookie,
        reqwest::Method::POST,
        &submit,
        Some(json!({"rationale": "ok"})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // Reconnecting after the ready event replays what came since: the submission.
    let mut events = Events::open(&app, &cookie, id.as_deref()).await;
    let (_, submitted) = events.next("transaction.submitted").await;
    assert_eq!(submitted["id"], ready["id"]);
    // API callers need a role and name the tenant.
    let anonymous = reqwest::Client::new()
        .get(app.url("/events"))
        .send()
        .await
        .expect("events");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    // A made-up session cookie is not a way around the API caller's credentials.
    let forged = reqwest::Client::new()
        .get(app.url(&format!("/events?tenant={TENANT}")))
        .header("cookie", format!("fhirgate_review={}", "0".repeat(64)))
        .send()
        .await
        .expect("events");
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_smart_launch_opens_a_session_for_the_launch_patient_and_bad_launches_are_refused() {
    let double = ehr().await;
    let smart = SmartDouble::start(PATIENT, "enc-1", "Practitioner/doc-1").await;
    let app = TestApp::start_with(|c| {
        configure(c, &double);
        c.pipeline.app.dev_login = false;
        if let Some(t) = c.pipeline.tenants.get_mut(TENANT) {
            t.smart_iss = Some(smart.iss());
        }
    })
    .await;
    let client = browser();
    let launch = client
        .get(app.url(&format!("/app/launch?iss={}&launch=xyz", smart.iss())))
        .send()
        .await
        .expect("launch");
    assert_eq!(launch.status(), StatusCode::SEE_OTHER);
    let authorize = location(&launch);
    assert!(
        authorize.starts_with(&format!("{}/authorize?", smart.origin)),
        "{authorize}"
    );
    let launch_cookie = cookie_pair(&launch);
    let back = client.get(&authorize).send().await.expect("authorize");
    let callback = location(&back);
    // Another browser (an attacker handing over their own launch) cannot finish it.
    let elsewhere = client.get(&callback).send().await.expect("callback");
    assert_eq!(elsewhere.status(), StatusCode::BAD_REQUEST);
    // The launch was used up by that attempt: launch again, in this browser.
    let launch = client
        .get(app.url(&format!("/app/launch?iss={}&launch=xyz", smart.iss())))
        .send()
        .await
        .expect("launch");
    let launch_cookie_again = cookie_pair(&launch);
    assert_ne!(launch_cookie, launch_cookie_again);
    let authorize = location(&launch);
    let back = client.get(&authorize).send().await.expect("authorize");
    let callback = location(&back);
    let opened = client
        .get(&callback)
        .header("cookie", &launch_cookie_again)
        .send()
        .await
        .expect("callback");
    assert_eq!(opened.status(), StatusCode::SEE_OTHER);
    assert_eq!(opened.headers()["location"], "/app/");
    let cookie = cookie_pair(&opened);
    let (status, session) = api(
        &app,
        &cookie,
        reqwest::Method::GET,
        "/app/api/session",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(session["patient"], format!("Patient/{PATIENT}"));
    assert_eq!(session["encounter"], "Encounter/enc-1");
    assert_eq!(session["practitioner"], "Practitioner/doc-1");
    assert_eq!(session["mode"], "smart");
    assert!(smart.problems().is_empty(), "{:?}", smart.problems());

    // The same state again, a made-up state, an unknown EHR, development sign-in when off.
    let again = client
        .get(&callback)
        .header("cookie", &launch_cookie_again)
        .send()
        .await
        .expect("callback again");
    assert_eq!(again.status(), StatusCode::BAD_REQUEST);
    assert!(again.headers()["content-type"]
        .to_str()
        .expect("type")
        .starts_with("text/html"));
    assert!(again
        .text()
        .await
        .expect("page")
        .contains("expired or is not valid"));
    let forged = client
        .get(app.url("/app/callback?code=x&state=forged"))
        .send()
        .await
        .expect("forged");
    assert_eq!(forged.status(), StatusCode::BAD_REQUEST);
    let unknown = client
        .get(app.url("/app/launch?iss=https://evil.example/fhir&launch=1"))
        .send()
        .await
        .expect("unknown");
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);
    let dev = client
        .get(app.url(&format!("/app/dev?tenant={TENANT}&patient=x")))
        .send()
        .await
        .expect("dev");
    assert_eq!(dev.status(), StatusCode::NOT_FOUND);
    let page = client.get(app.url("/app/")).send().await.expect("page");
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .expect("csp");
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(
        csp.contains(&format!("frame-ancestors 'self' {}", smart.origin)),
        "only the EHR may frame the page: {csp}"
    );
}
