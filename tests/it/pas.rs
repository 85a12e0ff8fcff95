//! Da Vinci PAS: the IG's request examples get schema-valid answers with a decision per item;
//! resubmissions, updates, inquiries and reviewer decisions; every kind of bad request.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{assert_outcome, fixtures, json, read_json, TestApp};

fn example(name: &str) -> Value {
    read_json(&fixtures().join("davinci/pas-ig").join(name))
}

async fn submit(app: &TestApp, bundle: &Value) -> (StatusCode, Value) {
    json(app.post("/Claim/$submit", bundle).await).await
}

fn schema() -> fhirgate::fhir::SchemaValidator {
    fhirgate::fhir::SchemaValidator::bundled().expect("schema")
}

/// The ClaimResponse of a response Bundle.
fn claim_response(bundle: &Value) -> &Value {
    let first = &bundle["entry"][0]["resource"];
    assert_eq!(first["resourceType"], "ClaimResponse", "{bundle}");
    first
}

/// `(sequence, X12 306 code, authorization number)` per item.
fn review_actions(bundle: &Value) -> Vec<(u64, String, Option<String>)> {
    claim_response(bundle)["item"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| {
            let review = item["adjudication"][0]["extension"]
                .as_array()
                .expect("extensions")
                .iter()
                .find(|e| {
                    e["url"]
                        .as_str()
                        .is_some_and(|u| u.ends_with("extension-reviewAction"))
                })
                .expect("reviewAction");
            let parts = review["extension"].as_array().expect("parts");
            let code = parts
                .iter()
                .find(|p| {
                    p["url"]
                        .as_str()
                        .is_some_and(|u| u.ends_with("reviewActionCode"))
                })
                .and_then(|p| p["valueCodeableConcept"]["coding"][0]["code"].as_str())
                .expect("code")
                .to_owned();
            let number = parts
                .iter()
                .find(|p| p["url"] == "number")
                .and_then(|p| p["valueString"].as_str())
                .map(str::to_owned);
            (
                item["itemSequence"].as_u64().expect("sequence"),
                code,
                number,
            )
        })
        .collect()
}

/// A ClaimResponse with its server id, times and authorization numbers replaced.
fn stable(mut response: Value) -> Value {
    let id = response["id"].as_str().unwrap_or_default().to_owned();
    let text = serde_json::to_string(&response).expect("json");
    let short: String = id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(10)
        .collect::<String>()
        .to_uppercase();
    response =
        serde_json::from_str(&text.replace(&id, "[id]").replace(&short, "[claim]")).expect("json");
    response["created"] = json!("[now]");
    for item in response["item"].as_array_mut().into_iter().flatten() {
        for extension in item["extension"].as_array_mut().into_iter().flatten() {
            if extension["url"]
                .as_str()
                .is_some_and(|u| u.ends_with("itemPreAuthIssueDate"))
            {
                extension["valueDate"] = json!("[today]");
            }
            if extension["url"]
                .as_str()
                .is_some_and(|u| u.ends_with("itemPreAuthPeriod"))
            {
                extension["valuePeriod"] = json!({"start": "[today]", "end": "[today + 90 days]"});
            }
        }
    }
    if response.get("preAuthPeriod").is_some() {
        response["preAuthPeriod"] = json!({"start": "[today]", "end": "[today + 90 days]"});
    }
    response
}

fn codes(bundle: &Value) -> Vec<String> {
    review_actions(bundle)
        .into_iter()
        .map(|(_, c, _)| c)
        .collect()
}

