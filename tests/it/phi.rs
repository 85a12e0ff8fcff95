//! PHI hygiene: Synthea patients go through the real binary — synced from an EHR double, read,
//! searched by name, birth date, identifier and address, written with mistakes, sent as a
//! transaction — with the most verbose log level, and neither the captured log, the metrics
//! nor the audit log holds any of their names, birth dates, identifiers, addresses or phone
//! numbers.

use std::process::{Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::ehr_double::{FhirDouble, Flavor, Options};
use crate::helpers::read_json;
use crate::sync::{finished_job, synthea_files};

/// What identifies a patient, as it appears in the record.
fn identifying(patient: &Value) -> Vec<String> {
    let id = patient["id"].as_str().unwrap_or_default();
    let mut found = Vec::new();
    let mut add = |value: &Value| {
        if let Some(text) = value.as_str() {
            found.push(text.to_owned());
        }
    };
    for name in patient["name"].as_array().into_iter().flatten() {
        add(&name["family"]);
        for given in name["given"].as_array().into_iter().flatten() {
            add(given);
        }
    }
    add(&patient["birthDate"]);
    for identifier in patient["identifier"].as_array().into_iter().flatten() {
        // Synthea uses the resource id as one identifier; resource ids may be logged.
        if identifier["value"] != id {
            add(&identifier["value"]);
        }
    }
    for address in patient["address"].as_array().into_iter().flatten() {
        for line in address["line"].as_array().into_iter().flatten() {
            add(line);
        }
        add(&address["city"]);
        add(&address["postalCode"]);
    }
    for telecom in patient["telecom"].as_array().into_iter().flatten() {
        add(&telecom["value"]);
    }
    found
}

/// Whether `needle` occurs in `haystack` as a whole word (not inside a longer token).
fn contains_word(haystack: &str, needle: &str) -> bool {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric());
    haystack.match_indices(needle).any(|(at, _)| {
        !word(haystack[..at].chars().next_back())
            && !word(haystack[at + needle.len()..].chars().next())
    })
}

