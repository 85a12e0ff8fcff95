//! The real binary, killed with SIGKILL in the middle of a stream of writes, keeps every write
//! it acknowledged.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::{Client, StatusCode};
use serde_json::json;

pub struct Server {
    pub child: Child,
    pub base: String,
    /// The admin key the server made on its first start (`{data_dir}/admin-api-key`).
    pub admin_key: String,
}

impl Server {
    /// A client that authenticates with the server's admin key.
    pub fn client(&self) -> Client {
        crate::helpers::client_with(&self.admin_key)
    }
}

impl Drop for Server {
    /// A test that fails midway leaves no server behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

async fn start(data_dir: &std::path::Path) -> Server {
    start_binary(data_dir, None, free_port()).await
}

/// The real binary on `port`, with its data in `data_dir` and, when given, a config file.
pub async fn start_binary(
    data_dir: &std::path::Path,
    config: Option<&std::path::Path>,
    port: u16,
) -> Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fhirgate"));
    command.arg("serve");
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let mut child = command
        .env_remove("FHIRGATE_CONFIG")
        .env("FHIRGATE_SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("FHIRGATE_STORE__DATA_DIR", data_dir)
        .env(
            "FHIRGATE_LOG__LEVEL",
            std::env::var("TEST_SERVER_LOGS").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        // TEST_SERVER_LOGS=debug (a log filter) shows the server's log, for debugging a test.
        .stderr(if std::env::var_os("TEST_SERVER_LOGS").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("start fhirgate");
    let base = format!("http://127.0.0.1:{port}");
    let client = Client::new();
    // Ready within a bounded number of polls (not a timing assertion: a slow machine only waits).
    for _ in 0..600 {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status() == StatusCode::OK {
                let admin_key = std::fs::read_to_string(data_dir.join("admin-api-key"))
                    .expect("a fresh server writes its first admin key")
                    .trim()
                    .to_owned();
                return Server {
                    child,
                    base,
                    admin_key,
                };
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("fhirgate did not become ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut server = start(dir.path()).await;
    let client = server.client();
    let acknowledged: Arc<Mutex<Vec<(String, u64)>>> = Arc::new(Mutex::new(Vec::new()));

    // Four writers stream creates and updates until the server dies under them.
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = client.clone();
        let base = server.base.clone();
        let acknowledged = acknowledged.clone();
        writers.push(tokio::spawn(async move {
            for n in 0u64.. {
                let id = format!("w{w}-{}", n % 50);
                let body = json!({"resourceType":"Patient","id":id,"birthDate":"1970-01-01","multipleBirthInteger":n});
                let sent = client
                    .put(format!("{base}/fhir/Patient/{id}"))
                    .header("content-type", "application/fhir+json")
                    .json(&body)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => acknowledged.lock().expect("lock").push((id, n)),
                    Ok(r) => panic!("unexpected status {}", r.status()),
                    Err(_) => break, // the server is gone
                }
            }
        }));
    }
    // Kill once a good number of writes were acknowledged, mid-stream.
    for _ in 0..2000 {
        if acknowledged.lock().expect("lock").len() >= 400 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.child.kill().expect("SIGKILL");
    server.child.wait().expect("reaped");
    for w in writers {
        w.await.expect("writer");
    }
    let acknowledged = acknowledged.lock().expect("lock").clone();
    assert!(
        acknowledged.len() >= 400,
        "only {} writes before the kill",
        acknowledged.len()
    );

    // Restart on the same data: the latest acknowledged value of every id is there (a later,
    // unacknowledged write may also have landed, but never an older one).
    let mut server = start(dir.path()).await;
    let mut latest: std::collections::BTreeMap<String, u64> = Default::default();
    for (id, n) in &acknowledged {
        let e = latest.entry(id.clone()).or_default();
        *e = (*e).max(*n);
    }
    for (id, n) in &latest {
        let r = client
            .get(format!("{}/fhir/Patient/{id}", server.base))
            .send()
            .await
            .expect("read");
        assert_eq!(r.status(), StatusCode::OK, "{id} lost");
        let body: serde_json::Value = r.json().await.expect("json");
        let stored = body["multipleBirthInteger"].as_u64().expect("n");
        assert!(stored >= *n, "{id}: acknowledged {n}, found {stored}");
    }
    // And the store still takes writes after recovery.
    let r = client
        .put(format!("{}/fhir/Patient/after", server.base))
        .header("content-type", "application/fhir+json")
        .json(&json!({"resourceType":"Patient","id":"after"}))
        .send()
        .await
        .expect("write");
    assert_eq!(r.status(), StatusCode::CREATED);
    // A clean stop: SIGTERM lets it close the store.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(server.child.id().to_string())
        .status();
    let status = server.child.wait().expect("exit");
    assert!(
        status.success(),
        "graceful shutdown exits cleanly: {status}"
    );
}
