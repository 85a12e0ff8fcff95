//! The load harness: fhirgate against nginx on the same machine, in the same run.
//!
//! `cargo bench --bench load` builds the release binary, starts a local upstream FHIR server,
//! fhirgate (auth and audit on, the upstream configured as a source) and nginx (Debian package,
//! a keep-alive reverse proxy to the same upstream), then runs each scenario: a warm-up, then
//! at least three rounds with nginx and fhirgate interleaved, closed-loop for throughput and
//! fixed-rate (coordinated omission corrected) for latency. It reports requests/s, p50/p99/p99.9,
//! server CPU per request, peak RSS and errors, with the ratios against nginx, in
//! `target/load/report.json`, `report.md` and `latency.svg`. Everything stays on 127.0.0.1 and
//! every run is bounded in time. `LOAD_SECONDS` (default 5) sets the length of a run,
//! `LOAD_ROUNDS` (default 3) the rounds.

#[path = "load/client.rs"]
mod client;
#[path = "load/report.rs"]
mod report;
#[path = "load/upstream.rs"]
mod upstream;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use client::{Sample, Target};
use report::{Measurement, Report};

const KEY: &str = "fg_load-harness-key";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_for(address: &str) {
    for _ in 0..2000 {
        if std::net::TcpStream::connect(address).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("{address} did not come up");
}

/// CPU time (user + system) of a process and its children, in microseconds.
fn cpu_us(pids: &[u32]) -> u64 {
    let ticks_per_sec = 100;
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            let after = stat.rsplit_once(") ")?.1;
            let fields: Vec<&str> = after.split_whitespace().collect();
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) * 1_000_000 / ticks_per_sec)
        })
        .sum()
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A server under test: its processes (nginx has workers) and how to reach it.
struct Server {
    name: &'static str,
    /// `None` for the upstream, which runs in this process.
    child: Option<Child>,
    address: String,
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    fn pids(&self) -> Vec<u32> {
        let Some(master) = self.child.as_ref().map(Child::id) else {
            return Vec::new();
        };
        let mut pids = vec![master];
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| {
                        s.rsplit_once(") ")?
                            .1
                            .split_whitespace()
                            .nth(1)?
                            .parse::<u32>()
                            .ok()
                    });
                if parent == Some(master) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    fn rss_kib(&self) -> u64 {
        self.pids().iter().map(|p| status_kib(*p, "VmRSS:")).sum()
    }

