//! `TestApp`: a fhirgate server on `127.0.0.1:0` with its own temporary data folder.

use std::path::{Path, PathBuf};

use fhirgate::config::Config;
use reqwest::{Client, Method, Response, StatusCode};
use serde_json::Value;
use tokio::sync::oneshot;

/// The admin API key every [`TestApp`] accepts; its client sends it.
pub const TEST_ADMIN_KEY: &str = "fg_test-admin-key-for-integration-tests-only";

/// A client that sends `Authorization: Bearer {credential}` with every request.
pub fn client_with(credential: &str) -> Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {credential}")).expect("header"),
    );
    Client::builder()
        .default_headers(headers)
        .build()
        .expect("client")
}

/// The `iss` of the test CDS client whose keys are in `certs/`.
pub const TEST_ISSUER: &str = "https://ehr.test";

/// A CDS Hooks JWT from the test client for `audience`, signed with `key_file` (under `certs/`)
/// as `kid`; `adjust` may change the claims before signing.
pub fn cds_jwt(
    audience: &str,
    alg: jsonwebtoken::Algorithm,
    key_file: &str,
    kid: &str,
    adjust: impl FnOnce(&mut Value),
) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let mut claims = serde_json::json!({
        "iss": TEST_ISSUER, "sub": "ehr-client", "aud": audience,
        "exp": now + 300, "iat": now, "jti": uuid::Uuid::new_v4().to_string(),
    });
    adjust(&mut claims);
    let pem = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("certs")
            .join(key_file),
    )
    .expect("key");
    let key = match alg {
        jsonwebtoken::Algorithm::ES384 => jsonwebtoken::EncodingKey::from_ec_pem(&pem),
        _ => jsonwebtoken::EncodingKey::from_rsa_pem(&pem),
    }
    .expect("pem");
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &claims, &key).expect("sign")
}

/// A valid RS384 token for the CDS service `service` of `app`.
pub fn cds_token(app: &TestApp, path: &str) -> String {
    cds_jwt(
        &app.url(path),
        jsonwebtoken::Algorithm::RS384,
        "test-cds-client-rs384.key",
        "test-rs384",
        |_| {},
    )
}

pub struct TestApp {
    /// `http://127.0.0.1:{port}`
    pub base: String,
    pub client: Client,
    pub data_dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> Self {
        Self::start_in(tempfile::tempdir().expect("temp dir"), configure).await
    }

    /// A server on the data of an earlier one (see [`TestApp::stop`]).
    pub async fn start_in(
        data_dir: tempfile::TempDir,
        configure: impl FnOnce(&mut Config),
    ) -> Self {
        let mut config = Config::default();
        config.store.data_dir = data_dir.path().to_path_buf();
        config.log.level = "warn".into();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        config.pa.policies_dir = root.join("policies");
        config.cds.hooks_dir = root.join("hooks");
        config.cds.issuers = vec![fhirgate::config::TrustedIssuer {
            iss: TEST_ISSUER.into(),
            jwks_file: Some(root.join("certs/test-cds-client.jwks.json")),
            jwks_url: None,
            jku: Vec::new(),
            fhir_servers: Vec::new(),
        }];
        config.auth.api_keys = vec![fhirgate::config::ConfiguredApiKey {
            name: "test-admin".into(),
            sha256: fhirgate::auth::keys::hash(TEST_ADMIN_KEY),
            roles: vec!["admin".into()],
            scopes: Vec::new(),
        }];
        configure(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(fhirgate::run(listener, config, async move {
            let _ = rx.await;
        }));
        Self {
            base,
            client: client_with(TEST_ADMIN_KEY),
            data_dir,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn fhir(&self, path: &str) -> String {
        format!("{}/fhir{}", self.base, path)
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Response {
        let mut req = self.client.request(method, self.fhir(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(body) = body {
            req = req
                .header("content-type", "application/fhir+json")
                .body(serde_json::to_vec(body).expect("json"));
        }
        req.send().await.expect("request sent")
    }

    pub async fn get(&self, path: &str) -> Response {
        self.request(Method::GET, path, None, &[]).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Response {
        self.request(Method::PUT, path, Some(body), &[]).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Response {
        self.request(Method::POST, path, Some(body), &[]).await
    }

    pub async fn delete(&self, path: &str) -> Response {
        self.request(Method::DELETE, path, None, &[]).await
    }

    /// Stops the server and waits for it to close the store.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server
                .await
                .expect("server task")
                .expect("server ran cleanly");
        }
        let dir = tempfile::tempdir().expect("temp dir");
        std::mem::replace(&mut self.data_dir, dir)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The Prometheus text of `/metrics`.
pub async fn metrics(app: &TestApp) -> String {
    app.client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text")
}

/// Status and JSON body of a response.
pub async fn json(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    let bytes = response.bytes().await.expect("body");
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
    };
    (status, value)
}

/// Asserts `outcome` is an OperationOutcome whose first error has `code` and, if given, the
/// expression.
pub fn assert_outcome(outcome: &Value, code: &str, expression: Option<&str>) {
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
    let issue = &outcome["issue"][0];
    assert_eq!(issue["severity"], "error", "{outcome}");
    assert_eq!(issue["code"], code, "{outcome}");
    if let Some(expression) = expression {
        let found: Vec<&str> = outcome["issue"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|i| i["expression"].as_array().into_iter().flatten())
            .filter_map(Value::as_str)
            .collect();
        assert!(
            found.contains(&expression),
            "expected {expression} in {found:?}: {outcome}"
        );
    }
}

/// The resource without `meta`.
pub fn without_meta(resource: &Value) -> Value {
    let mut copy = resource.clone();
    if let Some(o) = copy.as_object_mut() {
        o.remove("meta");
    }
    copy
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn patient(id: &str) -> Value {
    serde_json::json!({
        "resourceType": "Patient",
        "id": id,
        "identifier": [{"system": "urn:test:mrn", "value": format!("mrn-{id}")}],
        "name": [{"family": "Test", "given": ["Synthetic"]}],
        "gender": "unknown",
    })
}
