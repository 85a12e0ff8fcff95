//! `/app`: the review page, launched from the EHR as a SMART on FHIR app.
//!
//! EHR launch: `/app/launch?iss=…&launch=…` checks that `iss` is a configured tenant, reads its
//! `.well-known/smart-configuration`, and sends the browser to the EHR's authorize endpoint
//! with PKCE (S256) and a single-use `state`; `/app/callback` exchanges the code and takes the
//! patient, encounter and practitioner context from the token response. The EHR's access
//! token is not kept: fhirgate reads the chart with the tenant's own credentials. The page
//! then works with an opaque session cookie (the store keeps only its hash) and can see only
//! its own patient's items. `pipeline.app.dev_login` adds `/app/dev` for local development.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post, put};
use axum::Router;
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Digest;

use super::submit::{self, SubmitError};
use super::{instant, now_micros, process, random_token, Pipeline, Status, Transaction};
use crate::audit::AuditNote;
use crate::store::KvOp;

/// Review sessions, by the SHA-256 of their cookie value.
pub const SESSIONS: &str = "pipeline_sessions";
/// Launches between authorize and callback, by the SHA-256 of their `state`.
pub const LAUNCHES: &str = "pipeline_launches";
const COOKIE: &str = "fhirgate_review";
/// Ties a launch to the browser that started it.
const LAUNCH_COOKIE: &str = "fhirgate_launch";
/// A launch must come back from the EHR within this long (microseconds).
const LAUNCH_TTL_MICROS: i64 = 10 * 60 * 1_000_000;

const INDEX: &str = include_str!("../../assets/app/index.html");
const SCRIPT: &str = include_str!("../../assets/app/app.js");
const STYLE: &str = include_str!("../../assets/app/app.css");
const ICON: &str = include_str!("../../assets/app/favicon.svg");
const CSP: &str =
    "default-src 'self'; frame-src 'self'; object-src 'self'; base-uri 'none'; form-action 'self'";

/// A signed-in review page.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    pub tenant: String,
    /// `Patient/{id}` at the EHR.
    pub patient: String,
    pub encounter: Option<String>,
    pub practitioner: Option<String>,
    /// `smart` or `dev`.
    pub mode: String,
    /// Microseconds since the epoch.
    pub expires: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Launch {
    tenant: String,
    iss: String,
    verifier: String,
    token_endpoint: String,
    created: i64,
    /// The hash of the launch cookie given to the browser that started it: the callback must
    /// come back to that browser (no one can finish their own launch in someone else's).
    #[serde(default)]
    browser: String,
}

fn digest(value: &str) -> String {
    crate::hex(&sha2::Sha256::digest(value.as_bytes()))
}

/// Keeps `value` under the hash of the secret `token` (a session cookie, a launch state), so
/// the store never holds the token itself.
async fn keep(
    pipeline: &Pipeline,
    space: &'static str,
    token: &str,
    value: &impl Serialize,
) -> Result<(), crate::store::StoreError> {
    pipeline
        .store
        .kv_apply(vec![KvOp::put(
            space,
            digest(token),
            serde_json::to_vec(value).unwrap_or_default(),
        )])
        .await
}

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    named_cookie(headers, COOKIE)
}

/// A cookie of ours: 64 hex digits, or nothing.
fn named_cookie(headers: &HeaderMap, cookie: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == cookie)
        .map(|(_, value)| value.to_owned())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Cookie attributes: inside an EHR's frame the page is a third party, and only
/// `SameSite=None` cookies reach it, which must be `Secure`; plain-HTTP development keeps `Lax`.
fn cookie_attributes(pipeline: &Pipeline, path: &str, max_age: Option<i64>) -> String {
    let mut attributes = if pipeline.public_base.starts_with("https://") {
        format!("HttpOnly; Secure; SameSite=None; Partitioned; Path={path}")
    } else {
        format!("HttpOnly; SameSite=Lax; Path={path}")
    };
    if let Some(seconds) = max_age {
        attributes.push_str(&format!("; Max-Age={seconds}"));
    }
    attributes
}

/// " by Practitioner/…" for audit notes, when the session knows its clinician.
fn by(session: &Session) -> String {
    session
        .practitioner
        .as_deref()
        .map(|p| format!(" by {p}"))
        .unwrap_or_default()
}

