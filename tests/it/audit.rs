//! The audit log: what is recorded for each kind of access, the AuditEvent view admins get,
//! and `fhirgate audit verify` finding every kind of tampering with the stored chain.

use std::path::Path;

use redb::ReadableTable;

use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};

use crate::auth::api_key;
use crate::helpers::{client_with, json, patient, TestApp};

/// Every AuditEvent the admin may see, following `next` links.
async fn all_events(app: &TestApp, query: &str) -> Vec<Value> {
    let mut url = app.fhir(&format!("/AuditEvent?{query}"));
    let mut events = Vec::new();
    loop {
        let (status, bundle) = json(app.client.get(&url).send().await.expect("search")).await;
        assert_eq!(status, StatusCode::OK, "{bundle}");
        assert_eq!(bundle["type"], "searchset");
        for entry in bundle["entry"].as_array().expect("entries") {
            events.push(entry["resource"].clone());
        }
        match bundle["link"]
            .as_array()
            .and_then(|links| links.iter().find(|l| l["relation"] == "next"))
        {
            Some(next) => url = next["url"].as_str().expect("url").to_owned(),
            None => return events,
        }
    }
}

/// `GET /audit/verify` as the admin.
async fn verify(app: &TestApp) -> (StatusCode, Value) {
    json(
        app.client
            .get(app.url("/audit/verify"))
            .send()
            .await
            .expect("verify"),
    )
    .await
}

fn entity_reference(event: &Value) -> Option<&str> {
    event["entity"][0]["what"]["reference"].as_str()
}