fn task_of(bundle: &Value) -> Option<&Value> {
    bundle["entry"]
        .as_array()?
        .iter()
        .map(|e| &e["resource"])
        .find(|r| r["resourceType"] == "Task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ig_request_example_gets_a_valid_answer_with_a_decision_per_item() {
    let validator = schema();
    let cases = [
        ("Bundle-ReferralAuthorizationBundleExample.json", vec!["A1"]),
        ("Bundle-SurgicalRequestBundleExample.json", vec!["A3"]),
        (
            "Bundle-HomecareAuthorizationBundleExample.json",
            vec!["A4", "A4"],
        ),
        (
            "Bundle-MedicalServicesAuthorizationBundleExample.json",
            vec!["NA"],
        ),
    ];
    for (name, expected) in cases {
        // Several examples share a Claim identifier: each goes to a server of its own.
        let app = TestApp::start().await;
        let request = example(name);
        let (status, response) = submit(&app, &request).await;
        assert_eq!(status, StatusCode::OK, "{name}: {response}");
        validator
            .validate(&response)
            .unwrap_or_else(|e| panic!("{name}: the response is not valid R4: {e:?}"));
        assert_eq!(response["type"], "collection");
        assert_eq!(response["identifier"], request["identifier"], "{name}");
        assert_eq!(codes(&response), expected, "{name}: {response}");
        let claim_response = claim_response(&response);
        let claim = &request["entry"][0]["resource"];
        assert_eq!(claim_response["use"], "preauthorization");
        assert_eq!(claim_response["patient"], claim["patient"]);
        assert_eq!(
            claim_response["request"]["reference"],
            format!("Claim/{}", claim["id"].as_str().expect("id"))
        );
        let pended = expected.contains(&"A4");
        assert_eq!(
            claim_response["outcome"],
            if pended { "queued" } else { "complete" }
        );
        // The patient the ClaimResponse names travels with it.
        assert!(response["entry"]
            .as_array()
            .expect("entries")
            .iter()
            .any(|e| e["resource"]["resourceType"] == "Patient"));
        match expected[0] {
            "A1" => {
                let (_, _, number) = &review_actions(&response)[0];
                let number = number.as_deref().expect("authorization number");
                assert!(number.starts_with("PA-"), "{number}");
                assert_eq!(claim_response["preAuthRef"], number);
                let item = &claim_response["item"][0];
                let period = item["extension"]
                    .as_array()
                    .expect("extensions")
                    .iter()
                    .find(|e| {
                        e["url"]
                            .as_str()
                            .is_some_and(|u| u.ends_with("itemPreAuthPeriod"))
                    })
                    .expect("itemPreAuthPeriod");
                assert!(
                    period["valuePeriod"]["start"].is_string()
                        && period["valuePeriod"]["end"].is_string()
                );
            }
            "A3" => {
                let reason = claim_response["item"][0]["adjudication"][0]["reason"]["text"]
                    .as_str()
                    .expect("denial reason");
                assert!(reason.contains("Coronary artery disease"), "{reason}");
            }
            "A4" => {
                let task = task_of(&response).expect("a Task for the pended items");
                let inputs = task["input"].as_array().expect("inputs");
                let lines: Vec<u64> = inputs
                    .iter()
                    .map(|i| {
                        i["extension"][0]["valuePositiveInt"]
                            .as_u64()
                            .expect("line")
                    })
                    .collect();
                assert!(lines.contains(&1) && lines.contains(&2), "{task}");
                let needed: Vec<&str> = inputs
                    .iter()
                    .filter_map(|i| i["valueString"].as_str())
                    .collect();
                assert!(needed.iter().any(|n| n.contains("Homebound")), "{needed:?}");
                assert!(
                    needed.iter().any(|n| n.contains("Intestinal failure")),
                    "{needed:?}"
                );
            }
            _ => assert!(task_of(&response).is_none()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubmission_gets_the_same_answer_and_creates_nothing() {
    let app = TestApp::start().await;
    let request = example("Bundle-ReferralAuthorizationBundleExample.json");
    let (_, first) = submit(&app, &request).await;
    let (status, second) = submit(&app, &request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first, second);
    insta::assert_json_snapshot!(
        "referral_claim_response",
        stable(claim_response(&first).clone())
    );
    let id = claim_response(&first)["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (status, record) = json(
        app.client
            .get(app.url(&format!("/pas/claims/{id}")))
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        record["history"].as_array().expect("history").len(),
        1,
        "{record}"
    );
    assert_eq!(record["revision"], 1);
}

/// The IG's home-care update, made to bring a diagnosis that meets the parenteral-nutrition
/// criteria.
fn homecare_update_with_diagnosis(identifier: &str) -> Value {
    let mut update = example("Bundle-HomecareAuthorizationUpdateBundleExample.json");
    let claim = &mut update["entry"][0]["resource"];
    claim["identifier"][0]["value"] = json!(identifier);
    claim["diagnosis"] = json!([{
        "sequence": 1,
        "diagnosisCodeableConcept": {"coding": [{
            "system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "K90.0", "display": "Celiac disease"
        }]}
    }]);
    update
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pended_items_are_decided_by_an_update_or_by_a_reviewer() {
    let app = TestApp::start().await;
    let (_, pended) = submit(
        &app,
        &example("Bundle-HomecareAuthorizationBundleExample.json"),
    )
    .await;
    assert_eq!(codes(&pended), ["A4", "A4"]);
    let id = claim_response(&pended)["id"]
        .as_str()
        .expect("id")
        .to_owned();

    // The IG's update adds item 3 and changes item 2, still without what is missing.
    let (status, updated) = submit(
        &app,
        &example("Bundle-HomecareAuthorizationUpdateBundleExample.json"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(
        claim_response(&updated)["id"],
        id.as_str(),
        "the same claim"
    );
    assert_eq!(
        review_actions(&updated)
            .iter()
            .map(|(s, c, _)| (*s, c.as_str()))
            .collect::<Vec<_>>(),
        [(1, "A4"), (2, "A4"), (3, "A4")]
    );

    // An update bringing intestinal failure: the parenteral nutrition items are approved.
    let (status, decided) = submit(&app, &homecare_update_with_diagnosis("111099-UPDATE-2")).await;
    assert_eq!(status, StatusCode::OK, "{decided}");
    assert_eq!(codes(&decided), ["A4", "A1", "A1"]);
    let task = task_of(&decided).expect("item 1 still pended");
    assert!(task["input"]
        .as_array()
        .expect("inputs")
        .iter()
        .all(|i| i["extension"][0]["valuePositiveInt"] == 1));

    // A reviewer approves the home nursing: nothing is pended any more.
    let (status, reviewed) = json(
        app.client
            .post(app.url(&format!("/pas/claims/{id}/decision")))
            .json(&json!({"reviewer": "Dr. Rivera", "items": [
                {"sequence": 1, "action": "approved", "period": {"start": "2025-01-01", "end": "2025-03-31"}}
            ]}))
            .send()
            .await
            .expect("decision"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{reviewed}");
    assert_eq!(codes(&reviewed), ["A1", "A1", "A1"]);
    assert_eq!(claim_response(&reviewed)["outcome"], "complete");
    assert!(task_of(&reviewed).is_none());
    schema().validate(&reviewed).expect("valid R4");

    // The history keeps every decision, when and by whom.
    let (_, record) = json(
        app.client
            .get(app.url(&format!("/pas/claims/{id}")))
            .send()
            .await
            .expect("get"),
    )
    .await;
    let history = record["history"].as_array().expect("history");
    let by_reviewer: Vec<&Value> = history
        .iter()
        .filter(|h| h["by"] == "reviewer:Dr. Rivera")
        .collect();
    assert_eq!(by_reviewer.len(), 1);
    assert_eq!(by_reviewer[0]["action"], "Approved");
    assert!(history.iter().all(|h| h["at"].is_string()));

    // Inquiry by the original identifier finds the latest answer.
    let (status, inquired) = json(
        app.post(
            "/Claim/$inquire",
            &example("Bundle-PASClaimInquiryBundleExample.json"),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{inquired}");
    assert_eq!(codes(&inquired), ["A1", "A1", "A1"]);
}

#[tokio::test]
async fn an_inquiry_finds_by_patient_and_provider_and_says_when_nothing_matches() {
    let app = TestApp::start().await;
    let (_, answered) = submit(
        &app,
        &example("Bundle-ReferralAuthorizationBundleExample.json"),
    )
    .await;
    let mut inquiry = example("Bundle-PASClaimInquiryBundleExample.json");
    inquiry["entry"][0]["resource"]["identifier"][0]["value"] = json!("not-the-same");
    let (status, found) = json(app.post("/Claim/$inquire", &inquiry).await).await;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert_eq!(
        claim_response(&found)["id"],
        claim_response(&answered)["id"]
    );

    let mut stranger = inquiry.clone();
    for entry in stranger["entry"].as_array_mut().expect("entries") {
        if entry["resource"]["resourceType"] == "Patient" {
            entry["resource"]["identifier"] = json!([{"system": "urn:test", "value": "nobody"}]);
        }
    }
    let (status, outcome) = json(app.post("/Claim/$inquire", &stranger).await).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{outcome}");
    assert_outcome(&outcome, "not-found", None);
}

#[tokio::test]
async fn bad_requests_are_one_operation_outcome_each() {
    let app = TestApp::start().await;
    let good = example("Bundle-ReferralAuthorizationBundleExample.json");
    let claim = "Bundle.entry[0].resource";
    let mut cases: Vec<(&str, Value, StatusCode, &str, Option<String>)> = Vec::new();
    cases.push((
        "not a Bundle",
        json!({"resourceType": "Patient"}),
        StatusCode::BAD_REQUEST,
        "structure",
        None,
    ));
    let mut no_claim = good.clone();
    no_claim["entry"].as_array_mut().expect("entries").remove(0);
    cases.push((
        "no Claim",
        no_claim,
        StatusCode::UNPROCESSABLE_ENTITY,
        "structure",
        Some(claim.into()),
    ));
    let mut claim_second = good.clone();
    claim_second["entry"]
        .as_array_mut()
        .expect("entries")
        .swap(0, 1);
    cases.push((
        "Claim not first",
        claim_second,
        StatusCode::UNPROCESSABLE_ENTITY,
        "structure",
        Some(claim.into()),
    ));
    let mut wrong_use = good.clone();
    wrong_use["entry"][0]["resource"]["use"] = json!("claim");
    cases.push((
        "use claim",
        wrong_use,
        StatusCode::UNPROCESSABLE_ENTITY,
        "value",
        Some(format!("{claim}.use")),
    ));
    let mut dangling = good.clone();
    dangling["entry"][0]["resource"]["provider"]["reference"] = json!("Organization/missing");
    cases.push((
        "dangling reference",
        dangling,
        StatusCode::UNPROCESSABLE_ENTITY,
        "not-found",
        Some(format!("{claim}.provider.reference")),
    ));
    let mut unknown_payer = good.clone();
    for entry in unknown_payer["entry"].as_array_mut().expect("entries") {
        if entry["resource"]["id"] == "InsurerExample" {
            entry["resource"]["name"] = json!("Nobody Mutual");
            entry["resource"]["identifier"] = json!([{"system": "urn:test", "value": "0"}]);
        }
    }
    cases.push((
        "unknown payer",
        unknown_payer,
        StatusCode::UNPROCESSABLE_ENTITY,
        "not-supported",
        None,
    ));
    let mut no_code = good.clone();
    no_code["entry"][0]["resource"]["item"][0]["productOrService"] =
        json!({"text": "a consultation"});
    cases.push((
        "item without codes",
        no_code,
        StatusCode::UNPROCESSABLE_ENTITY,
        "required",
        Some(format!("{claim}.item[0].productOrService")),
    ));
    let mut duplicate = good.clone();
    let item = duplicate["entry"][0]["resource"]["item"][0].clone();
    duplicate["entry"][0]["resource"]["item"]
        .as_array_mut()
        .expect("items")
        .push(item);
    cases.push((
        "duplicate sequences",
        duplicate,
        StatusCode::UNPROCESSABLE_ENTITY,
        "duplicate",
        Some(format!("{claim}.item[1].sequence")),
    ));
    let mut orphan_update = homecare_update_with_diagnosis("orphan");
    orphan_update["entry"][0]["resource"]["related"][0]["claim"]["reference"] =
        json!("Claim/never-submitted");
    cases.push((
        "update of an unknown claim",
        orphan_update,
        StatusCode::UNPROCESSABLE_ENTITY,
        "not-found",
        Some(format!("{claim}.related[0].claim")),
    ));
    let mut not_r4 = good.clone();
    not_r4["entry"][0]["resource"]["status"] = json!(42);
    cases.push((
        "not valid R4",
        not_r4,
        StatusCode::BAD_REQUEST,
        "structure",
        None,
    ));
    for (what, body, status, code, expression) in cases {
        let (got, outcome) = submit(&app, &body).await;
        assert_eq!(got, status, "{what}: {outcome}");
        assert_outcome(&outcome, code, expression.as_deref());
        assert_eq!(
            outcome["issue"].as_array().map(Vec::len),
            Some(1),
            "{what}: {outcome}"
        );
    }
    // Not JSON, or not FHIR JSON.
    let response = app
        .client
        .post(app.fhir("/Claim/$submit"))
        .header("content-type", "application/fhir+json")
        .body("{not json")
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = app
        .client
        .post(app.fhir("/Claim/$submit"))
        .header("content-type", "application/xml")
        .body("<Bundle/>")
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // Reviewer decisions on what does not exist.
    let (status, outcome) = json(
        app.client
            .post(app.url("/pas/claims/nope/decision"))
            .json(&json!({"reviewer": "R", "items": [{"sequence": 1, "action": "approved"}]}))
            .send()
            .await
            .expect("post"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_outcome(&outcome, "not-found", None);
    let (_, answered) = submit(&app, &good).await;
    let id = claim_response(&answered)["id"]
        .as_str()
        .expect("id")
        .to_owned();
    for (body, status, code) in [
        (
            json!({"reviewer": "R", "items": [{"sequence": 9, "action": "approved"}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "not-found",
        ),
        (
            json!({"reviewer": "R", "items": [{"sequence": 1, "action": "maybe"}]}),
            StatusCode::BAD_REQUEST,
            "value",
        ),
        (
            json!({"reviewer": "", "items": []}),
            StatusCode::BAD_REQUEST,
            "required",
        ),
        (json!({"items": "x"}), StatusCode::BAD_REQUEST, "structure"),
    ] {
        let (got, outcome) = json(
            app.client
                .post(app.url(&format!("/pas/claims/{id}/decision")))
                .json(&body)
                .send()
                .await
                .expect("post"),
        )
        .await;
        assert_eq!(got, status, "{body}: {outcome}");
        assert_outcome(&outcome, code, None);
    }
}

/// The IG's referral request, sent to `payer` for a CPAP device, with `ahi` (if any) from a
/// sleep study ten days ago.
fn cpap_request(payer: &str, identifier: &str, ahi: Option<u32>) -> Value {
    let mut request = example("Bundle-ReferralAuthorizationBundleExample.json");
    let claim = &mut request["entry"][0]["resource"];
    claim["identifier"][0]["value"] = json!(identifier);
    claim["item"][0]["productOrService"] = json!({"coding": [{
        "system": "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "code": "E0601"}]});
    let entries = request["entry"].as_array_mut().expect("entries");
    for entry in entries.iter_mut() {
        if entry["resource"]["id"] == "InsurerExample" {
            entry["resource"]["name"] = json!(payer);
            entry["resource"]["identifier"] = json!([{"system": "urn:test:payer", "value": payer}]);
        }
    }
    if let Some(ahi) = ahi {
        let taken = time::OffsetDateTime::now_utc().date() - time::Duration::days(10);
        entries.push(json!({
            "fullUrl": "http://example.org/fhir/Observation/sleep-study",
            "resource": {
                "resourceType": "Observation", "id": "sleep-study", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "69990-0"}]},
                "subject": {"reference": "Patient/SubscriberExample"},
                "effectiveDateTime": taken.to_string(),
                "valueQuantity": {"value": ahi, "unit": "/h"}
            }
        }));
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sample_payer_approves_denies_and_pends_by_its_policy() {
    let app = TestApp::start().await;
    let validator = schema();
    for payer in ["Acme Health Plan", "Bluestone Insurance", "Cedar Mutual"] {
        for (ahi, expected) in [(Some(22), "A1"), (Some(2), "A3"), (None, "A4")] {
            let identifier = format!("cpap-{payer}-{ahi:?}");
            let (status, response) = submit(&app, &cpap_request(payer, &identifier, ahi)).await;
            assert_eq!(status, StatusCode::OK, "{payer} {ahi:?}: {response}");
            validator.validate(&response).expect("valid R4");
            assert_eq!(codes(&response), [expected], "{payer} {ahi:?}: {response}");
            if expected == "A4" {
                let task = task_of(&response).expect("task");
                let needed = task["input"][0]["valueString"].as_str().expect("needed");
                assert!(needed.contains("Apnea-hypopnea"), "{needed}");
            }
        }
    }
    // Cedar Mutual does not cover acupuncture: denied whatever the record.
    let mut acupuncture = cpap_request("Cedar Mutual", "acupuncture", None);
    acupuncture["entry"][0]["resource"]["item"][0]["productOrService"] = json!({"coding": [{
        "system": "http://www.ama-assn.org/go/cpt", "code": "97810"}]});
    let (_, response) = submit(&app, &acupuncture).await;
    assert_eq!(codes(&response), ["A3"], "{response}");
}

#[tokio::test]
async fn claim_identifiers_belong_to_their_submitter() {
    let app = TestApp::start().await;
    // The IG's home-care and office-visit requests share a Claim identifier and a provider:
    // the second is a different request under a used identifier.
    let (status, _) = submit(
        &app,
        &example("Bundle-HomecareAuthorizationBundleExample.json"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, outcome) = submit(
        &app,
        &example("Bundle-MedicalServicesAuthorizationBundleExample.json"),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{outcome}");
    assert_outcome(
        &outcome,
        "duplicate",
        Some("Bundle.entry[0].resource.identifier"),
    );

    // Another provider may use the same identifier (and Claim id) for its own request…
    let mut elsewhere = example("Bundle-MedicalServicesAuthorizationBundleExample.json");
    for entry in elsewhere["entry"].as_array_mut().expect("entries") {
        if entry["resource"]["id"] == "UMOExample" {
            entry["resource"]["identifier"] =
                json!([{"system": "http://hl7.org/fhir/sid/us-npi", "value": "5555555555"}]);
        }
    }
    let (status, answered) = submit(&app, &elsewhere).await;
    assert_eq!(status, StatusCode::OK, "{answered}");
    assert_eq!(codes(&answered), ["NA"]);
    // …but cannot update the first provider's claim.
    let mut foreign_update = example("Bundle-HomecareAuthorizationUpdateBundleExample.json");
    for entry in foreign_update["entry"].as_array_mut().expect("entries") {
        if entry["resource"]["id"] == "UMOExample" {
            entry["resource"]["identifier"] =
                json!([{"system": "http://hl7.org/fhir/sid/us-npi", "value": "5555555555"}]);
        }
    }
    let (status, outcome) = submit(&app, &foreign_update).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{outcome}");
    assert_outcome(
        &outcome,
        "not-found",
        Some("Bundle.entry[0].resource.related[0].claim"),
    );
}
