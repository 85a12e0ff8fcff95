//! Who is calling and what they may do.
//!
//! Every request passes [`guard`] before it reaches a handler. The guard works out what the
//! request needs (nothing, for health checks and discovery; a role, for fhirgate's own
//! endpoints; SMART scopes, for FHIR interactions), finds the caller from its bearer token or
//! API key, and answers 401 (no or bad credentials) or 403 (not allowed) with an
//! OperationOutcome — or lets the request through with the caller's [`Principal`] in its
//! extensions.
//!
//! Callers with a patient-context scope (`patient/Observation.rs`) see only their patient's
//! compartment: searches get a `patient=` (or `_id=`) filter added, reads are checked against
//! the resource returned, and everything else is refused.

pub mod keys;
pub mod scopes;
pub mod tokens;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::audit::{AuditLog, AuditNote, Entry};
use crate::fhir::{FhirError, Issue, SearchRegistry};
use crate::store::Store;
use scopes::{Action, Context, Scope};

pub const ADMIN: &str = "admin";
pub const CLINICIAN: &str = "clinician";
pub const STAFF: &str = "staff";
pub const REVIEWER: &str = "reviewer";
pub const SYNC_OPERATOR: &str = "sync-operator";
pub const READ_ONLY: &str = "read-only";
/// The roles fhirgate knows; anything else in configuration is an error.
pub const ROLES: &[&str] = &[ADMIN, CLINICIAN, STAFF, REVIEWER, SYNC_OPERATOR, READ_ONLY];

/// The FHIR access a role brings with it, on top of any scopes the caller holds.
fn role_scopes(role: &str) -> &'static str {
    match role {
        ADMIN => "system/*.cruds",
        CLINICIAN | STAFF => "user/*.cruds",
        REVIEWER | READ_ONLY => "user/*.rs",
        SYNC_OPERATOR => "system/*.rs",
        _ => "",
    }
}

/// Checks role names from configuration or an API request.
pub fn check_roles(roles: &[String]) -> Result<(), String> {
    match roles.iter().find(|r| !ROLES.contains(&r.as_str())) {
        Some(unknown) => Err(format!(
            "unknown role {unknown:?}; roles are {}",
            ROLES.join(", ")
        )),
        None => Ok(()),
    }
}

/// Whether `id` is a FHIR id (`[A-Za-z0-9\-\.]{1,64}`).
fn is_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The token's `sub`, or the API key's name.
    pub subject: String,
    /// How it proved itself: `api-key`, `token` (issued here), `jwt` (an identity provider),
    /// or `open` when authentication is turned off.
    pub via: &'static str,
    pub roles: BTreeSet<String>,
    pub scopes: Vec<Scope>,
    /// The patient of a patient-context token (SMART `patient` claim).
    pub patient: Option<String>,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.roles.contains(ADMIN)
    }

    /// Whether the caller holds one of `roles` (admins hold every role).
    pub fn has_any_role(&self, roles: &[&str]) -> bool {
        self.is_admin() || roles.iter().any(|r| self.roles.contains(*r))
    }

    /// The caller's scopes, with those its roles bring.
    fn effective_scopes(&self) -> Vec<Scope> {
        let mut all = self.scopes.clone();
        for role in &self.roles {
            all.extend(Scope::parse_all(role_scopes(role)));
        }
        all
    }

    fn anonymous() -> Self {
        Self {
            subject: "anonymous".into(),
            via: "open",
            roles: BTreeSet::from([ADMIN.to_owned()]),
            scopes: Vec::new(),
            patient: None,
        }
    }
}

/// Why credentials were not accepted (said to the caller, never with the credential).
#[derive(Debug, Clone, Copy)]
pub struct AuthFailure {
    pub reason: &'static str,
}

impl AuthFailure {
    pub fn new(reason: &'static str) -> Self {
        Self { reason }
    }
}

/// A FHIR interaction, as the guard sees it from the method and path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FhirAccess {
    resource_type: String,
    action: Action,
    /// The instance read, updated or deleted.
    id: Option<String>,
    /// Type-level history or an operation: nothing a patient-context caller may do.
    whole_type: bool,
}

/// What a request needs from its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Need {
    Public,
    /// One of these roles (admins always pass).
    Role(&'static [&'static str]),
    Fhir(FhirAccess),
    /// Anything the guard cannot classify, batches and transactions: only callers allowed
    /// every interaction on every type.
    Everything,
}

