//! Sync throughput, all in one run on this machine:
//!
//! 1. a local source double → the embedded store (on the working disk and on tmpfs);
//! 2. the same source → a second fhirgate over HTTP, batched;
//! 3. the same source → a second fhirgate by a sequential per-resource `PUT` loop, which is what
//!    the OpenEMR → Azure Functions connector does; the ratio of 2 to 3 is printed.
//!
//! `cargo bench --bench sync` (or `-- --copies 10` for a bigger set). Targets (2-core machine):
//! ≥ 10,000 resources/s into the embedded store, ≥ 5,000 resources/s over HTTP with batching.
//!
//! The source double serves the 20 Synthea patients (tests/fixtures/synthea), copied with
//! distinct ids, from pages prepared in memory, so the numbers are the gateway's, not the
//! double's. Everything shares the same two cores: source, gateway and destination.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, Query, State};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use fhirgate::config::{Config, DestinationConfig, DestinationKind, SourceConfig, SourceKind};
use serde_json::{json, Value};

/// The allocator the binary uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PAGE: usize = 500;

/// Synthea resources with `urn:uuid:` references resolved, copied `copies` times with ids
/// suffixed `-{n}` (references follow), grouped by type.
fn load_resources(copies: usize) -> BTreeMap<String, Vec<Value>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/synthea");
    let mut originals: BTreeMap<String, Value> = BTreeMap::new();
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("fixtures")
        .map(|e| e.expect("entry").path())
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path).expect("read");
        let bundle: Value = serde_json::from_str(&text).expect("json");
        let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
        let mut ids = BTreeMap::new();
        for entry in &entries {
            let full = entry["fullUrl"].as_str().unwrap_or_default().to_owned();
            let t = entry["resource"]["resourceType"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            ids.insert(
                full.clone(),
                format!("{t}/{}", full.trim_start_matches("urn:uuid:")),
            );
        }
        for entry in entries {
            let full = entry["fullUrl"].as_str().unwrap_or_default().to_owned();
            let mut resource = entry["resource"].clone();
            resource["id"] = json!(full.trim_start_matches("urn:uuid:"));
            fhirgate::fhir::rewrite_references(&mut resource, &mut |r| ids.get(r).cloned());
            originals.insert(ids[&full].clone(), resource);
        }
    }
    let mut by_type: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for n in 0..copies {
        for resource in originals.values() {
            let mut copy = resource.clone();
            let id = format!("{}-{n}", copy["id"].as_str().unwrap_or_default());
            copy["id"] = json!(id);
            copy["meta"] = json!({"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z"});
            fhirgate::fhir::rewrite_references(&mut copy, &mut |r| {
                let (t, id) = r.split_once('/')?;
                (t.starts_with(|c: char| c.is_ascii_uppercase()) && !id.contains('/'))
                    .then(|| format!("{t}/{id}-{n}"))
            });
            let t = copy["resourceType"].as_str().unwrap_or_default().to_owned();
            by_type.entry(t).or_default().push(copy);
        }
    }
    by_type
}

/// Search pages per type, serialized once.
struct SourceDouble {
    pages: BTreeMap<String, Vec<Bytes>>,
}

fn build_pages(base: &str, by_type: &BTreeMap<String, Vec<Value>>) -> BTreeMap<String, Vec<Bytes>> {
    let mut pages = BTreeMap::new();
    for (t, resources) in by_type {
        let chunks: Vec<&[Value]> = resources.chunks(PAGE).collect();
        let mut bodies = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let mut links =
                vec![json!({"relation": "self", "url": format!("{base}/{t}?page={i}")})];
            if i + 1 < chunks.len() {
                links
                    .push(json!({"relation": "next", "url": format!("{base}/{t}?page={}", i + 1)}));
            }
            let entries: Vec<Value> = chunk
                .iter()
                .map(|r| json!({"fullUrl": format!("{base}/{t}/{}", r["id"].as_str().unwrap_or_default()), "resource": r, "search": {"mode": "match"}}))
                .collect();
            let bundle = json!({"resourceType": "Bundle", "type": "searchset", "total": resources.len(), "link": links, "entry": entries});
            bodies.push(Bytes::from(serde_json::to_vec(&bundle).expect("page")));
        }
        pages.insert(t.clone(), bodies);
    }
    pages
}

async fn page(
    State(source): State<Arc<SourceDouble>>,
    UrlPath(t): UrlPath<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> axum::response::Response {
    let i: usize = query.get("page").and_then(|p| p.parse().ok()).unwrap_or(0);
    match source.pages.get(&t).and_then(|p| p.get(i)) {
        Some(body) => axum::response::Response::builder()
            .header("content-type", "application/fhir+json")
            .body(axum::body::Body::from(body.clone()))
            .expect("response"),
        None => axum::response::Response::builder()
            .status(404)
            .body(axum::body::Body::empty())
            .expect("404"),
    }
}

async fn start_source(by_type: &BTreeMap<String, Vec<Value>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}/fhir", listener.local_addr().expect("addr"));
    let source = Arc::new(SourceDouble {
        pages: build_pages(&base, by_type),
    });
    let app = Router::new()
        .route("/fhir/{type}", get(page))
        .with_state(source);
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    base
}