/// Deletes review sessions past their end and launches that never came back.
pub async fn forget_expired(pipeline: &Pipeline) -> Result<(), crate::store::StoreError> {
    let now = now_micros();
    let mut ops = Vec::new();
    for (key, bytes) in pipeline.store.kv_scan(SESSIONS, None, usize::MAX).await? {
        let ended = serde_json::from_slice::<Session>(&bytes).map_or(true, |s| s.expires <= now);
        if ended {
            ops.push(KvOp::delete(SESSIONS, key));
        }
    }
    for (key, bytes) in pipeline.store.kv_scan(LAUNCHES, None, usize::MAX).await? {
        let stale = serde_json::from_slice::<Launch>(&bytes)
            .map_or(true, |l| now - l.created >= LAUNCH_TTL_MICROS);
        if stale {
            ops.push(KvOp::delete(LAUNCHES, key));
        }
    }
    if !ops.is_empty() {
        pipeline.store.kv_apply(ops).await?;
    }
    Ok(())
}

/// Whether the request carries a review-session cookie (checked or not).
pub fn has_session_cookie(headers: &HeaderMap) -> bool {
    cookie_value(headers).is_some()
}

/// The live session of the request's cookie.
pub async fn session_of(pipeline: &Pipeline, headers: &HeaderMap) -> Option<Session> {
    let token = cookie_value(headers)?;
    let found = pipeline
        .store
        .kv_get(SESSIONS, vec![digest(&token)])
        .await
        .ok()?
        .into_iter()
        .next()
        .flatten()?;
    let session: Session = serde_json::from_slice(&found).ok()?;
    (session.expires > now_micros() && pipeline.tenants.contains_key(&session.tenant))
        .then_some(session)
}

