//! Search parameters, paging, sorting and counts.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{json, patient, TestApp};

async fn ids(app: &TestApp, query: &str) -> Vec<String> {
    let (status, bundle) = json(app.get(query).await).await;
    assert_eq!(status, StatusCode::OK, "{query}: {bundle}");
    assert_eq!(bundle["type"], "searchset");
    let mut ids: Vec<String> = bundle["entry"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|e| e["search"]["mode"] == "match")
                .filter_map(|e| e["resource"]["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        bundle["total"].as_u64(),
        Some(ids.len() as u64),
        "{query}: total vs entries"
    );
    ids.sort();
    ids
}

async fn seed(app: &TestApp) {
    for (id, subject, code, date, status) in [
        ("o1", "Patient/a", "8302-6", "2021-01-10T10:00:00Z", "final"),
        ("o2", "Patient/a", "29463-7", "2021-02-10", "final"),
        ("o3", "Patient/b", "8302-6", "2022-03", "amended"),
        ("o4", "Group/g", "8302-6", "2020", "preliminary"),
    ] {
        let obs = json!({"resourceType":"Observation","id":id,"status":status,
            "category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}]}],
            "code":{"coding":[{"system":"http://loinc.org","code":code}]},
            "subject":{"reference":subject},"effectiveDateTime":date});
        assert_eq!(
            app.put(&format!("/Observation/{id}"), &obs).await.status(),
            StatusCode::CREATED
        );
    }
    let enc = json!({"resourceType":"Encounter","id":"e1","status":"finished","class":{"code":"AMB"},
        "subject":{"reference":"Patient/a"},"period":{"start":"2021-05-01T09:00:00Z","end":"2021-05-03T09:00:00Z"}});
    app.put("/Encounter/e1", &enc).await;
    let cond = json!({"resourceType":"Condition","id":"c1","subject":{"reference":"Patient/a"},
        "code":{"coding":[{"system":"http://snomed.info/sct","code":"279039007"}]},"onsetDateTime":"2019-06-01"});
    app.put("/Condition/c1", &cond).await;
    let proc = json!({"resourceType":"Procedure","id":"p1","status":"completed","subject":{"reference":"Patient/b"},
        "code":{"text":"PT"},"performedPeriod":{"start":"2021-01-01","end":"2021-03-01"}});
    app.put("/Procedure/p1", &proc).await;
}

#[tokio::test]
async fn reference_token_and_date_parameters() {
    let app = TestApp::start().await;
    seed(&app).await;
    assert_eq!(ids(&app, "/Observation?patient=a").await, ["o1", "o2"]);
    assert_eq!(
        ids(&app, "/Observation?patient=Patient/a").await,
        ["o1", "o2"]
    );
    assert_eq!(ids(&app, "/Observation?subject=Patient/b").await, ["o3"]);
    assert_eq!(ids(&app, "/Observation?subject=g").await, ["o4"]);
    assert!(
        ids(&app, "/Observation?patient=g").await.is_empty(),
        "patient only follows Patient references"
    );
    assert_eq!(
        ids(&app, "/Observation?code=http://loinc.org|8302-6").await,
        ["o1", "o3", "o4"]
    );
    assert_eq!(
        ids(&app, "/Observation?code=8302-6,29463-7&patient=a").await,
        ["o1", "o2"]
    );
    assert_eq!(ids(&app, "/Observation?code:not=8302-6").await, ["o2"]);
    assert_eq!(
        ids(&app, "/Observation?category=vital-signs&status=final").await,
        ["o1", "o2"]
    );
    assert_eq!(
        ids(&app, "/Observation?status=amended,preliminary").await,
        ["o3", "o4"]
    );
    assert_eq!(ids(&app, "/Observation?date=2021").await, ["o1", "o2"]);
    assert_eq!(
        ids(&app, "/Observation?date=ge2021-02-01&date=lt2023").await,
        ["o2", "o3"]
    );
    assert_eq!(ids(&app, "/Observation?date=gt2021-12-31").await, ["o3"]);
    assert_eq!(ids(&app, "/Observation?date=le2020-12-31").await, ["o4"]);
    assert_eq!(ids(&app, "/Observation?date=ne2021").await, ["o3", "o4"]);
    assert_eq!(ids(&app, "/Observation?date=sa2021-06-01").await, ["o3"]);
    assert_eq!(ids(&app, "/Observation?date=eb2021-01-01").await, ["o4"]);
    assert_eq!(
        ids(&app, "/Encounter?date=2021-05-02").await,
        Vec::<String>::new(),
        "the period is not inside that day"
    );
    assert_eq!(ids(&app, "/Encounter?date=2021-05").await, ["e1"]);
    assert_eq!(ids(&app, "/Encounter?date=gt2021-05-02").await, ["e1"]);
    assert_eq!(ids(&app, "/Condition?date=lt2020").await, ["c1"]);
    assert_eq!(ids(&app, "/Procedure?date=ge2021-02-01").await, ["p1"]);
    assert_eq!(
        ids(&app, "/Procedure?patient=b&status=completed").await,
        ["p1"]
    );
    assert_eq!(ids(&app, "/Observation?_id=o1,o3").await, ["o1", "o3"]);
    assert_eq!(
        ids(&app, "/Observation?code:missing=false&_id=o2").await,
        ["o2"]
    );
}

#[tokio::test]
async fn identifier_search_and_updates_move_index_entries() {
    let app = TestApp::start().await;
    app.put("/Patient/i1", &patient("i1")).await;
    app.put("/Patient/i2", &patient("i2")).await;
    assert_eq!(
        ids(&app, "/Patient?identifier=urn:test:mrn|mrn-i1").await,
        ["i1"]
    );
    assert_eq!(ids(&app, "/Patient?identifier=mrn-i2").await, ["i2"]);
    assert_eq!(
        ids(&app, "/Patient?identifier=urn:test:mrn|").await,
        ["i1", "i2"]
    );
    assert!(
        ids(&app, "/Patient?identifier=|mrn-i1").await.is_empty(),
        "the identifier has a system"
    );
    // Changing the identifier moves the resource in the index.
    let mut changed = patient("i1");
    changed["identifier"][0]["value"] = json!("mrn-new");
    app.put("/Patient/i1", &changed).await;
    assert!(ids(&app, "/Patient?identifier=urn:test:mrn|mrn-i1")
        .await
        .is_empty());
    assert_eq!(
        ids(&app, "/Patient?identifier=urn:test:mrn|mrn-new").await,
        ["i1"]
    );
    app.delete("/Patient/i1").await;
    assert!(ids(&app, "/Patient?identifier=urn:test:mrn|mrn-new")
        .await
        .is_empty());
}

#[tokio::test]
async fn last_updated_sort_and_paging() {
    let app = TestApp::start().await;
    for i in 0..7 {
        app.put(&format!("/Patient/s{i}"), &patient(&format!("s{i}")))
            .await;
    }
    // Touch s2 last.
    app.put("/Patient/s2", &patient("s2")).await;
    let (_, bundle) = json(app.get("/Patient?_sort=-_lastUpdated&_count=3").await).await;
    let page: Vec<&str> = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["resource"]["id"].as_str())
        .collect();
    assert_eq!(page, ["s2", "s6", "s5"]);
    assert_eq!(bundle["total"], 7);

    // Follow `next` links until the end: every resource exactly once.
    let mut seen = Vec::new();
    let mut url = Some(app.fhir("/Patient?_sort=_lastUpdated&_count=3"));
    let mut pages = 0;
    while let Some(u) = url {
        let (_, b) = json(app.client.get(&u).send().await.expect("page")).await;
        for e in b["entry"].as_array().into_iter().flatten() {
            seen.push(e["resource"]["id"].as_str().expect("id").to_owned());
        }
        url = b["link"]
            .as_array()
            .expect("links")
            .iter()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str().map(str::to_owned));
        pages += 1;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 7);
    assert_eq!(seen.last().map(String::as_str), Some("s2"));

    let (_, count) = json(app.get("/Patient?_summary=count").await).await;
    assert_eq!(count["total"], 7);
    assert!(count.get("entry").is_none());

    // _lastUpdated against the stored instants.
    let (_, s2) = json(app.get("/Patient/s2").await).await;
    let at = s2["meta"]["lastUpdated"].as_str().expect("instant");
    assert_eq!(
        ids(&app, &format!("/Patient?_lastUpdated=ge{at}")).await,
        ["s2"]
    );
    assert_eq!(
        ids(&app, &format!("/Patient?_lastUpdated=lt{at}"))
            .await
            .len(),
        6
    );
}

#[tokio::test]
async fn post_search_and_includes_of_count_zero() {
    let app = TestApp::start().await;
    seed(&app).await;
    let response = app
        .client
        .post(app.fhir("/Observation/_search"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("patient=a&code=8302-6")
        .send()
        .await
        .expect("post");
    let (status, bundle): (StatusCode, Value) = json(response).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bundle["total"], 1);
    let (_, bundle) = json(app.get("/Observation?_count=0").await).await;
    assert_eq!(bundle["total"], 4);
    assert!(bundle.get("entry").is_none());
}