fn quiet_config(data_dir: &Path) -> Config {
    let mut config = Config::default();
    config.store.data_dir = data_dir.to_path_buf();
    config.log.level = "error".into();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    config.pa.policies_dir = root.join("policies");
    config.cds.hooks_dir = root.join("hooks");
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

/// The service-account key the benchmarks authenticate with, as real callers do.
const BENCH_KEY: &str = "fg_benchmark-key";

/// A fhirgate server on a random port; returns its FHIR base.
async fn start_fhirgate(data_dir: &Path) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let mut config = quiet_config(data_dir);
    // The gateway under test gets its tokens here, as a SMART backend client.
    config.auth.clients = vec![fhirgate::config::BackendClient {
        client_id: "bench-sync".into(),
        jwks_file: Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/test-cds-client.jwks.json"),
        scopes: vec!["system/*.cruds".into()],
        roles: Vec::new(),
    }];
    tokio::spawn(fhirgate::run(listener, config, std::future::pending()));
    let client = reqwest::Client::new();
    for _ in 0..400 {
        if client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    format!("{base}/fhir")
}

fn source_config(base: &str) -> SourceConfig {
    SourceConfig {
        kind: SourceKind::Fhir,
        base_url: Some(base.to_owned()),
        site_id: "default".into(),
        practice_id: None,
        auth: None,
        rate_limit_per_sec: None,
        page_size: PAGE,
        timeout_secs: 30,
        allow_writes: false,
        everything: false,
        patient_types: Vec::new(),
    }
}

/// Runs one types job on a gateway built from `config`; returns resources delivered per second.
async fn sync_once(
    mut config: Config,
    source: &str,
    destination: Option<&str>,
    types: &[String],
) -> (u64, f64) {
    config.sources.insert("bench".into(), source_config(source));
    let target = match destination {
        Some(base) => {
            config.destinations.insert(
                "remote".into(),
                DestinationConfig {
                    batch_size: Some(250),
                    timeout_secs: 60,
                    auth: Some(fhirgate::config::OAuthConfig {
                        token_url: Some(format!("{}/auth/token", base.trim_end_matches("/fhir"))),
                        client_id: "bench-sync".into(),
                        client_secret: None,
                        method: fhirgate::config::ClientAuthMethod::PrivateKeyJwt,
                        private_key_file: Some(
                            Path::new(env!("CARGO_MANIFEST_DIR"))
                                .join("certs/test-cds-client-rs384.key"),
                        ),
                        key_id: Some("test-rs384".into()),
                        algorithm: Some("RS384".into()),
                        scopes: Some("system/*.cruds".into()),
                    }),
                    ..DestinationConfig::new(DestinationKind::Fhir, Some(base.to_owned()))
                },
            );
            "remote"
        }
        None => "local",
    };
    let app = fhirgate::App::build(&config, "http://bench")
        .await
        .expect("gateway");
    let request = fhirgate::sync::api::job_request(
        &app.sync_api,
        json!({"source": "bench", "destination": target, "types": types}),
    )
    .expect("job");
    let started = Instant::now();
    let job = app.sync.submit(request).await.expect("submit");
    let job = app
        .sync
        .wait(job.id, Duration::from_secs(600))
        .await
        .expect("job");
    let elapsed = started.elapsed().as_secs_f64();
    assert!(job.state.is_finished() && !job.has_problems(), "{job:?}");
    app.sync.shutdown(Duration::from_secs(5)).await;
    app.store.close().await;
    (job.counts.done, job.counts.done as f64 / elapsed)
}

/// What the connector does: one `PUT` per resource, one after another.
async fn put_loop(resources: &[&Value], destination: &str) -> f64 {
    let client = reqwest::Client::new();
    let bearer = format!("Bearer {BENCH_KEY}");
    let started = Instant::now();
    for resource in resources {
        let url = format!(
            "{destination}/{}/{}",
            resource["resourceType"].as_str().unwrap_or_default(),
            resource["id"].as_str().unwrap_or_default()
        );
        let response = client
            .put(url)
            .header("authorization", &bearer)
            .header("content-type", "application/fhir+json")
            .body(serde_json::to_vec(resource).expect("json"))
            .send()
            .await
            .expect("put");
        assert!(response.status().is_success(), "{}", response.status());
    }
    resources.len() as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let copies = args
        .iter()
        .position(|a| a == "--copies")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let by_type = load_resources(copies);
        let total: usize = by_type.values().map(Vec::len).sum();
        let types: Vec<String> = by_type.keys().cloned().collect();
        let source = start_source(&by_type).await;
        println!("source: {total} resources ({copies} copies of 20 Synthea patients), pages of {PAGE}");

        let mut media = vec![("disk", tempfile::tempdir().expect("temp dir"))];
        if let Ok(dir) = tempfile::tempdir_in("/dev/shm") {
            media.push(("tmpfs", dir));
        }
        for (medium, dir) in &media {
            let (done, rate) = sync_once(quiet_config(&dir.path().join("gw")), &source, None, &types).await;
            println!("sync → embedded store ({medium}): {done} resources, {rate:.0} resources/s");
        }
        for (medium, dir) in &media {
            let destination = start_fhirgate(&dir.path().join("dest")).await;
            let (done, rate) = sync_once(quiet_config(&dir.path().join("gw2")), &source, Some(&destination), &types).await;
            println!("sync → fhirgate over HTTP, batches of 250 ({medium}): {done} resources, {rate:.0} resources/s");
            let loop_dest = start_fhirgate(&dir.path().join("loop")).await;
            let sample: Vec<&Value> = by_type.values().flatten().take(3000).collect();
            let loop_rate = put_loop(&sample, &loop_dest).await;
            println!(
                "sequential PUT loop → fhirgate ({medium}): {} resources, {loop_rate:.0} resources/s; batched sync is {:.1}× faster",
                sample.len(),
                rate / loop_rate
            );
        }
    });
}