fn classify(method: &Method, path: &str, sources: &BTreeSet<String>, open_metrics: bool) -> Need {
    let read = matches!(*method, Method::GET | Method::HEAD);
    match path {
        "/healthz" | "/readyz" => return Need::Public,
        "/metrics" if open_metrics => return Need::Public,
        "/metrics" => return Need::Role(&[READ_ONLY]),
        "/auth/token" => return Need::Public,
        "/.well-known/smart-configuration" | "/fhir/.well-known/smart-configuration" => {
            return Need::Public
        }
        _ => {}
    }
    // CDS Hooks callers prove themselves with the JWT CDS Hooks defines (see `cds::auth`);
    // discovery is public by the specification.
    if path == "/cds-services" || path.starts_with("/cds-services/") {
        return Need::Public;
    }
    // Webhook senders sign their requests (see `webhooks`).
    if path.starts_with("/webhooks/") {
        return Need::Public;
    }
    // The review page signs in through a SMART launch and works with its own session
    // (`pipeline::app`); its assets are public.
    if path == "/app" || path.starts_with("/app/") {
        return Need::Public;
    }
    if path == "/events" {
        return Need::Role(&[CLINICIAN, STAFF, REVIEWER, ADMIN]);
    }
    if path == "/auth/api-keys" || path.starts_with("/auth/api-keys/") {
        return Need::Role(&[ADMIN]);
    }
    // The audit log is for admins only, whatever the caller's scopes.
    if path == "/fhir/AuditEvent"
        || path.starts_with("/fhir/AuditEvent/")
        || path == "/audit/verify"
    {
        return Need::Role(&[ADMIN]);
    }
    if path.starts_with("/sync/") || path.starts_with("/api/sync-") {
        return Need::Role(if read {
            &[SYNC_OPERATOR, READ_ONLY]
        } else {
            &[SYNC_OPERATOR]
        });
    }
    if let Some(rest) = path.strip_prefix("/pas/claims/") {
        return match (rest.split_once('/'), read) {
            (None, true) => Need::Role(&[REVIEWER, CLINICIAN, STAFF, READ_ONLY]),
            (Some((_, "decision")), false) => Need::Role(&[REVIEWER]),
            _ => Need::Everything,
        };
    }
    if path == "/packets" || path.starts_with("/packets/") {
        return Need::Role(if read {
            &[CLINICIAN, STAFF, REVIEWER, READ_ONLY]
        } else {
            &[CLINICIAN, STAFF]
        });
    }
    let Some(rest) = path.strip_prefix("/fhir") else {
        return Need::Everything;
    };
    let mut segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    if segments.first().is_some_and(|s| sources.contains(*s)) {
        segments.remove(0);
    }
    classify_fhir(method, &segments)
}

fn classify_fhir(method: &Method, segments: &[&str]) -> Need {
    let read = matches!(*method, Method::GET | Method::HEAD);
    if segments == ["metadata"] && read {
        return Need::Public;
    }
    let Some((&resource_type, rest)) = segments.split_first() else {
        return Need::Everything;
    };
    let is_type = resource_type.starts_with(|c: char| c.is_ascii_uppercase())
        && resource_type.bytes().all(|b| b.is_ascii_alphabetic());
    if !is_type {
        return Need::Everything;
    }
    let access = |action, id: Option<&str>, whole_type| {
        Need::Fhir(FhirAccess {
            resource_type: resource_type.to_owned(),
            action,
            id: id.map(str::to_owned),
            whole_type,
        })
    };
    match (method.as_str(), rest) {
        ("GET" | "HEAD", []) | ("POST", ["_search"]) => access(Action::Search, None, false),
        ("POST", []) => access(Action::Create, None, false),
        // Conditional update and delete: writes of whatever matches.
        ("PUT", []) => access(Action::Update, None, true),
        ("DELETE", []) => access(Action::Delete, None, true),
        ("GET" | "HEAD", ["_history"]) => access(Action::Read, None, true),
        ("POST", ["$submit"]) if resource_type == "Claim" => access(Action::Create, None, true),
        ("POST", ["$inquire"]) if resource_type == "Claim" => access(Action::Search, None, true),
        ("GET" | "HEAD", [id] | [id, "_history"] | [id, "_history", _] | [id, "$status"])
            if is_fhir_id(id) =>
        {
            access(Action::Read, Some(id), false)
        }
        ("PUT", [id]) if is_fhir_id(id) => access(Action::Update, Some(id), false),
        ("DELETE", [id]) if is_fhir_id(id) => access(Action::Delete, Some(id), false),
        _ => Need::Everything,
    }
}

/// How a patient-context caller's request is narrowed.
enum Narrowing {
    /// Add this `name=value` to the search.
    Filter(&'static str, String),
    /// Let the read run and check what it returns.
    CheckResponse,
}

/// A refusal: 401 (who are you?) or 403 (not for you).
struct Refusal {
    status: StatusCode,
    code: &'static str,
    reason: String,
}

impl Refusal {
    fn unauthenticated(reason: &str) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: "login",
            reason: reason.to_owned(),
        }
    }

    fn forbidden(reason: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            code: "forbidden",
            reason: reason.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        metrics::counter!(
            "fhirgate_auth_refusals_total",
            "status" => self.status.as_u16().to_string()
        )
        .increment(1);
        let mut response =
            FhirError::new(self.status, Issue::error(self.code, &self.reason)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            // RFC 6750: say what kind of credential is wanted, and why this one failed.
            let challenge = if self.reason == "no credentials" {
                r#"Bearer realm="fhirgate""#.to_owned()
            } else {
                format!(
                    r#"Bearer realm="fhirgate", error="invalid_token", error_description="{}""#,
                    self.reason.replace('"', "'")
                )
            };
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, value);
            }
        }
        response
    }
}

/// The authentication and authorization state shared by the guard and `/auth` routes.
pub struct AuthApi {
    required: bool,
    open_metrics: bool,
    pub tokens: tokens::Tokens,
    pub keys: keys::ApiKeys,
    search: Arc<SearchRegistry>,
    /// Configured EHR sources, readable under `/fhir/{source}/`.
    sources: BTreeSet<String>,
    public_base: String,
    pub audit: Arc<AuditLog>,
    /// Service clients by the SHA-256 of their TLS client certificate.
    mtls: HashMap<String, Principal>,
    limits: Option<RateLimits>,
}

