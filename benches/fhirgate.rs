//! Criterion benchmarks of the foundation: schema validation, the embedded store, PUT+GET
//! through the full HTTP stack in-process, and Synthea transaction ingest.
//!
//! `cargo bench --bench fhirgate`. Targets (2-core machine): validate a valid Patient ≤ 5 µs;
//! PUT+GET p50 ≤ 300 µs; Synthea ingest ≥ 5,000 resources/s. Store benchmarks run twice: on
//! the working disk (every commit is fsynced) and, where present, on tmpfs (`/dev/shm`), which
//! isolates the server's own cost from the disk's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fhirgate::fhir::{SchemaValidator, SearchRegistry};
use fhirgate::store::{Action, EmbeddedStore, Mutation, Store};
use serde_json::{json, Value};

/// The service-account key the benchmarks authenticate with, as real callers do.
const BENCH_KEY: &str = "fg_benchmark-key";

fn bench_config(data_dir: &Path) -> fhirgate::config::Config {
    let mut config = fhirgate::config::Config::default();
    config.store.data_dir = data_dir.to_path_buf();
    config.auth.api_keys = vec![fhirgate::config::ConfiguredApiKey {
        name: "bench".into(),
        sha256: fhirgate::auth::keys::hash(BENCH_KEY),
        roles: vec!["admin".into()],
        scopes: Vec::new(),
    }];
    // One client makes every request here: its limit is set far above what it can reach, so
    // the limiter's cost is still measured.
    config.server.rate_limit_per_sec = 10_000_000;
    config.server.rate_limit_burst = 10_000_000;
    config
}

fn bench_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_static("Bearer fg_benchmark-key"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client")
}

/// The allocator the binary uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn patient(id: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "id": id,
        "identifier": [{"system": "urn:bench:mrn", "value": id}],
        "name": [{"family": "Bench", "given": ["Synthetic"]}],
        "gender": "female",
        "birthDate": "1970-01-01",
        "address": [{"city": "Springfield", "state": "MA"}],
    })
}

fn data_dirs() -> Vec<(&'static str, tempfile::TempDir)> {
    let mut dirs = vec![("disk", tempfile::tempdir().expect("temp dir"))];
    if Path::new("/dev/shm").is_dir() {
        if let Ok(dir) = tempfile::tempdir_in("/dev/shm") {
            dirs.push(("tmpfs", dir));
        }
    }
    dirs
}

fn validation(c: &mut Criterion) {
    let validator = SchemaValidator::bundled().expect("schema");
    let valid = patient("v1");
    let mut invalid = patient("v2");
    invalid["gender"] = json!("robot");
    let _ = validator.validate(&invalid); // compile the per-type explainer once
    let mut group = c.benchmark_group("validate");
    group.bench_function("patient_valid", |b| {
        b.iter(|| {
            validator
                .validate(std::hint::black_box(&valid))
                .expect("valid")
        })
    });
    group.bench_function("patient_invalid_explained", |b| {
        b.iter(|| {
            validator
                .validate(std::hint::black_box(&invalid))
                .expect_err("invalid")
        })
    });
    group.finish();
}

fn store(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let registry = Arc::new(SearchRegistry::new(
        &SchemaValidator::bundled().expect("schema"),
    ));
    let mut group = c.benchmark_group("store");
    for (medium, dir) in data_dirs() {
        let store = EmbeddedStore::open(
            dir.path(),
            registry.clone(),
            std::time::Duration::from_secs(30),
        )
        .expect("store");
        let mut n = 0u64;
        group.bench_function(BenchmarkId::new("put_then_get", medium), |b| {
            b.to_async(&runtime).iter(|| {
                n += 1;
                let id = format!("p{}", n % 1000);
                let store = &store;
                async move {
                    store
                        .write(
                            vec![Mutation {
                                resource_type: "Patient".into(),
                                action: Action::Update {
                                    id: id.clone(),
                                    resource: patient(&id),
                                    if_match: None,
                                },
                                full_url: None,
                            }],
                            true,
                        )
                        .await
                        .expect("write");
                    store
                        .read("Patient", &id)
                        .await
                        .expect("read")
                        .expect("found");
                }
            })
        });
        runtime.block_on(store.close());
    }
    group.finish();
}

