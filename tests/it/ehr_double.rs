//! `FhirDouble`: a local FHIR server that answers like OpenEMR, athenahealth or Azure Health Data
//! Services, so sync tests exercise the real wire shapes without a network. It keeps resources
//! in memory, issues and really expires OAuth2 tokens, pages searches through `next` links,
//! applies PUTs and batch/transaction Bundles, and injects the faults sync must survive
//! (throttling, outages, timeouts, rejected resources, broken paging links), deterministically
//! from a seed.
//!
//! This file holds the API and the store; routing is in `ehr_double/server.rs`, the token
//! endpoint in `token.rs`, reads and searches in `search.rs`, writes in `write.rs`.

mod search;
mod server;
#[cfg(test)]
mod tests;
mod token;
mod write;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{Request, State as AxumState};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::{json, Value};
use time::OffsetDateTime;

use server::{bearer, handle, is_type, respond, Answer, Failure};

/// Which server the double imitates: its URL layout, token endpoint and response shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flavor {
    /// OpenEMR: FHIR at `/apis/{site}/fhir`, tokens at `/oauth2/{site}/token`.
    OpenEmr { site: String },
    /// athenahealth: FHIR at `/fhir/r4`, tokens at `/oauth2/v1/token`; every search must carry
    /// `ah-practice=Organization/a-1.Practice-{practice}`, and every stored resource gets the
    /// `ah-practice` extension.
    Athena { practice: String },
    /// Azure Health Data Services: FHIR at [`Options::path_prefix`] (the root by default),
    /// Entra ID tokens at `/{tenant}/oauth2/v2.0/token` with scope `{fhir_base}/.default`.
    Azure { tenant: String },
    /// A plain FHIR server at [`Options::path_prefix`]; tokens, if required, at `/oauth2/token`.
    Plain,
}

impl Flavor {
    /// OpenEMR's default site, `default`.
    pub fn openemr() -> Self {
        Self::OpenEmr {
            site: "default".into(),
        }
    }

    /// athenahealth's preview sandbox practice, 195900.
    pub fn athena() -> Self {
        Self::Athena {
            practice: "195900".into(),
        }
    }

    /// An Azure tenant named `test-tenant`.
    pub fn azure() -> Self {
        Self::Azure {
            tenant: "test-tenant".into(),
        }
    }

    /// The `ah-practice` search parameter athenahealth requires, for [`Flavor::Athena`].
    pub fn ah_practice(&self) -> Option<String> {
        match self {
            Self::Athena { practice } => Some(format!("Organization/a-1.Practice-{practice}")),
            _ => None,
        }
    }
}

/// How a client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_secret_basic`: `Authorization: Basic` with the form-encoded id and secret.
    Basic,
    /// `client_secret_post`: `client_id` and `client_secret` in the form.
    Post,
    /// `private_key_jwt`: an RS384 client assertion, checked against
    /// `certs/test-cds-client.jwks.json` (kid `test-rs384`).
    PrivateKeyJwt,
}

/// The one client the token endpoint knows, and the lifetime of the tokens it gets.
#[derive(Debug, Clone)]
pub struct Auth {
    pub method: ClientAuth,
    pub client_id: String,
    /// Ignored for [`ClientAuth::PrivateKeyJwt`].
    pub client_secret: String,
    /// `expires_in` of issued tokens; `None` uses the flavor's usual lifetime (OpenEMR 60 s,
    /// athenahealth 3600 s, Azure 3599 s, plain 300 s).
    pub expires_in: Option<u64>,
}

impl Auth {
    pub fn basic(client_id: &str, client_secret: &str) -> Self {
        Self::with(ClientAuth::Basic, client_id, client_secret)
    }

    pub fn post(client_id: &str, client_secret: &str) -> Self {
        Self::with(ClientAuth::Post, client_id, client_secret)
    }

    pub fn private_key_jwt(client_id: &str) -> Self {
        Self::with(ClientAuth::PrivateKeyJwt, client_id, "")
    }

    /// Tokens live `seconds`.
    pub fn expires_in(mut self, seconds: u64) -> Self {
        self.expires_in = Some(seconds);
        self
    }