pub fn router(pipeline: Arc<Pipeline>) -> Router {
    Router::new()
        .route("/app", get(|| async { Redirect::to("/app/") }))
        .route("/app/", get(index))
        .route(
            "/app/app.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/app/app.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .route(
            "/app/favicon.svg",
            get(|| async { asset(ICON, "image/svg+xml") }),
        )
        .route("/app/launch", get(launch))
        .route("/app/callback", get(callback))
        .route("/app/dev", get(dev_login))
        .route("/app/api/session", get(session))
        .route("/app/api/transactions", get(list))
        .route("/app/api/transactions/{id}", get(detail))
        .route("/app/api/transactions/{id}/rationale", put(edit))
        .route("/app/api/transactions/{id}/submit", post(submit_one))
        .route("/app/api/transactions/{id}/packet.pdf", get(packet))
        .route("/events", get(super::events::events))
        .with_state(pipeline)
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn page(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// The review page. Only the tenants' EHRs (and `pipeline.app.frame_ancestors`) may frame it,
/// so no other site can overlay it and trick a click on Submit.
async fn index(State(pipeline): State<Arc<Pipeline>>) -> Response {
    let mut response = page(Html(INDEX).into_response());
    if let Ok(csp) = HeaderValue::from_str(&format!(
        "{CSP}; frame-ancestors 'self' {}",
        frame_ancestors(&pipeline).join(" ")
    )) {
        response
            .headers_mut()
            .insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    response
}

/// The origins that may frame the page: each tenant's `iss`, and the configured ones.
fn frame_ancestors(pipeline: &Pipeline) -> Vec<String> {
    let mut origins: Vec<String> = pipeline
        .tenants
        .values()
        .filter_map(|t| {
            let url = reqwest::Url::parse(&t.iss).ok()?;
            Some(url.origin().ascii_serialization())
        })
        .chain(pipeline.config.app.frame_ancestors.iter().cloned())
        .filter(|o| {
            !o.is_empty()
                && o.chars()
                    .all(|c| !c.is_whitespace() && c != ';' && c != ',')
        })
        .collect();
    origins.sort();
    origins.dedup();
    origins
}

/// A plain page saying what went wrong with a launch.
fn problem(status: StatusCode, message: &str) -> Response {
    let escaped = message
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let body = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Review launch</title>\
         <link rel=\"stylesheet\" href=\"/app/app.css\"></head><body><main class=\"problem\">\
         <h1>This review could not be opened</h1><p>{escaped}</p>\
         <p>Open it again from the patient's chart.</p></main></body></html>"
    );
    let mut response = page((status, Html(body)).into_response());
    response
        .extensions_mut()
        .insert(AuditNote(format!("launch refused: {message}")));
    response
}

fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": message.into()}))).into_response()
}

#[derive(Deserialize)]
struct LaunchQuery {
    iss: Option<String>,
    launch: Option<String>,
}

fn base64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// `GET /app/launch?iss=…&launch=…`: the EHR launch; off to the EHR's authorize endpoint.
async fn launch(
    State(pipeline): State<Arc<Pipeline>>,
    Query(query): Query<LaunchQuery>,
) -> Response {
    let (Some(iss), Some(launch)) = (query.iss, query.launch) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "The launch is missing iss or launch.",
        );
    };
    let iss = iss.trim_end_matches('/').to_owned();
    let Some(tenant) = pipeline
        .tenants
        .values()
        .find(|t| !t.iss.is_empty() && t.iss == iss)
    else {
        return problem(
            StatusCode::BAD_REQUEST,
            "The launch comes from an EHR this server does not know.",
        );
    };
    let configuration = match smart_configuration(&pipeline, &iss).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(tenant = %tenant.name, error = %e, "SMART configuration unreadable");
            return problem(
                StatusCode::BAD_GATEWAY,
                "The EHR's SMART configuration could not be read.",
            );
        }
    };
    let state = random_token();
    let mut verifier = [0u8; 32];
    let _ = aws_lc_rs::rand::fill(&mut verifier);
    let verifier = base64url(&verifier);
    let challenge = base64url(&sha2::Sha256::digest(verifier.as_bytes()));
    let browser = random_token();
    let record = Launch {
        tenant: tenant.name.clone(),
        iss: iss.clone(),
        verifier,
        token_endpoint: configuration.1,
        created: now_micros(),
        browser: digest(&browser),
    };
    if let Err(e) = keep(pipeline.as_ref(), LAUNCHES, &state, &record).await {
        tracing::warn!(error = %e, "a launch could not be recorded");
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "The server could not record the launch; try again.",
        );
    }
    let params = [
        ("response_type", "code"),
        ("client_id", pipeline.config.app.client_id.as_str()),
        (
            "redirect_uri",
            &format!("{}/app/callback", pipeline.public_base),
        ),
        ("scope", pipeline.config.app.scopes.as_str()),
        ("state", &state),
        ("aud", &iss),
        ("launch", &launch),
        ("code_challenge", &challenge),
        ("code_challenge_method", "S256"),
    ];
    let query = serde_urlencoded::to_string(params).unwrap_or_default();
    let separator = if configuration.0.contains('?') {
        '&'
    } else {
        '?'
    };
    let mut response =
        Redirect::to(&format!("{}{separator}{query}", configuration.0)).into_response();
    let attributes = cookie_attributes(
        &pipeline,
        "/app/callback",
        Some(LAUNCH_TTL_MICROS / 1_000_000),
    );
    if let Ok(cookie) = HeaderValue::from_str(&format!("{LAUNCH_COOKIE}={browser}; {attributes}")) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response.extensions_mut().insert(AuditNote(format!(
        "review launch for tenant {}",
        tenant.name
    )));
    response
}

/// The authorize and token endpoints from `{iss}/.well-known/smart-configuration`.
async fn smart_configuration(pipeline: &Pipeline, iss: &str) -> Result<(String, String), String> {
    let url = format!("{iss}/.well-known/smart-configuration");
    let response = pipeline
        .http
        .get(&url)
        .header(header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("{url} answered {}", response.status()));
    }
    let body: Value = response.json().await.map_err(|e| e.to_string())?;
    let endpoint = |name: &str| {
        body[name]
            .as_str()
            .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
            .map(str::to_owned)
            .ok_or_else(|| format!("{name} is missing"))
    };
    Ok((
        endpoint("authorization_endpoint")?,
        endpoint("token_endpoint")?,
    ))
}

#[derive(Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

