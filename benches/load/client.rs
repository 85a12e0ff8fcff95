//! The load generator: HTTP/1.1 keep-alive connections over hyper's low-level client.
//!
//! Closed loop: each connection sends its next request when the last answer is in — the
//! throughput a server sustains. Fixed rate: requests are due on a schedule, and latency counts
//! from when a request was due, not when it could be sent, so a stalled server is charged for
//! the requests it kept waiting (coordinated omission corrected).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use tokio::net::TcpStream;

/// What to send: method, path, headers and a body per request number.
pub struct Target {
    pub address: String,
    pub method: http::Method,
    pub path: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Option<Arc<dyn Fn(u64) -> Bytes + Send + Sync>>,
    /// Answers other than this are errors.
    pub expect: u16,
}

/// Latencies (microseconds) and counts of one run.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    pub latencies_us: Vec<u32>,
    pub errors: u64,
    pub elapsed: Duration,
}

impl Sample {
    pub fn requests(&self) -> u64 {
        self.latencies_us.len() as u64 + self.errors
    }

    pub fn rps(&self) -> f64 {
        self.latencies_us.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// The `q` quantile (0–1) in microseconds.
    pub fn quantile(&mut self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        self.latencies_us.sort_unstable();
        let rank = ((self.latencies_us.len() as f64 - 1.0) * q).round() as usize;
        f64::from(self.latencies_us[rank])
    }
}

async fn connect(address: &str) -> std::io::Result<http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn send(sender: &mut http1::SendRequest<Full<Bytes>>, target: &Target, n: u64) -> bool {
    let mut request = http::Request::builder()
        .method(target.method.clone())
        .uri(&target.path)
        .header("host", &target.address);
    for (name, value) in &target.headers {
        request = request.header(*name, value);
    }
    let body = target.body.as_ref().map(|b| b(n)).unwrap_or_default();
    let Ok(request) = request.body(Full::new(body)) else {
        return false;
    };
    if sender.ready().await.is_err() {
        return false;
    }
    match sender.send_request(request).await {
        Ok(response) => {
            let ok = response.status().as_u16() == target.expect;
            let closing = response
                .headers()
                .get("connection")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            let ok = ok && response.into_body().collect().await.is_ok();
            // A server may end a keep-alive connection after an answer; that is not an error.
            if closing {
                if let Ok(fresh) = connect(&target.address).await {
                    *sender = fresh;
                }
            }
            ok
        }
        Err(_) => false,
    }
}

/// `connections` connections as fast as answers come, for `duration`.
pub async fn closed_loop(target: Arc<Target>, connections: usize, duration: Duration) -> Sample {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for c in 0..connections {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut sample = Sample::default();
            let Ok(mut sender) = connect(&target.address).await else {
                sample.errors += 1;
                return sample;
            };
            let mut n = c as u64 * 1_000_000_000;
            while Instant::now() < deadline {
                let at = Instant::now();
                n += 1;
                if send(&mut sender, &target, n).await {
                    sample.latencies_us.push(at.elapsed().as_micros() as u32);
                } else {
                    sample.errors += 1;
                    match connect(&target.address).await {
                        Ok(s) => sender = s,
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            }
            sample
        }));
    }
    merge(tasks, started).await
}

/// `rate` requests a second spread over `connections`, for `duration`; latency counts from
/// each request's due time.
pub async fn fixed_rate(
    target: Arc<Target>,
    connections: usize,
    rate: f64,
    duration: Duration,
) -> Sample {
    let started = Instant::now();
    let per_connection = Duration::from_secs_f64(connections as f64 / rate);
    let count = (duration.as_secs_f64() * rate / connections as f64) as u64;
    let mut tasks = Vec::new();
    for c in 0..connections {
        let target = target.clone();
        let offset = per_connection.mul_f64(c as f64 / connections as f64);
        tasks.push(tokio::spawn(async move {
            let mut sample = Sample::default();
            let Ok(mut sender) = connect(&target.address).await else {
                sample.errors += 1;
                return sample;
            };
            for k in 0..count {
                let due = started + offset + per_connection * k as u32;
                tokio::time::sleep_until(due.into()).await;
                let n = c as u64 * 1_000_000_000 + k;
                if send(&mut sender, &target, n).await {
                    sample.latencies_us.push(due.elapsed().as_micros() as u32);
                } else {
                    sample.errors += 1;
                    if let Ok(s) = connect(&target.address).await {
                        sender = s;
                    }
                }
            }
            sample
        }));
    }
    merge(tasks, started).await
}

async fn merge(tasks: Vec<tokio::task::JoinHandle<Sample>>, started: Instant) -> Sample {
    let mut all = Sample::default();
    for task in tasks {
        if let Ok(sample) = task.await {
            all.latencies_us.extend(sample.latencies_us);
            all.errors += sample.errors;
        } else {
            all.errors += 1;
        }
    }
    all.elapsed = started.elapsed();
    all
}