    fn with(method: ClientAuth, client_id: &str, client_secret: &str) -> Self {
        Self {
            method,
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            expires_in: None,
        }
    }
}

/// How the double is set up; `Options::default()` is an open server with no faults.
#[derive(Debug, Clone)]
pub struct Options {
    /// `None`: no token needed (and the token endpoint refuses everyone). `Some`: every FHIR
    /// request but `metadata` needs a live bearer token from the token endpoint. Lifetimes run
    /// on tokio's clock (with tokio's `test-util`, `time::advance` expires tokens too).
    pub auth: Option<Auth>,
    /// Path of the FHIR base under the origin for [`Flavor::Azure`] and [`Flavor::Plain`]
    /// (e.g. `/fhir`); OpenEMR and athenahealth have fixed paths.
    pub path_prefix: String,
    /// Whether `Patient/{id}/$everything` is answered (otherwise 404 not-supported).
    pub everything: bool,
    /// Entries a batch or transaction Bundle may hold; more is a 400.
    pub max_bundle_entries: usize,
    pub faults: Faults,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            auth: None,
            path_prefix: String::new(),
            everything: false,
            max_bundle_entries: 500,
            faults: Faults::default(),
        }
    }
}

/// Faults injected into FHIR requests. Fractions are drawn per write request (PUT or Bundle
/// POST) from a xorshift generator seeded with `seed`, so a run repeats when requests arrive in
/// the same order.
#[derive(Debug, Clone)]
pub struct Faults {
    pub seed: u64,
    /// Fraction of write requests answered 503 without being applied.
    pub unavailable: f64,
    /// `Retry-After` seconds sent with those 503s.
    pub unavailable_retry_after: Option<u64>,
    /// Fraction of write requests that hang for `timeout_delay`, are not applied, and then get
    /// a 504 (the client should have given up by then).
    pub timeouts: f64,
    pub timeout_delay: Duration,
    /// Fraction of write requests that are applied but whose answer comes only after
    /// `timeout_delay` (the client gives up without learning the write happened).
    pub lost_answers: f64,
    /// Time every write request takes before it is handled.
    pub write_delay: Duration,
    /// Once this many writes are applied, later write requests wait until the faults change
    /// and are then answered 503 without being applied.
    pub hold_after: Option<usize>,
    /// Ids (`id` or `Type/id`) whose writes are refused with 422; inside a batch only their
    /// entries fail, a transaction fails as a whole.
    pub rejected_ids: HashSet<String>,
    /// A search page whose `next` link is broken.
    pub broken_next: Option<BrokenNext>,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            seed: 1,
            unavailable: 0.0,
            unavailable_retry_after: None,
            timeouts: 0.0,
            timeout_delay: Duration::from_secs(30),
            lost_answers: 0.0,
            write_delay: Duration::ZERO,
            hold_after: None,
            rejected_ids: HashSet::new(),
            broken_next: None,
        }
    }
}

/// Breaks the `next` link of page `page` (1 is the first page) of every search and
/// `$everything` until the faults change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokenNext {
    pub page: usize,
    pub link: BrokenLink,
}

/// What a broken `next` link looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokenLink {
    /// On this server, but a path that answers 404 (an expired paging cursor).
    NotFound,
    /// Not a URL at all.
    Malformed,
    /// Another host (`fhir.other-host.invalid`), which a client must not send its token to.
    OtherHost,
}

/// One write the double applied.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteRecord {
    pub resource_type: String,
    pub id: String,
    /// `meta.versionId` of the resource as received (the source's version, when sync sends it).
    pub source_version: Option<String>,
    /// The resource exactly as received.
    pub body: Value,
}

/// One request the double answered.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    pub path: String,
    /// Decoded query parameters, in order.
    pub query: Vec<(String, String)>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub status: StatusCode,
    /// When it arrived.
    pub at: std::time::Instant,
}