/// `GET /app/callback`: the code comes back; exchange it, open a session, show the page.
async fn callback(
    State(pipeline): State<Arc<Pipeline>>,
    headers: HeaderMap,
    Query(query): Query<CallbackQuery>,
) -> Response {
    let Some(state) = query.state.filter(|s| !s.is_empty()) else {
        return problem(StatusCode::BAD_REQUEST, "The EHR's answer has no state.");
    };
    let key = digest(&state);
    let found = pipeline
        .store
        .kv_get(LAUNCHES, vec![key.clone()])
        .await
        .ok()
        .and_then(|v| v.into_iter().next().flatten())
        .and_then(|b| serde_json::from_slice::<Launch>(&b).ok());
    // A state is good once, whatever happens next.
    let _ = pipeline
        .store
        .kv_apply(vec![KvOp::delete(LAUNCHES, key)])
        .await;
    let browser = named_cookie(&headers, LAUNCH_COOKIE).map(|b| digest(&b));
    let Some(launch) = found.filter(|l| {
        now_micros() - l.created < LAUNCH_TTL_MICROS
            && browser.as_deref() == Some(l.browser.as_str())
    }) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "This launch has expired or is not valid.",
        );
    };
    if let Some(error) = query.error {
        return problem(
            StatusCode::BAD_REQUEST,
            &format!("The EHR refused the launch ({error})."),
        );
    }
    let Some(code) = query.code else {
        return problem(StatusCode::BAD_REQUEST, "The EHR's answer has no code.");
    };
    let form = serde_urlencoded::to_string([
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        (
            "redirect_uri",
            &format!("{}/app/callback", pipeline.public_base),
        ),
        ("client_id", pipeline.config.app.client_id.as_str()),
        ("code_verifier", launch.verifier.as_str()),
    ])
    .unwrap_or_default();
    let answer = pipeline
        .http
        .post(&launch.token_endpoint)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::ACCEPT, "application/json")
        .body(form)
        .send()
        .await;
    let token: Value = match answer {
        Ok(r) if r.status().is_success() => match r.json().await {
            Ok(v) => v,
            Err(_) => {
                return problem(
                    StatusCode::BAD_GATEWAY,
                    "The EHR's token answer is not JSON.",
                )
            }
        },
        Ok(r) => {
            tracing::warn!(tenant = %launch.tenant, status = %r.status(), "the token exchange was refused");
            return problem(
                StatusCode::BAD_REQUEST,
                "The EHR did not accept the launch code.",
            );
        }
        Err(e) => {
            tracing::warn!(tenant = %launch.tenant, error = %e, "the token endpoint could not be reached");
            return problem(
                StatusCode::BAD_GATEWAY,
                "The EHR's token endpoint could not be reached.",
            );
        }
    };
    let Some(patient) = token["patient"].as_str().filter(|p| !p.is_empty()) else {
        return problem(StatusCode::BAD_REQUEST, "The EHR gave no patient context.");
    };
    let practitioner = token["fhirUser"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| id_token_claim(&token["id_token"], "fhirUser"))
        .and_then(|u| super::hydrate::local_reference(&u))
        .filter(|r| r.starts_with("Practitioner/"));
    // The EHR's token is not used after this, so its lifetime does not bound the session.
    let hours = i64::try_from(pipeline.config.app.session_hours).unwrap_or(8);
    let session = Session {
        tenant: launch.tenant,
        patient: format!("Patient/{patient}"),
        encounter: token["encounter"]
            .as_str()
            .map(|e| format!("Encounter/{e}")),
        practitioner,
        mode: "smart".into(),
        expires: now_micros() + hours * 3_600_000_000,
    };
    open_session(&pipeline, session).await
}

/// A claim of an ID token received straight from the token endpoint over TLS (OpenID Connect
/// lets a client trust it without checking the signature in that case).
fn id_token_claim(id_token: &Value, claim: &str) -> Option<String> {
    let payload = id_token.as_str()?.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims[claim].as_str().map(str::to_owned)
}

async fn open_session(pipeline: &Pipeline, session: Session) -> Response {
    let token = random_token();
    if let Err(e) = keep(pipeline, SESSIONS, &token, &session).await {
        tracing::warn!(error = %e, "a review session could not be saved");
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "The server could not open the session; try again.",
        );
    }
    let attributes = cookie_attributes(pipeline, "/", None);
    let mut response = Redirect::to("/app/").into_response();
    if let Ok(cookie) = HeaderValue::from_str(&format!("{COOKIE}={token}; {attributes}")) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response.extensions_mut().insert(AuditNote(format!(
        "review session opened ({}) for tenant {}{}",
        session.mode,
        session.tenant,
        by(&session)
    )));
    response
}

#[derive(Deserialize)]
struct DevQuery {
    tenant: String,
    patient: String,
    practitioner: Option<String>,
}

