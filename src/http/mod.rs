//! The HTTP server: routes of every area, the middleware stack, and graceful shutdown.
//!
//! All middleware is assembled in [`app`], so the order is visible in one place, and wraps
//! the application once (not each route). From the outside in: request id → trace log →
//! metrics → bare errors as OperationOutcome → panic guard → time limit on reads (and on receiving write bodies) → body limit → handler, with
//! oversized headers refused just inside the metrics.

mod listener;
pub mod ops;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use http::{header, HeaderName, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

pub use listener::{CappedListener, Peer};

use crate::config::ServerConfig;
use crate::fhir::{operation_outcome, Issue};
use crate::server::json_response;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The process-wide Prometheus recorder (installed once; later calls share it).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is already global (e.g. an embedding program's); render ours
                // from a local recorder so /metrics still answers.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Wraps the application (the routes with the guard around them) in the middleware stack,
/// once around the whole rather than around each route, so a request pays for each layer
/// once. The list reads from the outermost layer to the innermost.
pub fn app<S>(inner: S, config: &ServerConfig) -> Router
where
    S: tower::Service<Request, Response = Response, Error = std::convert::Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let stack = tower::ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request<Body>| {
                    let request_id = request
                        .headers()
                        .get(&REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    tracing::info_span!("request", method = %request.method(), request_id)
                })
                .on_request(())
                .on_response(
                    |response: &Response, latency: Duration, _span: &tracing::Span| {
                        // Only the route template: paths and query strings can carry
                        // identifiers.
                        tracing::info!(
                            route = route_of(response),
                            status = response.status().as_u16(),
                            latency_us = latency.as_micros() as u64,
                            "served"
                        );
                    },
                )
                .on_failure(()),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(middleware::from_fn(record_metrics))
        .layer(middleware::from_fn_with_state(
            config.max_header_bytes,
            limit_headers,
        ))
        .layer(middleware::map_response(bare_errors_as_outcomes))
        .map_response(|response: http::Response<_>| response.map(Body::new))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn_with_state(
            config.request_timeout(),
            time_limit_reads,
        ))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .service(inner);
    Router::new().fallback_service(stack)
}

/// The route a response came from, as a template (`/fhir/{type}/{id}`), for logs and metrics.
#[derive(Clone)]
pub enum RouteName {
    Matched(MatchedPath),
    Fixed(&'static str),
}

impl RouteName {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Matched(path) => path.as_str(),
            Self::Fixed(name) => name,
        }
    }
}

fn route_of(response: &Response) -> &str {
    response
        .extensions()
        .get::<RouteName>()
        .map_or("unmatched", RouteName::as_str)
}

/// Labels each routed response with its route's template ([`RouteName`]), so the layers
/// around the router can tell routes apart without routing again.
#[derive(Clone, Copy)]
pub struct RouteLabelLayer;

impl<S> tower::Layer<S> for RouteLabelLayer {
    type Service = RouteLabel<S>;
    fn layer(&self, inner: S) -> RouteLabel<S> {
        RouteLabel(inner)
    }
}

#[derive(Clone)]
pub struct RouteLabel<S>(S);

impl<S> tower::Service<Request> for RouteLabel<S>
where
    S: tower::Service<Request, Response = Response, Error = std::convert::Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures_util::future::BoxFuture<'static, Result<Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let matched = request.extensions().get::<MatchedPath>().cloned();
        let answer = self.0.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            if let Some(matched) = matched {
                response
                    .extensions_mut()
                    .insert(RouteName::Matched(matched));
            }
            Ok(response)
        })
    }
}

/// Bounds the time of reads (`GET`, `HEAD`). Writes are not cut off: once queued, a write is
/// either applied and answered, or refused unapplied by the store's own queue deadline, so a
/// client never gets a timeout for a write that in fact happened.
async fn time_limit_reads(
    axum::extract::State(limit): axum::extract::State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    if !matches!(*request.method(), http::Method::GET | http::Method::HEAD) {
        // A write's body must arrive within the limit too, so a client trickling bytes cannot
        // hold a connection (and a body buffer) for ever; nothing is applied before it has.
        let request = request.map(|body| body_deadline(body, limit));
        return next.run(request).await;
    }
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &operation_outcome(&[Issue::error("timeout", "the request took too long")]),
        ),
    }
}