#[tokio::test]
async fn every_access_is_recorded_and_shown_to_admins_as_audit_events() {
    let app = TestApp::start().await;
    let mut alice = patient("p-audit");
    alice["name"] = json!([{"family": "Quixley", "given": ["Wendeline"]}]);
    alice["birthDate"] = json!("1957-04-13");
    assert_eq!(app.put("/Patient/p-audit", &alice).await.status(), 201);
    assert_eq!(app.get("/Patient/p-audit").await.status(), 200);
    assert_eq!(
        app.get("/Patient?family=Quixley&birthdate=1957-04-13")
            .await
            .status(),
        200
    );
    let observation = json!({
        "resourceType": "Observation", "status": "final",
        "code": {"text": "weight"}, "subject": {"reference": "Patient/p-audit"},
    });
    let created = app.post("/Observation", &observation).await;
    assert_eq!(created.status(), 201);
    let location = created.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    let observation_id = location
        .split("/Observation/")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("id")
        .to_owned();
    // Refused: no credentials, an unknown key, and a reader writing.
    let anonymous = Client::new();
    let refused = anonymous
        .get(app.fhir("/Patient/p-audit"))
        .send()
        .await
        .expect("get");
    assert_eq!(refused.status(), 401);
    let forged = client_with("fg_not-a-key-anyone-was-given");
    assert_eq!(
        forged
            .get(app.fhir("/Patient/p-audit"))
            .send()
            .await
            .expect("get")
            .status(),
        401
    );
    let reader = client_with(&api_key(&app, &["read-only"], &[]).await);
    let write = reader
        .put(app.fhir("/Patient/p-audit"))
        .header("content-type", "application/fhir+json")
        .body(alice.to_string())
        .send()
        .await
        .expect("put");
    assert_eq!(write.status(), 403);

    // Readers may read patients but never the audit log, whatever their scopes.
    for path in ["/AuditEvent", "/AuditEvent/1"] {
        let answer = reader.get(app.fhir(path)).send().await.expect("get");
        assert_eq!(answer.status(), 403, "{path}");
    }
    assert_eq!(
        reader
            .get(app.url("/audit/verify"))
            .send()
            .await
            .expect("get")
            .status(),
        403
    );
    // Append-only: nothing but reads.
    for method in [Method::POST, Method::PUT, Method::DELETE] {
        let path = if method == Method::POST {
            "/AuditEvent"
        } else {
            "/AuditEvent/1"
        };
        let answer = app
            .request(
                method.clone(),
                path,
                Some(&json!({"resourceType": "AuditEvent"})),
                &[],
            )
            .await;
        assert_eq!(answer.status(), 405, "{method} {path}");
    }

    let events = all_events(&app, "").await;
    let schema = fhirgate::fhir::SchemaValidator::bundled().expect("schema");
    for event in &events {
        assert!(schema.validate(event).is_ok(), "not valid R4: {event:#}");
        let text = event.to_string();
        for phi in ["Quixley", "Wendeline", "1957-04-13", "fg_"] {
            assert!(!text.contains(phi), "{phi} in {event:#}");
        }
    }
    let start = &events[0];
    assert_eq!(start["type"]["code"], "110100");
    assert_eq!(start["subtype"][0]["code"], "110120");
    assert!(start["outcomeDesc"]
        .as_str()
        .expect("desc")
        .contains("first start"));

    let find = |subtype: &str, reference: Option<&str>, outcome: &str| {
        events
            .iter()
            .find(|e| {
                e["subtype"][0]["code"] == subtype
                    && entity_reference(e) == reference
                    && e["outcome"] == outcome
            })
            .unwrap_or_else(|| panic!("no {subtype} {reference:?} {outcome} in {events:#?}"))
    };
    let update = find("update", Some("Patient/p-audit"), "0");
    assert_eq!(update["action"], "U");
    assert_eq!(update["agent"][0]["who"]["display"], "api-key:test-admin");
    assert_eq!(update["agent"][0]["network"]["address"], "127.0.0.1");
    assert_eq!(update["entity"][1]["type"]["code"], "XrequestId");
    assert_eq!(update["entity"][0]["type"]["code"], "1");
    // Recorded before it ran too, with the same request id and no outcome yet.
    let request_id = &update["entity"][1]["what"]["identifier"]["value"];
    let intent = events
        .iter()
        .find(|e| {
            e["subtype"][0]["code"] == "update"
                && e.get("outcome").is_none()
                && &e["entity"][1]["what"]["identifier"]["value"] == request_id
        })
        .expect("the update's record from before it ran");
    assert!(
        intent["id"]
            .as_str()
            .expect("id")
            .parse::<u64>()
            .expect("seq")
            < update["id"]
                .as_str()
                .expect("id")
                .parse::<u64>()
                .expect("seq")
    );
    let read = find("read", Some("Patient/p-audit"), "0");
    assert_eq!(read["action"], "R");
    let search = events
        .iter()
        .find(|e| {
            e["subtype"][0]["code"] == "search-type" && e["entity"][0]["what"]["type"] == "Patient"
        })
        .expect("search");
    assert_eq!(
        search["entity"][0]["description"],
        "params birthdate,family"
    );
    let create = find(
        "create",
        Some(format!("Observation/{observation_id}").as_str()),
        "0",
    );
    assert_eq!(create["action"], "C");
    // The refusals, with who (as far as known) and why.
    let no_credentials = events
        .iter()
        .find(|e| {
            e["agent"][0]["who"]["display"] == "unauthenticated"
                && e["subtype"][0]["code"] == "read"
        })
        .expect("refused read");
    assert_eq!(no_credentials["outcome"], "4");
    assert!(no_credentials["outcomeDesc"]
        .as_str()
        .expect("desc")
        .contains("no credentials"));
    let bad_key = events
        .iter()
        .find(|e| e["type"]["code"] == "110114")
        .expect("login failure");
    assert_eq!(bad_key["outcome"], "4");
    assert!(bad_key["outcomeDesc"]
        .as_str()
        .expect("desc")
        .contains("unknown API key"));
    let forbidden = find("update", Some("Patient/p-audit"), "4");
    assert!(forbidden["agent"][0]["who"]["display"]
        .as_str()
        .expect("who")
        .contains("read-only"));
    assert!(forbidden["outcomeDesc"]
        .as_str()
        .expect("desc")
        .starts_with("HTTP 403"));
    // Making the key was an admin action.
    assert!(events
        .iter()
        .any(|e| e["type"]["code"] == "110136" && e["outcome"] == "0"));

    // Searching the log.
    let about_patient = all_events(&app, "entity=Patient/p-audit").await;
    assert!(about_patient.len() >= 4, "{about_patient:#?}");
    assert!(about_patient
        .iter()
        .all(|e| entity_reference(e) == Some("Patient/p-audit")));
    let failures = all_events(&app, "outcome=4").await;
    assert!(failures.len() >= 4 && failures.iter().all(|e| e["outcome"] == "4"));
    let anonymous = all_events(&app, "agent=unauthenticated").await;
    assert!(!anonymous.is_empty());
    let writes = all_events(&app, "action=U&date=ge2020-01-01").await;
    assert!(writes.iter().all(|e| e["action"] == "U"));
    assert!(all_events(&app, "date=lt2020-01-01").await.is_empty());
    // Paging: two at a time finds the same events (the searches themselves add some).
    let paged = all_events(&app, "_count=2&outcome=4").await;
    assert_eq!(
        paged.iter().map(|e| e["id"].clone()).collect::<Vec<_>>(),
        failures.iter().map(|e| e["id"].clone()).collect::<Vec<_>>()
    );
    let (status, one) = json(
        app.get(&format!("/AuditEvent/{}", read["id"].as_str().expect("id")))
            .await,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(&one, read);
    assert_eq!(app.get("/AuditEvent/999999").await.status(), 404);
    let (status, outcome) = json(app.get("/AuditEvent?name=x").await).await;
    assert_eq!(status, 400, "{outcome}");
    let (status, none) = json(app.get("/AuditEvent?_count=0").await).await;
    assert_eq!(status, 200, "{none}");
    assert!(
        none["entry"].as_array().is_some_and(Vec::is_empty),
        "{none}"
    );
    assert!(
        none["link"].as_array().is_some_and(|l| l.len() == 1),
        "{none}"
    );
    // Token requests are logins, recorded whether they succeed or not.
    let token = Client::new()
        .post(app.url("/auth/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await
        .expect("token");
    assert_eq!(token.status(), 400);
    let logins = all_events(&app, "agent=token-client").await;
    assert_eq!(logins.len(), 1, "{logins:#?}");
    assert_eq!(logins[0]["type"]["code"], "110114");
    assert_eq!(logins[0]["outcome"], "4");

    let (status, verified) = verify(&app).await;
    assert_eq!(status, 200, "{verified}");
    assert_eq!(verified["intact"], true);
}

/// Runs `fhirgate audit verify` on `data_dir`: (exit code, what it printed).
fn verify_cli(data_dir: &Path) -> (i32, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .args(["audit", "verify"])
        .env("FHIRGATE_STORE__DATA_DIR", data_dir)
        .env("FHIRGATE_LOG__LEVEL", "error")
        .output()
        .expect("run fhirgate audit verify");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

const RECORDS: redb::TableDefinition<(&str, u64), &[u8]> = redb::TableDefinition::new("records");

/// A copy of the store in `from`, changed by `tamper` on the raw audit records.
fn tampered_copy(
    from: &Path,
    tamper: impl FnOnce(&mut redb::Table<(&str, u64), &[u8]>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for file in ["fhirgate.redb", "store.key"] {
        std::fs::copy(from.join(file), dir.path().join(file)).expect("copy");
    }
    let db = redb::Database::open(dir.path().join("fhirgate.redb")).expect("open");
    let txn = db.begin_write().expect("write");
    {
        let mut table = txn.open_table(RECORDS).expect("records");
        tamper(&mut table);
    }
    txn.commit().expect("commit");
    dir
}

fn payload(table: &redb::Table<(&str, u64), &[u8]>, seq: u64) -> Vec<u8> {
    table
        .get(("audit", seq))
        .expect("get")
        .expect("record")
        .value()
        .to_vec()
}

fn last_seq(table: &redb::Table<(&str, u64), &[u8]>) -> u64 {
    table
        .range(("audit", 0)..=("audit", u64::MAX))
        .expect("range")
        .next_back()
        .expect("a record")
        .expect("read")
        .0
        .value()
        .1
}

#[tokio::test]
async fn audit_verify_finds_edited_removed_reordered_and_cut_records() {
    let app = TestApp::start().await;
    for n in 0..6 {
        let id = format!("p-{n}");
        assert_eq!(
            app.put(&format!("/Patient/{id}"), &patient(&id))
                .await
                .status(),
            201
        );
        assert_eq!(app.get(&format!("/Patient/{id}")).await.status(), 200);
    }
    let data = app.stop().await;
    let (code, printed) = verify_cli(data.path());
    assert_eq!(code, 0, "{printed}");
    // The start, each PUT twice (before it ran, and its result) and each GET.
    assert!(printed.contains("intact: 19 records"), "{printed}");

    // An edited outcome.
    let edited = tampered_copy(data.path(), |table| {
        let mut record: Value = serde_json::from_slice(&payload(table, 5)).expect("json");
        record["outcome"] = json!(404);
        table
            .insert(
                ("audit", 5),
                serde_json::to_vec(&record).expect("json").as_slice(),
            )
            .expect("insert");
    });
    let (code, printed) = verify_cli(edited.path());
    assert_eq!(code, 1, "{printed}");
    assert!(
        printed.contains("BROKEN at record 5") && printed.contains("edited"),
        "{printed}"
    );

    // An edit whose author also recomputed the record's own hash: the next record's link breaks.
    let rehashed = tampered_copy(data.path(), |table| {
        let mut record: fhirgate::audit::Record =
            serde_json::from_slice(&payload(table, 5)).expect("record");
        record.entry.who = "someone-else".into();
        record.hash = record.compute_hash();
        table
            .insert(
                ("audit", 5),
                serde_json::to_vec(&record).expect("json").as_slice(),
            )
            .expect("insert");
    });
    let (code, printed) = verify_cli(rehashed.path());
    assert_eq!(code, 1, "{printed}");
    assert!(printed.contains("BROKEN at record 6"), "{printed}");

    // A record removed from the middle.
    let removed = tampered_copy(data.path(), |table| {
        table.remove(("audit", 7)).expect("remove");
    });
    let (code, printed) = verify_cli(removed.path());
    assert_eq!(code, 1, "{printed}");
    assert!(printed.contains("removed or reordered"), "{printed}");

    // Two records swapped.
    let reordered = tampered_copy(data.path(), |table| {
        let (four, five) = (payload(table, 4), payload(table, 5));
        table.insert(("audit", 4), five.as_slice()).expect("insert");
        table.insert(("audit", 5), four.as_slice()).expect("insert");
    });
    let (code, printed) = verify_cli(reordered.path());
    assert_eq!(code, 1, "{printed}");
    assert!(printed.contains("BROKEN at record 4"), "{printed}");

    // The newest record cut off.
    let cut = tampered_copy(data.path(), |table| {
        let last = last_seq(table);
        table.remove(("audit", last)).expect("remove");
    });
    let (code, printed) = verify_cli(cut.path());
    assert_eq!(code, 1, "{printed}");
    assert!(printed.contains("removed from the end"), "{printed}");

    // The untouched store is still intact, and a restarted server continues the chain.
    let app = TestApp::start_in(data, |_| {}).await;
    assert_eq!(app.get("/Patient/p-0").await.status(), 200);
    let (status, verified) = verify(&app).await;
    assert_eq!(status, 200, "{verified}");
    assert_eq!(verified["records"], 21, "{verified}");
    let events = all_events(&app, "subtype=110120").await;
    assert_eq!(events.len(), 2);
    assert!(events[1]["outcomeDesc"]
        .as_str()
        .expect("desc")
        .contains("unchanged"));
}
