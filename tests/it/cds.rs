//! CDS Hooks / Da Vinci CRD services: discovery, every request example in the fixtures, the
//! prior-authorization answers as cards and coverage-information, bad input, feedback.

use std::sync::OnceLock;

use fhirgate::fhir::SchemaValidator;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{cds_jwt, cds_token, fixtures, json, read_json, TestApp};

const CPT: &str = "http://www.ama-assn.org/go/cpt";
const COVERAGE_INFORMATION: &str =
    "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information";

fn schema() -> &'static SchemaValidator {
    static S: OnceLock<SchemaValidator> = OnceLock::new();
    S.get_or_init(|| SchemaValidator::bundled().expect("schema"))
}

async fn call(app: &TestApp, service: &str, body: &Value) -> (StatusCode, Value) {
    let path = format!("/cds-services/{service}");
    let token = cds_token(app, &path);
    json(
        app.client
            .post(app.url(&path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("call"),
    )
    .await
}

/// Checks the CDS Hooks and CRD rules every response must follow.
fn assert_spec_valid(response: &Value) {
    let cards = response["cards"].as_array().expect("cards array");
    for card in cards {
        assert!(uuid_like(card["uuid"].as_str()), "card uuid: {card}");
        let summary = card["summary"].as_str().expect("summary");
        assert!(
            !summary.is_empty() && summary.chars().count() <= 140,
            "summary: {summary}"
        );
        assert!(
            matches!(
                card["indicator"].as_str(),
                Some("info" | "warning" | "critical")
            ),
            "{card}"
        );
        assert!(
            card["source"]["label"]
                .as_str()
                .is_some_and(|l| !l.is_empty()),
            "{card}"
        );
        assert!(card["source"]["topic"]["code"].as_str().is_some(), "{card}");
        if let Some(suggestions) = card.get("suggestions") {
            assert!(!suggestions.as_array().expect("array").is_empty());
            for action in suggestions
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|s| s["actions"].as_array().into_iter().flatten())
            {
                if let Some(resource) = action.get("resource") {
                    schema().validate(resource).unwrap_or_else(|e| {
                        panic!("proposed order is not valid R4: {e}: {resource}")
                    });
                }
            }
            assert!(
                card["selectionBehavior"].as_str().is_some(),
                "selectionBehavior with suggestions: {card}"
            );
        }
        for link in card["links"].as_array().into_iter().flatten() {
            assert!(
                matches!(link["type"].as_str(), Some("absolute" | "smart")),
                "{link}"
            );
        }
    }
    for action in response["systemActions"].as_array().into_iter().flatten() {
        assert_eq!(action["type"], "update");
        let resource = &action["resource"];
        schema()
            .validate(resource)
            .unwrap_or_else(|e| panic!("annotated order is not valid R4: {e}: {resource}"));
        let info = resource["extension"]
            .as_array()
            .expect("extensions")
            .iter()
            .find(|e| e["url"] == COVERAGE_INFORMATION)
            .expect("coverage-information");
        let part = |name: &str| {
            info["extension"]
                .as_array()
                .expect("parts")
                .iter()
                .find(|p| p["url"] == name)
                .cloned()
        };
        assert!(matches!(
            part("covered").expect("covered")["valueCode"].as_str(),
            Some("covered" | "not-covered" | "conditional")
        ));
        assert!(part("date").is_some() && part("coverage-assertion-id").is_some());
    }
}

fn uuid_like(s: Option<&str>) -> bool {
    s.is_some_and(|s| s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4)
}

#[tokio::test]
async fn discovery_lists_the_crd_services() {
    let app = TestApp::start().await;
    let (status, body) = json(
        app.client
            .get(app.url("/cds-services"))
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let services = body["services"].as_array().expect("services");
    let hooks: Vec<&str> = services.iter().filter_map(|s| s["hook"].as_str()).collect();
    for hook in [
        "order-sign",
        "order-select",
        "order-dispatch",
        "appointment-book",
        "encounter-start",
        "encounter-discharge",
    ] {
        assert!(hooks.contains(&hook), "{hook} missing from {hooks:?}");
    }
    for s in services {
        assert!(s["id"].is_string() && s["title"].is_string() && s["description"].is_string());
        assert_eq!(s["prefetch"]["patient"], "Patient/{{context.patientId}}");
        let options = s["extension"]["davinci-crd.configuration-options"]
            .as_array()
            .expect("options");
        assert!(options.iter().any(|o| o["code"] == "coverage-info"));
    }
}

/// A FHIR server standing in for the EHR: fhirgate itself, seeded with the patients the
/// request examples name, each covered by Acme Health Plan.
async fn ehr_with(patients: &[String]) -> TestApp {
    let ehr = TestApp::start().await;
    for id in patients {
        let patient =
            json!({"resourceType":"Patient","id":id,"gender":"female","birthDate":"1970-01-01"});
        assert!(ehr
            .put(&format!("/Patient/{id}"), &patient)
            .await
            .status()
            .is_success());
        let coverage = json!({"resourceType":"Coverage","id":format!("cov-{id}"),"status":"active",
            "beneficiary":{"reference":format!("Patient/{id}")},"payor":[{"display":"Acme Health Plan"}]});
        assert!(ehr
            .put(&format!("/Coverage/cov-{id}"), &coverage)
            .await
            .status()
            .is_success());
    }
    ehr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_example_is_answered_per_spec() {
    let mut examples: Vec<(String, Value)> = Vec::new();
    for dir in ["davinci/crd-hooks", "cds-hooks"] {
        for entry in std::fs::read_dir(fixtures().join(dir)).expect("dir") {
            let path = entry.expect("entry").path();
            let name = path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            if name.contains("Request") || name.contains("request") {
                examples.push((name, read_json(&path)));
            }
        }
    }
    examples.sort_by(|a, b| a.0.cmp(&b.0));
    let patients: Vec<String> = examples
        .iter()
        .filter_map(|(_, e)| e["context"]["patientId"].as_str().map(str::to_owned))
        .collect();
    let ehr = ehr_with(&patients).await;
    let ehr_base = ehr.fhir("");
    let app = TestApp::start_with(|c| c.cds.issuers[0].fhir_servers = vec![ehr_base.clone()]).await;

    let mut answered = 0;
    for (name, mut example) in examples {
        let hook = example["hook"].as_str().expect("hook").to_owned();
        // Point the example at the stand-in EHR and lend a token for it.
        example["fhirServer"] = json!(ehr_base);
        example["fhirAuthorization"] = json!({"access_token":crate::helpers::TEST_ADMIN_KEY,"token_type":"Bearer","expires_in":300,"scope":"patient/*.read","subject":"cds-service"});
        let (status, body) = call(&app, &format!("crd-{hook}"), &example).await;
        match hook.as_str() {
            // Hooks this server has no service for.
            "patient-view" => assert_eq!(status, StatusCode::NOT_FOUND, "{name}"),
            _ if example["context"].get("draftOrders").is_none()
                && matches!(hook.as_str(), "order-sign" | "order-select") =>
            {
                // The 1.0-era example names `medications` instead of `draftOrders`.
                assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {body}");
                assert!(body["issue"][0]["diagnostics"]
                    .as_str()
                    .expect("text")
                    .contains("draftOrders"));
            }
            _ => {
                assert_eq!(status, StatusCode::OK, "{name}: {body}");
                assert_spec_valid(&body);
                answered += 1;
            }
        }
    }
    assert!(answered >= 5, "answered {answered} examples");
}

/// An order-sign request for an Acme patient with low back pain and no therapy on record.
fn lumbar_mri_request(payer: &str, code: &str) -> Value {
    let order = json!({"resourceType":"ServiceRequest","id":"mri-1","status":"draft","intent":"order",
        "code":{"coding":[{"system":CPT,"code":code}]},"subject":{"reference":"Patient/p1"}});
    json!({
        "hook": "order-sign",
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "context": {"userId": "Practitioner/doc", "patientId": "p1",
            "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": order}]}},
        "prefetch": {
            "patient": {"resourceType":"Patient","id":"p1","gender":"male","birthDate":"1968-04-02"},
            "coverage": {"resourceType":"Bundle","type":"searchset","entry":[{"resource":
                {"resourceType":"Coverage","id":"cov1","status":"active","beneficiary":{"reference":"Patient/p1"},"payor":[{"display":payer}]}}]},
            "conditions": {"resourceType":"Bundle","type":"searchset","entry":[{"resource":
                {"resourceType":"Condition","id":"lbp","clinicalStatus":{"coding":[{"code":"active"}]},
                 "code":{"coding":[{"system":"http://hl7.org/fhir/sid/icd-10-cm","code":"M54.50"}]},"subject":{"reference":"Patient/p1"}}}]},
            "procedures": {"resourceType":"Bundle","type":"searchset"}
        }
    })
}