impl RecordedRequest {
    /// The first value of query parameter `name`.
    pub fn query_value(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The bearer token sent, if any.
    pub fn bearer(&self) -> Option<&str> {
        bearer(&self.headers)
    }
}

/// A running double; the server stops when it is dropped.
pub struct FhirDouble {
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

/// Configuration fixed at start, and the mutable state behind one lock (never held across an
/// `.await`).
struct Shared {
    flavor: Flavor,
    auth: Option<Auth>,
    everything: bool,
    max_bundle_entries: usize,
    origin: String,
    fhir_path: String,
    token_path: String,
    jwks: Option<jsonwebtoken::jwk::JwkSet>,
    state: Mutex<State>,
}

struct State {
    resources: BTreeMap<String, BTreeMap<String, Stored>>,
    /// Milliseconds after [`EPOCH`] of the newest `meta.lastUpdated`.
    clock: i64,
    /// The athenahealth practice stored resources are marked with.
    practice: Option<String>,
    tokens: HashMap<String, tokio::time::Instant>,
    assertion_ids: HashSet<String>,
    token_fault: Option<TokenFault>,
    token_requests: usize,
    faults: Faults,
    rng: XorShift,
    /// Requests still to answer 429, and the `Retry-After` seconds.
    throttle: Option<(usize, u64)>,
    writes: Vec<WriteRecord>,
    write_requests: usize,
    requests: Vec<RecordedRequest>,
}

#[derive(Debug, Clone)]
struct Stored {
    resource: Value,
    version: u64,
    last_updated: OffsetDateTime,
}

struct TokenFault {
    status: StatusCode,
    /// `None`: every request.
    remaining: Option<usize>,
}

/// `meta.lastUpdated` of the first stored version; later ones add a millisecond each, so they
/// are strictly increasing and `_lastUpdated=gt…` watermarks are exact.
const EPOCH: OffsetDateTime = time::macros::datetime!(2024-01-01 00:00:00 UTC);

impl FhirDouble {
    /// Binds `127.0.0.1:0` and serves `flavor` with `options` until dropped.
    pub async fn start(flavor: Flavor, options: Options) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the FHIR double");
        let origin = format!("http://{}", listener.local_addr().expect("local address"));
        let fhir_path = match &flavor {
            Flavor::OpenEmr { site } => format!("/apis/{site}/fhir"),
            Flavor::Athena { .. } => "/fhir/r4".into(),
            Flavor::Azure { .. } | Flavor::Plain => {
                let prefix = options.path_prefix.trim_matches('/');
                if prefix.is_empty() {
                    String::new()
                } else {
                    format!("/{prefix}")
                }
            }
        };
        let token_path = match &flavor {
            Flavor::OpenEmr { site } => format!("/oauth2/{site}/token"),
            Flavor::Athena { .. } => "/oauth2/v1/token".into(),
            Flavor::Azure { tenant } => format!("/{tenant}/oauth2/v2.0/token"),
            Flavor::Plain => "/oauth2/token".into(),
        };
        let jwks = match &options.auth {
            Some(auth) if auth.method == ClientAuth::PrivateKeyJwt => {
                let path =
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/test-cds-client.jwks.json");
                let text = std::fs::read_to_string(&path).expect("test JWKS");
                Some(serde_json::from_str(&text).expect("test JWKS is a JWK set"))
            }
            _ => None,
        };
        let state = State {
            resources: BTreeMap::new(),
            clock: 0,
            practice: match &flavor {
                Flavor::Athena { practice } => Some(practice.clone()),
                _ => None,
            },
            tokens: HashMap::new(),
            assertion_ids: HashSet::new(),
            token_fault: None,
            token_requests: 0,
            rng: XorShift::new(options.faults.seed),
            faults: options.faults,
            throttle: None,
            writes: Vec::new(),
            write_requests: 0,
            requests: Vec::new(),
        };
        let shared = Arc::new(Shared {
            flavor,
            auth: options.auth,
            everything: options.everything,
            max_bundle_entries: options.max_bundle_entries,
            origin,
            fhir_path,
            token_path,
            jwks,
            state: Mutex::new(state),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { shared, server }
    }

    /// `http://127.0.0.1:{port}`.
    pub fn origin(&self) -> &str {
        &self.shared.origin
    }

    /// The FHIR base URL, without a trailing slash.
    pub fn fhir_base(&self) -> String {
        self.shared.fhir_base()
    }

    /// The token endpoint's URL (also the `aud` a client assertion must carry).
    pub fn token_url(&self) -> String {
        self.shared.token_url()
    }

    /// The server this double imitates.
    pub fn flavor(&self) -> &Flavor {
        &self.shared.flavor
    }

    /// Stores `resource` (which must have `resourceType` and `id`) as a new version and returns
    /// it with the `meta.versionId` and `meta.lastUpdated` it got.
    pub fn put_resource(&self, resource: Value) -> Value {
        let resource_type = resource["resourceType"]
            .as_str()
            .expect("resourceType")
            .to_owned();
        let id = resource["id"].as_str().expect("id").to_owned();
        self.shared.state().store(&resource_type, &id, resource).0
    }

    /// Stores every resource of a Synthea transaction Bundle under the uuid of its
    /// `urn:uuid:` fullUrl, with references to those uuids rewritten to `Type/uuid`; returns how
    /// many were stored.
    pub fn load_synthea(&self, path: impl AsRef<Path>) -> usize {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let bundle: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
        let targets: HashMap<String, String> = entries
            .iter()
            .filter_map(|entry| {
                let full_url = entry["fullUrl"].as_str()?;
                let uuid = full_url.strip_prefix("urn:uuid:")?;
                let resource_type = entry["resource"]["resourceType"].as_str()?;
                Some((full_url.to_owned(), format!("{resource_type}/{uuid}")))
            })
            .collect();
        let mut state = self.shared.state();
        let mut stored = 0;
        for entry in entries {
            let mut resource = entry["resource"].clone();
            let Some(resource_type) = resource["resourceType"].as_str().map(str::to_owned) else {
                continue;
            };
            let id = match entry["fullUrl"]
                .as_str()
                .and_then(|u| u.strip_prefix("urn:uuid:"))
            {
                Some(uuid) => uuid.to_owned(),
                None => match resource["id"].as_str() {
                    Some(id) => id.to_owned(),
                    None => continue,
                },
            };
            resource["id"] = json!(id);
            rewrite_references(&mut resource, &targets);
            state.store(&resource_type, &id, resource);
            stored += 1;
        }
        stored
    }

    /// Every stored resource, ordered by type and id.
    pub fn resources(&self) -> Vec<Value> {
        let state = self.shared.state();
        state
            .resources
            .values()
            .flat_map(|by_id| by_id.values().map(|s| s.resource.clone()))
            .collect()
    }

    /// The current version of `Type/id`.
    pub fn resource(&self, resource_type: &str, id: &str) -> Option<Value> {
        let state = self.shared.state();
        let stored = state.resources.get(resource_type)?.get(id)?;
        Some(stored.resource.clone())
    }

    /// Deletes `Type/id` (reads answer 404 afterwards); whether it existed.
    pub fn remove_resource(&self, resource_type: &str, id: &str) -> bool {
        let mut state = self.shared.state();
        let by_id = state.resources.get_mut(resource_type);
        by_id.is_some_and(|by_id| by_id.remove(id).is_some())
    }

    /// Every write applied (PUT or Bundle entry), in order.
    pub fn writes(&self) -> Vec<WriteRecord> {
        self.shared.state().writes.clone()
    }

    /// Makes every token issued so far expire now; requests carrying one get a 401.
    pub fn expire_all_tokens(&self) {
        let now = tokio::time::Instant::now();
        for expiry in self.shared.state().tokens.values_mut() {
            *expiry = now;
        }
    }

    /// Answers `status` with an OAuth2 error to the next `times` token requests (`None`: to all
    /// of them, until [`FhirDouble::clear_token_fault`]).
    pub fn fail_token_requests(&self, status: u16, times: Option<usize>) {
        let status = StatusCode::from_u16(status).expect("HTTP status");
        self.shared.state().token_fault = (times != Some(0)).then_some(TokenFault {
            status,
            remaining: times,
        });
    }

    /// Ends a fault set by [`FhirDouble::fail_token_requests`].
    pub fn clear_token_fault(&self) {
        self.shared.state().token_fault = None;
    }

    /// Requests received at the token endpoint, answered or refused.
    pub fn token_requests(&self) -> usize {
        self.shared.state().token_requests
    }

    /// Replaces the faults; the generator restarts from the new seed.
    pub fn set_faults(&self, faults: Faults) {
        let mut state = self.shared.state();
        state.rng = XorShift::new(faults.seed);
        state.faults = faults;
    }

    /// Answers the next `requests` FHIR requests (reads and writes, not token requests) with
    /// 429 and `Retry-After: {retry_after_secs}`.
    pub fn throttle_next(&self, requests: usize, retry_after_secs: u64) {
        self.shared.state().throttle = (requests > 0).then_some((requests, retry_after_secs));
    }

    /// Requests answered, including token requests.
    pub fn requests(&self) -> usize {
        self.shared.state().requests.len()
    }

    /// Requests answered with `status`.
    pub fn requests_with_status(&self, status: u16) -> usize {
        let state = self.shared.state();
        state
            .requests
            .iter()
            .filter(|r| r.status.as_u16() == status)
            .count()
    }

    /// PUTs and Bundle POSTs received, whatever became of them.
    pub fn write_requests(&self) -> usize {
        self.shared.state().write_requests
    }

    /// The last request answered.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.shared.state().requests.last().cloned()
    }