fn leaks<'a>(text: &str, phi: &'a [String]) -> Vec<&'a String> {
    phi.iter().filter(|p| contains_word(text, p)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthea_patients_leave_no_phi_in_logs_metrics_or_audit() {
    let files: Vec<_> = synthea_files().into_iter().take(4).collect();
    let ehr = FhirDouble::start(Flavor::Plain, Options::default()).await;
    let mut patients = Vec::new();
    for file in &files {
        ehr.load_synthea(file);
    }
    for resource in ehr.resources() {
        if resource["resourceType"] == "Patient" {
            patients.push(resource);
        }
    }
    assert_eq!(patients.len(), files.len());
    let phi: Vec<String> = patients.iter().flat_map(identifying).collect();
    assert!(phi.len() > 30, "{phi:?}");

    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("fhirgate.toml");
    std::fs::write(
        &config,
        format!(
            "[sources.ehr]\nkind = \"fhir\"\nbase_url = \"{}\"\n\n[sync]\ndefault_destination = \"local\"\n",
            ehr.fhir_base()
        ),
    )
    .expect("config");
    let log_path = dir.path().join("server.log");
    let port = crate::durability::free_port();
    let data = dir.path().join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("FHIRGATE_CONFIG")
        .env("FHIRGATE_SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("FHIRGATE_STORE__DATA_DIR", &data)
        // Everything, dependencies included, at their most talkative but one.
        .env("FHIRGATE_LOG__LEVEL", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log file"))
        .spawn()
        .expect("start fhirgate");
    let base = format!("http://127.0.0.1:{port}");
    let mut ready = false;
    for _ in 0..600 {
        if let Ok(answer) = reqwest::get(format!("{base}/readyz")).await {
            if answer.status() == StatusCode::OK {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "fhirgate did not start");
    let key = std::fs::read_to_string(data.join("admin-api-key")).expect("admin key");
    let client = crate::helpers::client_with(key.trim());
    let fhir = |path: &str| format!("{base}/fhir{path}");

    // Each patient's whole record, synced from the EHR.
    for patient in &patients {
        let id = patient["id"].as_str().expect("id");
        let job: Value = client
            .post(format!("{base}/sync/jobs"))
            .json(&json!({"source": "ehr", "patient": id}))
            .send()
            .await
            .expect("job")
            .json()
            .await
            .expect("job json");
        let done = finished_job(&client, &base, job["id"].as_u64().expect("id")).await;
        assert_eq!(done["state"], "completed", "{done}");
    }
    for patient in &patients {
        let id = patient["id"].as_str().expect("id");
        let name = &patient["name"][0];
        let family = name["family"].as_str().expect("family");
        let given = name["given"][0].as_str().expect("given");
        let birth = patient["birthDate"].as_str().expect("birth date");
        let ssn = patient["identifier"]
            .as_array()
            .and_then(|ids| {
                ids.iter()
                    .find(|i| i["system"] == "http://hl7.org/fhir/sid/us-ssn")
            })
            .and_then(|i| i["value"].as_str())
            .unwrap_or("000-00-0000");
        let city = patient["address"][0]["city"].as_str().unwrap_or("Boston");
        for query in [
            format!("/Patient?family={family}&given={given}&birthdate={birth}"),
            format!("/Patient?identifier=http://hl7.org/fhir/sid/us-ssn|{ssn}"),
            format!("/Patient?address-city={city}&name:contains={family}"),
            format!("/Patient/{id}"),
            format!("/Observation?patient={id}&_count=5"),
            format!("/ehr/Patient/{id}"),
            format!("/ehr/Patient?family={family}"),
        ] {
            let answer = client.get(fhir(&query)).send().await.expect("get");
            assert!(
                answer.status().as_u16() < 500,
                "{query}: {}",
                answer.status()
            );
        }
        // Writes with mistakes: the refusals echo values to the caller, never to the log.
        let mut wrong = patient.clone();
        wrong["birthDate"] = json!(format!("{birth}T99"));
        wrong["gender"] = json!(given);
        let answer = client
            .put(fhir(&format!("/Patient/{id}")))
            .header("content-type", "application/fhir+json")
            .body(wrong.to_string())
            .send()
            .await
            .expect("put");
        assert!(answer.status().is_client_error());
        let broken =
            format!("{{\"resourceType\": \"Patient\", \"name\": [{{\"family\": \"{family}\"");
        let answer = client
            .post(fhir("/Patient"))
            .header("content-type", "application/fhir+json")
            .body(broken)
            .send()
            .await
            .expect("post");
        assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
        let answer = client
            .post(fhir("/Patient"))
            .header("content-type", "application/fhir+json")
            .header(
                "If-None-Exist",
                format!("identifier=http://hl7.org/fhir/sid/us-ssn|{ssn}"),
            )
            .body(patient.to_string())
            .send()
            .await
            .expect("conditional create");
        assert!(answer.status().is_success(), "{}", answer.status());
    }
    // A whole Synthea record as a transaction.
    let mut bundle = read_json(&files[0]);
    bundle["type"] = json!("transaction");
    let answer = client
        .post(fhir(""))
        .header("content-type", "application/fhir+json")
        .body(bundle.to_string())
        .send()
        .await
        .expect("transaction");
    assert_eq!(answer.status(), StatusCode::OK);

    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let audit: Value = client
        .get(fhir("/AuditEvent?_count=1000"))
        .send()
        .await
        .expect("audit")
        .json()
        .await
        .expect("audit json");
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&log_path).expect("log");

    // The log is there and talkative: a test that read nothing would prove nothing.
    assert!(log.lines().count() > 200, "{log}");
    assert!(log.contains("\"level\":\"DEBUG\""), "no debug lines");
    assert!(
        metrics.contains("fhirgate_http_requests_total"),
        "{metrics}"
    );
    assert!(audit["entry"].as_array().is_some_and(|e| e.len() > 30));
    let in_log = leaks(&log, &phi);
    assert!(in_log.is_empty(), "PHI in the log: {in_log:?}");
    let in_metrics = leaks(&metrics, &phi);
    assert!(in_metrics.is_empty(), "PHI in the metrics: {in_metrics:?}");
    let in_audit = leaks(&audit.to_string(), &phi);
    assert!(in_audit.is_empty(), "PHI in the audit log: {in_audit:?}");
}

#[test]
fn whole_words_are_found_and_parts_of_words_are_not() {
    assert!(contains_word("family=Schaden&x", "Schaden"));
    assert!(!contains_word("Schadenfreude", "Schaden"));
    assert!(!contains_word("latency_us=1018012", "01801"));
    assert!(contains_word("zip 01801.", "01801"));
}
