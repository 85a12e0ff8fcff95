//! Sync from EHR doubles (OpenEMR, athenahealth, a plain FHIR server) into the embedded store,
//! a second fhirgate process and an Azure double; incremental runs; patient syncs through the
//! connector endpoints; reads through the `/fhir/{source}/` facade; the API's bad input.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fhirgate::config::{
    ClientAuthMethod, Config, DestinationConfig, DestinationKind, IdStrategy, OAuthConfig, Secret,
    SourceConfig, SourceKind, UpsertMode,
};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::ehr_double::{Auth, Faults, FhirDouble, Flavor, Options};
use crate::helpers::{fixtures, json, without_meta, TestApp};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// The Synthea bundles, sorted.
pub fn synthea_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixtures().join("synthea"))
        .expect("synthea fixtures")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

/// A source reading `double`, authenticating the way the double expects.
pub fn source_for(
    double: &FhirDouble,
    kind: SourceKind,
    auth: Option<OAuthConfig>,
) -> SourceConfig {
    let base_url = match kind {
        SourceKind::Openemr | SourceKind::Athena => double.origin().to_owned(),
        _ => double.fhir_base(),
    };
    SourceConfig {
        kind,
        base_url: Some(base_url),
        site_id: "default".into(),
        practice_id: double.flavor().ah_practice().map(|_| "195900".to_owned()),
        auth,
        rate_limit_per_sec: None,
        page_size: 100,
        timeout_secs: 10,
        allow_writes: false,
        everything: false,
        patient_types: Vec::new(),
    }
}

/// A plain FHIR source at `base_url`, without credentials.
pub fn source_for_url(base_url: &str) -> SourceConfig {
    SourceConfig {
        kind: SourceKind::Fhir,
        base_url: Some(base_url.to_owned()),
        site_id: "default".into(),
        practice_id: None,
        auth: None,
        rate_limit_per_sec: None,
        page_size: 100,
        timeout_secs: 10,
        allow_writes: false,
        everything: false,
        patient_types: Vec::new(),
    }
}

pub fn oauth(method: ClientAuthMethod, client_id: &str, secret: Option<&str>) -> OAuthConfig {
    OAuthConfig {
        token_url: None,
        client_id: client_id.into(),
        client_secret: secret.map(|s| Secret::new(s.to_owned())),
        method,
        private_key_file: (method == ClientAuthMethod::PrivateKeyJwt)
            .then(|| root().join("certs/test-cds-client-rs384.key")),
        key_id: (method == ClientAuthMethod::PrivateKeyJwt).then(|| "test-rs384".to_owned()),
        algorithm: None,
        scopes: Some("system/*.read".into()),
    }
}

pub fn destination(kind: DestinationKind, base_url: Option<String>) -> DestinationConfig {
    DestinationConfig::new(kind, base_url)
}

/// Quick retries, so fault tests do not wait long.
pub fn quick_retries(config: &mut Config) {
    config.sync.backoff_base_ms = 5;
    config.sync.backoff_max_ms = 100;
    config.sync.max_attempts = 30;
}

/// Starts a job and returns its id.
pub async fn start_job(app: &TestApp, body: Value) -> u64 {
    let response = app
        .client
        .post(app.url("/sync/jobs"))
        .json(&body)
        .send()
        .await
        .expect("POST /sync/jobs");
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (status, job) = json(response).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let id = job["id"].as_u64().expect("job id");
    assert_eq!(
        location.as_deref(),
        Some(format!("/sync/jobs/{id}").as_str())
    );
    id
}