    fn peak_kib(&self) -> u64 {
        self.pids().iter().map(|p| status_kib(*p, "VmHWM:")).sum()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start_fhirgate(upstream: &str) -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let sha = {
        use sha2::Digest;
        fhirgate::hex(&sha2::Sha256::digest(KEY.as_bytes()))
    };
    let config = format!(
        r#"[server]
bind = "127.0.0.1:{port}"
max_connections = 4096
rate_limit_per_sec = 0
[store]
data_dir = "{data}"
[log]
level = "warn"
[pa]
policies_dir = "{root}/policies"
[cds]
hooks_dir = "{root}/hooks"
require_jwt = false
[[auth.api_keys]]
name = "load"
sha256 = "{sha}"
roles = ["admin"]
[sources.upstream]
kind = "fhir"
base_url = "http://{upstream}/fhir"
timeout_secs = 10
"#,
        data = dir.path().join("data").display(),
        root = root().display(),
    );
    let path = dir.path().join("fhirgate.toml");
    std::fs::write(&path, config).expect("config");
    let child = Command::new(root().join("target/release/fhirgate"))
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fhirgate");
    let address = format!("127.0.0.1:{port}");
    wait_for(&address);
    Server {
        name: "fhirgate",
        child: Some(child),
        address,
        _dir: Some(dir),
    }
}

fn start_nginx(upstream: &str) -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let d = dir.path().display();
    // What a production front proxy would be: keep-alive to the upstream, two workers (one per
    // core), buffering on, no access log (logging would only slow it down).
    let config = format!(
        r#"worker_processes 2;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  upstream fhir {{ server {upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} reuseport;
    keepalive_requests 10000000;
    location / {{
      proxy_pass http://fhir;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"#
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, config).expect("nginx config");
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("nginx is not installed: apt-get install nginx-light (the README's Performance section)");
    let child = Command::new(nginx)
        .args(["-c"])
        .arg(&path)
        .args(["-p"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let address = format!("127.0.0.1:{port}");
    wait_for(&address);
    Server {
        name: "nginx",
        child: Some(child),
        address,
        _dir: Some(dir),
    }
}

/// One measured run against `server`.
fn measure(
    runtime: &tokio::runtime::Runtime,
    server: &Server,
    scenario: &str,
    target: Target,
    mode: Mode,
) -> Measurement {
    let target = Arc::new(target);
    let pids = server.pids();
    let cpu_before = cpu_us(&pids);
    let started = Instant::now();
    let mut sample: Sample = runtime.block_on(async {
        match mode {
            Mode::Closed {
                connections,
                seconds,
            } => client::closed_loop(target, connections, Duration::from_secs_f64(seconds)).await,
            Mode::Rate {
                connections,
                rate,
                seconds,
            } => {
                client::fixed_rate(target, connections, rate, Duration::from_secs_f64(seconds))
                    .await
            }
        }
    });
    let wall = started.elapsed();
    let cpu = cpu_us(&pids).saturating_sub(cpu_before);
    let requests = sample.latencies_us.len() as f64;
    Measurement {
        scenario: scenario.to_owned(),
        server: server.name.to_owned(),
        mode: mode.describe(),
        requests: sample.requests(),
        errors: sample.errors,
        rps: sample.rps(),
        p50_us: sample.quantile(0.5),
        p90_us: sample.quantile(0.9),
        p99_us: sample.quantile(0.99),
        p999_us: sample.quantile(0.999),
        cpu_us_per_request: cpu as f64 / requests.max(1.0),
        cpu_cores: cpu as f64 / wall.as_micros() as f64,
        rss_mb: server.rss_kib() as f64 / 1024.0,
        peak_rss_mb: server.peak_kib() as f64 / 1024.0,
    }
}

#[derive(Clone, Copy)]
enum Mode {
    Closed {
        connections: usize,
        seconds: f64,
    },
    Rate {
        connections: usize,
        rate: f64,
        seconds: f64,
    },
}

impl Mode {
    fn describe(self) -> String {
        match self {
            Mode::Closed { connections, .. } => format!("closed loop, {connections} connections"),
            Mode::Rate {
                connections, rate, ..
            } => format!("fixed rate {rate:.0}/s, {connections} connections"),
        }
    }
}

fn get(address: &str, path: &str, authorized: bool) -> Target {
    Target {
        address: address.to_owned(),
        method: http::Method::GET,
        path: path.to_owned(),
        headers: if authorized {
            vec![("authorization", format!("Bearer {KEY}"))]
        } else {
            Vec::new()
        },
        body: None,
        expect: 200,
    }
}

fn post(address: &str, path: &str, body: Arc<dyn Fn(u64) -> Bytes + Send + Sync>) -> Target {
    Target {
        address: address.to_owned(),
        method: http::Method::POST,
        path: path.to_owned(),
        headers: vec![
            ("authorization", format!("Bearer {KEY}")),
            ("content-type", "application/fhir+json".to_owned()),
        ],
        body: Some(body),
        expect: 200,
    }
}

fn order_sign() -> Bytes {
    let text = std::fs::read_to_string(root().join("benches/load/order-sign.json"))
        .expect("benches/load/order-sign.json");
    Bytes::from(text)
}

fn pas_template() -> String {
    let example = std::fs::read_to_string(
        root().join("tests/fixtures/davinci/pas-ig/Bundle-ReferralAuthorizationBundleExample.json"),
    )
    .expect("the PAS example");
    let template = example.replacen("\"value\":\"111099\"", "\"value\":\"ID-PLACEHOLDER\"", 1);
    assert_ne!(template, example, "the example's Claim identifier moved");
    template
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seconds: f64 = std::env::var("LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let rounds: usize = std::env::var("LOAD_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    println!("building the release binary…");
    let built = Command::new(env!("CARGO"))
        .args(["build", "--release", "--bin", "fhirgate"])
        .current_dir(root())
        .status()
        .expect("cargo build");
    assert!(built.success(), "the release build failed");

    // The upstream runs on one thread of its own.
    let upstream_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let upstream = upstream_listener.local_addr().expect("address").to_string();
    upstream_listener
        .set_nonblocking(true)
        .expect("nonblocking");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("upstream runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(upstream_listener).expect("listener");
            upstream::serve(listener).await;
        });
    });
    wait_for(&upstream);
    // The load generator: one thread, like wrk with one thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");

    let fhirgate = start_fhirgate(&upstream);
    let nginx = start_nginx(&upstream);
    std::thread::sleep(Duration::from_millis(500));
    let idle_rss = fhirgate.rss_kib() as f64 / 1024.0;
    let mut report = Report::new(seconds, rounds, idle_rss);

    // The embedded store's resource, and a check that the proxy path answers.
    let put = runtime.block_on(async {
        reqwest::Client::new()
            .put(format!("http://{}/fhir/Patient/p1", fhirgate.address))
            .header("authorization", format!("Bearer {KEY}"))
            .header("content-type", "application/fhir+json")
            .body(r#"{"resourceType":"Patient","id":"p1","name":[{"family":"Loadtest"}],"gender":"female","birthDate":"1970-01-01"}"#)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    assert!(
        matches!(put, Ok(200 | 201)),
        "seeding the embedded store: {put:?}"
    );

    let closed = Mode::Closed {
        connections: 32,
        seconds,
    };
    let single = Mode::Closed {
        connections: 1,
        seconds,
    };
    let warm = Mode::Closed {
        connections: 16,
        seconds: 1.0,
    };
    let proxied = |s: &Server| match s.name {
        "nginx" => get(&s.address, "/fhir/Patient/p1", false),
        _ => get(&s.address, "/fhir/upstream/Patient/p1", true),
    };
    let pas = Arc::new(pas_template());
    let pas_body = {
        let pas = pas.clone();
        Arc::new(move |n: u64| Bytes::from(pas.replace("ID-PLACEHOLDER", &format!("load-{n}"))))
            as Arc<dyn Fn(u64) -> Bytes + Send + Sync>
    };
    let cds = order_sign();
    let cds_body = Arc::new(move |_| cds.clone()) as Arc<dyn Fn(u64) -> Bytes + Send + Sync>;

    // Warm-up: every path once.
    for server in [&nginx, &fhirgate] {
        measure(&runtime, server, "warm-up", proxied(server), warm);
    }
    measure(
        &runtime,
        &fhirgate,
        "warm-up",
        get(&fhirgate.address, "/fhir/Patient/p1", true),
        warm,
    );
    println!("warm-up done; {rounds} rounds of {seconds} s per run");

    // Direct to the upstream, to see what each proxy adds at one connection.
    let direct = Server {
        name: "upstream",
        child: None,
        address: upstream.clone(),
        _dir: None,
    };
    for round in 0..rounds {
        println!("round {}", round + 1);
        // Interleaved: nginx, then fhirgate, for the same scenario.
        for server in [&nginx, &fhirgate] {
            report.add(measure(
                &runtime,
                server,
                "proxied read",
                proxied(server),
                closed,
            ));
        }
        report.add(measure(
            &runtime,
            &direct,
            "read at one connection",
            get(&upstream, "/fhir/Patient/p1", false),
            single,
        ));
        for server in [&nginx, &fhirgate] {
            report.add(measure(
                &runtime,
                server,
                "read at one connection",
                proxied(server),
                single,
            ));
        }
        report.add(measure(
            &runtime,
            &fhirgate,
            "embedded read",
            get(&fhirgate.address, "/fhir/Patient/p1", true),
            closed,
        ));
        report.add(measure(
            &runtime,
            &fhirgate,
            "CDS order-sign",
            post(
                &fhirgate.address,
                "/cds-services/crd-order-sign",
                cds_body.clone(),
            ),
            closed,
        ));
        report.add(measure(
            &runtime,
            &fhirgate,
            "CDS order-sign at 1,000/s",
            post(
                &fhirgate.address,
                "/cds-services/crd-order-sign",
                cds_body.clone(),
            ),
            Mode::Rate {
                connections: 16,
                rate: 1000.0,
                seconds,
            },
        ));
        report.add(measure(
            &runtime,
            &fhirgate,
            "PAS $submit",
            post(&fhirgate.address, "/fhir/Claim/$submit", pas_body.clone()),
            closed,
        ));
    }
    report.peak_rss_mb = fhirgate.peak_kib() as f64 / 1024.0;
    let out = root().join("target/load");
    std::fs::create_dir_all(&out).expect("target/load");
    report.write(&out).expect("writing the report");
    println!("{}", report.markdown());
    println!("written to {}", out.display());
}