struct Server {
    base: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

fn start_server(runtime: &tokio::runtime::Runtime, dir: tempfile::TempDir) -> Server {
    let config = bench_config(dir.path());
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let base = format!("http://{}/fhir", listener.local_addr().expect("addr"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    runtime.spawn(fhirgate::run(listener, config, async move {
        let _ = rx.await;
    }));
    Server {
        base,
        shutdown: Some(tx),
        _dir: dir,
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// PUT then GET through the router and its whole middleware stack, in-process (no socket).
fn router_put_get(c: &mut Criterion) {
    use tower::ServiceExt;
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("router");
    for (medium, dir) in data_dirs() {
        let config = bench_config(dir.path());
        let app = runtime
            .block_on(async { fhirgate::App::build(&config, "http://bench").await })
            .expect("app");
        let mut n = 0u64;
        group.bench_function(BenchmarkId::new("put_then_get_patient", medium), |b| {
            b.to_async(&runtime).iter(|| {
                n += 1;
                let id = format!("r{}", n % 1000);
                let body = serde_json::to_vec(&patient(&id)).expect("json");
                let router = app.router.clone();
                async move {
                    let put = http::Request::put(format!("/fhir/Patient/{id}"))
                        .header("content-type", "application/fhir+json")
                        .header("authorization", format!("Bearer {BENCH_KEY}"))
                        .body(axum::body::Body::from(body))
                        .expect("request");
                    let response = router.clone().oneshot(put).await.expect("put");
                    assert!(response.status().is_success());
                    let _ = axum::body::to_bytes(response.into_body(), usize::MAX).await;
                    let get = http::Request::get(format!("/fhir/Patient/{id}"))
                        .header("authorization", format!("Bearer {BENCH_KEY}"))
                        .body(axum::body::Body::empty())
                        .expect("request");
                    let response = router.oneshot(get).await.expect("get");
                    assert!(response.status().is_success());
                    let _ = axum::body::to_bytes(response.into_body(), usize::MAX).await;
                }
            })
        });
        runtime.block_on(app.store.close());
    }
    group.finish();
}

/// An order-sign call with complete prefetch (~5 KB): MRI of the lumbar spine for an Acme patient
/// with a problem list, vital signs and therapy on record.
fn order_sign_request() -> Vec<u8> {
    let entry = |r: Value| json!({"resource": r});
    let observations: Vec<Value> = (0..8)
        .map(|i| entry(json!({"resourceType":"Observation","id":format!("o{i}"),"status":"final",
            "code":{"coding":[{"system":"http://loinc.org","code":"39156-5","display":"Body mass index"}]},
            "valueQuantity":{"value":27.5 + i as f64 / 10.0,"unit":"kg/m2"},"effectiveDateTime":"2024-05-01T10:00:00Z",
            "subject":{"reference":"Patient/p1"}})))
        .collect();
    let body = json!({
        "hook": "order-sign",
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "context": {"userId": "Practitioner/doc", "patientId": "p1", "draftOrders": {"resourceType": "Bundle", "type": "collection",
            "entry": [entry(json!({"resourceType":"ServiceRequest","id":"mri-1","status":"draft","intent":"order",
                "code":{"coding":[{"system":"http://www.ama-assn.org/go/cpt","code":"72148","display":"MRI lumbar spine"}]},
                "subject":{"reference":"Patient/p1"}}))]}},
        "prefetch": {
            "patient": {"resourceType":"Patient","id":"p1","gender":"male","birthDate":"1968-04-02","name":[{"family":"Bench","given":["Synthetic"]}]},
            "coverage": {"resourceType":"Bundle","type":"searchset","entry":[entry(json!({"resourceType":"Coverage","id":"cov1","status":"active",
                "beneficiary":{"reference":"Patient/p1"},"payor":[{"display":"Acme Health Plan"}]}))]},
            "conditions": {"resourceType":"Bundle","type":"searchset","entry":[entry(json!({"resourceType":"Condition","id":"lbp",
                "clinicalStatus":{"coding":[{"code":"active"}]},"code":{"coding":[{"system":"http://hl7.org/fhir/sid/icd-10-cm","code":"M54.50"}]},
                "subject":{"reference":"Patient/p1"},"onsetDateTime":"2024-01-10"}))]},
            "procedures": {"resourceType":"Bundle","type":"searchset","entry":[entry(json!({"resourceType":"Procedure","id":"pt","status":"completed",
                "code":{"coding":[{"system":"http://www.ama-assn.org/go/cpt","code":"97110"}]},"subject":{"reference":"Patient/p1"},
                "performedPeriod":{"start":"2024-03-01","end":"2024-05-01"}}))]},
            "observations": {"resourceType":"Bundle","type":"searchset","entry":observations},
        }
    });
    serde_json::to_vec(&body).expect("json")
}

fn cds_order_sign(c: &mut Criterion) {
    use tower::ServiceExt;
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = fhirgate::config::Config::default();
    config.store.data_dir = dir.path().to_path_buf();
    config.pa.policies_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies");
    config.cds.hooks_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("hooks");
    config.server.rate_limit_per_sec = 10_000_000;
    config.server.rate_limit_burst = 10_000_000;
    let certs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("certs");
    config.cds.issuers = vec![fhirgate::config::TrustedIssuer {
        iss: "https://ehr.test".into(),
        jwks_file: Some(certs.join("test-cds-client.jwks.json")),
        jwks_url: None,
        jku: Vec::new(),
        fhir_servers: Vec::new(),
    }];
    let app = runtime
        .block_on(async { fhirgate::App::build(&config, "http://bench").await })
        .expect("app");
    let body = order_sign_request();
    let mut group = c.benchmark_group("cds");
    group.throughput(Throughput::Bytes(body.len() as u64));
    // Each call needs a fresh token (a jti is accepted once); tokens are signed outside the
    // measured part.
    for (alg, file, kid) in [
        (
            jsonwebtoken::Algorithm::RS384,
            "test-cds-client-rs384.key",
            "test-rs384",
        ),
        (
            jsonwebtoken::Algorithm::ES384,
            "test-cds-client-es384.key",
            "test-es384",
        ),
    ] {
        let pem = std::fs::read(certs.join(file)).expect("key");
        let key = match alg {
            jsonwebtoken::Algorithm::ES384 => jsonwebtoken::EncodingKey::from_ec_pem(&pem),
            _ => jsonwebtoken::EncodingKey::from_rsa_pem(&pem),
        }
        .expect("pem");
        let token = move || {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let claims = json!({"iss": "https://ehr.test", "aud": "http://bench/cds-services/crd-order-sign",
                "exp": now + 300, "iat": now, "jti": uuid::Uuid::new_v4().to_string()});
            let mut header = jsonwebtoken::Header::new(alg);
            header.kid = Some(kid.into());
            jsonwebtoken::encode(&header, &claims, &key).expect("sign")
        };
        let name = format!("order_sign_full_prefetch_{alg:?}_jwt").to_lowercase();
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter_batched(
                || (token(), app.router.clone(), body.clone()),
                |(token, router, body)| async move {
                    let request = http::Request::post("/cds-services/crd-order-sign")
                        .header("content-type", "application/json")
                        .header("authorization", format!("Bearer {token}"))
                        .body(axum::body::Body::from(body))
                        .expect("request");
                    let response = router.oneshot(request).await.expect("call");
                    assert!(response.status().is_success());
                    let _ = axum::body::to_bytes(response.into_body(), usize::MAX).await;
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// PUT then GET over loopback TCP with a pooled client, for comparison with the in-process path.
fn http_put_get(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = bench_client();
    let mut group = c.benchmark_group("http");
    for (medium, dir) in data_dirs() {
        let server = start_server(&runtime, dir);
        let body = serde_json::to_vec(&patient("h1")).expect("json");
        let mut n = 0u64;
        group.bench_function(BenchmarkId::new("put_then_get_patient", medium), |b| {
            b.to_async(&runtime).iter(|| {
                n += 1;
                let id = format!("h{}", n % 1000);
                let mut resource = patient(&id);
                resource["id"] = json!(id);
                let body = serde_json::to_vec(&resource).unwrap_or_else(|_| body.clone());
                let url = format!("{}/Patient/{id}", server.base);
                let client = &client;
                async move {
                    let put = client
                        .put(&url)
                        .header("content-type", "application/fhir+json")
                        .body(body)
                        .send()
                        .await
                        .expect("put");
                    assert!(put.status().is_success());
                    let _ = put.bytes().await;
                    let get = client.get(&url).send().await.expect("get");
                    assert!(get.status().is_success());
                    let _ = get.bytes().await;
                }
            })
        });
    }
    group.finish();
}

fn synthea_bundle() -> (Vec<u8>, u64) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/synthea");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("synthea")
        .map(|e| e.expect("entry").path())
        .collect();
    paths.sort();
    // The largest bundle, as a realistic batch.
    let path = paths
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("a bundle");
    let bytes = std::fs::read(&path).expect("read");
    let bundle: Value = serde_json::from_slice(&bytes).expect("json");
    let entries = bundle["entry"].as_array().map_or(0, Vec::len) as u64;
    (bytes, entries)
}

fn ingest(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = bench_client();
    let (bundle, entries) = synthea_bundle();
    let mut group = c.benchmark_group("ingest");
    group.sample_size(20);
    group.throughput(Throughput::Elements(entries));
    for (medium, dir) in data_dirs() {
        let server = start_server(&runtime, dir);
        group.bench_function(BenchmarkId::new("synthea_transaction", medium), |b| {
            b.to_async(&runtime).iter(|| {
                let client = &client;
                let url = server.base.clone();
                let body = bundle.clone();
                async move {
                    let r = client
                        .post(&url)
                        .header("content-type", "application/fhir+json")
                        .body(body)
                        .send()
                        .await
                        .expect("post");
                    assert!(r.status().is_success());
                    let _ = r.bytes().await;
                }
            })
        });
    }
    group.finish();
}

/// Audit records: one committed before it returns (what a write waits for), and a burst of
/// 1,000 recorded without waiting (reads), until all are committed.
fn audit(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let registry = Arc::new(SearchRegistry::new(
        &SchemaValidator::bundled().expect("schema"),
    ));
    let mut group = c.benchmark_group("audit");
    for (medium, dir) in data_dirs() {
        let store: Arc<dyn fhirgate::store::Store> = Arc::new(
            EmbeddedStore::open(
                dir.path(),
                registry.clone(),
                std::time::Duration::from_secs(30),
            )
            .expect("store"),
        );
        let log = runtime
            .block_on(fhirgate::audit::AuditLog::start(store.clone(), 0))
            .expect("audit log");
        let entry = || {
            let mut entry = fhirgate::audit::Entry::now("api-key:bench", "api-key", "read");
            entry.resource_type = Some("Patient".into());
            entry.resource_id = Some("p-1".into());
            entry.outcome = 200;
            entry.source = Some("127.0.0.1".into());
            entry.request_id = Some("5a1c0f3e-8f1e-4c6e-9d43-1b2f0e7d9a10".into());
            entry
        };
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::new("record_durably", medium), |b| {
            b.to_async(&runtime)
                .iter(|| async { log.record_durably(entry()).await })
        });
        group.throughput(Throughput::Elements(1000));
        group.bench_function(BenchmarkId::new("record_1000_then_flush", medium), |b| {
            b.to_async(&runtime).iter(|| async {
                for _ in 0..1000 {
                    log.record(entry()).await;
                }
                log.flush().await;
            })
        });
        runtime.block_on(log.shutdown(std::time::Duration::from_secs(10)));
        runtime.block_on(store.close());
    }
    group.finish();
}

/// PAS `Claim/$submit` in-process with the IG's referral request (25 KB): schema check, PAS
/// rules, the determination, the record and the ClaimResponse Bundle. Each call carries a new
/// Claim identifier, so none is answered from an earlier submission.
fn pas_submit(c: &mut Criterion) {
    use tower::ServiceExt;
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = bench_config(dir.path());
    config.pa.policies_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies");
    config.cds.hooks_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("hooks");
    let app = runtime
        .block_on(async { fhirgate::App::build(&config, "http://bench").await })
        .expect("app");
    let example = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/davinci/pas-ig/Bundle-ReferralAuthorizationBundleExample.json"),
    )
    .expect("example");
    let template = example.replacen("\"value\":\"111099\"", "\"value\":\"ID-PLACEHOLDER\"", 1);
    assert_ne!(template, example, "the example's Claim identifier moved");
    let mut group = c.benchmark_group("pas");
    group.throughput(Throughput::Bytes(example.len() as u64));
    let mut n = 0u64;
    group.bench_function("submit_referral", |b| {
        b.to_async(&runtime).iter_batched(
            || {
                n += 1;
                (
                    template.replace("ID-PLACEHOLDER", &format!("bench-{n}")),
                    app.router.clone(),
                )
            },
            |(body, router)| async move {
                let request = http::Request::post("/fhir/Claim/$submit")
                    .header("content-type", "application/fhir+json")
                    .header("authorization", format!("Bearer {BENCH_KEY}"))
                    .body(axum::body::Body::from(body))
                    .expect("request");
                let response = router.oneshot(request).await.expect("call");
                assert!(response.status().is_success(), "{}", response.status());
                let _ = axum::body::to_bytes(response.into_body(), usize::MAX).await;
            },
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(
    benches,
    pas_submit,
    validation,
    store,
    audit,
    router_put_get,
    http_put_get,
    ingest,
    cds_order_sign
);
criterion_main!(benches);