/// Requests per second per caller: an authenticated client by its subject, anyone else by
/// IP address.
struct RateLimits {
    limiter: governor::DefaultKeyedRateLimiter<String>,
    /// Checks since idle callers were last forgotten.
    checks: std::sync::atomic::AtomicU32,
    /// Addresses over their limit of failed logins, until when: their credentials are not
    /// even looked at meanwhile.
    blocked: std::sync::Mutex<HashMap<String, std::time::Instant>>,
}

impl RateLimits {
    fn new(per_sec: u32, burst: u32) -> Option<Self> {
        let rate = std::num::NonZeroU32::new(per_sec)?;
        let burst = std::num::NonZeroU32::new(burst.max(per_sec)).unwrap_or(rate);
        Some(Self {
            limiter: governor::RateLimiter::keyed(
                governor::Quota::per_second(rate).allow_burst(burst),
            ),
            checks: std::sync::atomic::AtomicU32::new(0),
            blocked: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Seconds `key` must still wait after too many failed logins.
    fn blocked_for(&self, key: &str) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        match blocked.get(key) {
            Some(until) if *until > now => {
                let wait = *until - now;
                Some(whole_seconds(wait))
            }
            Some(_) => {
                blocked.remove(key);
                None
            }
            None => None,
        }
    }

    /// Counts a failed login from `key`; `Err(wait)` once it is over its limit.
    fn failed(&self, key: &str) -> Result<(), u64> {
        self.check(key).inspect_err(|wait| {
            let until = std::time::Instant::now() + std::time::Duration::from_secs(*wait);
            let mut blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
            let now = std::time::Instant::now();
            blocked.retain(|_, until| *until > now);
            blocked.insert(key.to_owned(), until);
        })
    }

    /// `Err(seconds to wait)` when `key` is over its rate.
    fn check(&self, key: &str) -> Result<(), u64> {
        use governor::clock::{Clock, DefaultClock};
        use std::sync::atomic::Ordering;
        if self.checks.fetch_add(1, Ordering::Relaxed) % 8192 == 8191 {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&key.to_owned())
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                whole_seconds(wait)
            })
    }
}