#[tokio::test]
async fn prior_auth_needed_gives_instructions_reference_and_review_app() {
    let app = TestApp::start_with(|c| {
        c.cds.review_app_url = Some("https://fhirgate.example/app/launch".into())
    })
    .await;
    let (status, body) = call(
        &app,
        "crd-order-sign",
        &lumbar_mri_request("Acme Health Plan", "72148"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_spec_valid(&body);
    let cards = body["cards"].as_array().expect("cards");
    let instructions = &cards[0];
    assert_eq!(instructions["indicator"], "warning");
    assert_eq!(
        instructions["summary"],
        "Acme Health Plan requires prior authorization for MRI of the lumbar spine"
    );
    let detail = instructions["detail"].as_str().expect("detail");
    assert!(detail.contains("6 weeks of physical therapy"), "{detail}");
    assert!(detail.contains("Attach to the request"), "{detail}");
    assert_eq!(
        instructions["extension"]["davinci-crd.associated-resource"][0]["reference"],
        "ServiceRequest/mri-1"
    );
    let smart = cards
        .iter()
        .find(|c| c["links"][0]["type"] == "smart")
        .expect("a SMART launch card");
    let app_context: Value = serde_json::from_str(
        smart["links"][0]["appContext"]
            .as_str()
            .expect("appContext"),
    )
    .expect("json");
    assert_eq!(app_context["order"], "ServiceRequest/mri-1");
    let reference = cards
        .iter()
        .find(|c| c["source"]["topic"]["code"] == "guideline")
        .expect("an external reference card");
    assert!(reference["links"][0]["url"]
        .as_str()
        .expect("url")
        .contains("mri-lumbar"));

    let annotated = &body["systemActions"][0]["resource"];
    assert_eq!(annotated["id"], "mri-1");
    let parts = &annotated["extension"][0]["extension"];
    let value = |name: &str| {
        parts
            .as_array()
            .expect("parts")
            .iter()
            .find(|p| p["url"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(value("covered")["valueCode"], "conditional");
    assert_eq!(value("pa-needed")["valueCode"], "auth-needed");
    assert_eq!(value("doc-needed")["valueCode"], "clinical");
    assert_eq!(value("billingCode")["valueCoding"]["code"], "72148");
    assert_eq!(
        value("coverage")["valueReference"]["reference"],
        "Coverage/cov1"
    );
}

/// Replaces what changes from run to run (card ids, today's date, assertion ids).
fn stable(mut body: Value) -> Value {
    for card in body["cards"].as_array_mut().into_iter().flatten() {
        card["uuid"] = json!("[uuid]");
    }
    for action in body["systemActions"].as_array_mut().into_iter().flatten() {
        for ext in action["resource"]["extension"]
            .as_array_mut()
            .into_iter()
            .flatten()
        {
            for part in ext["extension"].as_array_mut().into_iter().flatten() {
                if part["url"] == "date" {
                    part["valueDate"] = json!("[today]");
                }
            }
        }
    }
    body
}

#[tokio::test]
async fn answers_snapshot() {
    let app = TestApp::start().await;
    let (_, body) = call(
        &app,
        "crd-order-sign",
        &lumbar_mri_request("Acme Health Plan", "72148"),
    )
    .await;
    insta::assert_json_snapshot!("order_sign_lumbar_mri_pa_needed", stable(body));
    let (_, body) = call(
        &app,
        "crd-order-sign",
        &lumbar_mri_request("Cedar Mutual", "97810"),
    )
    .await;
    insta::assert_json_snapshot!("order_sign_not_covered", stable(body));
}

#[tokio::test]
async fn not_covered_unknown_payer_and_configuration() {
    let app = TestApp::start().await;
    // Cedar excludes acupuncture.
    let (_, body) = call(
        &app,
        "crd-order-sign",
        &lumbar_mri_request("Cedar Mutual", "97810"),
    )
    .await;
    assert_spec_valid(&body);
    assert!(body["cards"][0]["summary"]
        .as_str()
        .expect("summary")
        .starts_with("Not covered by Cedar Mutual"));
    assert_eq!(
        body["systemActions"][0]["resource"]["extension"][0]["extension"][1]["valueCode"],
        "not-covered"
    );
    // A payer without policies here: coverage unknown, no crash, no coverage assertion.
    let (status, body) = call(
        &app,
        "crd-order-sign",
        &lumbar_mri_request("Nobody Mutual", "72148"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_spec_valid(&body);
    assert_eq!(
        body["cards"][0]["summary"],
        "Coverage requirements could not be determined"
    );
    assert!(body.get("systemActions").is_none());
    // Covered without PA: the system action alone, no cards.
    let (_, body) = call(
        &app,
        "crd-order-sign",
        &lumbar_mri_request("Acme Health Plan", "99213"),
    )
    .await;
    assert_eq!(body["cards"].as_array().map(Vec::len), Some(0));
    assert_eq!(
        body["systemActions"][0]["resource"]["extension"][0]["extension"][2]["valueCode"],
        "no-auth"
    );
    // davinci-crd.configuration: no coverage-info, at most one card.
    let mut request = lumbar_mri_request("Acme Health Plan", "72148");
    request["extension"] =
        json!({"davinci-crd.configuration": {"coverage-info": false, "max-cards": 1}});
    let (_, body) = call(&app, "crd-order-sign", &request).await;
    assert!(body.get("systemActions").is_none());
    assert_eq!(body["cards"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn bad_requests() {
    let app = TestApp::start().await;
    let good = lumbar_mri_request("Acme Health Plan", "72148");
    let raw = |body: &'static str| {
        let client = app.client.clone();
        let url = app.url("/cds-services/crd-order-sign");
        let token = cds_token(&app, "/cds-services/crd-order-sign");
        async move {
            json(
                client
                    .post(url)
                    .bearer_auth(token)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .expect("post"),
            )
            .await
        }
    };
    let (status, _) = raw("{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = call(&app, "no-such-service", &good).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for field in ["hook", "hookInstance", "context"] {
        let mut body = good.clone();
        body.as_object_mut().expect("object").remove(field);
        let (status, outcome) = call(&app, "crd-order-sign", &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{field}");
        assert!(outcome["issue"][0]["diagnostics"]
            .as_str()
            .expect("text")
            .contains(field));
    }
    // The context of another hook.
    let mut body = good.clone();
    body["hook"] = json!("appointment-book");
    assert_eq!(
        call(&app, "crd-order-sign", &body).await.0,
        StatusCode::BAD_REQUEST
    );
    let (status, _) = call(&app, "crd-appointment-book", &body).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "appointment-book without appointments"
    );
    // fhirAuthorization without fhirServer.
    let mut body = good.clone();
    body["fhirAuthorization"] = json!({"access_token":"t","token_type":"Bearer"});
    assert_eq!(
        call(&app, "crd-order-sign", &body).await.0,
        StatusCode::BAD_REQUEST
    );
    // Prefetch of the wrong type.
    let mut body = good.clone();
    body["prefetch"]["patient"] = json!({"resourceType":"Observation","id":"x"});
    assert_eq!(
        call(&app, "crd-order-sign", &body).await.0,
        StatusCode::BAD_REQUEST
    );
    // No patient and no way to fetch it: 412.
    let mut body = good.clone();
    body["prefetch"]
        .as_object_mut()
        .expect("object")
        .remove("patient");
    assert_eq!(
        call(&app, "crd-order-sign", &body).await.0,
        StatusCode::PRECONDITION_FAILED
    );
    // A FHIR server that is not on the allow-list is never contacted: 412.
    body["fhirServer"] = json!("http://169.254.169.254/latest");
    body["fhirAuthorization"] = json!({"access_token":"t","token_type":"Bearer"});
    let (status, outcome) = call(&app, "crd-order-sign", &body).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    assert!(outcome["issue"][0]["diagnostics"]
        .as_str()
        .expect("text")
        .contains("not an allowed FHIR server"));
    // Orders without codes: answered, coverage unknown.
    let mut body = good.clone();
    body["context"]["draftOrders"]["entry"][0]["resource"]
        .as_object_mut()
        .expect("order")
        .remove("code");
    let (status, answer) = call(&app, "crd-order-sign", &body).await;
    assert_eq!(status, StatusCode::OK);
    assert!(answer["cards"][0]["detail"]
        .as_str()
        .expect("detail")
        .contains("no code"));
}

#[tokio::test]
async fn feedback_is_accepted_and_counted() {
    let app = TestApp::start().await;
    let example = read_json(&fixtures().join("cds-hooks/specification-current__24_feedback.json"));
    let anonymous = app
        .client
        .post(app.url("/cds-services/crd-order-sign/feedback"))
        .json(&example)
        .send()
        .await
        .expect("post");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let response = app
        .client
        .post(app.url("/cds-services/crd-order-sign/feedback"))
        .bearer_auth(cds_token(&app, "/cds-services/crd-order-sign/feedback"))
        .json(&example)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), StatusCode::OK);
    let overridden = json!({"feedback":[{"card":"4e0a3a1e-3283-4575-ab82-028d55fe2719","outcome":"overridden",
        "overrideReason":{"reason":{"code":"patient-refused","system":"http://example.org/cds-services/fhir/CodeSystem/override-reasons"},"userComment":"prefers to wait"},
        "outcomeTimestamp":"2024-06-01T10:05:31Z"}]});
    let response = app
        .client
        .post(app.url("/cds-services/crd-order-sign/feedback"))
        .bearer_auth(cds_token(&app, "/cds-services/crd-order-sign/feedback"))
        .json(&overridden)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), StatusCode::OK);
    let bad = json!({"feedback":[{"card":"x","outcome":"maybe","outcomeTimestamp":"2024-06-01T10:05:31Z"}]});
    let response = app
        .client
        .post(app.url("/cds-services/crd-order-sign/feedback"))
        .bearer_auth(cds_token(&app, "/cds-services/crd-order-sign/feedback"))
        .json(&bad)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("fhirgate_cds_feedback_total{service=\"crd-order-sign\",outcome=\"overridden\",override_reason=\"given\"}"), "{metrics}");
    // Kept in the store: two outcomes, the refused batch left nothing.
    let dir = app.stop().await;
    let registry = std::sync::Arc::new(fhirgate::fhir::SearchRegistry::new(schema()));
    // Feedback is sealed at rest; the server's own key (made in the data folder) opens it.
    let cipher =
        fhirgate::store::crypt::Cipher::from_config(&Default::default(), dir.path()).expect("key");
    let store = fhirgate::store::EmbeddedStore::open_with_options(
        dir.path(),
        registry,
        std::time::Duration::from_secs(5),
        16 << 20,
        Some(std::sync::Arc::new(cipher)),
    )
    .expect("store");
    use fhirgate::store::Store as _;
    let records = store
        .records(fhirgate::cds::FEEDBACK_STREAM, 0, 10)
        .await
        .expect("records");
    assert_eq!(records.len(), 2);
    let second: Value = serde_json::from_slice(&records[1].1).expect("json");
    assert_eq!(second["outcome"], "overridden");
    assert_eq!(
        second["overrideReason"]["reason"]["code"],
        "patient-refused"
    );
    assert_eq!(second["service"], "crd-order-sign");
}

#[tokio::test]
async fn jwt_matrix() {
    use jsonwebtoken::Algorithm::{ES384, HS384, RS384};
    let app = TestApp::start().await;
    let path = "/cds-services/crd-order-sign";
    let aud = app.url(path);
    let body = lumbar_mri_request("Acme Health Plan", "72148");
    let send = |token: Option<String>| {
        let mut request = app.client.post(app.url(path)).json(&body);
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        async move { request.send().await.expect("post").status() }
    };
    // Accepted: RS384 and ES384 from the trusted client.
    assert_eq!(
        send(Some(cds_jwt(
            &aud,
            RS384,
            "test-cds-client-rs384.key",
            "test-rs384",
            |_| {}
        )))
        .await,
        StatusCode::OK
    );
    assert_eq!(
        send(Some(cds_jwt(
            &aud,
            ES384,
            "test-cds-client-es384.key",
            "test-es384",
            |_| {}
        )))
        .await,
        StatusCode::OK
    );
    // Discovery needs no token.
    assert_eq!(
        app.client
            .get(app.url("/cds-services"))
            .send()
            .await
            .expect("get")
            .status(),
        StatusCode::OK
    );

    let refused: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        ("alg none", Some(unsigned_token(&aud))),
        (
            "HMAC keyed with the public key",
            Some(hmac_with_public_key(&aud)),
        ),
        (
            "forged with another key",
            Some(cds_jwt(
                &aud,
                RS384,
                "test-untrusted-rs384.key",
                "test-rs384",
                |_| {},
            )),
        ),
        (
            "unknown kid",
            Some(cds_jwt(
                &aud,
                RS384,
                "test-cds-client-rs384.key",
                "other",
                |_| {},
            )),
        ),
        (
            "expired",
            Some(cds_jwt(
                &aud,
                RS384,
                "test-cds-client-rs384.key",
                "test-rs384",
                |c| {
                    c["exp"] = json!(c["iat"].as_i64().expect("iat") - 600);
                    c["iat"] = json!(c["iat"].as_i64().expect("iat") - 900);
                },
            )),
        ),
        (
            "lives an hour",
            Some(cds_jwt(
                &aud,
                RS384,
                "test-cds-client-rs384.key",
                "test-rs384",
                |c| c["exp"] = json!(c["iat"].as_i64().expect("iat") + 3600),
            )),
        ),
        (
            "issued in the future",
            Some(cds_jwt(
                &aud,
                RS384,
                "test-cds-client-rs384.key",
                "test-rs384",
                |c| c["iat"] = json!(c["iat"].as_i64().expect("iat") + 600),
            )),
        ),
        (
            "wrong audience",
            Some(cds_jwt(
                &app.url("/cds-services/crd-order-select"),
                RS384,
                "test-cds-client-rs384.key",
                "test-rs384",
                |_| {},
            )),
        ),
        (
            "untrusted issuer",
            Some(cds_jwt(
                &aud,
                RS384,
                "test-cds-client-rs384.key",
                "test-rs384",
                |c| c["iss"] = json!("https://evil.test"),
            )),
        ),
        (
            "no jti",
            Some(cds_jwt(
                &aud,
                RS384,
                "test-cds-client-rs384.key",
                "test-rs384",
                |c| {
                    c.as_object_mut().expect("claims").remove("jti");
                },
            )),
        ),
        (
            "ES384 token claiming the RSA key",
            Some(cds_jwt(
                &aud,
                ES384,
                "test-cds-client-es384.key",
                "test-rs384",
                |_| {},
            )),
        ),
    ];
    for (why, token) in refused {
        assert_eq!(send(token).await, StatusCode::UNAUTHORIZED, "{why}");
    }
    let _ = HS384;

    // A token is good once.
    let once = cds_jwt(
        &aud,
        RS384,
        "test-cds-client-rs384.key",
        "test-rs384",
        |_| {},
    );
    assert_eq!(send(Some(once.clone())).await, StatusCode::OK);
    assert_eq!(send(Some(once)).await, StatusCode::UNAUTHORIZED, "replayed");
}

/// `{"alg":"none"}` with a valid-looking payload and no signature.
fn unsigned_token(aud: &str) -> String {
    use base64::Engine as _;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": "test-rs384"})),
        b64(
            &json!({"iss": crate::helpers::TEST_ISSUER, "aud": aud, "exp": now + 60, "iat": now, "jti": "n"})
        )
    )
}

/// The classic confusion attack: HS384 with the RSA public key's bytes as the HMAC secret.
fn hmac_with_public_key(aud: &str) -> String {
    let jwks = read_json(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/test-cds-client.jwks.json"),
    );
    let secret = jwks["keys"][0]["n"].as_str().expect("n").to_owned();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = json!({"iss": crate::helpers::TEST_ISSUER, "aud": aud, "exp": now + 60, "iat": now, "jti": "h"});
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS384);
    header.kid = Some("test-rs384".into());
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

#[tokio::test]
async fn keys_from_an_allowed_jku_and_development_mode() {
    // A JWKS served by the CDS client at a URL the issuer entry allows.
    let jwks = read_json(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/test-cds-client.jwks.json"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let jku = format!("http://{}/jwks.json", listener.local_addr().expect("addr"));
    let served = jwks.clone();
    tokio::spawn(async move {
        let router = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || async move { axum::Json(served) }),
        );
        let _ = axum::serve(listener, router).await;
    });
    let allowed = jku.clone();
    let app = TestApp::start_with(move |c| {
        c.cds.issuers[0].jwks_file = None;
        c.cds.issuers[0].jku = vec![allowed];
    })
    .await;
    let path = "/cds-services/crd-order-sign";
    let body = lumbar_mri_request("Acme Health Plan", "72148");
    let signed = |jku_header: &str| {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = json!({"iss": crate::helpers::TEST_ISSUER, "aud": app.url(path), "exp": now + 120, "iat": now, "jti": uuid::Uuid::new_v4().to_string()});
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS384);
        header.kid = Some("test-rs384".into());
        header.jku = Some(jku_header.to_owned());
        let pem = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("certs/test-cds-client-rs384.key"),
        )
        .expect("key");
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_rsa_pem(&pem).expect("pem"),
        )
        .expect("sign")
    };
    let status = |token: String| {
        let request = app
            .client
            .post(app.url(path))
            .bearer_auth(token)
            .json(&body);
        async move { request.send().await.expect("post").status() }
    };
    assert_eq!(status(signed(&jku)).await, StatusCode::OK);
    assert_eq!(
        status(signed("http://127.0.0.1:1/evil.json")).await,
        StatusCode::UNAUTHORIZED,
        "jku not allowed"
    );

    // Development mode: no token needed (and the server says so in its log).
    let dev = TestApp::start_with(|c| c.cds.require_jwt = false).await;
    let response = dev
        .client
        .post(dev.url(path))
        .json(&body)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn alternatives_are_proposed_as_valid_orders() {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = json!({"payer": {"id": "alt", "name": "Alt Health"},
        "rules": [{"id": "alt-brand", "title": "Brand drug", "prior_auth": true,
            "codes": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "327361"}],
            "criteria": {"diagnosis": {"label": "Rheumatoid arthritis", "codes": ["M05*"]}},
            "alternatives": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "999999", "display": "preferred biosimilar"}]}]});
    std::fs::write(dir.path().join("alt.json"), policy.to_string()).expect("write");
    let policies = dir.path().to_path_buf();
    let app = TestApp::start_with(move |c| c.pa.policies_dir = policies).await;
    let mut request = lumbar_mri_request("Alt Health", "72148");
    request["context"]["draftOrders"]["entry"][0]["resource"] = json!({"resourceType":"MedicationRequest","id":"rx1",
        "status":"draft","intent":"order","subject":{"reference":"Patient/p1"},
        "medicationCodeableConcept":{"coding":[{"system":"http://www.nlm.nih.gov/research/umls/rxnorm","code":"327361"}]}});
    let (status, body) = call(&app, "crd-order-sign", &request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_spec_valid(&body);
    let card = body["cards"]
        .as_array()
        .expect("cards")
        .iter()
        .find(|c| c.get("suggestions").is_some())
        .expect("an alternatives card");
    assert_eq!(card["selectionBehavior"], "at-most-one");
    let actions = &card["suggestions"][0]["actions"];
    assert_eq!(actions[0]["type"], "delete");
    assert_eq!(actions[0]["resourceId"], "MedicationRequest/rx1");
    assert_eq!(
        actions[1]["resource"]["medicationCodeableConcept"]["coding"][0]["code"],
        "999999"
    );
    assert_eq!(actions[1]["resource"]["subject"]["reference"], "Patient/p1");
}

