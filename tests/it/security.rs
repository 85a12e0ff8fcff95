//! The wire: TLS (1.2 and 1.3 only, HTTP/2 and HTTP/1.1), client certificates as
//! credentials, per-client rate limits, header limits and slow clients.

use std::path::Path;
use std::time::Duration;

use fhirgate::config::{ConfiguredApiKey, TlsConfig};
use reqwest::StatusCode;
use rustls::pki_types::pem::PemObject;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{client_with, json, patient, TestApp, TEST_ADMIN_KEY};

fn tls_config(dir: &Path, mtls: bool, require: bool) -> TlsConfig {
    TlsConfig {
        cert_file: dir.join("server.pem"),
        key_file: dir.join("server-key.pem"),
        client_ca_file: mtls.then(|| dir.join("ca.pem")),
        require_client_cert: require,
    }
}

/// A client trusting the development CA in `dir` (and nothing else).
fn tls_client(dir: &Path) -> reqwest::ClientBuilder {
    let ca = std::fs::read(dir.join("ca.pem")).expect("ca");
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).expect("ca pem")])
        .timeout(Duration::from_secs(20))
}

fn identity(dir: &Path) -> reqwest::Identity {
    let pem = [
        std::fs::read(dir.join("client.pem")).expect("cert"),
        std::fs::read(dir.join("client-key.pem")).expect("key"),
    ]
    .concat();
    reqwest::Identity::from_pem(&pem).expect("identity")
}

fn https(app: &TestApp, path: &str) -> String {
    format!("{}{path}", app.base.replacen("http://", "https://", 1))
}