/// `wait` rounded up to whole seconds, as `Retry-After` gives it.
fn whole_seconds(wait: std::time::Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

/// 429 with `Retry-After`.
fn too_many(entry: &mut Entry, wait_secs: u64) -> Response {
    entry.add_detail("refused: over the rate limit");
    let mut response = FhirError::new(
        StatusCode::TOO_MANY_REQUESTS,
        Issue::error(
            "throttled",
            "too many requests; retry after the time in Retry-After",
        ),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(wait_secs.max(1)));
    metrics::counter!("fhirgate_rate_limited_total").increment(1);
    response
}

/// The largest read response a patient-context check buffers.
const MAX_CHECKED_BODY: usize = 64 << 20;

impl AuthApi {
    /// Loads keys and the token secret; creates the first admin key when there is none.
    pub async fn build(
        full: &crate::config::Config,
        store: Arc<dyn Store>,
        search: Arc<SearchRegistry>,
        sources: BTreeSet<String>,
        public_base: &str,
        audit: Arc<AuditLog>,
    ) -> anyhow::Result<Self> {
        let config = &full.auth;
        let data_dir = &full.store.data_dir;
        for client in &config.clients {
            check_roles(&client.roles)
                .map_err(|e| anyhow::anyhow!("auth client {}: {e}", client.client_id))?;
        }
        for key in &config.api_keys {
            check_roles(&key.roles).map_err(|e| anyhow::anyhow!("auth key {}: {e}", key.name))?;
        }
        let secret = keys::token_secret(store.as_ref()).await?;
        let tokens = tokens::Tokens::new(
            &config.issuers,
            &config.clients,
            public_base,
            secret,
            config.token_lifetime_secs,
            crate::remote::outbound::Outbound::new(&full.outbound)?.client(),
        )?;
        let keys = keys::ApiKeys::load(store, &config.api_keys).await?;
        if config.required {
            keys.bootstrap(data_dir).await?;
        } else {
            tracing::warn!(
                "authentication is OFF (auth.required = false): anyone who can reach this server can read and change everything; never run like this with real data"
            );
        }
        let mut mtls = HashMap::new();
        for client in &config.mtls_clients {
            check_roles(&client.roles)
                .map_err(|e| anyhow::anyhow!("auth.mtls_clients {}: {e}", client.name))?;
            let sha = client.sha256.trim().to_ascii_lowercase().replace(':', "");
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                anyhow::bail!(
                    "auth.mtls_clients {}: sha256 must be the certificate's SHA-256 in hex",
                    client.name
                );
            }
            mtls.insert(
                sha,
                Principal {
                    subject: format!("mtls:{}", client.name),
                    via: "mtls",
                    roles: client.roles.iter().cloned().collect(),
                    scopes: client
                        .scopes
                        .iter()
                        .filter_map(|s| Scope::parse(s))
                        .collect(),
                    patient: None,
                },
            );
        }
        if config.open_metrics {
            tracing::warn!("/metrics is open to anyone (auth.open_metrics = true)");
        }
        Ok(Self {
            required: config.required,
            open_metrics: config.open_metrics,
            tokens,
            keys,
            search,
            sources,
            public_base: public_base.trim_end_matches('/').to_owned(),
            audit,
            mtls,
            limits: RateLimits::new(full.server.rate_limit_per_sec, full.server.rate_limit_burst),
        })
    }

    /// The caller named by the request's credentials: `Authorization: Bearer …` (a JWT or an
    /// API key) or `X-API-Key`, else a known TLS client certificate. `None` when there are
    /// none.
    async fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: Option<&crate::http::Peer>,
    ) -> Result<Option<Principal>, AuthFailure> {
        let api_key = headers.get("x-api-key").map(|v| v.to_str().unwrap_or(""));
        let bearer = match headers.get(header::AUTHORIZATION) {
            Some(value) => {
                let value = value
                    .to_str()
                    .map_err(|_| AuthFailure::new("malformed Authorization header"))?;
                let (scheme, credential) = value
                    .split_once(' ')
                    .ok_or_else(|| AuthFailure::new("malformed Authorization header"))?;
                if !scheme.eq_ignore_ascii_case("bearer") {
                    return Err(AuthFailure::new("only Bearer credentials are accepted"));
                }
                Some(credential.trim())
            }
            None => None,
        };
        match (bearer, api_key) {
            (Some(_), Some(_)) => Err(AuthFailure::new("give one credential, not two")),
            (None, None) => Ok(peer
                .and_then(|peer| peer.client_cert.as_ref())
                .and_then(|sha| self.mtls.get(sha))
                .cloned()),
            (Some(credential), None) if !credential.starts_with(keys::PREFIX) => {
                let principal = self.tokens.verify(credential).await?;
                if principal.patient.as_deref().is_some_and(|p| !is_fhir_id(p)) {
                    return Err(AuthFailure::new("the patient claim is not a FHIR id"));
                }
                Ok(Some(principal))
            }
            (Some(key), None) | (None, Some(key)) => self
                .keys
                .lookup(key)
                .map(Some)
                .ok_or_else(|| AuthFailure::new("unknown API key")),
        }
    }

    /// Whether `principal` may make a FHIR interaction, and how a patient-context caller's
    /// request is narrowed.
    fn authorize_fhir(
        &self,
        principal: &Principal,
        access: &FhirAccess,
    ) -> Result<Option<Narrowing>, Refusal> {
        let scopes = principal.effective_scopes();
        let context =
            scopes::allowed(&scopes, &access.resource_type, access.action).ok_or_else(|| {
                Refusal::forbidden(format!(
                    "no scope allows {:?} on {}",
                    access.action, access.resource_type
                ))
            })?;
        if context != Context::Patient {
            return Ok(None);
        }
        let patient = principal.patient.as_deref().ok_or_else(|| {
            Refusal::forbidden("a patient-context scope needs a patient in the token")
        })?;
        if access.whole_type || !matches!(access.action, Action::Read | Action::Search) {
            return Err(Refusal::forbidden(
                "a patient-context token may only read and search its patient's compartment",
            ));
        }
        let is_patient = access.resource_type == "Patient";
        if !is_patient
            && self
                .search
                .param(&access.resource_type, "patient")
                .is_none()
        {
            return Err(Refusal::forbidden(format!(
                "{} is not in the patient compartment",
                access.resource_type
            )));
        }
        Ok(Some(match (access.action, is_patient) {
            (Action::Search, true) => Narrowing::Filter("_id", patient.to_owned()),
            (Action::Search, false) => Narrowing::Filter("patient", format!("Patient/{patient}")),
            _ => Narrowing::CheckResponse,
        }))
    }

    /// Whether `resource` (or every resource of a history Bundle) is in `patient`'s
    /// compartment.
    fn in_compartment(&self, resource: &Value, patient: &str) -> bool {
        let resource_type = resource["resourceType"].as_str().unwrap_or_default();
        if resource_type == "Bundle" {
            return resource["entry"].as_array().is_none_or(|entries| {
                entries.iter().all(|entry| {
                    entry
                        .get("resource")
                        .is_none_or(|r| self.in_compartment(r, patient))
                })
            });
        }
        if resource_type == "Patient" {
            return resource["id"].as_str() == Some(patient);
        }
        let wanted = format!("Patient/{patient}");
        self.search
            .references_of(resource_type, "patient", resource)
            .contains(&wanted)
    }
}

/// Adds `name=value` to the query of `uri`.
fn with_filter(uri: &Uri, name: &str, value: &str) -> Option<Uri> {
    let added = serde_urlencoded::to_string([(name, value)]).ok()?;
    let query = match uri.query() {
        Some(q) if !q.is_empty() => format!("{q}&{added}"),
        _ => added,
    };
    format!("{}?{query}", uri.path()).parse().ok()
}

/// Whether a query (`a=1&b=2`) has search parameters that reach beyond the resources matched.
fn reaches_beyond(query: &str) -> bool {
    query.split('&').any(|pair| {
        let name = pair.split('=').next().unwrap_or_default();
        let name = serde_urlencoded::from_str::<Vec<(String, String)>>(&format!("{name}="))
            .ok()
            .and_then(|mut pairs| pairs.pop())
            .map_or_else(|| name.to_owned(), |(decoded, _)| decoded);
        name.starts_with("_include")
            || name.starts_with("_revinclude")
            || name.starts_with("_has")
            || name.starts_with("_contained")
    })
}

/// The largest `_search` form a patient-context check reads.
const MAX_SEARCH_FORM: usize = 1 << 20;