#[tokio::test]
async fn a_client_may_only_use_its_own_fhir_servers() {
    // The server is on the global list, but the calling client's own list is empty.
    let app = TestApp::start_with(|c| {
        c.cds.fhir_servers = vec!["https://someone-elses-ehr.test/fhir".into()]
    })
    .await;
    let mut body = lumbar_mri_request("Acme Health Plan", "72148");
    body["prefetch"]
        .as_object_mut()
        .expect("object")
        .remove("patient");
    body["fhirServer"] = json!("https://someone-elses-ehr.test/fhir");
    body["fhirAuthorization"] = json!({"access_token":"t","token_type":"Bearer"});
    let (status, outcome) = call(&app, "crd-order-sign", &body).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    assert!(outcome["issue"][0]["diagnostics"]
        .as_str()
        .expect("text")
        .contains("not an allowed FHIR server"));
}

#[tokio::test]
async fn encounter_start_answers_for_that_encounters_orders_and_the_patients_coverage() {
    let app = TestApp::start().await;
    let mut body = lumbar_mri_request("Acme Health Plan", "72148");
    body["hook"] = json!("encounter-start");
    body["context"] =
        json!({"userId": "Practitioner/doc", "patientId": "p1", "encounterId": "enc1"});
    let order = |id: &str, encounter: Option<&str>| {
        let mut o = json!({"resourceType":"ServiceRequest","id":id,"status":"active","intent":"order",
            "code":{"coding":[{"system":CPT,"code":"72148"}]},"subject":{"reference":"Patient/p1"}});
        if let Some(e) = encounter {
            o["encounter"] = json!({"reference": e});
        }
        json!({"resource": o})
    };
    body["prefetch"]["serviceRequests"] = json!({"resourceType":"Bundle","type":"searchset","entry":[
        order("this-visit", Some("Encounter/enc1")), order("last-year", Some("Encounter/old")), order("no-encounter", None)]});
    // Someone else's coverage, and an expired one of this patient, are ignored.
    body["prefetch"]["coverage"]["entry"] = json!([
        {"resource":{"resourceType":"Coverage","id":"theirs","status":"active","beneficiary":{"reference":"Patient/other"},"payor":[{"display":"Cedar Mutual"}]}},
        {"resource":{"resourceType":"Coverage","id":"old","status":"active","beneficiary":{"reference":"Patient/p1"},
            "period":{"start":"2010-01-01","end":"2011-01-01"},"payor":[{"display":"Bluestone Insurance"}]}},
        {"resource":{"resourceType":"Coverage","id":"cov1","status":"active","beneficiary":{"reference":"Patient/p1"},"payor":[{"display":"Acme Health Plan"}]}}]);
    let (status, answer) = call(&app, "crd-encounter-start", &body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_spec_valid(&answer);
    let actions = answer["systemActions"].as_array().expect("actions");
    assert_eq!(actions.len(), 1, "{answer}");
    assert_eq!(actions[0]["resource"]["id"], "this-visit");
    assert!(answer["cards"][0]["summary"]
        .as_str()
        .expect("summary")
        .starts_with("Acme Health Plan"));
}