/// `body`, failing if it has not all arrived within `limit`.
fn body_deadline(body: Body, limit: Duration) -> Body {
    use futures_util::StreamExt;
    let deadline = tokio::time::Instant::now() + limit;
    let frames =
        futures_util::stream::unfold(Some(body.into_data_stream()), move |state| async move {
            let mut stream = state?;
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(chunk)) => Some((chunk.map_err(axum::BoxError::from), Some(stream))),
                Ok(None) => None,
                Err(_) => Some((
                    Err(axum::BoxError::from(
                        "the request body did not arrive in time",
                    )),
                    None,
                )),
            }
        });
    Body::from_stream(frames)
}

/// Refuses requests whose headers together exceed `max` bytes (431).
async fn limit_headers(
    axum::extract::State(max): axum::extract::State<usize>,
    request: Request,
    next: Next,
) -> Response {
    let size: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if size > max {
        return json_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            &operation_outcome(&[Issue::error(
                "too-long",
                format!("the request headers are larger than {max} bytes"),
            )]),
        );
    }
    next.run(request).await
}

async fn record_metrics(request: Request, next: Next) -> Response {
    // Only standard methods become label values, so clients cannot mint new series.
    let method = match *request.method() {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let started = Instant::now();
    let response = next.run(request).await;
    let route = intern(route_of(&response));
    let status = response.status().as_u16();
    // The handles of a method, route and status are looked up once per thread.
    thread_local! {
        static HANDLES: std::cell::RefCell<HashMap<RequestSeries, SeriesHandles>> =
            Default::default();
    }
    let (count, duration) = HANDLES.with_borrow_mut(|handles| {
        handles
            .entry((method, route, status))
            .or_insert_with(|| {
                let label = crate::remote::status_label(status);
                (
                    metrics::counter!("fhirgate_http_requests_total", "method" => method, "route" => route, "status" => label),
                    metrics::histogram!("fhirgate_http_request_duration_seconds", "method" => method, "route" => route),
                )
            })
            .clone()
    });
    count.increment(1);
    duration.record(started.elapsed().as_secs_f64());
    response
}

/// A method, route and status: one series of the request metrics.
type RequestSeries = (&'static str, &'static str, u16);
type SeriesHandles = (metrics::Counter, metrics::Histogram);

/// Route templates as `'static` metric labels: there are as many as there are routes, so each
/// is kept once for the life of the process.
fn intern(route: &str) -> &'static str {
    static ROUTES: OnceLock<std::sync::RwLock<std::collections::HashSet<&'static str>>> =
        OnceLock::new();
    let routes = ROUTES.get_or_init(Default::default);
    if let Some(found) = routes.read().ok().and_then(|set| set.get(route).copied()) {
        return found;
    }
    let Ok(mut set) = routes.write() else {
        return "unmatched";
    };
    if let Some(found) = set.get(route) {
        return found;
    }
    let leaked: &'static str = Box::leak(route.to_owned().into_boxed_str());
    set.insert(leaked);
    leaked
}

/// Errors produced outside the handlers (unknown route, wrong method, timeout, body limit,
/// extractor rejections) arrive without a JSON body; give them an OperationOutcome.
async fn bare_errors_as_outcomes(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("json") || ct.starts_with("text/html"));
    // JSON already says what went wrong; an HTML page (the review app's) is for a browser.
    if is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let diagnostics = match String::from_utf8_lossy(&text).trim() {
        "" => status.canonical_reason().unwrap_or("error").to_owned(),
        t => t.to_owned(),
    };
    let code = match status {
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::METHOD_NOT_ALLOWED | StatusCode::UNSUPPORTED_MEDIA_TYPE => "not-supported",
        StatusCode::PAYLOAD_TOO_LARGE => "too-long",
        StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::REQUEST_TIMEOUT
        | StatusCode::GATEWAY_TIMEOUT => "timeout",
        s if s.is_server_error() => "exception",
        _ => "invalid",
    };
    let mut out = json_response(
        status,
        &operation_outcome(&[Issue::error(code, diagnostics)]),
    );
    for name in [header::ALLOW, header::RETRY_AFTER] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

fn panic_response(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    json_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        &operation_outcome(&[Issue::error("exception", "internal server error")]),
    )
}

/// How [`serve`] runs connections.
pub struct ServeOptions {
    /// Time in-flight requests get after the shutdown signal.
    pub grace: Duration,
    /// Time a client has to send a request's headers, and to finish a TLS handshake.
    pub header_read_timeout: Duration,
    /// HTTPS when set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Threads serving connections (`0`: one per CPU core).
    pub workers: usize,
}

/// The threads that serve connections. Each runs its own event loop (a runtime of one worker
/// thread), and a connection stays on the thread it was given: its requests, and the calls
/// they make to sources, are handled without waking other threads (a work-stealing pool spends
/// a good part of a short request moving it between threads). Connections go to the thread
/// with the fewest open.
struct Workers {
    runtimes: Vec<(tokio::runtime::Runtime, Arc<AtomicUsize>)>,
}