/// The middleware: authenticate, authorize, narrow, pass the caller on to the handler, and
/// record what happened in the audit log (writes before they are answered).
pub async fn guard(State(auth): State<Arc<AuthApi>>, request: Request, next: Next) -> Response {
    let mut need = classify(
        request.method(),
        request.uri().path(),
        &auth.sources,
        auth.open_metrics,
    );
    // A review page listens with its session cookie, which the handler checks.
    if request.uri().path() == "/events"
        && crate::pipeline::app::has_session_cookie(request.headers())
    {
        need = Need::Public;
    }
    if need == Need::Public {
        // CDS clients prove themselves inside the service (`cds::auth`), webhook senders
        // with their signature (`webhooks`); their calls are recorded here all the same, as
        // they touch patient data.
        let path = request.uri().path();
        let mut entry = if let Some(path) = cds_call(request.method(), path) {
            let mut entry = audit_entry(&request, "operation", None, None, Some(path));
            entry.who = "cds-client".into();
            entry.via = "cds-jwt".into();
            entry
        } else if path == "/auth/token" {
            // Token requests are logins: limited by address and recorded, refused or not.
            let mut entry = audit_entry(&request, "login", None, None, Some(path));
            entry.who = "token-client".into();
            entry.via = "client-assertion".into();
            entry
        } else if path.starts_with("/app/api/")
            || path == "/app/launch"
            || path == "/app/callback"
            || path == "/app/dev"
            || path == "/events"
        {
            // Review-page calls touch patient data: recorded like any other.
            let action = if path.starts_with("/app/api/") || path == "/events" {
                if matches!(*request.method(), Method::GET | Method::HEAD) {
                    "read"
                } else {
                    "update"
                }
            } else {
                "login"
            };
            let mut entry = audit_entry(&request, action, None, None, Some(path));
            entry.who = "review-session".into();
            entry.via = "session-cookie".into();
            entry
        } else if let Some(source) = path.strip_prefix("/webhooks/") {
            let mut entry = audit_entry(&request, "webhook", None, None, Some(path));
            entry.who = format!("webhook:{}", source.chars().take(64).collect::<String>());
            entry.via = "hmac".into();
            entry
        } else {
            return next.run(request).await;
        };
        let key = format!("ip:{}", entry.source.as_deref().unwrap_or("unknown"));
        if let Some(Err(wait)) = auth.limits.as_ref().map(|l| l.check(&key)) {
            let response = too_many(&mut entry, wait);
            entry.outcome = response.status().as_u16();
            auth.audit.record(entry).await;
            return response;
        }
        let response = next.run(request).await;
        entry.outcome = response.status().as_u16();
        add_note(&mut entry, &response);
        // A webhook starts a sync: its record is committed before the sender hears back.
        if entry.action == "webhook" {
            auth.audit.record_durably(entry).await;
        } else {
            auth.audit.record(entry).await;
        }
        return response;
    }
    let mut entry = describe(&request, &need, &auth.sources);
    let response = admit(&auth, need, request, next, &mut entry).await;
    entry.outcome = response.status().as_u16();
    add_note(&mut entry, &response);
    if entry.action == "create" && entry.resource_id.is_none() {
        entry.resource_id = created_id(&response);
    }
    // A change was recorded before it ran (see `admit`); its result follows without waiting.
    auth.audit.record(entry).await;
    response
}

/// Adds what the handler said for the audit log (an [`AuditNote`]) to the entry's detail.
fn add_note(entry: &mut Entry, response: &Response) {
    if let Some(AuditNote(note)) = response.extensions().get::<AuditNote>() {
        entry.add_detail(note);
    }
}

/// Sets why a request was refused on its audit entry, and answers the refusal.
fn refuse(entry: &mut Entry, refusal: Refusal) -> Response {
    entry.add_detail(&format!("refused: {}", refusal.reason));
    refusal.into_response()
}

