//! Local doubles for the pipeline tests: an EHR's SMART authorization server, and an
//! OpenAI-compatible chat completions API.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;
use bytes::Bytes;
use http::StatusCode;
use serde_json::{json, Value};
use sha2::Digest;

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a double");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    address
}

/// An EHR's SMART on FHIR authorization server: `/fhir/.well-known/smart-configuration`,
/// `/authorize` (approves at once, as a signed-in clinician would) and `/token`
/// (authorization code with PKCE S256), launching into a fixed patient and encounter.
pub struct SmartDouble {
    pub origin: String,
    shared: Arc<SmartShared>,
}

struct SmartShared {
    origin: String,
    patient: String,
    encounter: String,
    practitioner: String,
    /// Issued codes: code → (code_challenge, redirect_uri).
    codes: Mutex<Vec<(String, String, String)>>,
    /// Problems seen in requests (a wrong challenge method, a bad verifier…).
    problems: Mutex<Vec<String>>,
}

impl SmartDouble {
    pub async fn start(patient: &str, encounter: &str, practitioner: &str) -> Self {
        // The origin is known only once bound: bind first, then build the state.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the SMART double");
        let origin = format!("http://{}", listener.local_addr().expect("address"));
        let shared = Arc::new(SmartShared {
            origin: origin.clone(),
            patient: patient.into(),
            encounter: encounter.into(),
            practitioner: practitioner.into(),
            codes: Mutex::new(Vec::new()),
            problems: Mutex::new(Vec::new()),
        });
        let router = Router::new()
            .route("/fhir/.well-known/smart-configuration", get(configuration))
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .with_state(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { origin, shared }
    }

    /// The `iss` the EHR launches with.
    pub fn iss(&self) -> String {
        format!("{}/fhir", self.origin)
    }

    pub fn problems(&self) -> Vec<String> {
        self.shared.problems.lock().expect("lock").clone()
    }
}

async fn configuration(State(shared): State<Arc<SmartShared>>) -> Response {
    axum::Json(json!({
        "authorization_endpoint": format!("{}/authorize", shared.origin),
        "token_endpoint": format!("{}/token", shared.origin),
        "capabilities": ["launch-ehr", "client-public", "context-ehr-patient", "context-ehr-encounter"],
        "code_challenge_methods_supported": ["S256"],
    }))
    .into_response()
}

async fn authorize(
    State(shared): State<Arc<SmartShared>>,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let get = |name: &str| query.get(name).cloned().unwrap_or_default();
    let mut problems = Vec::new();
    if get("response_type") != "code" {
        problems.push("response_type is not code".to_owned());
    }
    if get("code_challenge_method") != "S256" {
        problems.push("no S256 code challenge".to_owned());
    }
    if get("aud") != format!("{}/fhir", shared.origin) {
        problems.push(format!("aud {} is not the FHIR base", get("aud")));
    }
    if get("launch").is_empty() || get("state").is_empty() || get("client_id").is_empty() {
        problems.push("launch, state or client_id missing".to_owned());
    }
    if !problems.is_empty() {
        shared.problems.lock().expect("lock").extend(problems);
        return (StatusCode::BAD_REQUEST, "bad authorize request").into_response();
    }
    let code = uuid::Uuid::new_v4().to_string();
    shared.codes.lock().expect("lock").push((
        code.clone(),
        get("code_challenge"),
        get("redirect_uri"),
    ));
    let redirect = format!("{}?code={code}&state={}", get("redirect_uri"), get("state"));
    Redirect::to(&redirect).into_response()
}

async fn token(State(shared): State<Arc<SmartShared>>, body: Bytes) -> Response {
    let form: std::collections::HashMap<String, String> =
        serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let get = |name: &str| form.get(name).cloned().unwrap_or_default();
    let issued = {
        let mut codes = shared.codes.lock().expect("lock");
        let at = codes.iter().position(|(c, _, _)| *c == get("code"));
        at.map(|i| codes.remove(i))
    };
    let Some((_, challenge, redirect_uri)) = issued else {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_grant"})),
        )
            .into_response();
    };
    let expected = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(get("code_verifier").as_bytes()));
    if expected != challenge || redirect_uri != get("redirect_uri") {
        shared
            .problems
            .lock()
            .expect("lock")
            .push("the code verifier or redirect_uri does not match".into());
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_grant"})),
        )
            .into_response();
    }
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
        json!({"iss": format!("{}/fhir", shared.origin), "sub": "doc", "fhirUser": format!("{}/fhir/{}", shared.origin, shared.practitioner)})
            .to_string(),
    );
    axum::Json(json!({
        "access_token": uuid::Uuid::new_v4().to_string(),
        "token_type": "Bearer",
        "expires_in": 3600,
        "scope": "launch openid fhirUser patient/*.read",
        "patient": shared.patient,
        "encounter": shared.encounter,
        "id_token": format!("eyJhbGciOiJub25lIn0.{claims}."),
    }))
    .into_response()
}

/// How the model double answers.
#[derive(Debug, Clone)]
pub enum LlmMode {
    /// These facts (each `{kind, value, days, date, quote}`).
    Facts(Vec<Value>),
    /// Content that is not JSON.
    NotJson,
    /// No answer before this long.
    Slow(Duration),
}

/// An OpenAI-compatible `POST /v1/chat/completions` that records what it was sent.
pub struct LlmDouble {
    pub base_url: String,
    shared: Arc<LlmShared>,
}

struct LlmShared {
    mode: Mutex<LlmMode>,
    requests: Mutex<Vec<(http::HeaderMap, Value)>>,
}

impl LlmDouble {
    pub async fn start(mode: LlmMode) -> Self {
        let shared = Arc::new(LlmShared {
            mode: Mutex::new(mode),
            requests: Mutex::new(Vec::new()),
        });
        let router = Router::new()
            .route("/v1/chat/completions", post(complete))
            .with_state(shared.clone());
        let address = serve(router).await;
        Self {
            base_url: format!("http://{address}/v1"),
            shared,
        }
    }

    pub fn requests(&self) -> Vec<(http::HeaderMap, Value)> {
        self.shared.requests.lock().expect("lock").clone()
    }
}

async fn complete(
    State(shared): State<Arc<LlmShared>>,
    headers: http::HeaderMap,
    body: Bytes,
) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    shared
        .requests
        .lock()
        .expect("lock")
        .push((headers, request));
    let mode = shared.mode.lock().expect("lock").clone();
    let content = match mode {
        LlmMode::Facts(facts) => json!({"facts": facts}).to_string(),
        LlmMode::NotJson => "Sure! Here are the facts: PT for 8 weeks.".into(),
        LlmMode::Slow(wait) => {
            tokio::time::sleep(wait).await;
            json!({"facts": []}).to_string()
        }
    };
    axum::Json(json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1_764_979_200u32,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
    }))
    .into_response()
}