/// `GET /app/dev?tenant=…&patient=…`: a session without SMART (only with `dev_login`).
async fn dev_login(
    State(pipeline): State<Arc<Pipeline>>,
    Query(query): Query<DevQuery>,
) -> Response {
    if !pipeline.config.app.dev_login {
        return problem(
            StatusCode::NOT_FOUND,
            "Development sign-in is off on this server.",
        );
    }
    if !pipeline.tenants.contains_key(&query.tenant) {
        return problem(StatusCode::BAD_REQUEST, "No such tenant.");
    }
    let session = Session {
        tenant: query.tenant,
        patient: super::hydrate::local_reference(&query.patient)
            .unwrap_or_else(|| format!("Patient/{}", query.patient)),
        encounter: None,
        practitioner: query.practitioner,
        mode: "dev".into(),
        expires: now_micros()
            + i64::try_from(pipeline.config.app.session_hours).unwrap_or(8) * 3_600_000_000,
    };
    open_session(&pipeline, session).await
}

/// The session, or the answer for a page without one.
async fn require(pipeline: &Pipeline, headers: &HeaderMap) -> Result<Session, Response> {
    session_of(pipeline, headers).await.ok_or_else(|| {
        json_error(
            StatusCode::UNAUTHORIZED,
            "no review session; open the page from the EHR",
        )
    })
}

/// Writes from the page must be JSON from this origin (what a cross-site form cannot send).
fn same_origin_json(pipeline: &Pipeline, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let origin_ok = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|o| o == pipeline.public_base);
    if json && origin_ok {
        Ok(())
    } else {
        Err(Box::new(json_error(
            StatusCode::FORBIDDEN,
            "send JSON from the review page",
        )))
    }
}

async fn session(State(pipeline): State<Arc<Pipeline>>, headers: HeaderMap) -> Response {
    match require(&pipeline, &headers).await {
        Ok(s) => axum::Json(json!({
            "tenant": s.tenant,
            "patient": s.patient,
            "encounter": s.encounter,
            "practitioner": s.practitioner,
            "mode": s.mode,
            "expires": instant(s.expires),
        }))
        .into_response(),
        Err(r) => r,
    }
}

