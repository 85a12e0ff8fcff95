//! The 20 Synthea patient bundles load as transactions and searches by patient return exactly
//! each patient's resources.

use std::collections::{BTreeMap, BTreeSet};

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{fixtures, json, read_json, TestApp};

/// How each resource type in the bundles points at its patient (written from the R4 spec's
/// search parameter definitions, independently of the server's table).
fn patient_element(resource_type: &str) -> Option<&'static str> {
    match resource_type {
        "Observation" | "Encounter" | "Condition" | "Procedure" | "MedicationRequest"
        | "DiagnosticReport" | "CarePlan" | "Goal" | "ImagingStudy" => Some("subject"),
        "Claim" | "ExplanationOfBenefit" | "Immunization" | "AllergyIntolerance" => Some("patient"),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthea_bundles_load_and_search_by_patient() {
    let app = TestApp::start().await;
    let mut dir: Vec<_> = std::fs::read_dir(fixtures().join("synthea"))
        .expect("synthea fixtures")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    dir.sort();
    assert_eq!(dir.len(), 20);

    let mut total_resources = 0;
    let mut expected_by_code: BTreeMap<String, usize> = BTreeMap::new();
    for path in &dir {
        let bundle = read_json(path);
        let entries = bundle["entry"].as_array().expect("entries");
        let (status, response) = json(app.post("", &bundle).await).await;
        assert_eq!(status, StatusCode::OK, "{}: {response}", path.display());
        let answers = response["entry"].as_array().expect("response entries");
        assert_eq!(answers.len(), entries.len());
        assert!(answers
            .iter()
            .all(|a| a["response"]["status"] == "201 Created"));
        total_resources += entries.len();

        // fullUrl → assigned id, from the response locations.
        let assigned: BTreeMap<&str, String> = entries
            .iter()
            .zip(answers)
            .map(|(e, a)| {
                let location = a["response"]["location"].as_str().expect("location");
                (
                    e["fullUrl"].as_str().expect("fullUrl"),
                    location.split('/').nth(1).expect("id").to_owned(),
                )
            })
            .collect();
        let patient_entry = entries
            .iter()
            .find(|e| e["resource"]["resourceType"] == "Patient")
            .expect("a patient");
        let patient_url = patient_entry["fullUrl"].as_str().expect("fullUrl");
        let patient_id = &assigned[patient_url];

        // Expected: per type, the ids of resources whose patient element points at this patient.
        let mut expected: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for e in entries {
            let r = &e["resource"];
            let rt = r["resourceType"].as_str().expect("type");
            if rt == "Observation" {
                for coding in r["code"]["coding"].as_array().into_iter().flatten() {
                    if coding["system"] == "http://loinc.org" {
                        *expected_by_code
                            .entry(coding["code"].as_str().expect("code").to_owned())
                            .or_default() += 1;
                    }
                }
            }
            if let Some(element) = patient_element(rt) {
                if r[element]["reference"].as_str() == Some(patient_url) {
                    expected
                        .entry(rt)
                        .or_default()
                        .insert(assigned[e["fullUrl"].as_str().expect("fullUrl")].clone());
                }
            }
        }
        assert!(expected.len() >= 5, "the bundle covers several types");
        for (rt, want) in &expected {
            let (status, found) = json(
                app.get(&format!("/{rt}?patient={patient_id}&_count=1000"))
                    .await,
            )
            .await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(
                found["total"].as_u64(),
                Some(want.len() as u64),
                "{rt} of {}",
                path.display()
            );
            let got: BTreeSet<String> = found["entry"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| e["resource"]["id"].as_str().expect("id").to_owned())
                .collect();
            assert_eq!(&got, want, "{rt} of {}", path.display());
            // References were rewritten from urn:uuid to the assigned id.
            if let Some(first) = found["entry"].as_array().and_then(|e| e.first()) {
                let element = patient_element(rt).expect("element");
                assert_eq!(
                    first["resource"][element]["reference"],
                    Value::String(format!("Patient/{patient_id}"))
                );
            }
        }
    }
    assert_eq!(total_resources, 3581);
    let (_, patients) = json(app.get("/Patient?_summary=count").await).await;
    assert_eq!(patients["total"], 20);
    for (code, count) in expected_by_code.iter().take(15) {
        let (_, found) = json(
            app.get(&format!(
                "/Observation?code=http://loinc.org|{code}&_summary=count"
            ))
            .await,
        )
        .await;
        assert_eq!(found["total"].as_u64(), Some(*count as u64), "LOINC {code}");
    }
}
