//! Batch and transaction Bundles.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{assert_outcome, json, patient, TestApp};

fn observation_for(patient_ref: &str, n: usize) -> Value {
    json!({"resourceType":"Observation","status":"final",
        "code":{"coding":[{"system":"http://loinc.org","code":"8302-6"}]},
        "subject":{"reference":patient_ref},
        "valueQuantity":{"value":format!("{n}.0").parse::<serde_json::Number>().expect("number")}})
}

fn transaction(entries: Vec<Value>) -> Value {
    json!({"resourceType":"Bundle","type":"transaction","entry":entries})
}

#[tokio::test]
async fn transaction_resolves_urn_uuid_references() {
    let app = TestApp::start().await;
    let mut p = patient("ignored");
    p.as_object_mut().expect("object").remove("id");
    let bundle = transaction(vec![
        json!({"fullUrl":"urn:uuid:11111111-1111-1111-1111-111111111111","resource":p,"request":{"method":"POST","url":"Patient"}}),
        json!({"fullUrl":"urn:uuid:22222222-2222-2222-2222-222222222222","resource":observation_for("urn:uuid:11111111-1111-1111-1111-111111111111", 1),"request":{"method":"POST","url":"Observation"}}),
        json!({"resource":patient("fixed"),"request":{"method":"PUT","url":"Patient/fixed"}}),
    ]);
    let (status, response) = json(app.post("", &bundle).await).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    assert_eq!(response["type"], "transaction-response");
    let entries = response["entry"].as_array().expect("entries");
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[0]["response"]["status"], "201 Created");
    assert_eq!(entries[2]["response"]["status"], "201 Created");
    let patient_location = entries[0]["response"]["location"]
        .as_str()
        .expect("location");
    let patient_id = patient_location.split('/').nth(1).expect("id");
    let obs_location = entries[1]["response"]["location"]
        .as_str()
        .expect("location");
    let (_, obs) = json(
        app.get(&format!(
            "/{}",
            obs_location.split("/_history").next().expect("path")
        ))
        .await,
    )
    .await;
    assert_eq!(obs["subject"]["reference"], format!("Patient/{patient_id}"));
    let (_, found) = json(app.get(&format!("/Observation?patient={patient_id}")).await).await;
    assert_eq!(found["total"], 1);
}