    /// Every request answered, in the order the answers were sent.
    pub fn recorded_requests(&self) -> Vec<RecordedRequest> {
        self.shared.state().requests.clone()
    }
}

impl Drop for FhirDouble {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fhir_base(&self) -> String {
        format!("{}{}", self.origin, self.fhir_path)
    }

    fn token_url(&self) -> String {
        format!("{}{}", self.origin, self.token_path)
    }
}

impl State {
    /// Stores a new version of `Type/id`; returns it and whether it was created.
    fn store(&mut self, resource_type: &str, id: &str, mut resource: Value) -> (Value, bool) {
        self.clock += 1;
        let last_updated = EPOCH + time::Duration::milliseconds(self.clock);
        let by_id = self.resources.entry(resource_type.to_owned()).or_default();
        let previous = by_id.get(id).map(|s| s.version);
        let version = previous.map_or(1, |v| v + 1);
        if !resource["meta"].is_object() {
            resource["meta"] = json!({});
        }
        resource["meta"]["versionId"] = json!(version.to_string());
        resource["meta"]["lastUpdated"] = json!(instant(last_updated));
        if let Some(practice) = &self.practice {
            add_practice_extension(&mut resource, practice);
        }
        by_id.insert(
            id.to_owned(),
            Stored {
                resource: resource.clone(),
                version,
                last_updated,
            },
        );
        (resource, previous.is_none())
    }
}

/// athenahealth marks every resource with the practice it belongs to.
fn add_practice_extension(resource: &mut Value, practice: &str) {
    const URL: &str = "https://fhir.athena.io/StructureDefinition/ah-practice";
    if !resource["extension"].is_array() {
        resource["extension"] = json!([]);
    }
    if let Some(extensions) = resource["extension"].as_array_mut() {
        if !extensions.iter().any(|e| e["url"] == URL) {
            extensions.push(json!({
                "url": URL,
                "valueReference": {"reference": format!("Organization/a-1.Practice-{practice}")},
            }));
        }
    }
}

/// `2024-01-01T00:00:00.001Z`: always milliseconds, always `Z`.
fn instant(at: OffsetDateTime) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    at.format(&format).unwrap_or_default()
}

fn rewrite_references(value: &mut Value, targets: &HashMap<String, String>) {
    match value {
        Value::Object(object) => {
            for (key, child) in object.iter_mut() {
                match child {
                    Value::String(reference) if key == "reference" => {
                        if let Some(target) = targets.get(reference.as_str()) {
                            *reference = target.clone();
                        }
                    }
                    _ => rewrite_references(child, targets),
                }
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|item| rewrite_references(item, targets)),
        _ => {}
    }
}

/// FHIR's id rule: 1–64 of `A-Z a-z 0-9 - .`.
fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

/// xorshift64*: deterministic fault draws without a `rand` dependency.
#[derive(Debug)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }

    /// Uniform in `[0, 1)`.
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        bits as f64 / (1u64 << 53) as f64
    }
}