/// The guard's work between classifying a request and recording it.
async fn admit(
    auth: &AuthApi,
    need: Need,
    mut request: Request,
    next: Next,
    entry: &mut Entry,
) -> Response {
    let by_address = || format!("ip:{}", entry.source.as_deref().unwrap_or("unknown"));
    let principal = if auth.required {
        // An address that failed too often waits before any credential of it is checked,
        // the right one included: guessing stays slow.
        if let Some(wait) = auth
            .limits
            .as_ref()
            .and_then(|l| l.blocked_for(&by_address()))
        {
            return too_many(entry, wait);
        }
        let peer = request.extensions().get::<crate::http::Peer>();
        let authenticated = auth.authenticate(request.headers(), peer).await;
        if !matches!(authenticated, Ok(Some(_))) {
            if let Some(Err(wait)) = auth.limits.as_ref().map(|l| l.failed(&by_address())) {
                return too_many(entry, wait);
            }
        }
        match authenticated {
            Ok(Some(principal)) => principal,
            Ok(None) => return refuse(entry, Refusal::unauthenticated("no credentials")),
            Err(failure) => {
                tracing::warn!(reason = failure.reason, "credentials refused");
                entry.action = "login".into();
                return refuse(entry, Refusal::unauthenticated(failure.reason));
            }
        }
    } else {
        Principal::anonymous()
    };
    // API keys and certificates name themselves `api-key:…`, `mtls:…`; tokens' subjects are
    // prefixed too, so a token whose `sub` reads `api-key:x` is never taken for that key.
    let who = match principal.via {
        "jwt" | "token" => format!("{}:{}", principal.via, principal.subject),
        _ => principal.subject.clone(),
    };
    entry.via = principal.via.into();
    let key = if principal.via == "open" {
        by_address()
    } else {
        who.clone()
    };
    entry.who = who;
    if let Some(Err(wait)) = auth.limits.as_ref().map(|l| l.check(&key)) {
        return too_many(entry, wait);
    }
    let narrowing = match &need {
        Need::Public => None,
        Need::Role(roles) if principal.has_any_role(roles) => None,
        Need::Role(roles) => {
            return refuse(
                entry,
                Refusal::forbidden(format!("this needs the role {}", roles.join(" or "))),
            )
        }
        Need::Everything
            if principal.is_admin() || scopes::allows_everything(&principal.effective_scopes()) =>
        {
            None
        }
        Need::Everything => {
            return refuse(
                entry,
                Refusal::forbidden("this needs access to every resource type"),
            )
        }
        Need::Fhir(access) => match auth.authorize_fhir(&principal, access) {
            Ok(narrowing) => narrowing,
            Err(refusal) => return refuse(entry, refusal),
        },
    };
    let patient = principal.patient.clone().unwrap_or_default();
    if let Some(patient) = &principal.patient {
        entry.add_detail(&format!("patient context Patient/{patient}"));
    }
    request.extensions_mut().insert(principal);
    match narrowing {
        None => {
            // What changes data is recorded before it runs, in a commit the change's own
            // commit takes to disk: no change is ever stored without its record.
            let changes = !matches!(*request.method(), Method::GET | Method::HEAD)
                && entry.action != "search-type";
            if changes {
                let mut intent = entry.clone();
                intent.outcome = 0;
                auth.audit.record_before(intent).await;
            }
            next.run(request).await
        }
        Some(Narrowing::Filter(name, value)) => {
            let beyond = Refusal::forbidden(
                "_include, _revinclude, _has and _contained are not available to a patient-context token",
            );
            if reaches_beyond(request.uri().query().unwrap_or_default()) {
                return refuse(entry, beyond);
            }
            if request.method() == Method::POST {
                // `_search` by POST: its parameters are in the form too.
                let (parts, body) = request.into_parts();
                let Ok(form) = axum::body::to_bytes(body, MAX_SEARCH_FORM).await else {
                    return FhirError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        Issue::error("too-long", "the search form is too large"),
                    )
                    .into_response();
                };
                if reaches_beyond(&String::from_utf8_lossy(&form)) {
                    return refuse(entry, beyond);
                }
                request = Request::from_parts(parts, Body::from(form));
            }
            let Some(uri) = with_filter(request.uri(), name, &value) else {
                return FhirError::bad_request("invalid", "the query cannot be read")
                    .into_response();
            };
            *request.uri_mut() = uri;
            next.run(request).await
        }
        Some(Narrowing::CheckResponse) => {
            // The body is read here; a compressed one could not be.
            request.headers_mut().remove(header::ACCEPT_ENCODING);
            let response = next.run(request).await;
            if !response.status().is_success() {
                return response;
            }
            let (parts, body) = response.into_parts();
            let Ok(bytes) = axum::body::to_bytes(body, MAX_CHECKED_BODY).await else {
                return FhirError::internal("the response could not be checked").into_response();
            };
            let inside = serde_json::from_slice::<Value>(&bytes)
                .is_ok_and(|resource| auth.in_compartment(&resource, &patient));
            if !inside {
                return refuse(
                    entry,
                    Refusal::forbidden("the resource is outside the patient's compartment"),
                );
            }
            Response::from_parts(parts, Body::from(bytes))
        }
    }
}

/// `POST /cds-services/{id}` (and its feedback): the path, when it is one.
fn cds_call<'a>(method: &Method, path: &'a str) -> Option<&'a str> {
    (*method == Method::POST && path.starts_with("/cds-services/")).then_some(path)
}

/// A fresh audit entry for `request`: time, source address, request id and what it does.
fn audit_entry(
    request: &Request,
    action: &str,
    resource_type: Option<String>,
    resource_id: Option<String>,
    detail: Option<&str>,
) -> Entry {
    let mut entry = Entry::now("unauthenticated", "none", action);
    entry.resource_type = resource_type;
    entry.resource_id = resource_id;
    entry.detail = detail.map(str::to_owned);
    entry.source = request
        .extensions()
        .get::<crate::http::Peer>()
        .map(|peer| peer.addr.ip().to_string());
    entry.request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(|id| id.chars().take(200).collect());
    entry
}

/// The names (never the values) of a query's parameters, sorted.
fn parameter_names(query: &str) -> String {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).unwrap_or_default();
    let names: BTreeSet<String> = pairs
        .into_iter()
        .map(|(name, _)| name.chars().take(100).collect())
        .collect();
    names.into_iter().collect::<Vec<_>>().join(",")
}

