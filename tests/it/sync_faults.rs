//! Sync through faults: outages, token trouble, throttling, failing and timing-out writes,
//! resources the destination refuses, broken paging. Every good resource arrives exactly once
//! per version; what fails is a dead letter with its reason, and can be retried.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use fhirgate::config::{ClientAuthMethod, DestinationKind, SourceKind};
use reqwest::StatusCode;
use serde_json::json;

use crate::ehr_double::{Auth, BrokenLink, BrokenNext, Faults, FhirDouble, Flavor, Options};
use crate::helpers::{json, TestApp};
use crate::sync::{
    azure_destination, azure_double, dead_letters, destination, finished_job, oauth, quick_retries,
    run_job, source_for, start_job, synthea_files, types_of,
};

/// Writes per `(type, id, source version)` at a destination double.
fn arrivals(double: &FhirDouble) -> BTreeMap<(String, String, String), usize> {
    let mut counts = BTreeMap::new();
    for write in double.writes() {
        let version = write.body["meta"]["versionId"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        *counts
            .entry((write.resource_type.clone(), write.id.clone(), version))
            .or_default() += 1;
    }
    counts
}

/// Every resource of `source` arrived at `sink` exactly once, and nothing else did (except
/// the ids in `except`, which must not have arrived).
fn assert_exactly_once(source: &FhirDouble, sink: &FhirDouble, except: &[&str]) {
    let arrived = arrivals(sink);
    let mut expected = 0;
    for resource in source.resources() {
        let id = resource["id"].as_str().expect("id").to_owned();
        let key = (
            resource["resourceType"].as_str().expect("type").to_owned(),
            id.clone(),
            resource["meta"]["versionId"]
                .as_str()
                .expect("version")
                .to_owned(),
        );
        if except.contains(&id.as_str()) {
            assert!(
                !arrived.contains_key(&key),
                "{key:?} should have been refused"
            );
            continue;
        }
        expected += 1;
        assert_eq!(
            arrived.get(&key),
            Some(&1),
            "{key:?} arrived {:?} times",
            arrived.get(&key)
        );
    }
    assert_eq!(arrived.len(), expected, "nothing else arrived");
}

async fn plain_source(patients: usize) -> FhirDouble {
    let double = FhirDouble::start(Flavor::Plain, Options::default()).await;
    for file in &synthea_files()[..patients] {
        double.load_synthea(file);
    }
    double
}

/// A plain FHIR server double as a destination, with `faults`.
async fn plain_sink(faults: Faults) -> FhirDouble {
    FhirDouble::start(
        Flavor::Plain,
        Options {
            faults,
            ..Options::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_and_timing_out_writes_lose_nothing_and_duplicate_nothing() {
    let source_double = plain_source(4).await;
    let all = source_double.resources();
    let rejected = all
        .iter()
        .find(|r| r["resourceType"] == "Observation")
        .and_then(|r| r["id"].as_str())
        .expect("an observation")
        .to_owned();
    let azure = azure_double(Faults {
        seed: 7,
        unavailable: 0.20,
        timeouts: 0.05,
        lost_answers: 0.05,
        timeout_delay: Duration::from_millis(2500),
        rejected_ids: HashSet::from([rejected.clone()]),
        ..Faults::default()
    })
    .await;
    let source = source_for(&source_double, SourceKind::Fhir, None);
    let mut azure_config = azure_destination(&azure);
    azure_config.batch_size = Some(20);
    azure_config.timeout_secs = 1;
    let app = TestApp::start_with(|config| {
        quick_retries(config);
        config.sources.insert("ehr".into(), source);
        // Its own name: metrics are process-wide, and other tests sync to "azure" too.
        config
            .destinations
            .insert("azure-faults".into(), azure_config);
    })
    .await;
    let job = run_job(
        &app,
        json!({"source": "ehr", "destination": "azure-faults", "types": types_of(&all)}),
    )
    .await;
    assert_eq!(job["state"], "completed-with-errors", "{job}");
    assert_eq!(job["counts"]["failed"], 1, "{job}");
    assert_eq!(job["counts"]["done"], all.len() as u64 - 1, "{job}");
    assert!(
        job["counts"]["retried"].as_u64().expect("retried") > 0,
        "{job}"
    );
    assert!(azure.requests_with_status(503) > 0);
    // Answers lost after the write was applied were found at the destination, not re-sent.
    assert!(
        job["counts"]["verified"].as_u64().expect("verified") > 0,
        "{job}"
    );
    assert_exactly_once(&source_double, &azure, &[&rejected]);

    // The refusal is a dead letter with the destination's OperationOutcome.
    let letters = dead_letters(&app).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter["kind"], "resource");
    assert_eq!(letter["resourceId"], rejected.as_str());
    assert_eq!(letter["status"], 422);
    assert_eq!(letter["outcome"]["resourceType"], "OperationOutcome");
    assert!(
        letter["reason"].as_str().expect("reason").contains("422"),
        "{letter}"
    );

    // Once the destination takes it, a retry delivers it and the job completes.
    azure.set_faults(Faults::default());
    let id = letter["id"].as_u64().expect("id");
    let (status, retried) = json(
        app.client
            .post(app.url(&format!("/sync/dead-letters/{id}/retry")))
            .send()
            .await
            .expect("retry"),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{retried}");
    let job = finished_job(&app.client, &app.base, retried["id"].as_u64().expect("job")).await;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["counts"]["failed"], 0);
    assert!(dead_letters(&app).await.is_empty());
    assert_exactly_once(&source_double, &azure, &[]);

    let metrics = crate::helpers::metrics(&app).await;
    for name in [
        "fhirgate_remote_requests_total{remote=\"azure-faults\",status=\"error\"}",
        "fhirgate_sync_resources_total{destination=\"azure-faults\",type=\"Observation\",outcome=\"done\"}",
        "fhirgate_sync_dead_letters_total",
        "fhirgate_sync_queue_depth{destination=\"azure-faults\"} 0",
        "fhirgate_sync_batch_duration_seconds",
        "fhirgate_sync_verified_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_honoured_and_everything_arrives_once() {
    let source_double = plain_source(1).await;
    let azure = azure_double(Faults::default()).await;
    azure.throttle_next(2, 1);
    let source = source_for(&source_double, SourceKind::Fhir, None);
    let mut azure_config = azure_destination(&azure);
    azure_config.concurrency = 1;
    let app = TestApp::start_with(|config| {
        quick_retries(config);
        config.sources.insert("ehr".into(), source);
        config.destinations.insert("azure".into(), azure_config);
    })
    .await;
    let all = source_double.resources();
    let job = run_job(
        &app,
        json!({"source": "ehr", "destination": "azure", "types": types_of(&all)}),
    )
    .await;
    assert_eq!(job["state"], "completed", "{job}");
    assert!(job["counts"]["retried"].as_u64().expect("retried") > 0);
    assert_eq!(azure.requests_with_status(429), 2);
    assert_exactly_once(&source_double, &azure, &[]);
    // After each 429 with `Retry-After: 1`, the next request came no sooner than a second
    // later (a lower bound: a slow machine only makes the gap longer).
    let requests: Vec<_> = azure
        .recorded_requests()
        .into_iter()
        .filter(|r| !r.path.contains("oauth2"))
        .collect();
    let mut checked = 0;
    for pair in requests.windows(2) {
        if pair[0].status == 429 {
            let gap = pair[1].at.duration_since(pair[0].at);
            assert!(
                gap >= Duration::from_millis(950),
                "only {gap:?} after a 429"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_trouble_is_retried_refused_tokens_are_refreshed_and_a_dead_endpoint_is_reported() {
    let source_double = FhirDouble::start(
        Flavor::openemr(),
        Options {
            auth: Some(Auth::private_key_jwt("fhirgate-system")),
            ..Options::default()
        },
    )
    .await;
    source_double.load_synthea(&synthea_files()[0]);
    let all = source_double.resources();
    let azure = azure_double(Faults::default()).await;
    let source = source_for(
        &source_double,
        SourceKind::Openemr,
        Some(oauth(
            ClientAuthMethod::PrivateKeyJwt,
            "fhirgate-system",
            None,
        )),
    );
    let azure_config = azure_destination(&azure);
    let app = TestApp::start_with(|config| {
        quick_retries(config);
        config.sources.insert("openemr-tokens".into(), source);
        config.destinations.insert("azure".into(), azure_config);
    })
    .await;

    // The token endpoint fails twice with 500, then works: the sync just takes longer.
    source_double.fail_token_requests(500, Some(2));
    let job = run_job(
        &app,
        json!({"source": "openemr-tokens", "destination": "azure", "types": "Patient"}),
    )
    .await;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(source_double.token_requests(), 3);

    // Tokens revoked mid-run (both sides): a 401 drops the cached token, a new one is fetched
    // and the request sent again.
    source_double.expire_all_tokens();
    azure.expire_all_tokens();
    let azure_tokens = azure.token_requests();
    let job = run_job(
        &app,
        json!({"source": "openemr-tokens", "destination": "azure", "types": "Observation"}),
    )
    .await;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(source_double.token_requests(), 4);
    assert_eq!(azure.token_requests(), azure_tokens + 1);

    // The token endpoint refuses for good: the page is a dead letter saying why.
    source_double.expire_all_tokens();
    source_double.fail_token_requests(401, None);
    let job = run_job(
        &app,
        json!({"source": "openemr-tokens", "destination": "azure", "types": "Condition"}),
    )
    .await;
    assert_eq!(job["state"], "completed-with-errors", "{job}");
    assert_eq!(job["counts"]["failedPages"], 1);
    let letters = dead_letters(&app).await;
    let page = letters
        .iter()
        .find(|l| l["kind"] == "page")
        .expect("page dead letter");
    assert!(
        page["reason"]
            .as_str()
            .expect("reason")
            .contains("token endpoint answered 401"),
        "{page}"
    );
    let metrics = crate::helpers::metrics(&app).await;
    assert!(metrics.contains("fhirgate_remote_auth_failures_total{remote=\"openemr-tokens\"}"));

    // Retrying after the endpoint recovers reads the page and completes the job.
    source_double.clear_token_fault();
    let id = page["id"].as_u64().expect("id");
    let (status, _) = json(
        app.client
            .post(app.url(&format!("/sync/dead-letters/{id}/retry")))
            .send()
            .await
            .expect("retry"),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let job = finished_job(&app.client, &app.base, job["id"].as_u64().expect("id")).await;
    assert_eq!(job["state"], "completed", "{job}");
    let conditions = all
        .iter()
        .filter(|r| r["resourceType"] == "Condition")
        .count() as u64;
    assert_eq!(job["counts"]["done"], conditions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_source_and_destination_become_dead_letters() {
    let closed = format!("http://127.0.0.1:{}", crate::durability::free_port());
    let source_double = plain_source(1).await;
    let mut gone_source = source_for(&source_double, SourceKind::Fhir, None);
    gone_source.base_url = Some(format!("{closed}/fhir"));
    let good_source = source_for(&source_double, SourceKind::Fhir, None);
    let app = TestApp::start_with(|config| {
        quick_retries(config);
        config.sync.max_attempts = 3;
        config.sources.insert("gone".into(), gone_source);
        config.sources.insert("ehr".into(), good_source);
        config.destinations.insert(
            "nowhere".into(),
            destination(DestinationKind::Fhir, Some(format!("{closed}/fhir"))),
        );
    })
    .await;
    let job = run_job(
        &app,
        json!({"source": "gone", "destination": "local", "types": "Patient"}),
    )
    .await;
    assert_eq!(job["state"], "completed-with-errors", "{job}");
    assert_eq!(job["counts"]["failedPages"], 1);
    let letters = dead_letters(&app).await;
    assert!(
        letters[0]["reason"]
            .as_str()
            .expect("reason")
            .contains("connection failed"),
        "{letters:?}"
    );

    let job = run_job(
        &app,
        json!({"source": "ehr", "destination": "nowhere", "types": "Patient"}),
    )
    .await;
    assert_eq!(job["state"], "completed-with-errors", "{job}");
    assert_eq!(job["counts"]["failed"], 1);
    let letters = dead_letters(&app).await;
    let resource = letters
        .iter()
        .find(|l| l["kind"] == "resource")
        .expect("resource letter");
    assert_eq!(resource["resourceType"], "Patient");
    assert_eq!(resource["attempts"], 3);
    assert!(
        resource["reason"]
            .as_str()
            .expect("reason")
            .contains("gave up after 3 attempts"),
        "{resource}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_next_link_is_a_dead_letter_and_the_other_pages_arrive() {
    let source_double = FhirDouble::start(
        Flavor::Plain,
        Options {
            faults: Faults {
                broken_next: Some(BrokenNext {
                    page: 2,
                    link: BrokenLink::NotFound,
                }),
                ..Faults::default()
            },
            ..Options::default()
        },
    )
    .await;
    source_double.load_synthea(&synthea_files()[0]);
    let observations = source_double
        .resources()
        .iter()
        .filter(|r| r["resourceType"] == "Observation")
        .count() as u64;
    assert!(observations > 150);
    let mut source = source_for(&source_double, SourceKind::Fhir, None);
    source.page_size = 50;
    let app = TestApp::start_with(|config| {
        quick_retries(config);
        config.sources.insert("ehr".into(), source);
    })
    .await;
    let job = run_job(
        &app,
        json!({"source": "ehr", "destination": "local", "types": "Patient,Observation"}),
    )
    .await;
    assert_eq!(job["state"], "completed-with-errors", "{job}");
    assert_eq!(job["counts"]["failedPages"], 1);
    // The patient and the first two pages of observations arrived.
    assert_eq!(job["types"]["Observation"]["done"], 100, "{job}");
    assert_eq!(job["types"]["Patient"]["done"], 1);
    let letters = dead_letters(&app).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["kind"], "page");
    assert_eq!(letters[0]["status"], 404);
    assert!(letters[0]["url"].as_str().is_some(), "{}", letters[0]);

    // The broken link stays broken; once the source pages properly again, a fresh run fills
    // the gap and skips what already arrived.
    source_double.set_faults(Faults::default());
    let job = run_job(&app, json!({"source": "ehr", "destination": "local", "types": "Observation", "since": "2000-01-01"})).await;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(
        job["types"]["Observation"]["done"],
        observations - 100,
        "{job}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_the_destination_finds_invalid_is_a_dead_letter_and_the_rest_arrive() {
    let source_double = plain_source(1).await;
    let mut bad = crate::helpers::patient("bad-gender");
    bad["gender"] = json!("robot");
    source_double.put_resource(bad);
    let source = source_for(&source_double, SourceKind::Fhir, None);
    let app = TestApp::start_with(|config| {
        config.sources.insert("ehr".into(), source);
    })
    .await;
    let job = run_job(
        &app,
        json!({"source": "ehr", "destination": "local", "types": "Patient,Encounter"}),
    )
    .await;
    assert_eq!(job["state"], "completed-with-errors", "{job}");
    assert_eq!(
        job["types"]["Patient"],
        json!({"done": 1, "skipped": 0, "failed": 1})
    );
    let letters = dead_letters(&app).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["resourceId"], "bad-gender");
    assert_eq!(letters[0]["status"], 422);
    let issue = &letters[0]["outcome"]["issue"][0];
    assert_eq!(issue["expression"][0], "Patient.gender", "{}", letters[0]);
    let (status, _) = json(app.get("/Patient/bad-gender").await).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_interrupted_by_a_restart_resumes_where_it_was() {
    // In-process stop (graceful) in the middle: what is queued is delivered after the start.
    let source_double = plain_source(3).await;
    let all = source_double.resources();
    let sink = plain_sink(Faults {
        write_delay: Duration::from_millis(20),
        ..Faults::default()
    })
    .await;
    let source = source_for(&source_double, SourceKind::Fhir, None);
    let mut plain = destination(DestinationKind::Fhir, Some(sink.fhir_base()));
    plain.batch_size = Some(10);
    plain.concurrency = 1;
    let configure = move |config: &mut fhirgate::config::Config| {
        config.sources.insert("ehr".into(), source.clone());
        config.destinations.insert("store".into(), plain.clone());
        config.server.shutdown_grace_secs = 1;
    };
    let app = TestApp::start_with(configure.clone()).await;
    let id = start_job(
        &app,
        json!({"source": "ehr", "destination": "store", "types": types_of(&all)}),
    )
    .await;
    for _ in 0..2000 {
        if sink.writes().len() >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let data = app.stop().await;
    let delivered_before = sink.writes().len();
    assert!(delivered_before < all.len(), "stopped in the middle");

    let app = TestApp::start_in(data, configure).await;
    let job = finished_job(&app.client, &app.base, id).await;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["counts"]["done"], all.len() as u64, "{job}");
    assert_exactly_once(&source_double, &sink, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_killed_with_sigkill_resumes_and_delivers_each_version_once() {
    let source_double = FhirDouble::start(Flavor::Plain, Options::default()).await;
    source_double.put_resource(crate::helpers::patient("kill-test"));
    for n in 0..4999 {
        source_double.put_resource(json!({
            "resourceType": "Observation",
            "id": format!("obs-{n}"),
            "status": "final",
            "code": {"text": "synthetic measurement"},
            "subject": {"reference": "Patient/kill-test"},
            "valueQuantity": {"value": n, "unit": "mg"}
        }));
    }
    // The destination takes 1,000 writes, then holds every further one: the kill lands in the
    // middle of the sync, with deliveries in flight, whatever the machine's speed.
    let sink = plain_sink(Faults {
        hold_after: Some(1000),
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("fhirgate.toml");
    std::fs::write(
        &config,
        format!(
            "[sources.ehr]\nkind = \"fhir\"\nbase_url = \"{}\"\npage_size = 500\n\n\
             [destinations.store]\nkind = \"fhir\"\nbase_url = \"{}\"\nbatch_size = 50\nconcurrency = 2\n",
            source_double.fhir_base(),
            sink.fhir_base()
        ),
    )
    .expect("config");
    let data = dir.path().join("data");
    let port = crate::durability::free_port();
    let mut server = crate::durability::start_binary(&data, Some(&config), port).await;
    let client = server.client();
    let (status, job) = json(
        client
            .post(format!("{}/sync/jobs", server.base))
            .json(&json!({"source": "ehr", "destination": "store", "types": "Patient,Observation"}))
            .send()
            .await
            .expect("job"),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let id = job["id"].as_u64().expect("id");
    for _ in 0..4000 {
        if sink.writes().len() >= 1000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    server.child.kill().expect("SIGKILL");
    server.child.wait().expect("reaped");
    let before = sink.writes().len();
    assert!(
        (1000..5000).contains(&before),
        "killed in the middle: {before} written"
    );
    // The destination takes writes again; the held ones of the dead process are refused.
    sink.set_faults(Faults::default());

    let server = crate::durability::start_binary(&data, Some(&config), port).await;
    let job = finished_job(&client, &server.base, id).await;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["counts"]["done"], 5000, "{job}");
    assert_exactly_once(&source_double, &sink, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_jobs_deliver_each_version_once_and_both_finish() {
    let source_double = plain_source(2).await;
    // A third of the writes fail: entries of one job retry while another job's entries for
    // the same resources wait behind them.
    let sink = plain_sink(Faults {
        write_delay: Duration::from_millis(5),
        unavailable: 0.3,
        seed: 11,
        ..Faults::default()
    })
    .await;
    let source = source_for(&source_double, SourceKind::Fhir, None);
    let mut plain = destination(DestinationKind::Fhir, Some(sink.fhir_base()));
    plain.batch_size = Some(25);
    let app = TestApp::start_with(|config| {
        quick_retries(config);
        config.sources.insert("ehr".into(), source);
        config.destinations.insert("store".into(), plain);
    })
    .await;
    let all = source_double.resources();
    let patient = all
        .iter()
        .find(|r| r["resourceType"] == "Patient")
        .and_then(|r| r["id"].as_str())
        .expect("patient")
        .to_owned();
    // A bulk run and two runs for one patient at once, all overlapping.
    let bulk = start_job(
        &app,
        json!({"source": "ehr", "destination": "store", "types": types_of(&all)}),
    )
    .await;
    let first = start_job(
        &app,
        json!({"source": "ehr", "destination": "store", "patient": patient}),
    )
    .await;
    let second = start_job(
        &app,
        json!({"source": "ehr", "destination": "store", "patient": patient}),
    )
    .await;
    for id in [bulk, first, second] {
        let job = finished_job(&app.client, &app.base, id).await;
        assert_eq!(job["state"], "completed", "{job}");
        let counts = &job["counts"];
        assert_eq!(counts["failed"], 0);
        let settled = counts["done"].as_u64().unwrap_or(0)
            + counts["skipped"].as_u64().unwrap_or(0)
            + counts["failed"].as_u64().unwrap_or(0);
        assert_eq!(counts["queued"].as_u64(), Some(settled), "{job}");
    }
    assert_exactly_once(&source_double, &sink, &[]);

    // Two retries of one dead letter at once: one is taken, the other finds nothing.
    let closed = format!("http://127.0.0.1:{}/fhir", crate::durability::free_port());
    let app = TestApp::start_with(|config| {
        quick_retries(config);
        config.sync.max_attempts = 1;
        config.sources.insert(
            "ehr".into(),
            source_for(&source_double, SourceKind::Fhir, None),
        );
        config.destinations.insert(
            "nowhere".into(),
            destination(DestinationKind::Fhir, Some(closed)),
        );
    })
    .await;
    let job = run_job(&app, json!({"source": "ehr", "destination": "nowhere", "resources": [format!("Patient/{patient}")]})).await;
    assert_eq!(job["counts"]["failed"], 1, "{job}");
    let letter = dead_letters(&app).await[0]["id"].as_u64().expect("id");
    let retry = || {
        app.client
            .post(app.url(&format!("/sync/dead-letters/{letter}/retry")))
            .send()
    };
    let (a, b) = tokio::join!(retry(), retry());
    let mut statuses = [a.expect("a").status(), b.expect("b").status()];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::ACCEPTED, StatusCode::NOT_FOUND]);
    let job = finished_job(&app.client, &app.base, job["id"].as_u64().expect("id")).await;
    assert_eq!(
        job["counts"]["failed"], 1,
        "the retry failed again, once: {job}"
    );
}
