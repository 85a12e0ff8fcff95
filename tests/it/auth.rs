//! Who may call what: credentials, roles, SMART scopes, patient compartments, the token
//! endpoint, API keys, and tokens forged every way the issue names.

use std::path::{Path, PathBuf};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{assert_outcome, client_with, json, patient, TestApp};

/// An identity provider the tests trust; its keys are the test CDS client's.
const IDP: &str = "https://idp.test";

fn certs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("certs")
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn key(file: &str, alg: Algorithm) -> EncodingKey {
    let pem = std::fs::read(certs().join(file)).expect("key");
    match alg {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
        _ => EncodingKey::from_rsa_pem(&pem),
    }
    .expect("pem")
}

/// A JWT signed with `file` as `kid`.
fn sign(claims: &Value, alg: Algorithm, file: &str, kid: &str) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, &key(file, alg)).expect("sign")
}

/// An identity provider's access token for `app`, with `adjust`ed claims.
fn idp_token(app: &TestApp, adjust: impl FnOnce(&mut Value)) -> String {
    let mut claims = json!({
        "iss": IDP, "sub": "user-1", "aud": app.base,
        "exp": now() + 300, "iat": now(), "scope": "user/*.rs",
    });
    adjust(&mut claims);
    sign(
        &claims,
        Algorithm::RS384,
        "test-cds-client-rs384.key",
        "test-rs384",
    )
}

async fn start_with_idp(configure: impl FnOnce(&mut fhirgate::config::Config)) -> TestApp {
    TestApp::start_with(|config| {
        config.auth.issuers = vec![fhirgate::config::JwtIssuer {
            iss: IDP.into(),
            jwks_file: Some(certs().join("test-cds-client.jwks.json")),
            jwks_url: None,
            audience: None,
        }];
        configure(config);
    })
    .await
}