/// The audit entry of a request that needs a caller: its action, resource and a detail that
/// names the route and the search parameters, never their values.
fn describe(request: &Request, need: &Need, sources: &BTreeSet<String>) -> Entry {
    let method = request.method();
    let path = request.uri().path();
    let query = request.uri().query().unwrap_or_default();
    let read = matches!(*method, Method::GET | Method::HEAD);
    let via_source = path
        .strip_prefix("/fhir/")
        .and_then(|rest| rest.split('/').next())
        .filter(|first| sources.contains(*first))
        .map(|source| format!("source {source}"));
    let searched = (!query.is_empty()).then(|| format!("params {}", parameter_names(query)));
    let detail = [via_source, searched]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("; ");
    let detail = (!detail.is_empty()).then_some(detail);
    match need {
        Need::Fhir(access) => {
            let action = match access.action {
                Action::Search if path.ends_with("/$inquire") => "operation",
                Action::Search => "search-type",
                Action::Create if path.ends_with("/$submit") => "operation",
                Action::Create => "create",
                Action::Update => "update",
                Action::Delete => "delete",
                Action::Read if path.ends_with("/$status") => "operation",
                Action::Read if path.ends_with("/_history") && access.id.is_some() => {
                    "history-instance"
                }
                Action::Read if path.ends_with("/_history") => "history-type",
                Action::Read if path.contains("/_history/") => "vread",
                Action::Read => "read",
            };
            audit_entry(
                request,
                action,
                Some(access.resource_type.clone()),
                access.id.clone(),
                detail.as_deref(),
            )
        }
        _ => {
            let action = if path.starts_with("/auth/api-keys") && !read {
                "admin"
            } else if path == "/sync/jobs" && !read
                || path.starts_with("/api/sync-")
                || path.starts_with("/sync/dead-letters/") && !read
                || path.ends_with("/write-back")
            {
                "export"
            } else if matches!(path, "/fhir" | "/fhir/") && !read {
                "batch"
            } else if path.starts_with("/fhir/AuditEvent") && read {
                if path == "/fhir/AuditEvent" {
                    "search-type"
                } else {
                    "read"
                }
            } else if read {
                "read"
            } else {
                "operation"
            };
            let route = format!("{method} {path}");
            let detail = match detail {
                Some(detail) => format!("{route}; {detail}"),
                None => route,
            };
            let (resource_type, id) = match path.strip_prefix("/fhir/AuditEvent") {
                Some("") => (Some("AuditEvent".to_owned()), None),
                Some(rest) => (
                    Some("AuditEvent".to_owned()),
                    rest.strip_prefix('/').map(str::to_owned),
                ),
                None => (None, None),
            };
            audit_entry(request, action, resource_type, id, Some(&detail))
        }
    }
}

/// The id in a create's `Location` (`…/Type/id/_history/1`).
fn created_id(response: &Response) -> Option<String> {
    let location = response.headers().get(header::LOCATION)?.to_str().ok()?;
    let path = location.split("/_history/").next()?;
    let id = path.rsplit('/').next()?;
    is_fhir_id(id).then(|| id.to_owned())
}

/// The `/auth` routes and SMART discovery.
pub fn router(api: Arc<AuthApi>) -> Router {
    Router::new()
        .route("/auth/token", post(token))
        .route("/.well-known/smart-configuration", get(smart_configuration))
        .route(
            "/fhir/.well-known/smart-configuration",
            get(smart_configuration),
        )
        .route("/auth/api-keys", get(list_keys).post(create_key))
        .route("/auth/api-keys/{id}", delete(revoke_key))
        .with_state(api)
}

