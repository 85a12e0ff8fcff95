//! Read, vread, create, update, delete, history, versioning and conditional interactions.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{assert_outcome, json, patient, without_meta, TestApp};

#[tokio::test]
async fn update_as_create_then_update_increments_versions() {
    let app = TestApp::start().await;
    let created = app.put("/Patient/p1", &patient("p1")).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(created.headers()["etag"], "W/\"1\"");
    assert!(created.headers()["location"]
        .to_str()
        .expect("ascii")
        .ends_with("/fhir/Patient/p1/_history/1"));
    assert!(created.headers().contains_key("last-modified"));
    let (_, body) = json(created).await;
    assert_eq!(body["meta"]["versionId"], "1");
    assert!(body["meta"]["lastUpdated"].as_str().is_some());

    let mut changed = patient("p1");
    changed["gender"] = json!("female");
    let updated = app.put("/Patient/p1", &changed).await;
    assert_eq!(updated.status(), StatusCode::OK);
    assert_eq!(updated.headers()["etag"], "W/\"2\"");

    let (status, read) = json(app.get("/Patient/p1").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read["meta"]["versionId"], "2");
    assert_eq!(without_meta(&read), changed);

    let (status, v1) = json(app.get("/Patient/p1/_history/1").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v1["gender"], "unknown");
    let (status, _) = json(app.get("/Patient/p1/_history/9").await).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn create_assigns_an_id_and_location() {
    let app = TestApp::start().await;
    let mut body = patient("ignored");
    body.as_object_mut().expect("object").remove("id");
    let response = app.post("/Patient", &body).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let (_, created) = json(response).await;
    let id = created["id"].as_str().expect("id");
    assert!(location.ends_with(&format!("/Patient/{id}/_history/1")));
    let (status, read) = json(
        app.client
            .get(location.replace("/_history/1", ""))
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read["id"], id);
}

#[tokio::test]
async fn delete_then_read_is_gone_and_history_shows_it() {
    let app = TestApp::start().await;
    app.put("/Patient/d1", &patient("d1")).await;
    let deleted = app.delete("/Patient/d1").await;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert_eq!(deleted.headers()["etag"], "W/\"2\"");
    let (status, outcome) = json(app.get("/Patient/d1").await).await;
    assert_eq!(status, StatusCode::GONE);
    assert_outcome(&outcome, "deleted", None);
    // Deleted resources do not match searches.
    let (_, bundle) = json(app.get("/Patient?_id=d1").await).await;
    assert_eq!(bundle["total"], 0);
    // Deleting again is harmless.
    assert_eq!(
        app.delete("/Patient/d1").await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.delete("/Patient/never").await.status(),
        StatusCode::NO_CONTENT
    );

    let (status, history) = json(app.get("/Patient/d1/_history").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(history["type"], "history");
    assert_eq!(history["total"], 2);
    assert_eq!(history["entry"][0]["request"]["method"], "DELETE");
    assert!(history["entry"][0].get("resource").is_none());
    // Created by PUT at the client's id: replaying the history must reuse that id.
    assert_eq!(history["entry"][1]["request"]["method"], "PUT");
    assert_eq!(history["entry"][1]["request"]["url"], "Patient/d1");
    assert_eq!(history["entry"][1]["resource"]["meta"]["versionId"], "1");

    // A deleted resource can be brought back by an update, as a new version.
    let back = app.put("/Patient/d1", &patient("d1")).await;
    assert_eq!(back.status(), StatusCode::CREATED);
    assert_eq!(back.headers()["etag"], "W/\"3\"");
}

#[tokio::test]
async fn type_history_lists_newest_first_with_paging() {
    let app = TestApp::start().await;
    for i in 0..5 {
        app.put(&format!("/Patient/h{i}"), &patient(&format!("h{i}")))
            .await;
    }
    app.put(
        "/Observation/o1",
        &json!({"resourceType":"Observation","id":"o1","status":"final","code":{"text":"x"}}),
    )
    .await;
    let (_, history) = json(app.get("/Patient/_history?_count=2").await).await;
    assert_eq!(history["total"], 5);
    assert_eq!(history["entry"].as_array().expect("entries").len(), 2);
    assert_eq!(history["entry"][0]["resource"]["id"], "h4");
    let next = history["link"]
        .as_array()
        .expect("links")
        .iter()
        .find(|l| l["relation"] == "next")
        .expect("next link")["url"]
        .as_str()
        .expect("url")
        .to_owned();
    let (_, page2) = json(app.client.get(next).send().await.expect("next")).await;
    assert_eq!(page2["entry"][0]["resource"]["id"], "h2");
    let (status, _) = json(app.get("/Patient/nope/_history").await).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn if_match_guards_updates_and_deletes() {
    let app = TestApp::start().await;
    app.put("/Patient/m1", &patient("m1")).await;
    let stale = app
        .request(
            Method::PUT,
            "/Patient/m1",
            Some(&patient("m1")),
            &[("if-match", "W/\"7\"")],
        )
        .await;
    let (status, outcome) = json(stale).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    assert_outcome(&outcome, "conflict", None);
    let fresh = app
        .request(
            Method::PUT,
            "/Patient/m1",
            Some(&patient("m1")),
            &[("if-match", "W/\"1\"")],
        )
        .await;
    assert_eq!(fresh.status(), StatusCode::OK);
    let stale_delete = app
        .request(
            Method::DELETE,
            "/Patient/m1",
            None,
            &[("if-match", "W/\"1\"")],
        )
        .await;
    assert_eq!(stale_delete.status(), StatusCode::PRECONDITION_FAILED);
    let (_, still) = json(app.get("/Patient/m1").await).await;
    assert_eq!(still["meta"]["versionId"], "2");
    let malformed = app
        .request(
            Method::PUT,
            "/Patient/m1",
            Some(&patient("m1")),
            &[("if-match", "seven")],
        )
        .await;
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn if_none_match_gives_not_modified() {
    let app = TestApp::start().await;
    app.put("/Patient/n1", &patient("n1")).await;
    let response = app
        .request(
            Method::GET,
            "/Patient/n1",
            None,
            &[("if-none-match", "W/\"1\"")],
        )
        .await;
    assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
    let response = app
        .request(
            Method::GET,
            "/Patient/n1",
            None,
            &[("if-none-match", "W/\"0\"")],
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn prefer_return_shapes_the_answer() {
    let app = TestApp::start().await;
    let minimal = app
        .request(
            Method::PUT,
            "/Patient/r1",
            Some(&patient("r1")),
            &[("prefer", "return=minimal")],
        )
        .await;
    assert_eq!(minimal.status(), StatusCode::CREATED);
    assert!(minimal.headers().contains_key("location"));
    assert!(minimal.bytes().await.expect("body").is_empty());
    let oo = app
        .request(
            Method::PUT,
            "/Patient/r1",
            Some(&patient("r1")),
            &[("prefer", "return=OperationOutcome")],
        )
        .await;
    let (status, body) = json(oo).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert_eq!(body["issue"][0]["severity"], "information");
    let rep = app
        .request(
            Method::PUT,
            "/Patient/r1",
            Some(&patient("r1")),
            &[("prefer", "return=representation")],
        )
        .await;
    let (_, body) = json(rep).await;
    assert_eq!(body["meta"]["versionId"], "3");
}

#[tokio::test]
async fn conditional_create_creates_once() {
    let app = TestApp::start().await;
    let mut body = patient("x");
    body.as_object_mut().expect("object").remove("id");
    let header = [("if-none-exist", "identifier=urn:test:mrn|mrn-x")];
    let first = app
        .request(Method::POST, "/Patient", Some(&body), &header)
        .await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let (_, first) = json(first).await;
    let second = app
        .request(Method::POST, "/Patient", Some(&body), &header)
        .await;
    assert_eq!(second.status(), StatusCode::OK);
    let (_, second) = json(second).await;
    assert_eq!(first["id"], second["id"]);
    let (_, bundle) = json(app.get("/Patient?identifier=urn:test:mrn|mrn-x").await).await;
    assert_eq!(bundle["total"], 1);

    // Two matches: the condition is ambiguous.
    let mut dup = patient("x");
    dup["id"] = json!("dup");
    assert_eq!(
        app.put("/Patient/dup", &dup).await.status(),
        StatusCode::CREATED
    );
    let third = app
        .request(Method::POST, "/Patient", Some(&body), &header)
        .await;
    assert_eq!(third.status(), StatusCode::PRECONDITION_FAILED);
    // An unknown parameter in a condition is refused rather than ignored.
    let bad = app
        .request(
            Method::POST,
            "/Patient",
            Some(&body),
            &[("if-none-exist", "bogus=1")],
        )
        .await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn concurrent_conditional_creates_make_one_resource() {
    let app = TestApp::start().await;
    let mut body = patient("c");
    body.as_object_mut().expect("object").remove("id");
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let client = app.client.clone();
        let url = app.fhir("/Patient");
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            client
                .post(url)
                .header("content-type", "application/fhir+json")
                .header("if-none-exist", "identifier=urn:test:mrn|mrn-c")
                .json(&body)
                .send()
                .await
                .expect("post")
                .status()
        }));
    }
    let mut created = 0;
    for t in tasks {
        let status = t.await.expect("task");
        assert!(
            status == StatusCode::CREATED || status == StatusCode::OK,
            "{status}"
        );
        if status == StatusCode::CREATED {
            created += 1;
        }
    }
    assert_eq!(created, 1);
    let (_, bundle) = json(app.get("/Patient?identifier=urn:test:mrn|mrn-c").await).await;
    assert_eq!(bundle["total"], 1);
}

#[tokio::test]
async fn conditional_update_by_identifier() {
    let app = TestApp::start().await;
    let mut body = patient("cu");
    body.as_object_mut().expect("object").remove("id");
    // No match: created with a server id.
    let first = app
        .put("/Patient?identifier=urn:test:mrn|mrn-cu", &body)
        .await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let (_, first) = json(first).await;
    // One match: that resource is updated.
    body["gender"] = json!("male");
    let second = app
        .put("/Patient?identifier=urn:test:mrn|mrn-cu", &body)
        .await;
    assert_eq!(second.status(), StatusCode::OK);
    let (_, second) = json(second).await;
    assert_eq!(second["id"], first["id"]);
    assert_eq!(second["meta"]["versionId"], "2");
    assert_eq!(second["gender"], "male");
    // A body id that contradicts the match is refused.
    body["id"] = json!("other");
    let (status, outcome) = json(
        app.put("/Patient?identifier=urn:test:mrn|mrn-cu", &body)
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&outcome, "invalid", Some("Patient.id"));
    // Several matches: 412.
    let mut other = patient("cu");
    other["id"] = json!("other2");
    assert_eq!(
        app.put("/Patient/other2", &other).await.status(),
        StatusCode::CREATED
    );
    body.as_object_mut().expect("object").remove("id");
    let (status, _) = json(
        app.put("/Patient?identifier=urn:test:mrn|mrn-cu", &body)
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
}

#[tokio::test]
async fn metadata_lists_what_is_implemented() {
    let app = TestApp::start().await;
    let (status, cs) = json(app.get("/metadata").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    let rest = &cs["rest"][0];
    let resources = rest["resource"].as_array().expect("resources");
    assert_eq!(resources.len(), 146);
    let observation = resources
        .iter()
        .find(|r| r["type"] == "Observation")
        .expect("Observation");
    let params: Vec<&str> = observation["searchParam"]
        .as_array()
        .expect("params")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for p in [
        "_id",
        "_lastUpdated",
        "identifier",
        "patient",
        "subject",
        "code",
        "category",
        "date",
        "status",
    ] {
        assert!(params.contains(&p), "Observation lacks {p}: {params:?}");
    }
    let patient = resources
        .iter()
        .find(|r| r["type"] == "Patient")
        .expect("Patient");
    let params: Vec<&str> = patient["searchParam"]
        .as_array()
        .expect("params")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(!params.contains(&"date"), "Patient has no date parameter");
    assert_eq!(observation["conditionalDelete"], "not-supported");
    let system: Vec<&str> = rest["interaction"]
        .as_array()
        .expect("interactions")
        .iter()
        .filter_map(|i| i["code"].as_str())
        .collect();
    assert_eq!(system, ["transaction", "batch"]);
    // Every advertised search parameter is accepted by the server under strict handling.
    for name in &params {
        let value = match *name {
            "_lastUpdated" => "ge2000-01-01",
            _ => "x",
        };
        let response = app
            .request(
                Method::GET,
                &format!("/Patient?{name}={value}"),
                None,
                &[("prefer", "handling=strict")],
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK, "Patient?{name}");
    }
}

#[tokio::test]
async fn decimals_and_unknown_extensions_survive() {
    let app = TestApp::start().await;
    let text = r#"{"resourceType":"Observation","id":"dec","status":"final","code":{"text":"weight"},"valueQuantity":{"value":1.50,"unit":"kg"},"extension":[{"url":"http://example.org/fhir/StructureDefinition/never-seen","valueDecimal":0.10}],"component":[{"code":{"text":"x"},"valueQuantity":{"value":100.000}}]}"#;
    let response = app
        .client
        .put(app.fhir("/Observation/dec"))
        .header("content-type", "application/fhir+json")
        .body(text)
        .send()
        .await
        .expect("put");
    assert_eq!(response.status(), StatusCode::CREATED);
    let read = app
        .get("/Observation/dec")
        .await
        .text()
        .await
        .expect("text");
    assert!(read.contains(r#""value":1.50"#), "{read}");
    assert!(read.contains(r#""valueDecimal":0.10"#), "{read}");
    assert!(read.contains(r#""value":100.000"#), "{read}");
    assert!(read.contains("never-seen"));
}

#[tokio::test]
async fn conditions_must_filter_something() {
    let app = TestApp::start().await;
    app.put("/Patient/keep", &patient("keep")).await;
    let mut other = patient("x");
    other.as_object_mut().expect("object").remove("id");
    other["gender"] = json!("male");
    for query in ["identifier=", "_count=1", "_sort=_id", "bogus=1"] {
        let (status, outcome) = json(app.put(&format!("/Patient?{query}"), &other).await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {outcome}");
        let header = [("if-none-exist", query)];
        let response = app
            .request(Method::POST, "/Patient", Some(&other), &header)
            .await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "If-None-Exist: {query}"
        );
    }
    let (_, kept) = json(app.get("/Patient/keep").await).await;
    assert_eq!(kept["meta"]["versionId"], "1");
    assert_eq!(kept["gender"], "unknown");
    let (_, count) = json(app.get("/Patient?_summary=count").await).await;
    assert_eq!(count["total"], 1);
}

#[tokio::test]
async fn conditional_update_without_match_does_not_take_over_another_id() {
    let app = TestApp::start().await;
    app.put("/Patient/keep1", &patient("keep1")).await;
    let mut body = patient("keep1");
    body["identifier"][0]["value"] = json!("someone-else");
    let (status, outcome) = json(
        app.put("/Patient?identifier=urn:test:mrn|someone-else", &body)
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{outcome}");
    let (_, kept) = json(app.get("/Patient/keep1").await).await;
    assert_eq!(kept["identifier"][0]["value"], "mrn-keep1");
    // With an id nobody has, the conditional update creates the resource there.
    body["id"] = json!("fresh");
    let response = app
        .put("/Patient?identifier=urn:test:mrn|someone-else", &body)
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(app.get("/Patient/fresh").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn conditional_update_honours_if_match() {
    let app = TestApp::start().await;
    app.put("/Patient/cm", &patient("cm")).await;
    let mut body = patient("cm");
    body.as_object_mut().expect("object").remove("id");
    let stale = app
        .request(
            Method::PUT,
            "/Patient?identifier=urn:test:mrn|mrn-cm",
            Some(&body),
            &[("if-match", "W/\"9\"")],
        )
        .await;
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);
    let fresh = app
        .request(
            Method::PUT,
            "/Patient?identifier=urn:test:mrn|mrn-cm",
            Some(&body),
            &[("if-match", "W/\"1\"")],
        )
        .await;
    assert_eq!(fresh.status(), StatusCode::OK);
}