#[tokio::test]
async fn a_transaction_whose_fiftieth_entry_is_invalid_stores_nothing() {
    let app = TestApp::start().await;
    let mut entries: Vec<Value> = (0..60)
        .map(|i| json!({"fullUrl":format!("urn:uuid:00000000-0000-0000-0000-{i:012}"),"resource":observation_for("Patient/x", i),"request":{"method":"POST","url":"Observation"}}))
        .collect();
    entries[49]["resource"]["status"] = json!("finished-ish");
    let (status, outcome) = json(app.post("", &transaction(entries.clone())).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{outcome}");
    assert_outcome(&outcome, "value", Some("Bundle.entry[49].resource.status"));
    let (_, count) = json(app.get("/Observation?_summary=count").await).await;
    assert_eq!(count["total"], 0);

    // A structural error in the 50th entry: also nothing stored.
    entries[49]["resource"] = json!({"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":"heavy"});
    let (status, outcome) = json(app.post("", &transaction(entries.clone())).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(
        &outcome,
        "structure",
        Some("Bundle.entry[49].resource.valueQuantity"),
    );

    // A failure found only while writing (If-Match against a resource that does not exist).
    entries[49] = json!({"resource":patient("nope"),"request":{"method":"PUT","url":"Patient/nope","ifMatch":"W/\"3\""}});
    let (status, outcome) = json(app.post("", &transaction(entries.clone())).await).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED, "{outcome}");
    assert!(outcome["issue"][0]["expression"][0]
        .as_str()
        .expect("expr")
        .starts_with("Bundle.entry[49]"));
    let (_, count) = json(app.get("/Observation?_summary=count").await).await;
    assert_eq!(count["total"], 0);
    let (_, count) = json(app.get("/Patient?_summary=count").await).await;
    assert_eq!(count["total"], 0);

    // And the same Bundle fixed goes through whole.
    entries[49] =
        json!({"resource":patient("nope"),"request":{"method":"PUT","url":"Patient/nope"}});
    let (status, _) = json(app.post("", &transaction(entries)).await).await;
    assert_eq!(status, StatusCode::OK);
    let (_, count) = json(app.get("/Observation?_summary=count").await).await;
    assert_eq!(count["total"], 59);
}

#[tokio::test]
async fn batch_entries_succeed_or_fail_on_their_own() {
    let app = TestApp::start().await;
    app.put("/Patient/existing", &patient("existing")).await;
    app.put("/Patient/doomed", &patient("doomed")).await;
    let bundle = json!({"resourceType":"Bundle","type":"batch","entry":[
        {"resource":patient("b1"),"request":{"method":"PUT","url":"Patient/b1"}},
        {"resource":{"resourceType":"Patient","id":"b2","gender":"robot"},"request":{"method":"PUT","url":"Patient/b2"}},
        {"request":{"method":"GET","url":"Patient/existing"}},
        {"request":{"method":"GET","url":"Patient/missing"}},
        {"request":{"method":"DELETE","url":"Patient/doomed"}},
        {"request":{"method":"GET","url":"Patient?identifier=urn:test:mrn|mrn-b1"}},
    ]});
    let (status, response) = json(app.post("", &bundle).await).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    assert_eq!(response["type"], "batch-response");
    let e = response["entry"].as_array().expect("entries");
    assert_eq!(e.len(), 6);
    assert_eq!(e[0]["response"]["status"], "201 Created");
    assert!(e[1]["response"]["status"]
        .as_str()
        .expect("status")
        .starts_with("422"));
    assert_eq!(
        e[1]["response"]["outcome"]["issue"][0]["expression"][0],
        "Bundle.entry[1].resource.gender"
    );
    assert_eq!(e[2]["response"]["status"], "200 OK");
    assert_eq!(e[2]["resource"]["id"], "existing");
    assert!(e[3]["response"]["status"]
        .as_str()
        .expect("status")
        .starts_with("404"));
    assert_eq!(e[4]["response"]["status"], "204 No Content");
    assert_eq!(e[5]["resource"]["type"], "searchset");
    assert_eq!(e[5]["resource"]["total"], 1);
    assert_eq!(app.get("/Patient/b2").await.status(), StatusCode::NOT_FOUND);
    assert_eq!(app.get("/Patient/b1").await.status(), StatusCode::OK);
    assert_eq!(app.get("/Patient/doomed").await.status(), StatusCode::GONE);
}

#[tokio::test]
async fn conditional_entries_and_references() {
    let app = TestApp::start().await;
    app.put("/Patient/known", &patient("known")).await;
    let mut p = patient("x");
    p.as_object_mut().expect("object").remove("id");
    p["identifier"][0]["value"] = json!("mrn-known");
    let bundle = transaction(vec![
        // Matches the existing patient: nothing created, references point at it.
        json!({"fullUrl":"urn:uuid:aaaaaaaa-0000-0000-0000-000000000001","resource":p,
               "request":{"method":"POST","url":"Patient","ifNoneExist":"identifier=urn:test:mrn|mrn-known"}}),
        json!({"resource":observation_for("urn:uuid:aaaaaaaa-0000-0000-0000-000000000001", 2),"request":{"method":"POST","url":"Observation"}}),
        // A conditional reference, resolved by search.
        json!({"resource":observation_for("Patient?identifier=urn:test:mrn|mrn-known", 3),"request":{"method":"POST","url":"Observation"}}),
    ]);
    let (status, response) = json(app.post("", &bundle).await).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    assert_eq!(response["entry"][0]["response"]["status"], "200 OK");
    let (_, found) = json(app.get("/Observation?subject=Patient/known").await).await;
    assert_eq!(found["total"], 2);
    let (_, patients) = json(app.get("/Patient?_summary=count").await).await;
    assert_eq!(patients["total"], 1);

    // A conditional reference that matches nothing fails the whole transaction.
    let bundle = transaction(vec![
        json!({"resource":observation_for("Patient?identifier=urn:test:mrn|nobody", 4),"request":{"method":"POST","url":"Observation"}}),
    ]);
    let (status, outcome) = json(app.post("", &bundle).await).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    assert!(outcome["issue"][0]["diagnostics"]
        .as_str()
        .expect("text")
        .contains("matched 0"));
}

#[tokio::test]
async fn two_entries_for_one_resource_are_refused() {
    let app = TestApp::start().await;
    let bundle = transaction(vec![
        json!({"resource":patient("twice"),"request":{"method":"PUT","url":"Patient/twice"}}),
        json!({"resource":patient("twice"),"request":{"method":"PUT","url":"Patient/twice"}}),
    ]);
    let (status, outcome) = json(app.post("", &bundle).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&outcome, "duplicate", Some("Bundle.entry[1].resource"));
    assert_eq!(
        app.get("/Patient/twice").await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn bundle_envelope_errors() {
    let app = TestApp::start().await;
    let (status, outcome) = json(
        app.post("", &json!({"resourceType":"Bundle","type":"collection"}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&outcome, "value", Some("Bundle.type"));
    let (status, outcome) = json(app.post("", &patient("a")).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&outcome, "invalid", Some("resourceType"));
    let (status, outcome) = json(
        app.post("", &transaction(vec![json!({"resource":patient("a")})]))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&outcome, "required", Some("Bundle.entry[0].request"));
    let (status, outcome) = json(
        app.post(
            "",
            &transaction(vec![
                json!({"resource":patient("a"),"request":{"method":"PUT","url":"Patient/b"}}),
            ]),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&outcome, "invalid", Some("Bundle.entry[0].resource.id"));
    let (status, response) = json(app.post("", &transaction(vec![])).await).await;
    assert_eq!(status, StatusCode::OK);
    assert!(response.get("entry").is_none());
}

#[tokio::test]
async fn identical_conditional_creates_in_one_transaction_make_one_resource() {
    let app = TestApp::start().await;
    let mut p = patient("x");
    p.as_object_mut().expect("object").remove("id");
    p["identifier"][0]["value"] = json!("DUP");
    let bundle = transaction(vec![
        json!({"fullUrl":"urn:uuid:bbbbbbbb-0000-0000-0000-000000000001","resource":p,"request":{"method":"POST","url":"Patient","ifNoneExist":"identifier=urn:test:mrn|DUP"}}),
        json!({"fullUrl":"urn:uuid:bbbbbbbb-0000-0000-0000-000000000002","resource":p,"request":{"method":"POST","url":"Patient","ifNoneExist":"identifier=urn:test:mrn|DUP"}}),
        json!({"resource":observation_for("urn:uuid:bbbbbbbb-0000-0000-0000-000000000002", 5),"request":{"method":"POST","url":"Observation"}}),
    ]);
    let (status, response) = json(app.post("", &bundle).await).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    assert_eq!(response["entry"][0]["response"]["status"], "201 Created");
    assert_eq!(response["entry"][1]["response"]["status"], "200 OK");
    assert_eq!(
        response["entry"][0]["response"]["location"],
        response["entry"][1]["response"]["location"]
    );
    let (_, count) = json(app.get("/Patient?identifier=urn:test:mrn|DUP").await).await;
    assert_eq!(count["total"], 1);
    let id = count["entry"][0]["resource"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (_, obs) = json(app.get(&format!("/Observation?patient={id}")).await).await;
    assert_eq!(obs["total"], 1);
}

#[tokio::test]
async fn transaction_reads_are_checked_before_anything_is_written() {
    let app = TestApp::start().await;
    let bundle = transaction(vec![
        json!({"resource":patient("tr1"),"request":{"method":"PUT","url":"Patient/tr1"}}),
        json!({"request":{"method":"GET","url":"Observation?date=xx2020"}}),
    ]);
    let (status, outcome) = json(app.post("", &bundle).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&outcome, "invalid", Some("Bundle.entry[1].request.url"));
    assert_eq!(
        app.get("/Patient/tr1").await.status(),
        StatusCode::NOT_FOUND
    );

    // A well-formed read of something absent is that entry's 404; the writes stand.
    let bundle = transaction(vec![
        json!({"resource":patient("tr1"),"request":{"method":"PUT","url":"Patient/tr1"}}),
        json!({"request":{"method":"GET","url":"Patient/absent"}}),
        json!({"request":{"method":"GET","url":"Patient/tr1"}}),
    ]);
    let (status, response) = json(app.post("", &bundle).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(response["entry"][0]["response"]["status"], "201 Created");
    assert!(response["entry"][1]["response"]["status"]
        .as_str()
        .expect("status")
        .starts_with("404"));
    assert_eq!(response["entry"][2]["resource"]["id"], "tr1");
}