/// `POST /auth/token`: client_credentials with a signed assertion (SMART Backend Services).
async fn token(State(api): State<Arc<AuthApi>>, headers: HeaderMap, body: Bytes) -> Response {
    let form_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"));
    let answer = if form_type {
        match serde_urlencoded::from_bytes::<HashMap<String, String>>(&body) {
            Ok(form) => api.tokens.grant(&form),
            Err(_) => Err((
                400,
                json!({"error": "invalid_request", "error_description": "the form cannot be read"}),
            )),
        }
    } else {
        Err((
            400,
            json!({"error": "invalid_request", "error_description": "send application/x-www-form-urlencoded"}),
        ))
    };
    let (status, body) = match answer {
        Ok(body) => (StatusCode::OK, body),
        Err((status, body)) => {
            tracing::warn!(error = %body["error"], "token request refused");
            (
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                body,
            )
        }
    };
    let mut response = (status, Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// SMART App Launch discovery: where the token endpoint is and what it accepts.
async fn smart_configuration(State(api): State<Arc<AuthApi>>) -> Json<Value> {
    Json(json!({
        "issuer": api.public_base,
        "token_endpoint": api.tokens.token_url(),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": ["system/*.cruds", "system/*.rs", "system/Claim.c", "system/ClaimResponse.rs"],
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    name: String,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    scopes: Vec<String>,
}

/// `POST /auth/api-keys` (admins): a new service-account key, shown this once.
async fn create_key(
    State(api): State<Arc<AuthApi>>,
    axum::Extension(caller): axum::Extension<Principal>,
    body: Bytes,
) -> Result<Response, FhirError> {
    let request: NewKey = serde_json::from_slice(&body).map_err(|e| {
        FhirError::bad_request("invalid", format!("expected {{name, roles, scopes}}: {e}"))
    })?;
    let name = request.name.trim();
    if name.is_empty() || name.len() > 100 {
        return Err(FhirError::bad_request(
            "invalid",
            "name: 1 to 100 characters",
        ));
    }
    check_roles(&request.roles).map_err(|e| FhirError::bad_request("invalid", e))?;
    if let Some(bad) = request.scopes.iter().find(|s| Scope::parse(s).is_none()) {
        return Err(FhirError::bad_request(
            "invalid",
            format!("{bad:?} is not a SMART resource scope"),
        ));
    }
    if request.roles.is_empty() && request.scopes.is_empty() {
        return Err(FhirError::bad_request(
            "invalid",
            "a key needs at least one role or scope",
        ));
    }
    let (key, record) = api
        .keys
        .create(name, request.roles, request.scopes, &caller.subject)
        .await
        .map_err(|e| FhirError::internal(format!("the key could not be stored: {e}")))?;
    tracing::info!(key_id = %record.id, by = %caller.subject, "API key created");
    let mut shown = serde_json::to_value(&record).unwrap_or_default();
    shown["key"] = Value::String(key);
    Ok((StatusCode::CREATED, Json(shown)).into_response())
}

/// `GET /auth/api-keys` (admins): the keys, without their secrets.
async fn list_keys(State(api): State<Arc<AuthApi>>) -> Json<Value> {
    Json(json!({ "keys": api.keys.list() }))
}

/// `DELETE /auth/api-keys/{id}` (admins): revokes a key at once.
async fn revoke_key(
    State(api): State<Arc<AuthApi>>,
    axum::Extension(caller): axum::Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, FhirError> {
    match api.keys.revoke(&id).await {
        Ok(true) => {
            tracing::info!(key_id = %id, by = %caller.subject, "API key revoked");
            Ok(StatusCode::NO_CONTENT)
        }
        Ok(false) => Err(FhirError::not_found(format!(
            "no API key {id} (keys from the configuration file are removed there)"
        ))),
        Err(e) => Err(FhirError::internal(format!(
            "the key could not be revoked: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fhir(method: Method, path: &str) -> Need {
        classify(&method, path, &BTreeSet::from(["ehr".to_owned()]), false)
    }

    fn access(resource_type: &str, action: Action, id: Option<&str>, whole_type: bool) -> Need {
        Need::Fhir(FhirAccess {
            resource_type: resource_type.into(),
            action,
            id: id.map(Into::into),
            whole_type,
        })
    }

    #[test]
    fn requests_are_classified_by_method_and_path() {
        assert_eq!(fhir(Method::GET, "/healthz"), Need::Public);
        assert_eq!(fhir(Method::GET, "/fhir/metadata"), Need::Public);
        assert_eq!(fhir(Method::GET, "/fhir/ehr/metadata"), Need::Public);
        assert_eq!(fhir(Method::POST, "/cds-services/pa-check"), Need::Public);
        assert_eq!(fhir(Method::GET, "/metrics"), Need::Role(&[READ_ONLY]));
        assert_eq!(
            fhir(Method::GET, "/fhir/Observation"),
            access("Observation", Action::Search, None, false)
        );
        assert_eq!(
            fhir(Method::GET, "/fhir/ehr/Observation/o-1"),
            access("Observation", Action::Read, Some("o-1"), false)
        );
        assert_eq!(
            fhir(Method::GET, "/fhir/Patient/p-1/_history/2"),
            access("Patient", Action::Read, Some("p-1"), false)
        );
        assert_eq!(
            fhir(Method::POST, "/fhir/Claim/$submit"),
            access("Claim", Action::Create, None, true)
        );
        assert_eq!(
            fhir(Method::PUT, "/fhir/Patient"),
            access("Patient", Action::Update, None, true)
        );
        assert_eq!(
            fhir(Method::DELETE, "/fhir/Patient/p-1"),
            access("Patient", Action::Delete, Some("p-1"), false)
        );
        // What the guard cannot read is only for callers allowed everything.
        for (method, path) in [
            (Method::POST, "/fhir"),
            (Method::GET, "/fhir/Patient/p%2F1"),
            (Method::GET, "/fhir/patient/p-1"),
            (Method::POST, "/fhir/Patient/$everything"),
            (Method::GET, "/fhir/Patient/p-1/Observation"),
            (Method::GET, "/somewhere"),
        ] {
            assert_eq!(fhir(method, path), Need::Everything, "{path}");
        }
        assert_eq!(
            fhir(Method::POST, "/pas/claims/c-1/decision"),
            Need::Role(&[REVIEWER])
        );
        assert_eq!(
            fhir(Method::POST, "/sync/jobs"),
            Need::Role(&[SYNC_OPERATOR])
        );
    }

    #[test]
    fn filters_are_added_to_the_query() {
        let uri: Uri = "/fhir/Observation?code=1234-5".parse().expect("uri");
        let narrowed = with_filter(&uri, "patient", "Patient/p-1").expect("uri");
        assert_eq!(
            narrowed.to_string(),
            "/fhir/Observation?code=1234-5&patient=Patient%2Fp-1"
        );
        let bare: Uri = "/fhir/Patient".parse().expect("uri");
        assert_eq!(
            with_filter(&bare, "_id", "p-1").expect("uri").to_string(),
            "/fhir/Patient?_id=p-1"
        );
        assert!(reaches_beyond("_revinclude=Observation:subject"));
        assert!(reaches_beyond("name=x&%5Finclude=Observation:patient"));
        assert!(reaches_beyond("_has:Observation:patient:code=1"));
        assert!(!reaches_beyond("name=x&code=_include"));
    }

    #[test]
    fn unknown_roles_are_named() {
        assert!(check_roles(&["admin".into(), "reviewer".into()]).is_ok());
        let error = check_roles(&["superuser".into()]).expect_err("unknown");
        assert!(error.contains("superuser"), "{error}");
    }
}