/// A TLS 1.1 ClientHello (no `supported_versions` extension, so TLS 1.1 is the highest the
/// client offers), built by hand: rustls clients cannot even ask for it.
fn tls11_client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x02]; // client_version TLS 1.1
    hello.extend([7u8; 32]); // random
    hello.push(0); // no session id
    hello.extend([0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // two CBC suites
    hello.extend([0x01, 0x00]); // null compression
    let mut handshake = vec![0x01, 0x00];
    handshake.extend((hello.len() as u16).to_be_bytes());
    handshake.extend(hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

#[tokio::test]
async fn tls_serves_http2_and_http1_and_refuses_old_versions_and_plain_http() {
    let certs = tempfile::tempdir().expect("dir");
    fhirgate::http::tls::generate_dev(certs.path(), &["127.0.0.1".into()]).expect("certs");
    let app = TestApp::start_with(|config| {
        config.server.tls = Some(tls_config(certs.path(), false, false));
    })
    .await;
    let client = tls_client(certs.path()).build().expect("client");
    let answer = client
        .get(https(&app, "/fhir/metadata"))
        .send()
        .await
        .expect("https");
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.version(), reqwest::Version::HTTP_2);
    let (_, capability) = json(answer).await;
    assert_eq!(capability["resourceType"], "CapabilityStatement");
    // Links the server writes use https.
    assert!(capability["implementation"]["url"]
        .as_str()
        .expect("url")
        .starts_with("https://"));

    let http1_tls12 = tls_client(certs.path())
        .http1_only()
        .tls_version_max(reqwest::tls::Version::TLS_1_2)
        .build()
        .expect("client");
    let answer = http1_tls12
        .get(https(&app, "/healthz"))
        .send()
        .await
        .expect("https");
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.version(), reqwest::Version::HTTP_11);

    // A client that does not trust the server's CA refuses it.
    let stranger = tempfile::tempdir().expect("dir");
    fhirgate::http::tls::generate_dev(stranger.path(), &["127.0.0.1".into()]).expect("certs");
    let distrustful = tls_client(stranger.path()).build().expect("client");
    assert!(distrustful
        .get(https(&app, "/healthz"))
        .send()
        .await
        .is_err());

    // TLS 1.1: the server answers the hello with an alert, never a ServerHello.
    let address = app.base.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    socket
        .write_all(&tls11_client_hello())
        .await
        .expect("hello");
    let mut answer = [0u8; 7];
    socket.read_exact(&mut answer).await.expect("alert");
    assert_eq!(
        answer[0], 0x15,
        "an alert record, not a handshake: {answer:?}"
    );
    assert_eq!(answer[5], 2, "fatal");
    // protocol_version or handshake_failure: either way no TLS 1.1 session.
    assert!([40, 70].contains(&answer[6]), "{answer:?}");

    // Plain HTTP to the TLS port gets nothing served.
    let plain = reqwest::Client::new().get(app.url("/healthz")).send().await;
    assert!(plain.is_err() || !plain.expect("answer").status().is_success());
}

#[tokio::test]
async fn client_certificates_identify_service_clients() {
    let certs = tempfile::tempdir().expect("dir");
    let made =
        fhirgate::http::tls::generate_dev(certs.path(), &["127.0.0.1".into()]).expect("certs");
    let app = TestApp::start_with(|config| {
        config.server.tls = Some(tls_config(certs.path(), true, false));
        config.auth.mtls_clients = vec![ConfiguredApiKey {
            name: "lab-feed".into(),
            sha256: made.client_fingerprint.clone(),
            roles: vec!["read-only".into()],
            scopes: Vec::new(),
        }];
    })
    .await;
    let admin = tls_client(certs.path())
        .default_headers(
            [(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {TEST_ADMIN_KEY}").parse().expect("header"),
            )]
            .into_iter()
            .collect(),
        )
        .build()
        .expect("client");
    let put = admin
        .put(https(&app, "/fhir/Patient/tls-1"))
        .header("content-type", "application/fhir+json")
        .body(patient("tls-1").to_string())
        .send()
        .await
        .expect("put");
    assert_eq!(put.status(), StatusCode::CREATED);

    let with_cert = tls_client(certs.path())
        .identity(identity(certs.path()))
        .build()
        .expect("client");
    let read = with_cert
        .get(https(&app, "/fhir/Patient/tls-1"))
        .send()
        .await
        .expect("read");
    assert_eq!(read.status(), StatusCode::OK);
    // Read-only: the certificate's client may not write.
    let write = with_cert
        .put(https(&app, "/fhir/Patient/tls-1"))
        .header("content-type", "application/fhir+json")
        .body(patient("tls-1").to_string())
        .send()
        .await
        .expect("put");
    assert_eq!(write.status(), StatusCode::FORBIDDEN);
    // Without a certificate (optional here) there is no credential.
    let without = tls_client(certs.path()).build().expect("client");
    let refused = without
        .get(https(&app, "/fhir/Patient/tls-1"))
        .send()
        .await
        .expect("read");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    // A certificate from another CA does not get through the handshake.
    let other = tempfile::tempdir().expect("dir");
    fhirgate::http::tls::generate_dev(other.path(), &["127.0.0.1".into()]).expect("certs");
    let impostor = tls_client(certs.path())
        .identity(identity(other.path()))
        .build()
        .expect("client");
    assert!(impostor
        .get(https(&app, "/fhir/Patient/tls-1"))
        .send()
        .await
        .is_err());

    let (status, bundle) = json(
        admin
            .get(https(&app, "/fhir/AuditEvent?agent=mtls:lab-feed"))
            .send()
            .await
            .expect("audit"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    let outcomes: Vec<&Value> = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| &e["resource"]["outcome"])
        .collect();
    assert_eq!(outcomes, ["0", "4"]);

    // Required client certificates: no certificate, no handshake.
    let data = app.stop().await;
    let strict = TestApp::start_in(data, |config| {
        config.server.tls = Some(tls_config(certs.path(), true, true));
    })
    .await;
    assert!(without
        .get(https(&strict, "/healthz"))
        .send()
        .await
        .is_err());
    let answer = with_cert
        .get(https(&strict, "/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(answer.status(), StatusCode::OK);
}

#[tokio::test]
async fn each_client_has_its_own_rate_limit() {
    let app = TestApp::start_with(|config| {
        config.server.rate_limit_per_sec = 1;
        config.server.rate_limit_burst = 3;
    })
    .await;
    // A second client's key (the admin spends one request of its burst on it).
    let key = crate::auth::api_key(&app, &["read-only"], &[]).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..6 {
        let answer = app.get("/Patient").await;
        if answer.status() == StatusCode::TOO_MANY_REQUESTS {
            retry_after = answer
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let (_, outcome) = json(answer).await;
            assert_eq!(outcome["issue"][0]["code"], "throttled");
            statuses.push(429);
        } else {
            statuses.push(answer.status().as_u16());
        }
    }
    // A burst of three, then refusals (a slow machine may earn one more token meanwhile).
    assert_eq!(&statuses[..3], [200, 200, 200], "{statuses:?}");
    assert!(statuses[3..].contains(&429), "{statuses:?}");
    assert!(retry_after.is_some_and(|s| s >= 1), "{retry_after:?}");
    // Another client is not affected; failed logins are limited by address.
    let other = client_with(&key);
    let answer = other.get(app.fhir("/Patient")).send().await.expect("get");
    assert_eq!(answer.status(), StatusCode::OK);
    let guesser = client_with("fg_guess");
    let mut guessed = Vec::new();
    for _ in 0..6 {
        let answer = guesser.get(app.fhir("/Patient")).send().await.expect("get");
        guessed.push(answer.status().as_u16());
    }
    assert_eq!(&guessed[..3], [401, 401, 401], "{guessed:?}");
    assert!(guessed[3..].contains(&429), "{guessed:?}");
    // Meanwhile that address is not heard at all, right key or not.
    let blocked = other.get(app.fhir("/Patient")).send().await.expect("get");
    assert_eq!(blocked.status(), StatusCode::TOO_MANY_REQUESTS);
    // Health checks are never limited.
    for _ in 0..10 {
        let health = app
            .client
            .get(app.url("/healthz"))
            .send()
            .await
            .expect("health");
        assert_eq!(health.status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn oversized_headers_and_slow_clients_are_cut_off() {
    let app = TestApp::start_with(|config| {
        config.server.header_read_timeout_secs = 1;
        config.server.request_timeout_secs = 1;
    })
    .await;
    let huge = "x".repeat(40 * 1024);
    let answer = app
        .client
        .get(app.fhir("/Patient"))
        .header("x-padding", huge)
        .send()
        .await
        .expect("get");
    assert_eq!(answer.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let (_, outcome) = json(answer).await;
    assert_eq!(outcome["issue"][0]["code"], "too-long");

    let address = app.base.trim_start_matches("http://").to_owned();
    // A connection that never says anything: closed, so it cannot hold a connection slot.
    let mut silent = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    let mut nothing = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(30), silent.read_to_end(&mut nothing)).await;
    assert!(closed.is_ok(), "a silent connection was left open");
    // Headers that never finish: the server closes the connection.
    let mut slow = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(30), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection was left open");

    // A body that stops arriving: refused, and nothing is stored.
    let body = patient("slow-1").to_string();
    let mut trickle = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    let head = format!(
        "PUT /fhir/Patient/slow-1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_ADMIN_KEY}\r\nContent-Type: application/fhir+json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    trickle.write_all(head.as_bytes()).await.expect("head");
    trickle
        .write_all(&body.as_bytes()[..10])
        .await
        .expect("part");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = trickle.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer to a stalled body");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 4"), "{text}");
    assert_eq!(
        app.get("/Patient/slow-1").await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn outbound_tls_is_verified_against_the_system_and_the_extra_ca_bundle() {
    let certs = tempfile::tempdir().expect("dir");
    fhirgate::http::tls::generate_dev(certs.path(), &["127.0.0.1".into()]).expect("certs");
    // An EHR that speaks HTTPS with a certificate from a private CA.
    let ehr = TestApp::start_with(|config| {
        config.server.tls = Some(tls_config(certs.path(), false, false));
        config.auth.required = false;
    })
    .await;
    let ehr_client = tls_client(certs.path()).build().expect("client");
    let put = ehr_client
        .put(https(&ehr, "/fhir/Patient/far-1"))
        .header("content-type", "application/fhir+json")
        .body(patient("far-1").to_string())
        .send()
        .await
        .expect("put");
    assert_eq!(put.status(), StatusCode::CREATED);
    let source = |config: &mut fhirgate::config::Config| {
        config.sources.insert(
            "ehr".into(),
            crate::sync::source_for_url(&https(&ehr, "/fhir")),
        );
    };
    // Without the CA the gateway refuses the EHR's certificate…
    let untrusting = TestApp::start_with(source).await;
    let answer = untrusting.get("/ehr/Patient/far-1").await;
    assert!(answer.status().is_server_error(), "{}", answer.status());
    // …with it in outbound.ca_file, it reads through.
    let trusting = TestApp::start_with(|config| {
        source(config);
        config.outbound.ca_file = Some(certs.path().join("ca.pem"));
    })
    .await;
    let (status, read) = json(trusting.get("/ehr/Patient/far-1").await).await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(read["id"], "far-1");
}

/// A key file holding `byte` 32 times, as hex.
fn key_file(dir: &Path, id: &str, byte: u8) -> fhirgate::config::EncryptionKey {
    let path = dir.join(format!("{id}.key"));
    std::fs::write(&path, format!("{byte:02x}").repeat(32)).expect("key");
    fhirgate::config::EncryptionKey {
        id: id.into(),
        file: Some(path),
        env: None,
    }
}

#[tokio::test]
async fn stored_data_is_encrypted_and_key_rotation_keeps_it_readable() {
    let keys = tempfile::tempdir().expect("dir");
    let first = key_file(keys.path(), "2026-01", 0x11);
    let second = key_file(keys.path(), "2026-07", 0x22);
    let with_keys = |list: Vec<fhirgate::config::EncryptionKey>| {
        move |config: &mut fhirgate::config::Config| {
            config.store.encryption.keys = list;
            config.store.encryption.resources = true;
        }
    };
    let app = TestApp::start_with(with_keys(vec![first.clone()])).await;
    let mut before = patient("enc-1");
    before["name"] = json!([{"family": "Vandermolen", "given": ["Ottoline"]}]);
    assert_eq!(app.put("/Patient/enc-1", &before).await.status(), 201);
    // Something kept in the key-value space too: an API key's record.
    let made = app
        .client
        .post(app.url("/auth/api-keys"))
        .json(&json!({"name": "Zephyrine-feed", "roles": ["read-only"]}))
        .send()
        .await
        .expect("key");
    assert_eq!(made.status(), StatusCode::CREATED);
    let data = app.stop().await;
    let raw = std::fs::read(data.path().join("fhirgate.redb")).expect("db");
    let contains = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
    assert!(
        !contains(b"\"family\":\"Vandermolen\""),
        "a resource body in the clear"
    );
    assert!(!contains(b"Ottoline"), "a given name in the clear");
    assert!(!contains(b"Zephyrine"), "a key-value record in the clear");

    // A new active key: old data stays readable, new data is sealed with the new key.
    let app = TestApp::start_in(data, with_keys(vec![first.clone(), second.clone()])).await;
    let (status, read) = json(app.get("/Patient/enc-1").await).await;
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["name"][0]["given"][0], "Ottoline");
    let mut after = patient("enc-2");
    after["name"] = json!([{"family": "Brightwater"}]);
    assert_eq!(app.put("/Patient/enc-2", &after).await.status(), 201);
    let (status, listed) = json(
        app.client
            .get(app.url("/auth/api-keys"))
            .send()
            .await
            .expect("keys"),
    )
    .await;
    assert_eq!(status, 200, "{listed}");
    assert!(listed.to_string().contains("Zephyrine-feed"));
    let data = app.stop().await;

    let app = TestApp::start_in(data, with_keys(vec![first, second.clone()])).await;
    assert_eq!(app.get("/Patient/enc-1").await.status(), 200);
    assert_eq!(app.get("/Patient/enc-2").await.status(), 200);
    let data = app.stop().await;
    // Without the old key, what it sealed cannot be read: the server says so and stops.
    let mut config = fhirgate::config::Config::default();
    config.store.data_dir = data.path().to_path_buf();
    with_keys(vec![second.clone()])(&mut config);
    let refused = fhirgate::App::build(&config, "http://127.0.0.1:1").await;
    let message = format!("{:#}", refused.err().expect("refused"));
    assert!(message.contains("not configured"), "{message}");

    // A plain value planted in the file where everything is sealed is refused, not trusted.
    let planted = tempfile::tempdir().expect("dir");
    std::fs::copy(
        data.path().join("fhirgate.redb"),
        planted.path().join("fhirgate.redb"),
    )
    .expect("copy");
    {
        const KV: redb::TableDefinition<(&str, &str), &[u8]> = redb::TableDefinition::new("kv");
        let db = redb::Database::open(planted.path().join("fhirgate.redb")).expect("open");
        let txn = db.begin_write().expect("write");
        txn.open_table(KV)
            .expect("kv")
            .insert(("auth.meta", "token-secret"), b"attacker-chosen".as_slice())
            .expect("plant");
        txn.commit().expect("commit");
    }
    let mut config = fhirgate::config::Config::default();
    config.store.data_dir = planted.path().to_path_buf();
    with_keys(vec![key_file(keys.path(), "2026-01", 0x11), second])(&mut config);
    let refused = fhirgate::App::build(&config, "http://127.0.0.1:1").await;
    let message = format!("{:#}", refused.err().expect("refused"));
    assert!(message.contains("must be encrypted"), "{message}");
}

#[tokio::test]
async fn a_silent_http2_client_over_tls_is_closed() {
    let certs = tempfile::tempdir().expect("dir");
    fhirgate::http::tls::generate_dev(certs.path(), &["127.0.0.1".into()]).expect("certs");
    let app = TestApp::start_with(|config| {
        config.server.tls = Some(tls_config(certs.path(), false, false));
        config.server.header_read_timeout_secs = 1;
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(certs.path().join("ca.pem")).expect("ca");
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.expect("cert")).expect("root");
    }
    let mut client = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let address = app.base.trim_start_matches("http://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
    // Says nothing after the handshake: the server hangs up.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "a silent HTTP/2 client was left connected");
}