/// A key made through the API for `roles` and `scopes`.
pub async fn api_key(app: &TestApp, roles: &[&str], scopes: &[&str]) -> String {
    let (status, made) = json(
        app.client
            .post(app.url("/auth/api-keys"))
            .json(
                &json!({"name": format!("{roles:?}{scopes:?}"), "roles": roles, "scopes": scopes}),
            )
            .send()
            .await
            .expect("create key"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    made["key"].as_str().expect("key").to_owned()
}

async fn send(
    client: &Client,
    method: Method,
    url: &str,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let mut request = client.request(method, url);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/fhir+json")
            .json(body);
    }
    let response = request.send().await.expect("sent");
    let status = response.status();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_but_health_and_discovery_needs_a_caller() {
    let app = TestApp::start().await;
    let anonymous = Client::new();
    for path in ["/healthz", "/readyz", "/fhir/metadata", "/cds-services"] {
        let (status, _) = send(&anonymous, Method::GET, &app.url(path), None).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    let (status, smart) = send(
        &anonymous,
        Method::GET,
        &app.url("/fhir/.well-known/smart-configuration"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(smart["token_endpoint"], app.url("/auth/token"));
    let (_, capability) = send(&anonymous, Method::GET, &app.fhir("/metadata"), None).await;
    let security = &capability["rest"][0]["security"];
    assert_eq!(security["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    assert_eq!(
        security["extension"][0]["extension"][0]["valueUri"],
        app.url("/auth/token")
    );
    let empty = json!({"resourceType": "Bundle", "type": "batch", "entry": []});
    for (method, path) in [
        (Method::GET, "/fhir/Patient"),
        (Method::GET, "/fhir/Patient/p1"),
        (Method::PUT, "/fhir/Patient/p1"),
        (Method::POST, "/fhir"),
        (Method::POST, "/fhir/Claim/$submit"),
        (Method::GET, "/sync/jobs"),
        (Method::GET, "/pas/claims/c1"),
        (Method::GET, "/packets/x"),
        (Method::GET, "/metrics"),
        (Method::GET, "/auth/api-keys"),
        (Method::GET, "/nowhere"),
    ] {
        let response = anonymous
            .request(method.clone(), app.url(path))
            .json(&empty)
            .send()
            .await
            .expect("sent");
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{method} {path}"
        );
        let challenge = response
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(challenge.starts_with("Bearer"), "{path}: {challenge}");
        let (_, outcome) = json(response).await;
        assert_outcome(&outcome, "login", None);
    }
    // Nothing was written by the refused PUT.
    let (status, _) = json(app.get("/Patient/p1").await).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// Callers of the authorization matrix, in column order.
const CALLERS: [&str; 8] = [
    "admin",
    "clinician",
    "staff",
    "reviewer",
    "sync-operator",
    "read-only",
    "system/Patient.rs",
    "user/Observation.read",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authorization_matrix_holds_for_every_role_and_scope() {
    let app = TestApp::start().await;
    assert_eq!(
        app.put("/Patient/p1", &patient("p1")).await.status(),
        StatusCode::CREATED
    );
    let mut clients = Vec::new();
    for caller in CALLERS {
        let key = if caller.contains('/') {
            api_key(&app, &[], &[caller]).await
        } else {
            api_key(&app, &[caller], &[]).await
        };
        clients.push(client_with(&key));
    }
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": []});
    let nothing = json!({});
    let new_patient = patient("p9");
    // Y: allowed (the endpoint answers whatever it answers), n: 403.
    let matrix: [(Method, &str, Option<&Value>, &str); 15] = [
        (Method::GET, "/fhir/Patient", None, "YYYYYYYn"),
        (Method::GET, "/fhir/Patient/p1", None, "YYYYYYYn"),
        (
            Method::PUT,
            "/fhir/Patient/p9",
            Some(&new_patient),
            "YYYnnnnn",
        ),
        (Method::DELETE, "/fhir/Patient/gone", None, "YYYnnnnn"),
        (Method::GET, "/fhir/Observation", None, "YYYYYYnY"),
        (Method::POST, "/fhir", Some(&batch), "YYYnnnnn"),
        (
            Method::POST,
            "/fhir/Claim/$submit",
            Some(&nothing),
            "YYYnnnnn",
        ),
        (Method::GET, "/sync/jobs", None, "YnnnYYnn"),
        (Method::POST, "/sync/jobs", Some(&nothing), "YnnnYnnn"),
        (Method::GET, "/pas/claims/none", None, "YYYYnYnn"),
        (
            Method::POST,
            "/pas/claims/none/decision",
            Some(&nothing),
            "YnnYnnnn",
        ),
        (Method::POST, "/packets", Some(&nothing), "YYYnnnnn"),
        (Method::GET, "/packets/none", None, "YYYYnYnn"),
        (Method::GET, "/metrics", None, "YnnnnYnn"),
        (Method::GET, "/auth/api-keys", None, "Ynnnnnnn"),
    ];
    let mut wrong = Vec::new();
    for (method, path, body, expected) in &matrix {
        for ((caller, client), allowed) in CALLERS.iter().zip(&clients).zip(expected.chars()) {
            let (status, answer) = send(client, method.clone(), &app.url(path), *body).await;
            let refused = status == StatusCode::FORBIDDEN;
            if status == StatusCode::UNAUTHORIZED || refused == (allowed == 'Y') {
                wrong.push(format!("{caller} {method} {path}: {status} {answer}"));
            } else if refused {
                assert_outcome(&answer, "forbidden", None);
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patient_context_tokens_see_only_their_compartment() {
    let app = start_with_idp(|_| {}).await;
    for id in ["p1", "p2"] {
        assert!(app
            .put(&format!("/Patient/{id}"), &patient(id))
            .await
            .status()
            .is_success());
        let observation = json!({
            "resourceType": "Observation", "id": format!("o-{id}"), "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": format!("Patient/{id}")},
        });
        assert!(app
            .put(&format!("/Observation/o-{id}"), &observation)
            .await
            .status()
            .is_success());
    }
    let practitioner = json!({"resourceType": "Practitioner", "id": "dr"});
    assert!(app
        .put("/Practitioner/dr", &practitioner)
        .await
        .status()
        .is_success());
    let token = idp_token(&app, |c| {
        c["scope"] = json!("patient/*.rs launch/patient openid");
        c["patient"] = json!("p1");
    });
    let client = client_with(&token);
    let get = |path: &str| {
        let client = client.clone();
        let url = app.fhir(path);
        async move { send(&client, Method::GET, &url, None).await }
    };

    for (path, expected) in [
        ("/Patient/p1", StatusCode::OK),
        ("/Patient/p2", StatusCode::FORBIDDEN),
        ("/Observation/o-p1", StatusCode::OK),
        ("/Observation/o-p2", StatusCode::FORBIDDEN),
        ("/Observation/o-p1/_history", StatusCode::OK),
        ("/Observation/o-p2/_history", StatusCode::FORBIDDEN),
        ("/Observation/o-p2/_history/1", StatusCode::FORBIDDEN),
        ("/Practitioner/dr", StatusCode::FORBIDDEN),
        ("/Observation/_history", StatusCode::FORBIDDEN),
        (
            "/Patient?_revinclude=Observation:subject",
            StatusCode::FORBIDDEN,
        ),
    ] {
        let (status, body) = get(path).await;
        assert_eq!(status, expected, "{path}: {body}");
    }
    let ids = |bundle: &Value| -> Vec<String> {
        bundle["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["resource"]["id"].as_str().map(str::to_owned))
            .collect()
    };
    let (status, bundle) = get("/Observation").await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert_eq!(ids(&bundle), ["o-p1"]);
    let (_, bundle) = get("/Observation?patient=Patient/p2").await;
    assert!(ids(&bundle).is_empty(), "{bundle}");
    let (_, bundle) = get("/Patient").await;
    assert_eq!(ids(&bundle), ["p1"]);
    // POST _search carries its parameters in the form: it is narrowed and checked the same way.
    let search = |form: &'static str| {
        let client = client.clone();
        let url = app.fhir("/Observation/_search");
        async move {
            json(
                client
                    .post(url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(form)
                    .send()
                    .await
                    .expect("search"),
            )
            .await
        }
    };
    let (status, bundle) = search("patient=Patient/p2").await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert!(ids(&bundle).is_empty(), "{bundle}");
    let (status, _) = search("_include=Observation:subject").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Writes are refused even where the scope would allow them.
    let writer = client_with(&idp_token(&app, |c| {
        c["scope"] = json!("patient/*.cruds");
        c["patient"] = json!("p1");
    }));
    let (status, _) = send(
        &writer,
        Method::PUT,
        &app.fhir("/Patient/p1"),
        Some(&patient("p1")),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // A patient scope without a patient is good for nothing.
    let nobody = client_with(&idp_token(&app, |c| c["scope"] = json!("patient/*.rs")));
    let (status, _) = send(&nobody, Method::GET, &app.fhir("/Patient/p1"), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // A user scope sees everyone.
    let user = client_with(&idp_token(&app, |_| {}));
    let (status, _) = send(&user, Method::GET, &app.fhir("/Observation/o-p2"), None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_stale_tokens_are_refused() {
    let app = start_with_idp(|_| {}).await;
    let url = app.fhir("/Patient");
    let b64 = |v: &Value| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let good_claims = json!({
        "iss": IDP, "sub": "user-1", "aud": app.base,
        "exp": now() + 300, "iat": now(), "scope": "user/*.rs",
    });
    let hs256 = |secret: &[u8], claims: &Value| {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("test-rs384".into());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).expect("sign")
    };
    let jwks = std::fs::read(certs().join("test-cds-client.jwks.json")).expect("jwks");
    let mut own = good_claims.clone();
    own["iss"] = json!(app.base);
    let forged = [
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&good_claims)
            ),
        ),
        (
            "HS256 with the issuer's public keys",
            hs256(&jwks, &good_claims),
        ),
        (
            "HS256 as fhirgate's own token, guessed secret",
            hs256(b"secret", &own),
        ),
        (
            "untrusted issuer",
            idp_token(&app, |c| c["iss"] = json!("https://evil.test")),
        ),
        (
            "wrong audience",
            idp_token(&app, |c| c["aud"] = json!("https://elsewhere.test")),
        ),
        (
            "expired",
            idp_token(&app, |c| c["exp"] = json!(now() - 3600)),
        ),
        (
            "not yet valid",
            idp_token(&app, |c| c["nbf"] = json!(now() + 3600)),
        ),
        (
            "no exp",
            idp_token(&app, |c| {
                c.as_object_mut().expect("claims").remove("exp");
            }),
        ),
        (
            "unknown kid",
            sign(
                &good_claims,
                Algorithm::RS384,
                "test-cds-client-rs384.key",
                "who-knows",
            ),
        ),
        (
            "signed by another key under a trusted kid",
            sign(
                &good_claims,
                Algorithm::RS384,
                "test-untrusted-rs384.key",
                "test-rs384",
            ),
        ),
        ("garbage", "not-a-token".to_owned()),
        (
            "unknown API key",
            "fg_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".to_owned(),
        ),
    ];
    for (what, token) in &forged {
        let response = client_with(token).get(&url).send().await.expect("sent");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
        let challenge = response
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(
            challenge.contains(r#"error="invalid_token""#),
            "{what}: {challenge}"
        );
        let (_, outcome) = json(response).await;
        assert_outcome(&outcome, "login", None);
    }
    // Another scheme is not a bearer credential.
    let basic = Client::new()
        .get(&url)
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .expect("sent");
    assert_eq!(basic.status(), StatusCode::UNAUTHORIZED);
    // The genuine article passes, with RS384 and ES384 alike.
    let genuine = idp_token(&app, |_| {});
    let es384 = sign(
        &good_claims,
        Algorithm::ES384,
        "test-cds-client-es384.key",
        "test-es384",
    );
    for token in [genuine, es384] {
        let response = client_with(&token).get(&url).send().await.expect("sent");
        assert_eq!(response.status(), StatusCode::OK);
    }
}

/// A SMART Backend Services client assertion for `client_id`.
fn assertion(app: &TestApp, client_id: &str, adjust: impl FnOnce(&mut Value)) -> Value {
    let mut claims = json!({
        "iss": client_id, "sub": client_id, "aud": app.url("/auth/token"),
        "exp": now() + 240, "jti": uuid::Uuid::new_v4().to_string(),
    });
    adjust(&mut claims);
    claims
}

async fn ask_for_token(app: &TestApp, assertion: &str, scope: Option<&str>) -> (StatusCode, Value) {
    let mut form = vec![
        ("grant_type", "client_credentials"),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", assertion),
    ];
    if let Some(scope) = scope {
        form.push(("scope", scope));
    }
    let response = Client::new()
        .post(app.url("/auth/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(serde_urlencoded::to_string(&form).expect("form"))
        .send()
        .await
        .expect("token request");
    assert_eq!(
        response
            .headers()
            .get("cache-control")
            .and_then(|v| v.to_str().ok()),
        Some("no-store")
    );
    json(response).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_clients_get_short_lived_tokens_from_the_token_endpoint() {
    let app = TestApp::start_with(|config| {
        config.auth.clients = vec![fhirgate::config::BackendClient {
            client_id: "payer-a".into(),
            jwks_file: certs().join("test-cds-client.jwks.json"),
            scopes: vec!["system/Claim.c".into(), "system/ClaimResponse.rs".into()],
            roles: Vec::new(),
        }];
    })
    .await;
    let signed = sign(
        &assertion(&app, "payer-a", |_| {}),
        Algorithm::RS384,
        "test-cds-client-rs384.key",
        "test-rs384",
    );
    let (status, granted) = ask_for_token(&app, &signed, None).await;
    assert_eq!(status, StatusCode::OK, "{granted}");
    assert_eq!(granted["token_type"], "bearer");
    assert_eq!(granted["scope"], "system/Claim.c system/ClaimResponse.rs");
    assert!(granted["expires_in"]
        .as_u64()
        .is_some_and(|s| s > 0 && s <= 300));
    let token = granted["access_token"].as_str().expect("token").to_owned();
    let payload: Value = {
        use base64::Engine as _;
        let part = token.split('.').nth(1).expect("payload");
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part)
                .expect("base64"),
        )
        .expect("json")
    };
    assert!(payload["exp"].as_i64().expect("exp") - payload["iat"].as_i64().expect("iat") <= 300);
    let client = client_with(&token);
    let (status, _) = send(&client, Method::GET, &app.fhir("/ClaimResponse"), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(&client, Method::GET, &app.fhir("/Patient"), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = send(
        &client,
        Method::POST,
        &app.fhir("/Claim/$submit"),
        Some(&json!({})),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "allowed in, and told the body is wrong"
    );

    // The same assertion twice is a replay.
    let (status, refused) = ask_for_token(&app, &signed, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused["error"], "invalid_client");
    // A narrower scope is granted as asked; one beyond the client's is not.
    let fresh = |adjust: fn(&mut Value)| {
        sign(
            &assertion(&app, "payer-a", adjust),
            Algorithm::RS384,
            "test-cds-client-rs384.key",
            "test-rs384",
        )
    };
    let (status, narrowed) =
        ask_for_token(&app, &fresh(|_| {}), Some("system/ClaimResponse.r")).await;
    assert_eq!(status, StatusCode::OK, "{narrowed}");
    assert_eq!(narrowed["scope"], "system/ClaimResponse.r");
    let (status, refused) = ask_for_token(&app, &fresh(|_| {}), Some("system/Patient.rs")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(refused["error"], "invalid_scope");
    // Assertions that must not work.
    let refusals = [
        ("lives an hour", fresh(|c| c["exp"] = json!(now() + 3600))),
        ("expired", fresh(|c| c["exp"] = json!(now() - 600))),
        (
            "for another audience",
            fresh(|c| c["aud"] = json!("https://elsewhere.test/token")),
        ),
        (
            "no jti",
            fresh(|c| {
                c.as_object_mut().expect("claims").remove("jti");
            }),
        ),
        (
            "unknown client",
            fresh(|c| {
                c["iss"] = json!("payer-z");
                c["sub"] = json!("payer-z");
            }),
        ),
        (
            "signed by an untrusted key",
            sign(
                &assertion(&app, "payer-a", |_| {}),
                Algorithm::RS384,
                "test-untrusted-rs384.key",
                "test-rs384",
            ),
        ),
        (
            "RS256 (assertions are RS384 or ES384)",
            sign(
                &assertion(&app, "payer-a", |_| {}),
                Algorithm::RS256,
                "test-cds-client-rs384.key",
                "test-rs384",
            ),
        ),
    ];
    for (what, signed) in &refusals {
        let (status, refused) = ask_for_token(&app, signed, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {refused}");
        assert_eq!(refused["error"], "invalid_client", "{what}");
    }
    let response = Client::new()
        .post(app.url("/auth/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=password&username=u&password=p")
        .send()
        .await
        .expect("sent");
    let (status, refused) = json(response).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(refused["error"], "unsupported_grant_type");
}

/// Every file under `dir`, read whole.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_shown_once_kept_hashed_and_revocable() {
    let app = TestApp::start().await;
    let (status, made) = json(
        app.client
            .post(app.url("/auth/api-keys"))
            .json(&json!({"name": "reporting", "roles": ["read-only"]}))
            .send()
            .await
            .expect("create"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    let key = made["key"].as_str().expect("key").to_owned();
    let id = made["id"].as_str().expect("id").to_owned();
    let reader = client_with(&key);
    let (status, _) = send(&reader, Method::GET, &app.fhir("/Patient"), None).await;
    assert_eq!(status, StatusCode::OK);
    // The key is also accepted as X-API-Key.
    let response = Client::new()
        .get(app.fhir("/Patient"))
        .header("x-api-key", &key)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);

    let (_, listed) = json(
        app.client
            .get(app.url("/auth/api-keys"))
            .send()
            .await
            .expect("list"),
    )
    .await;
    assert!(
        !listed.to_string().contains(&key),
        "the list never shows a key"
    );
    assert!(listed["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .any(|k| k["id"] == id
            && k["name"] == "reporting"
            && k["created_by"] == "api-key:test-admin"));
    for (path, bytes) in files_under(app.data_dir.path()) {
        assert!(
            !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
            "{} holds the key in the clear",
            path.display()
        );
    }
    for bad in [
        json!({"name": "x", "roles": ["superuser"]}),
        json!({"name": "x", "scopes": ["system/Patient.rwx"]}),
        json!({"name": "x"}),
        json!({"name": "", "roles": ["admin"]}),
    ] {
        let (status, outcome) = json(
            app.client
                .post(app.url("/auth/api-keys"))
                .json(&bad)
                .send()
                .await
                .expect("create"),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert_outcome(&outcome, "invalid", None);
    }
    let revoked = app
        .client
        .delete(app.url(&format!("/auth/api-keys/{id}")))
        .send()
        .await
        .expect("revoke");
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    let (status, _) = send(&reader, Method::GET, &app.fhir("/Patient"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Keys from the configuration file are changed there, not through the API.
    let (_, listed) = json(
        app.client
            .get(app.url("/auth/api-keys"))
            .send()
            .await
            .expect("list"),
    )
    .await;
    let configured = listed["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["configured"] == true)
        .expect("the test key")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let kept = app
        .client
        .delete(app.url(&format!("/auth/api-keys/{configured}")))
        .send()
        .await
        .expect("revoke");
    assert_eq!(kept.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_server_writes_one_admin_key_for_its_operator() {
    let app = TestApp::start_with(|config| config.auth.api_keys.clear()).await;
    let (status, _) = send(&app.client, Method::GET, &app.fhir("/Patient"), None).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the test key is not configured here"
    );
    let file = app.data_dir.path().join("admin-api-key");
    let key = std::fs::read_to_string(&file)
        .expect("admin key file")
        .trim()
        .to_owned();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "only the owner reads it");
    }
    let admin = client_with(&key);
    let (status, _) = send(&admin, Method::GET, &app.url("/auth/api-keys"), None).await;
    assert_eq!(status, StatusCode::OK);
    // A restart keeps the key and does not make another.
    let dir = app.stop().await;
    let app = TestApp::start_in(dir, |config| config.auth.api_keys.clear()).await;
    let again = std::fs::read_to_string(app.data_dir.path().join("admin-api-key")).expect("file");
    assert_eq!(again.trim(), key);
    let (status, listed) = send(&admin, Method::GET, &app.url("/auth/api-keys"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["keys"].as_array().map(Vec::len), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_authentication_off_is_explicit() {
    let app = TestApp::start_with(|config| {
        config.auth.required = false;
        config.auth.api_keys.clear();
    })
    .await;
    let (status, _) = send(&Client::new(), Method::GET, &app.fhir("/Patient"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!app.data_dir.path().join("admin-api-key").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_subject_cannot_pass_for_an_api_key_in_the_audit_log() {
    let app = start_with_idp(|_| {}).await;
    let token = idp_token(&app, |claims| claims["sub"] = json!("api-key:test-admin"));
    let answer = client_with(&token)
        .get(app.fhir("/Patient"))
        .send()
        .await
        .expect("search");
    assert_eq!(answer.status(), StatusCode::OK);
    let (status, bundle) = json(app.get("/AuditEvent?subtype=search-type").await).await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    let callers: Vec<&str> = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["resource"]["agent"][0]["who"]["display"].as_str())
        .collect();
    assert!(callers.contains(&"jwt:api-key:test-admin"), "{callers:?}");
    assert!(!callers.contains(&"api-key:test-admin"), "{callers:?}");
}