/// Polls the job until it has finished (bounded: a stuck job fails the test, a slow machine
/// only waits).
pub async fn finished_job(client: &reqwest::Client, base: &str, id: u64) -> Value {
    let mut last = Value::Null;
    for _ in 0..6000 {
        let job: Value = client
            .get(format!("{base}/sync/jobs/{id}"))
            .send()
            .await
            .expect("GET job")
            .json()
            .await
            .expect("job JSON");
        let state = job["state"].as_str().unwrap_or_default();
        if state == "completed" || state == "completed-with-errors" {
            return job;
        }
        last = job;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("job {id} did not finish: {last}");
}

/// POSTs `body` as JSON to `path`; the answer's status and JSON.
pub async fn post_json(app: &TestApp, path: &str, body: &Value) -> (StatusCode, Value) {
    json(
        app.client
            .post(app.url(path))
            .json(body)
            .send()
            .await
            .expect("POST"),
    )
    .await
}

pub async fn run_job(app: &TestApp, body: Value) -> Value {
    let id = start_job(app, body).await;
    finished_job(&app.client, &app.base, id).await
}

pub async fn dead_letters(app: &TestApp) -> Vec<Value> {
    let (status, body) = json(
        app.client
            .get(app.url("/sync/dead-letters"))
            .send()
            .await
            .expect("GET"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    body["deadLetters"].as_array().cloned().unwrap_or_default()
}

/// Resource types in `resources`, for a types job.
pub fn types_of(resources: &[Value]) -> Vec<String> {
    resources
        .iter()
        .filter_map(|r| r["resourceType"].as_str().map(str::to_owned))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The answer of `read`, sent again after `Retry-After` while the server says 429: reading
/// thousands of resources one by one is more than a caller's rate limit allows.
async fn patiently<F, Fut>(read: F) -> reqwest::Response
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = reqwest::Response>,
{
    for _ in 0..10 {
        let answer = read().await;
        if answer.status() != StatusCode::TOO_MANY_REQUESTS {
            return answer;
        }
        let wait = answer
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(1);
        tokio::time::sleep(Duration::from_secs(wait.min(5))).await;
    }
    read().await
}

/// Every resource of the double, read back from the gateway's embedded store, equal apart
/// from `meta`.
async fn assert_all_in_embedded(app: &TestApp, expected: &[Value]) {
    for resource in expected {
        let reference = format!(
            "/{}/{}",
            resource["resourceType"].as_str().expect("type"),
            resource["id"].as_str().expect("id")
        );
        let (status, stored) = json(patiently(|| app.get(&reference)).await).await;
        assert_eq!(status, StatusCode::OK, "{reference} missing");
        assert_eq!(
            without_meta(&stored),
            without_meta(resource),
            "{reference} differs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthea_from_openemr_arrives_in_the_embedded_store_exactly() {
    let openemr = FhirDouble::start(
        Flavor::openemr(),
        Options {
            auth: Some(Auth::private_key_jwt("fhirgate-system")),
            ..Options::default()
        },
    )
    .await;
    for file in synthea_files() {
        openemr.load_synthea(file);
    }
    // Patients share some practitioners and organizations: each is one resource.
    let expected = openemr.resources();
    let total = expected.len();
    assert!(total > 3500);
    let source = source_for(
        &openemr,
        SourceKind::Openemr,
        Some(oauth(
            ClientAuthMethod::PrivateKeyJwt,
            "fhirgate-system",
            None,
        )),
    );
    let app = TestApp::start_with(|config| {
        config.sources.insert("openemr".into(), source);
    })
    .await;
    let types = types_of(&expected);
    let job = run_job(
        &app,
        json!({"source": "openemr", "destination": "local", "types": types}),
    )
    .await;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["counts"]["done"], total as u64, "{job}");
    assert_eq!(job["counts"]["failed"], 0);
    assert_all_in_embedded(&app, &expected).await;
    // Every request to OpenEMR carried a token obtained with a signed assertion.
    assert!(openemr.token_requests() >= 1);
    let requests = openemr.recorded_requests();
    assert!(requests
        .iter()
        .filter(|r| r.path.starts_with("/apis/default/fhir"))
        .all(|r| r.bearer().is_some() && r.status == StatusCode::OK));

    // A second run finds nothing new: nothing is written again.
    let again = run_job(
        &app,
        json!({"source": "openemr", "destination": "local", "types": types}),
    )
    .await;
    assert_eq!(again["state"], "completed", "{again}");
    assert_eq!(again["counts"]["done"], 0, "{again}");
    let (_, history) = json(app.get("/Patient/_history?_summary=count").await).await;
    assert_eq!(history["total"], 20, "each patient written once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthea_arrives_in_a_second_fhirgate_process_over_http() {
    let source_double = FhirDouble::start(Flavor::Plain, Options::default()).await;
    for file in synthea_files() {
        source_double.load_synthea(file);
    }
    let expected = source_double.resources();
    // The second fhirgate lets the first one in as a SMART backend client: the first signs an
    // assertion with its key and gets a token from the second's token endpoint.
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
    let remote_config = dir.path().join("fhirgate.toml");
    std::fs::write(
        &remote_config,
        format!(
            "[[auth.clients]]\nclient_id = \"first-gateway\"\njwks_file = {:?}\nscopes = [\"system/*.cruds\"]\n",
            certs.join("test-cds-client.jwks.json")
        ),
    )
    .expect("config");
    let remote = crate::durability::start_binary(
        &dir.path().join("data"),
        Some(&remote_config),
        crate::durability::free_port(),
    )
    .await;
    let remote_fhir = format!("{}/fhir", remote.base);
    let source = source_for(&source_double, SourceKind::Fhir, None);
    let app = TestApp::start_with(|config| {
        config.sources.insert("ehr".into(), source);
        let mut second = destination(DestinationKind::Fhir, Some(remote_fhir.clone()));
        second.auth = Some(fhirgate::config::OAuthConfig {
            token_url: Some(format!("{}/auth/token", remote.base)),
            client_id: "first-gateway".into(),
            client_secret: None,
            method: fhirgate::config::ClientAuthMethod::PrivateKeyJwt,
            private_key_file: Some(certs.join("test-cds-client-rs384.key")),
            key_id: Some("test-rs384".into()),
            algorithm: Some("RS384".into()),
            scopes: Some("system/*.cruds".into()),
        });
        second.batch_size = Some(100);
        config.destinations.insert("second".into(), second);
    })
    .await;
    let job = run_job(
        &app,
        json!({"source": "ehr", "destination": "second", "types": types_of(&expected)}),
    )
    .await;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["counts"]["done"], expected.len() as u64);
    let client = remote.client();
    for resource in &expected {
        let url = format!(
            "{remote_fhir}/{}/{}",
            resource["resourceType"].as_str().expect("type"),
            resource["id"].as_str().expect("id")
        );
        let stored: Value = patiently(|| async { client.get(&url).send().await.expect("read") })
            .await
            .json()
            .await
            .expect("json");
        assert_eq!(without_meta(&stored), without_meta(resource), "{url}");
        assert_eq!(stored["meta"]["versionId"], "1", "{url} written once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_runs_move_the_watermark_and_send_only_changes() {
    let source_double = FhirDouble::start(Flavor::Plain, Options::default()).await;
    let loaded = source_double.load_synthea(&synthea_files()[0]);
    let sink = FhirDouble::start(Flavor::Plain, Options::default()).await;
    let source = source_for(&source_double, SourceKind::Fhir, None);
    let sink_base = sink.fhir_base();
    let app = TestApp::start_with(|config| {
        config.sources.insert("ehr".into(), source);
        let mut plain = destination(DestinationKind::Fhir, Some(sink_base));
        plain.batch_size = Some(50);
        config.destinations.insert("store".into(), plain);
    })
    .await;
    let body =
        json!({"source": "ehr", "destination": "store", "types": "Patient,Observation,Encounter"});
    let first = run_job(&app, body.clone()).await;
    let first_done = first["counts"]["done"].as_u64().expect("done");
    assert!(first_done > 100 && first_done < loaded as u64, "{first}");
    assert_eq!(sink.writes().len() as u64, first_done);

    // Three resources change at the source.
    let mut changed = Vec::new();
    for resource in source_double
        .resources()
        .into_iter()
        .filter(|r| r["resourceType"] == "Observation")
        .take(2)
    {
        let mut updated = resource.clone();
        updated["status"] = json!("amended");
        changed.push(source_double.put_resource(updated));
    }
    let patient = source_double
        .resources()
        .into_iter()
        .find(|r| r["resourceType"] == "Patient")
        .expect("patient");
    let mut patient = patient.clone();
    patient["active"] = json!(false);
    changed.push(source_double.put_resource(patient));

    let second = run_job(&app, body.clone()).await;
    assert_eq!(second["counts"]["done"], 3, "{second}");
    let writes = sink.writes();
    assert_eq!(writes.len() as u64, first_done + 3);
    let new: BTreeSet<(String, String)> = writes[first_done as usize..]
        .iter()
        .map(|w| (w.id.clone(), w.source_version.clone().unwrap_or_default()))
        .collect();
    let wanted: BTreeSet<(String, String)> = changed
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap_or_default().to_owned(),
                r["meta"]["versionId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(new, wanted);
    // The second run searched from the watermark, not from the beginning.
    assert!(source_double
        .recorded_requests()
        .iter()
        .rev()
        .take(3)
        .all(|r| r
            .query_value("_lastUpdated")
            .is_some_and(|v| v.starts_with("ge"))));

    let third = run_job(&app, body).await;
    assert_eq!(third["counts"]["done"], 0, "{third}");
    assert_eq!(
        sink.writes().len() as u64,
        first_done + 3,
        "a re-run writes nothing"
    );
}

/// An athenahealth double with HTTP Basic client authentication.
pub async fn athena_double() -> FhirDouble {
    FhirDouble::start(
        Flavor::athena(),
        Options {
            auth: Some(Auth::basic("athena-client", "athena-secret")),
            ..Options::default()
        },
    )
    .await
}

/// An Azure double (client secret posted in the form) with `faults` on writes.
pub async fn azure_double(faults: Faults) -> FhirDouble {
    FhirDouble::start(
        Flavor::azure(),
        Options {
            auth: Some(Auth::post("azure-app", "azure-secret")),
            faults,
            ..Options::default()
        },
    )
    .await
}

/// An Azure destination as the double serves it: an Azure AD token for `{fhir}/.default`.
pub fn azure_destination(azure: &FhirDouble) -> DestinationConfig {
    let mut config = destination(DestinationKind::Azure, Some(azure.fhir_base()));
    config.tenant_id = Some("test-tenant".into());
    let mut auth = oauth(
        ClientAuthMethod::ClientSecretPost,
        "azure-app",
        Some("azure-secret"),
    );
    auth.token_url = Some(azure.token_url());
    auth.scopes = None;
    config.auth = Some(auth);
    config.batch_size = Some(100);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_endpoints_sync_a_patient_from_athena_to_azure() {
    let athena = athena_double().await;
    athena.load_synthea(&synthea_files()[0]);
    athena.load_synthea(&synthea_files()[1]);
    let azure = azure_double(Faults::default()).await;
    let source = source_for(
        &athena,
        SourceKind::Athena,
        Some(oauth(
            ClientAuthMethod::ClientSecretBasic,
            "athena-client",
            Some("athena-secret"),
        )),
    );
    let azure_config = azure_destination(&azure);
    let app = TestApp::start_with(|config| {
        config.sources.insert("athena".into(), source);
        config.destinations.insert("azure".into(), azure_config);
    })
    .await;
    let patients: Vec<Value> = athena
        .resources()
        .into_iter()
        .filter(|r| r["resourceType"] == "Patient")
        .collect();
    let patient_id = patients[0]["id"].as_str().expect("id").to_owned();
    let observations: Vec<Value> = athena
        .resources()
        .into_iter()
        .filter(|r| {
            r["resourceType"] == "Observation"
                && r["subject"]["reference"] == format!("Patient/{patient_id}")
        })
        .collect();
    assert!(!observations.is_empty());

    // sync-patient: the patient alone, in the connector's answer shape.
    let (status, body) =
        post_json(&app, "/api/sync-patient", &json!({"patientId": patient_id})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["message"],
        format!("Successfully synced Patient/{patient_id}")
    );
    assert_eq!(
        body["result"],
        json!({"success": true, "resourceType": "Patient", "resourceId": patient_id})
    );
    assert_eq!(azure.writes().len(), 1);

    // sync-patient-with-observations: the patient (unchanged: not written again) and every
    // observation, patient first.
    let (status, body) = post_json(
        &app,
        "/api/sync-patient-with-observations",
        &json!({"patientId": patient_id}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let total = observations.len() + 1;
    assert_eq!(
        body["summary"],
        json!({"total": total, "succeeded": total, "failed": 0})
    );
    assert_eq!(
        body["message"],
        format!("Sync completed: {total} succeeded, 0 failed")
    );
    let writes = azure.writes();
    assert_eq!(writes.len(), total);
    assert_eq!(writes[0].resource_type, "Patient");
    for observation in &observations {
        let id = observation["id"].as_str().expect("id");
        let written = writes
            .iter()
            .find(|w| w.id == id)
            .expect("observation written");
        assert_eq!(written.body, *observation);
    }

    // sync-observation by observationId, as the connector took it.
    let mut changed = observations[0].clone();
    changed["status"] = json!("amended");
    athena.put_resource(changed);
    let observation_id = observations[0]["id"].as_str().expect("id");
    let (status, body) = post_json(
        &app,
        "/api/sync-observation",
        &json!({"observationId": observation_id}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["message"],
        format!("Successfully synced Observation/{observation_id}")
    );
    assert_eq!(azure.writes().len(), total + 1);
    assert_eq!(azure.writes()[total].body["status"], "amended");

    // Every athenahealth search carried the practice; every Azure call a token.
    for request in athena.recorded_requests() {
        if request.path.starts_with("/fhir/r4/") && request.path.matches('/').count() == 3 {
            assert_eq!(
                request.query_value("ah-practice"),
                Some("Organization/a-1.Practice-195900"),
                "{}",
                request.path
            );
        }
    }
    assert!(azure
        .recorded_requests()
        .iter()
        .filter(|r| !r.path.contains("oauth2"))
        .all(|r| r.bearer().is_some()));

    // Errors in the connector's shape.
    let (status, body) = post_json(&app, "/api/sync-patient", &json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "Missing required parameter: patientId");
    let (status, body) = post_json(
        &app,
        "/api/sync-patient",
        &json!({"patientId": "no-such-patient"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "Failed to sync Patient/no-such-patient");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patient_sync_sends_referenced_resources_before_their_referrers() {
    let ehr = FhirDouble::start(Flavor::Plain, Options::default()).await;
    for file in &synthea_files()[..3] {
        ehr.load_synthea(file);
    }
    let azure = azure_double(Faults::default()).await;
    let source = source_for(&ehr, SourceKind::Fhir, None);
    let mut azure_config = azure_destination(&azure);
    azure_config.batch_size = Some(20);
    azure_config.id_strategy = IdStrategy::Prefix;
    let app = TestApp::start_with(|config| {
        config.sources.insert("ehr".into(), source);
        config.destinations.insert("azure".into(), azure_config);
    })
    .await;
    let patient = ehr
        .resources()
        .into_iter()
        .find(|r| r["resourceType"] == "Patient")
        .expect("patient");
    let patient_id = patient["id"].as_str().expect("id").to_owned();
    let job = run_job(
        &app,
        json!({"source": "ehr", "destination": "azure", "patient": patient_id}),
    )
    .await;
    assert_eq!(job["state"], "completed", "{job}");

    let writes = azure.writes();
    // Everything of the patient, plus the practitioners and organizations it points at.
    let by_type: BTreeMap<&str, usize> = writes.iter().fold(BTreeMap::new(), |mut m, w| {
        *m.entry(w.resource_type.as_str()).or_default() += 1;
        m
    });
    assert_eq!(by_type.get("Patient"), Some(&1), "{by_type:?}");
    assert!(
        by_type.contains_key("Organization") && by_type.contains_key("Practitioner"),
        "{by_type:?}"
    );
    let observations_at_source = ehr
        .resources()
        .iter()
        .filter(|r| {
            r["resourceType"] == "Observation"
                && r["subject"]["reference"] == format!("Patient/{patient_id}")
        })
        .count();
    assert_eq!(by_type.get("Observation"), Some(&observations_at_source));
    // Ids carry the prefix, and so does every reference between them.
    assert!(
        writes.iter().all(|w| w.id.starts_with("ehr-")),
        "prefixed ids"
    );
    let patient_write = writes
        .iter()
        .find(|w| w.resource_type == "Patient")
        .expect("patient");
    assert_eq!(patient_write.id, format!("ehr-{patient_id}"));
    let observation = writes
        .iter()
        .find(|w| w.resource_type == "Observation")
        .expect("observation");
    assert_eq!(
        observation.body["subject"]["reference"],
        format!("Patient/ehr-{patient_id}")
    );
    // Referenced first: each write's resource is never of a tier below one already written.
    let rank = |t: &str| match t {
        "Organization" | "Practitioner" => 0,
        "Location" | "PractitionerRole" => 1,
        "Patient" => 2,
        "Encounter" => 4,
        "DiagnosticReport" | "Claim" | "ImagingStudy" => 6,
        "ExplanationOfBenefit" | "Provenance" => 7,
        _ => 5,
    };
    let ranks: Vec<u8> = writes.iter().map(|w| rank(&w.resource_type)).collect();
    assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "{ranks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_facade_reads_a_source_through_the_gateway() {
    let athena = athena_double().await;
    athena.load_synthea(&synthea_files()[0]);
    let source = source_for(
        &athena,
        SourceKind::Athena,
        Some(oauth(
            ClientAuthMethod::ClientSecretBasic,
            "athena-client",
            Some("athena-secret"),
        )),
    );
    let app = TestApp::start_with(|config| {
        config.sources.insert("athena".into(), source);
    })
    .await;
    let patient = athena
        .resources()
        .into_iter()
        .find(|r| r["resourceType"] == "Patient")
        .expect("patient");
    let patient_id = patient["id"].as_str().expect("id");

    // A read passes through with the source's token.
    let (status, read) = json(app.get(&format!("/athena/Patient/{patient_id}")).await).await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(read, patient);
    assert!(athena.last_request().expect("request").bearer().is_some());

    // A search gets ah-practice added and its links pointed at the gateway; paging through the
    // gateway's links visits every page.
    let mut url = app.fhir(&format!(
        "/athena/Observation?patient={patient_id}&_count=40"
    ));
    let mut seen = BTreeSet::new();
    let mut pages = 0;
    loop {
        let (status, bundle) = json(app.client.get(&url).send().await.expect("page")).await;
        assert_eq!(status, StatusCode::OK, "{bundle}");
        pages += 1;
        for entry in bundle["entry"].as_array().into_iter().flatten() {
            assert!(entry["fullUrl"]
                .as_str()
                .expect("fullUrl")
                .starts_with(&app.fhir("/athena/")));
            assert!(seen.insert(entry["resource"]["id"].as_str().expect("id").to_owned()));
        }
        let next = bundle["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str())
            .map(str::to_owned);
        match next {
            Some(next) => {
                assert!(next.starts_with(&app.fhir("/athena")), "{next}");
                url = next;
            }
            None => break,
        }
    }
    let expected = athena
        .resources()
        .iter()
        .filter(|r| {
            r["resourceType"] == "Observation"
                && r["subject"]["reference"] == format!("Patient/{patient_id}")
        })
        .count();
    assert_eq!(seen.len(), expected);
    assert!(pages > 1);
    assert!(athena
        .recorded_requests()
        .iter()
        .filter(|r| r.path == "/fhir/r4/Observation")
        .all(|r| r.query_value("ah-practice").is_some()));

    // Writes to a read-only source are refused; the embedded store is untouched by the prefix.
    let response = app
        .put("/athena/Patient/x", &crate::helpers::patient("x"))
        .await;
    let (status, outcome) = json(response).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    crate::helpers::assert_outcome(&outcome, "not-supported", None);
    let (status, _) = json(app.put("/Patient/x", &crate::helpers::patient("x")).await).await;
    assert_eq!(status, StatusCode::CREATED);
    // Paths that climb out of the FHIR base are refused before anything is sent: encoded
    // slashes, and dot segments (sent raw: an HTTP client would resolve them itself).
    let sent_before = athena.requests();
    let (status, outcome) = json(app.get("/athena/Patient%2F..%2F..%2Foauth2").await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
    crate::helpers::assert_outcome(&outcome, "invalid", None);
    for raw in [
        "/fhir/athena/../../oauth2/v1/token",
        "/fhir/athena/%2e%2e/%2E%2E/oauth2",
    ] {
        let answer = raw_get(&app.base, raw).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{raw}: {answer}");
    }
    assert_eq!(athena.requests(), sent_before, "nothing reached the source");
    // The practice is always the configured one, whatever the caller sends.
    let (status, _) = json(
        app.get(&format!(
            "/athena/Patient?_id={patient_id}&ah-practice=Organization/a-1.Practice-1"
        ))
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let last = athena.last_request().expect("request");
    let practices: Vec<&str> = last
        .query
        .iter()
        .filter(|(name, _)| name == "ah-practice")
        .map(|(_, value)| value.as_str())
        .collect();
    assert_eq!(practices, ["Organization/a-1.Practice-195900"]);
    // Also in a search by POST: the caller's practice leaves the form body, ours is added.
    let response = app
        .client
        .post(app.fhir("/athena/Patient/_search"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("family=x&ah-practice=Organization%2Fa-1.Practice-1")
        .send()
        .await
        .expect("POST _search");
    drop(response);
    let last = athena.last_request().expect("request");
    assert_eq!(last.path, "/fhir/r4/Patient/_search");
    assert_eq!(&last.body[..], b"family=x");
    assert_eq!(
        last.query_value("ah-practice"),
        Some("Organization/a-1.Practice-195900")
    );
    assert_eq!(
        last.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/x-www-form-urlencoded")
    );
    // An id of another practice is not read with our credentials.
    let sent_before = athena.requests();
    let (status, outcome) = json(app.get("/athena/Patient/a-999.E-1").await).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{outcome}");
    crate::helpers::assert_outcome(&outcome, "forbidden", None);
    assert_eq!(athena.requests(), sent_before);
    // An unknown id at the source answers the source's 404 OperationOutcome.
    let (status, outcome) = json(app.get("/athena/Patient/nope").await).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(outcome["resourceType"], "OperationOutcome");
}

/// A GET with the path exactly as given (no client-side normalization); the answer's head.
async fn raw_get(base: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {}\r\nconnection: close\r\n\r\n",
        crate::helpers::TEST_ADMIN_KEY
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn the_sync_api_refuses_bad_requests_with_operation_outcomes() {
    let app = TestApp::start().await;
    let cases = [
        (
            json!({"source": "nowhere", "destination": "local", "types": "Patient"}),
            "invalid",
        ),
        (
            json!({"source": "local", "destination": "local", "types": "Patient"}),
            "invalid",
        ),
        (
            json!({"source": "local", "destination": "local", "types": ["Patientt"]}),
            "value",
        ),
        (
            json!({"source": "local", "destination": "local", "patient": "1", "resources": ["Patient/1"]}),
            "invalid",
        ),
        (
            json!({"source": "local", "destination": "local", "resources": ["Patient"]}),
            "value",
        ),
        (
            json!({"source": "local", "destination": "local", "types": "Patient", "since": "yesterday"}),
            "value",
        ),
        (
            json!({"source": "local", "destination": "local"}),
            "required",
        ),
        (
            json!({"source": "local", "destination": "local", "types": "Patient", "extra": 1}),
            "structure",
        ),
        (
            json!({"destination": "local", "types": "Patient"}),
            "required",
        ),
    ];
    for (body, code) in cases {
        let response = app
            .client
            .post(app.url("/sync/jobs"))
            .json(&body)
            .send()
            .await
            .expect("post");
        let (status, outcome) = json(response).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {outcome}");
        crate::helpers::assert_outcome(&outcome, code, None);
    }
    let (status, outcome) = json(
        app.client
            .get(app.url("/sync/jobs/999"))
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    crate::helpers::assert_outcome(&outcome, "not-found", None);
    let (status, outcome) = json(
        app.client
            .post(app.url("/sync/dead-letters/12/retry"))
            .send()
            .await
            .expect("retry"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    crate::helpers::assert_outcome(&outcome, "not-found", None);
    // The connector endpoints without a configured source and destination.
    let (status, body) = post_json(&app, "/api/sync-patient", &json!({"patientId": "1"})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["error"]
        .as_str()
        .expect("error")
        .contains("sync.default_source"));
    let (status, body) = json(
        app.client
            .post(app.url("/api/sync-patient"))
            .body("not json")
            .send()
            .await
            .expect("post"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

/// Runs the `fhirgate` binary with `args` and a data folder; returns the exit code and stdout.
async fn run_cli(args: Vec<String>, data_dir: PathBuf) -> (i32, String) {
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_fhirgate"))
            .args(&args)
            .env_remove("FHIRGATE_CONFIG")
            .env("FHIRGATE_STORE__DATA_DIR", &data_dir)
            .output()
            .expect("run fhirgate");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    })
    .await
    .expect("cli")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_command_prints_a_summary_and_fails_on_dead_letters() {
    let ehr = FhirDouble::start(
        Flavor::Plain,
        Options {
            everything: true,
            ..Options::default()
        },
    )
    .await;
    ehr.load_synthea(&synthea_files()[0]);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("fhirgate.toml");
    std::fs::write(
        &config,
        format!(
            "[sources.ehr]\nkind = \"fhir\"\nbase_url = \"{}\"\neverything = true\n",
            ehr.fhir_base()
        ),
    )
    .expect("config");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut args = vec![
            "sync".to_owned(),
            "--config".into(),
            config.display().to_string(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args
    };
    let data = dir.path().join("data");
    let (code, out) = run_cli(
        args(&[
            "--source",
            "ehr",
            "--destination",
            "local",
            "--types",
            "Patient,Encounter",
        ]),
        data.clone(),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let encounters = ehr
        .resources()
        .iter()
        .filter(|r| r["resourceType"] == "Encounter")
        .count();
    assert!(out.contains(": completed"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("Encounter"))
        .expect("an Encounter row");
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        ["Encounter", &encounters.to_string(), "0", "0"]
    );

    // A patient sync through $everything; then a resource the store refuses: exit code 1 and
    // the dead letter in the summary.
    let patient = ehr
        .resources()
        .into_iter()
        .find(|r| r["resourceType"] == "Patient")
        .expect("patient");
    let patient_id = patient["id"].as_str().expect("id").to_owned();
    let (code, out) = run_cli(
        args(&[
            "--source",
            "ehr",
            "--destination",
            "local",
            "--patient",
            &patient_id,
        ]),
        data.clone(),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(ehr
        .recorded_requests()
        .iter()
        .any(|r| r.path.ends_with("/$everything")));
    let mut bad = crate::helpers::patient("bad");
    bad["gender"] = json!("robot");
    ehr.put_resource(bad);
    let (code, out) = run_cli(
        args(&[
            "--source",
            "ehr",
            "--destination",
            "local",
            "--resources",
            "Patient/bad",
        ]),
        data,
    )
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("dead letter") && out.contains("Patient/bad"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_command_runs_jobs_on_a_server_with_a_sync_operator_key() {
    let ehr = FhirDouble::start(Flavor::Plain, Options::default()).await;
    ehr.put_resource(crate::helpers::patient("p1"));
    let source = source_for(&ehr, SourceKind::Fhir, None);
    let app = TestApp::start_with(|config| {
        config.sources.insert("ehr".into(), source);
    })
    .await;
    let (status, made) = json(
        app.client
            .post(app.url("/auth/api-keys"))
            .json(&json!({"name": "nightly-sync", "roles": ["sync-operator"]}))
            .send()
            .await
            .expect("key"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    let key = made["key"].as_str().expect("key").to_owned();
    let data = tempfile::tempdir().expect("temp dir");
    let args = |key: Option<&str>| {
        let mut args: Vec<String> = [
            "sync",
            "--server",
            &app.base,
            "--source",
            "ehr",
            "--destination",
            "local",
            "--types",
            "Patient",
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        if let Some(key) = key {
            args.extend(["--api-key".to_owned(), key.to_owned()]);
        }
        args
    };
    let (code, out) = run_cli(args(None), data.path().to_path_buf()).await;
    assert_ne!(code, 0, "no key, no job: {out}");
    let (code, out) = run_cli(args(Some(&key)), data.path().to_path_buf()).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(": completed"), "{out}");
    let (status, _) = json(app.get("/Patient/p1").await).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_can_upsert_by_identifier() {
    let ehr = FhirDouble::start(Flavor::Plain, Options::default()).await;
    for n in 0..3 {
        ehr.put_resource(crate::helpers::patient(&format!("p{n}")));
    }
    let sink = FhirDouble::start(Flavor::Plain, Options::default()).await;
    // The destination already has p0 under its own id, found by identifier.
    let mut existing = crate::helpers::patient("their-0");
    existing["identifier"] = json!([{"system": "urn:test:mrn", "value": "mrn-p0"}]);
    sink.put_resource(existing);
    let source = source_for(&ehr, SourceKind::Fhir, None);
    let mut plain = destination(DestinationKind::Fhir, Some(sink.fhir_base()));
    plain.upsert = UpsertMode::Identifier;
    plain.batch_size = Some(1);
    let app = TestApp::start_with(|config| {
        config.sources.insert("ehr".into(), source);
        config.destinations.insert("store".into(), plain);
    })
    .await;
    let job = run_job(
        &app,
        json!({"source": "ehr", "destination": "store", "types": "Patient"}),
    )
    .await;
    assert_eq!(job["state"], "completed", "{job}");
    let puts: Vec<_> = sink
        .recorded_requests()
        .into_iter()
        .filter(|r| r.method == reqwest::Method::PUT)
        .collect();
    assert_eq!(puts.len(), 3);
    assert!(puts.iter().all(|r| r.path == "/Patient"
        && r.query_value("identifier")
            .is_some_and(|v| v.starts_with("urn:test:mrn|mrn-p"))));
    // p0 updated the destination's own resource; p1 and p2 were created.
    let ids: BTreeSet<String> = sink
        .resources()
        .iter()
        .map(|r| r["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(ids.contains("their-0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_call_that_takes_longer_than_the_wait_answers_202_with_the_job() {
    let ehr = FhirDouble::start(Flavor::Plain, Options::default()).await;
    ehr.load_synthea(&synthea_files()[0]);
    let sink = FhirDouble::start(
        Flavor::Plain,
        Options {
            faults: Faults {
                write_delay: Duration::from_millis(300),
                ..Faults::default()
            },
            ..Options::default()
        },
    )
    .await;
    let source = source_for(&ehr, SourceKind::Fhir, None);
    let sink_base = sink.fhir_base();
    let app = TestApp::start_with(|config| {
        config.sync.api_wait_secs = 0;
        config.sources.insert("ehr".into(), source);
        config.destinations.insert(
            "store".into(),
            destination(DestinationKind::Fhir, Some(sink_base)),
        );
    })
    .await;
    let patient = ehr
        .resources()
        .into_iter()
        .find(|r| r["resourceType"] == "Patient")
        .expect("patient");
    let response = app
        .client
        .post(app.url("/api/sync-patient-with-observations"))
        .json(&json!({"patientId": patient["id"]}))
        .send()
        .await
        .expect("post");
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .expect("Location");
    let (status, body) = json(response).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["jobId"].as_u64().expect("jobId");
    assert_eq!(location, format!("/sync/jobs/{id}"));
    assert_eq!(body["status"], location);
    // The job goes on and finishes; the default source and destination were the only ones.
    let job = finished_job(&app.client, &app.base, id).await;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["source"], "ehr");
    assert_eq!(job["destination"], "store");
}