/// The session's patient's transactions, newest first.
async fn list(State(pipeline): State<Arc<Pipeline>>, headers: HeaderMap) -> Response {
    let session = match require(&pipeline, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let hash = pipeline.patient_hash(&session.tenant, &session.patient);
    match pipeline.transactions().await {
        Ok(all) => {
            let mut mine: Vec<Transaction> = all
                .into_iter()
                .filter(|t| t.tenant == session.tenant && t.patient_hash == hash)
                .collect();
            mine.sort_by(|a, b| b.created.cmp(&a.created));
            let items: Vec<Value> = mine.iter().map(Transaction::summary).collect();
            axum::Json(json!({"items": items})).into_response()
        }
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// The transaction `id` if it belongs to the session's patient.
async fn owned(pipeline: &Pipeline, session: &Session, id: &str) -> Result<Transaction, Response> {
    let hash = pipeline.patient_hash(&session.tenant, &session.patient);
    match pipeline.transaction(id).await {
        Ok(Some(t)) if t.tenant == session.tenant && t.patient_hash == hash => Ok(t),
        Ok(_) => Err(json_error(
            StatusCode::NOT_FOUND,
            "no such item for this patient",
        )),
        Err(e) => Err(json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

/// Transaction `id`, for a session of its patient.
async fn readable(
    pipeline: &Pipeline,
    headers: &HeaderMap,
    id: &str,
) -> Result<Transaction, Response> {
    let session = require(pipeline, headers).await?;
    owned(pipeline, &session, id).await
}

async fn detail_of(pipeline: &Pipeline, transaction: &Transaction) -> Response {
    let mut body = transaction.summary();
    let draft = match pipeline.draft(&transaction.id).await {
        Ok(d) => d,
        Err(e) => return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    if let Some(draft) = draft {
        body["determinations"] = Value::Array(draft.determinations);
        body["facts"] = serde_json::to_value(&draft.facts).unwrap_or(Value::Null);
        body["rationale"] = Value::String(draft.rationale);
        body["extractor"] = Value::String(draft.extractor);
        body["packetUrl"] = Value::String(format!(
            "/app/api/transactions/{}/packet.pdf",
            transaction.id
        ));
    }
    axum::Json(body).into_response()
}

async fn detail(
    State(pipeline): State<Arc<Pipeline>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    match readable(&pipeline, &headers, &id).await {
        Ok(t) => detail_of(&pipeline, &t).await,
        Err(r) => r,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RationaleBody {
    rationale: String,
}

/// Longest rationale the page may save.
const MAX_RATIONALE: usize = 64 * 1024;

fn rationale_of(body: &Bytes, required: bool) -> Result<Option<String>, Box<Response>> {
    if body.is_empty() && !required {
        return Ok(None);
    }
    match serde_json::from_slice::<RationaleBody>(body) {
        Ok(b) if b.rationale.len() <= MAX_RATIONALE => Ok(Some(b.rationale)),
        Ok(_) => Err(Box::new(json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the rationale is too long",
        ))),
        Err(e) => Err(Box::new(json_error(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"rationale\": \"…\"}}: {e}"),
        ))),
    }
}

/// What every change from the page checks: the session, JSON from this origin, the body, and
/// that the item is the session's patient's. Answers the session and the rationale sent.
async fn change(
    pipeline: &Pipeline,
    headers: &HeaderMap,
    id: &str,
    body: &Bytes,
    rationale_required: bool,
) -> Result<(Session, Option<String>), Box<Response>> {
    let session = require(pipeline, headers).await.map_err(Box::new)?;
    same_origin_json(pipeline, headers)?;
    let rationale = rationale_of(body, rationale_required)?;
    owned(pipeline, &session, id).await.map_err(Box::new)?;
    Ok((session, rationale))
}

/// `PUT …/rationale`: the clinician's edit, kept in the draft; the packet is rendered again.
async fn edit(
    State(pipeline): State<Arc<Pipeline>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let rationale = match change(&pipeline, &headers, &id, &body, true).await {
        Ok((_, rationale)) => rationale.unwrap_or_default(),
        Err(r) => return *r,
    };
    let guard = pipeline.changes.lock().await;
    let (transaction, draft) = match (pipeline.transaction(&id).await, pipeline.draft(&id).await) {
        (Ok(Some(t)), Ok(Some(d))) if t.status == Status::Ready => (t, d),
        (Ok(Some(_)), Ok(_)) => {
            return json_error(
                StatusCode::CONFLICT,
                "this item is no longer ready for review",
            )
        }
        (Ok(None), _) => return json_error(StatusCode::NOT_FOUND, "no such item"),
        (Err(e), _) | (_, Err(e)) => {
            return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    };
    let mut draft = draft;
    draft.rationale = rationale;
    let payer = transaction.payer.clone().unwrap_or_default();
    match process::render(&draft, &transaction.encounter, &payer).await {
        Ok(pdf) => draft.pdf = base64::engine::general_purpose::STANDARD.encode(pdf),
        Err(e) => return json_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
    let saved = pipeline
        .store
        .kv_apply(vec![KvOp::put(
            super::DRAFTS,
            id.clone(),
            serde_json::to_vec(&draft).unwrap_or_default(),
        )])
        .await;
    drop(guard);
    if let Err(e) = saved {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    let mut response = detail_of(&pipeline, &transaction).await;
    response
        .extensions_mut()
        .insert(AuditNote(format!("rationale of {id} edited")));
    response
}

/// `POST …/submit`: writes the packet back to the chart (once, however often it is clicked).
async fn submit_one(
    State(pipeline): State<Arc<Pipeline>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let (session, rationale) = match change(&pipeline, &headers, &id, &body, false).await {
        Ok(checked) => checked,
        Err(r) => return *r,
    };
    let mut response = match submit::submit(&pipeline, &id, rationale).await {
        Ok((transaction, first)) => {
            let status = if first {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            };
            (status, axum::Json(transaction.summary())).into_response()
        }
        Err(SubmitError::NotFound(_)) => json_error(StatusCode::NOT_FOUND, "no such item"),
        Err(SubmitError::Conflict(why)) => json_error(StatusCode::CONFLICT, why),
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    response
        .extensions_mut()
        .insert(AuditNote(format!("submit of {id}{}", by(&session))));
    response
}

/// `GET …/packet.pdf`: the packet as last rendered.
async fn packet(
    State(pipeline): State<Arc<Pipeline>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = readable(&pipeline, &headers, &id).await {
        return r;
    }
    let pdf = match pipeline.draft(&id).await {
        Ok(Some(d)) => base64::engine::general_purpose::STANDARD
            .decode(d.pdf)
            .unwrap_or_default(),
        Ok(None) => return json_error(StatusCode::NOT_FOUND, "the draft has expired"),
        Err(e) => return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let mut response = pdf.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/pdf"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("inline; filename=\"packet.pdf\""),
    );
    response
}
