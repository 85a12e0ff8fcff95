//! Every kind of bad request gets a precise OperationOutcome and stores nothing.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{assert_outcome, json, patient, TestApp};

async fn put_raw(
    app: &TestApp,
    path: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, serde_json::Value) {
    json(
        app.client
            .put(app.fhir(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("put"),
    )
    .await
}

async fn assert_nothing_stored(app: &TestApp) {
    let (_, bundle) = json(app.get("/Patient?_summary=count").await).await;
    assert_eq!(bundle["total"], 0, "nothing may be stored");
    let (_, bundle) = json(app.get("/Observation?_summary=count").await).await;
    assert_eq!(bundle["total"], 0, "nothing may be stored");
}

#[tokio::test]
async fn malformed_json() {
    let app = TestApp::start().await;
    let (status, outcome) = put_raw(
        &app,
        "/Patient/a",
        "application/fhir+json",
        r#"{"resourceType":"Patient","id":"a","#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&outcome, "structure", None);
    assert!(outcome["issue"][0]["diagnostics"]
        .as_str()
        .expect("text")
        .contains("not valid JSON"));
    let (status, outcome) = put_raw(&app, "/Patient/a", "application/fhir+json", "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&outcome, "required", None);
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn json_nested_ten_thousand_deep() {
    let app = TestApp::start().await;
    let deep = format!(
        r#"{{"resourceType":"Patient","id":"a","extension":{}{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let (status, outcome) =
        put_raw(&app, "/Patient/a", "application/fhir+json", deep.clone()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&outcome, "structure", None);
    assert!(outcome["issue"][0]["diagnostics"]
        .as_str()
        .expect("text")
        .contains("nested too deeply"));
    let objects = format!("{}{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
    let (status, _) = put_raw(&app, "/Patient/a", "application/fhir+json", objects).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // The server is still fine.
    assert_eq!(app.get("/metadata").await.status(), StatusCode::OK);
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn wrong_or_unknown_resource_type() {
    let app = TestApp::start().await;
    let (status, outcome) = json(
        app.put(
            "/Patient/a",
            &json!({"resourceType":"Observation","id":"a","status":"final","code":{"text":"x"}}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&outcome, "invalid", Some("resourceType"));
    let (status, outcome) = json(
        app.post("/Patient", &json!({"resourceType":"Patientt"}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&outcome, "not-supported", Some("resourceType"));
    let (status, outcome) = json(app.post("/Patient", &json!({"id":"x"})).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&outcome, "required", Some("resourceType"));
    let (status, outcome) = json(app.post("/Patient", &json!([1, 2])).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&outcome, "structure", None);
    // A type FHIR does not define in the URL.
    let (status, outcome) = json(
        app.put("/Widget/a", &json!({"resourceType":"Widget","id":"a"}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_outcome(&outcome, "not-supported", None);
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn id_mismatch_and_missing_id() {
    let app = TestApp::start().await;
    let (status, outcome) = json(app.put("/Patient/a", &patient("b")).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&outcome, "invalid", Some("Patient.id"));
    let mut no_id = patient("a");
    no_id.as_object_mut().expect("object").remove("id");
    let (status, outcome) = json(app.put("/Patient/a", &no_id).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&outcome, "required", Some("Patient.id"));
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn invalid_id_characters() {
    let app = TestApp::start().await;
    for bad in ["a_b", "a%20b", &"x".repeat(65)] {
        let (status, outcome) =
            json(app.put(&format!("/Patient/{bad}"), &patient(bad)).await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert_outcome(&outcome, "value", Some("Patient.id"));
        let (status, _) = json(app.get(&format!("/Patient/{bad}")).await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
    // An invalid id inside a created resource's body is caught by the schema.
    let (status, outcome) = json(app.post("/Patient", &patient("bad id!")).await).await;
    assert!(status == StatusCode::BAD_REQUEST || status == StatusCode::UNPROCESSABLE_ENTITY);
    assert_outcome(&outcome, "value", Some("Patient.id"));
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn body_over_the_limit() {
    let app = TestApp::start_with(|c| c.server.max_body_bytes = 2048).await;
    let mut big = patient("big");
    big["name"][0]["text"] = json!("x".repeat(4096));
    let (status, outcome) = json(app.put("/Patient/big", &big).await).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_outcome(&outcome, "too-long", None);
    // Just under the limit is fine.
    assert_eq!(
        app.put("/Patient/small", &patient("small")).await.status(),
        StatusCode::CREATED
    );
    let (_, bundle) = json(app.get("/Patient?_summary=count").await).await;
    assert_eq!(bundle["total"], 1);
}

#[tokio::test]
async fn schema_invalid_resources() {
    let app = TestApp::start().await;
    let mut p = patient("s1");
    p["gender"] = json!("robot");
    let (status, outcome) = json(app.put("/Patient/s1", &p).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_outcome(&outcome, "value", Some("Patient.gender"));

    let mut p = patient("s1");
    p["name"][0]["given"] = json!([42]);
    let (status, outcome) = json(app.put("/Patient/s1", &p).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&outcome, "structure", Some("Patient.name[0].given[0]"));

    let mut p = patient("s1");
    p["nickname"] = json!("Bob");
    let (status, outcome) = json(app.put("/Patient/s1", &p).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&outcome, "structure", Some("Patient.nickname"));

    let (status, outcome) = json(
        app.put(
            "/Observation/o1",
            &json!({"resourceType":"Observation","id":"o1","status":"final"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&outcome, "required", Some("Observation.code"));
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn validation_can_be_turned_off_but_types_are_still_checked() {
    let app = TestApp::start_with(|c| c.fhir.validate = false).await;
    let mut p = patient("v");
    p["gender"] = json!("robot");
    assert_eq!(
        app.put("/Patient/v", &p).await.status(),
        StatusCode::CREATED
    );
    let (status, _) = json(
        app.put("/Patient/w", &json!({"resourceType":"Nope","id":"w"}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn unknown_search_parameter_under_strict_handling() {
    let app = TestApp::start().await;
    app.put("/Patient/p", &patient("p")).await;
    let strict = app
        .request(
            Method::GET,
            "/Patient?nickname=Bob",
            None,
            &[("prefer", "handling=strict")],
        )
        .await;
    let (status, outcome) = json(strict).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&outcome, "not-supported", None);
    assert!(outcome["issue"][0]["diagnostics"]
        .as_str()
        .expect("text")
        .contains("nickname"));
    // Lenient (the default) ignores it, says so, and leaves it out of the self link.
    let (status, bundle) = json(app.get("/Patient?nickname=Bob").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bundle["total"], 1);
    let outcome = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["search"]["mode"] == "outcome")
        .expect("an outcome entry");
    assert_eq!(outcome["resource"]["issue"][0]["severity"], "warning");
    let self_link = bundle["link"][0]["url"].as_str().expect("self");
    assert!(!self_link.contains("nickname"), "{self_link}");
}

#[tokio::test]
async fn bad_date_prefixes_and_values() {
    let app = TestApp::start().await;
    for query in [
        "date=xx2020",
        "date=2020-13",
        "date=gt",
        "_lastUpdated=zz2020",
        "date=ge2020-01-01T25:00:00Z",
    ] {
        let (status, outcome) = json(app.get(&format!("/Observation?{query}")).await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert_outcome(&outcome, "invalid", None);
    }
    let (status, _) = json(app.get("/Observation?code:text=x").await).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "unsupported modifiers are refused"
    );
}

#[tokio::test]
async fn xml_is_refused_with_415_and_406() {
    let app = TestApp::start().await;
    let (status, outcome) = put_raw(
        &app,
        "/Patient/x",
        "application/fhir+xml",
        r#"<Patient xmlns="http://hl7.org/fhir"><id value="x"/></Patient>"#,
    )
    .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_outcome(&outcome, "not-supported", None);
    assert!(outcome["issue"][0]["diagnostics"]
        .as_str()
        .expect("text")
        .contains("only JSON"));
    let (status, outcome) = json(app.get("/metadata?_format=xml").await).await;
    assert_eq!(status, StatusCode::NOT_ACCEPTABLE);
    assert_outcome(&outcome, "not-supported", None);
    let (status, _) = json(
        app.request(
            Method::GET,
            "/metadata",
            None,
            &[("accept", "application/fhir+xml")],
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_ACCEPTABLE);
    let (status, _) = json(app.get("/metadata?_format=json").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_with_outcomes() {
    let app = TestApp::start().await;
    let (status, outcome) = json(
        app.client
            .get(app.url("/nowhere"))
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_outcome(&outcome, "not-found", None);
    let (status, outcome) = json(
        app.client
            .patch(app.fhir("/Patient/a"))
            .send()
            .await
            .expect("patch"),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_outcome(&outcome, "not-supported", None);
}