impl Workers {
    fn start(count: usize) -> std::io::Result<Self> {
        let count = match count {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let runtimes = (0..count)
            .map(|i| {
                // A multi-thread runtime of one worker rather than a current-thread one: its
                // worker keeps its run queue while it waits for events, so the tasks those
                // events wake are queued locally instead of through a system call each.
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    // Blocking work (store reads, PDF rendering) needs CPUs more than
                    // threads; each thread more keeps memory of its own.
                    .max_blocking_threads(8)
                    .thread_name(format!("fhirgate-http-{i}"))
                    .enable_all()
                    .build()?;
                Ok((runtime, Arc::new(AtomicUsize::new(0))))
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Self { runtimes })
    }

    /// Runs `job` on the least busy thread.
    fn run(&self, job: impl Future<Output = ()> + Send + 'static) {
        let Some((runtime, open)) = self
            .runtimes
            .iter()
            .min_by_key(|(_, open)| open.load(Ordering::Relaxed))
        else {
            return;
        };
        open.fetch_add(1, Ordering::Relaxed);
        let open = open.clone();
        runtime.spawn(async move {
            job.await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// Stops the threads; connections still open have had their grace period and end here.
    async fn stop(self) {
        let runtimes = self.runtimes;
        let _ = tokio::task::spawn_blocking(move || {
            for (runtime, _) in runtimes {
                runtime.shutdown_timeout(Duration::from_secs(1));
            }
        })
        .await;
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting and gives
/// in-flight requests `options.grace` to finish. Each connection runs in its own task (the
/// TLS handshake included, so a slow client never holds up others) with HTTP/1.1 or HTTP/2;
/// requests carry the connection's [`Peer`].
pub async fn serve<F>(
    mut listener: CappedListener,
    app: Router,
    shutdown: F,
    options: ServeOptions,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    use axum::serve::Listener;
    use hyper_util::rt::{TokioExecutor, TokioTimer};
    use hyper_util::server::conn::auto::Builder;

    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    // Idle HTTP/2 connections are pinged; one that stops answering is closed.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(options.header_read_timeout);
    let tls = options.tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let workers = Workers::start(options.workers)?;
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let stream = match stream.handoff() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "an accepted connection could not be handed over");
                continue;
            }
        };
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let handshake_timeout = options.header_read_timeout;
        workers.run(async move {
            let Ok(stream) = stream.into_stream() else {
                return;
            };
            let Some(acceptor) = tls else {
                // A client that connects and says nothing gives its slot back in time.
                if !stream.first_bytes(handshake_timeout).await {
                    return;
                }
                let peer = Peer {
                    addr,
                    client_cert: None,
                };
                return serve_connection(builder, watcher, stream, peer, app).await;
            };
            match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let client_cert = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|cert| tls::fingerprint(cert));
                    let peer = Peer { addr, client_cert };
                    // The protocol was agreed in the handshake (ALPN): no sniffing, so the
                    // header timeout of HTTP/1 (or the pings of HTTP/2) apply from the start.
                    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                        // HTTP/2 reads its preface without a time limit of its own.
                        let stream = listener::FirstBytesDeadline::new(
                            stream,
                            listener::H2_PREFACE.len(),
                            handshake_timeout,
                        );
                        serve_connection(builder.http2_only(), watcher, stream, peer, app).await
                    } else {
                        serve_connection(builder.http1_only(), watcher, stream, peer, app).await
                    }
                }
                Ok(Err(e)) => {
                    metrics::counter!("fhirgate_tls_handshake_failures_total").increment(1);
                    tracing::debug!(error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    metrics::counter!("fhirgate_tls_handshake_failures_total").increment(1);
                    tracing::debug!("TLS handshake timed out");
                }
            }
        });
    }
    drop(listener);
    tracing::info!("shutdown requested; finishing in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(options.grace) => {
            tracing::warn!("in-flight requests did not finish within the grace period");
        }
    }
    workers.stop().await;
    Ok(())
}

/// Runs one connection until it closes or the server shuts down.
async fn serve_connection<I>(
    builder: hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    io: I,
    peer: Peer,
    app: Router,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tower::ServiceExt;
    let service =
        hyper::service::service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(peer.clone());
            app.clone().oneshot(request)
        });
    let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

/// Shared application handles that the ops endpoints need.
pub fn ops_router(store: Arc<dyn crate::store::Store>) -> Router {
    ops::router(Arc::new(ops::OpsState {
        store,
        metrics: metrics_handle(),
    }))
}
