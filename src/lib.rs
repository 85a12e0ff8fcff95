//! fhirgate: a FHIR R4 gateway for prior authorization.
//!
//! The parts, from the wire inwards: [`http`] (routes, middleware, shutdown) serves the
//! [`server`] FHIR REST facade, which checks resources with [`fhir`] (validation, search
//! parameters, OperationOutcome) and keeps them in a [`store`] (embedded redb by default).
//! [`pa`] decides prior authorization against the payer policies in `policies/`; [`cds`] serves
//! it as CDS Hooks / Da Vinci CRD services defined in `hooks/`. [`remote`] holds the outbound
//! FHIR clients (EHR sources, Azure and other destinations) and [`sync`] the durable outbox that
//! moves resources between them; configured sources are also readable under `/fhir/{source}/`.
//! [`pas`] answers Da Vinci PAS `Claim/$submit` and `$inquire` from the same determination and
//! notifies subscribers; [`packet`] renders prior-authorization packets as PDFs. [`auth`]
//! stands in front of all of it: who is calling (tokens, API keys) and what they may do, and
//! [`audit`] keeps the hash-chained record of every access.
//! [`config`] is read once at startup. [`run`] ties them together: it takes an already-bound
//! listener and a shutdown future, so tests start a real server on `127.0.0.1:0`.

pub mod audit;
pub mod auth;
pub mod cds;
pub mod config;
pub mod extract;
pub mod fhir;
pub mod fuzzing;
pub mod http;
pub mod pa;
pub mod packet;
pub mod pas;
pub mod pipeline;
pub mod remote;
pub mod server;
pub mod store;
pub mod sync;
pub mod webhooks;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::{Config, LogConfig, LogFormat};
use crate::fhir::{SchemaValidator, SearchRegistry};
use crate::server::FhirApi;
use crate::store::{EmbeddedStore, Store};

/// Lowercase hex of `bytes` (digests, fingerprints, keys).
pub fn hex(bytes: &[u8]) -> String {
    // Every request hashes something (its API key, its audit record): no formatter per byte.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// The assembled application: the HTTP router with its middleware, the store it serves, and
/// the sync engine working in the background.
pub struct App {
    pub router: axum::Router,
    pub store: Arc<dyn Store>,
    pub policies: Arc<pa::PolicySet>,
    pub sync: Arc<sync::SyncEngine>,
    pub sync_api: Arc<sync::api::SyncApi>,
    pub audit: Arc<audit::AuditLog>,
    pub pipeline: Arc<pipeline::Pipeline>,
}

impl App {
    /// Loads the schema, opens the store, starts the sync engine and builds the router.
    /// `public_base` is the URL clients use to reach the server (`http://host:port`).
    pub async fn build(config: &Config, public_base: &str) -> anyhow::Result<Self> {
        let schema = Arc::new(match &config.fhir.schema_path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading schema {}", path.display()))?;
                SchemaValidator::from_json(&text)?
            }
            None => SchemaValidator::bundled()?,
        });
        let policies = Arc::new(load_policies(&config.pa.policies_dir)?);
        let search = Arc::new(SearchRegistry::new(&schema));
        let cipher =
            store::crypt::Cipher::from_config(&config.store.encryption, &config.store.data_dir)
                .context("loading the store encryption keys")?;
        let store: Arc<dyn Store> = Arc::new(
            EmbeddedStore::open_with_options(
                &config.store.data_dir,
                search.clone(),
                config.server.request_timeout(),
                config.store.cache_mb.max(1) << 20,
                Some(Arc::new(cipher)),
            )
            .with_context(|| format!("opening the store in {}", config.store.data_dir.display()))?,
        );
        let mut remotes =
            remote::Remotes::build(config, store.clone(), schema.clone(), search.clone())?;
        pas::subscription::prepare(&store, &mut remotes)
            .await
            .context("loading PAS subscriptions")?;
        pipeline::submit::prepare(&store, &mut remotes);
        let engine = sync::SyncEngine::start(store.clone(), &remotes, config.sync.clone())
            .await
            .context("starting the sync engine")?;
        let sync_api = Arc::new(sync::api::SyncApi {
            engine: engine.clone(),
            schema: schema.clone(),
            config: config.sync.clone(),
            sources: config.sources.keys().cloned().collect(),
            destinations: config.destinations.keys().cloned().collect(),
        });
        let proxies = Arc::new(server::proxy::Proxies {
            sources: remotes.proxies.clone(),
            base_url: format!("{}/fhir", public_base.trim_end_matches('/')),
            max_body_bytes: config.server.max_body_bytes,
        });
        let pas = Arc::new(pas::PasApi::new(
            store.clone(),
            policies.clone(),
            schema.clone(),
            engine.clone(),
            public_base,
            config.server.max_body_bytes,
            remotes.outbound.clone(),
        ));
        pas::subscription::resume(&pas)
            .await
            .context("resuming PAS subscription handshakes")?;
        let extractor = extract::Extractor {
            llm: if config.extract.llm.enabled {
                let client =
                    extract::llm::OpenAiClient::new(&config.extract.llm, remotes.outbound.client())
                        .context("setting up the note extractor's model")?;
                tracing::info!(model = %config.extract.llm.model, "notes are read by the model, with the rules as fallback");
                Some(Arc::new(client) as Arc<dyn extract::llm::LlmClient>)
            } else {
                None
            },
        };
        let pipeline = pipeline::Pipeline::new(
            store.clone(),
            policies.clone(),
            extractor,
            engine.clone(),
            &remotes,
            config,
            public_base,
        )
        .await
        .context("setting up the encounter pipeline")?;
        pipeline
            .start()
            .await
            .context("starting the encounter pipeline")?;
        let audit = audit::AuditLog::start(store.clone(), config.audit.retention_days)
            .await
            .context("opening the audit log")?;
        audit.record_start(config).await;
        let auth = Arc::new(
            auth::AuthApi::build(
                config,
                store.clone(),
                search.clone(),
                config.sources.keys().cloned().collect(),
                public_base,
                audit.clone(),
            )
            .await
            .context("setting up authentication")?,
        );
        let fhir = Arc::new(FhirApi::new(
            store.clone(),
            schema,
            search,
            config.fhir.clone(),
            public_base,
        ));
        let services = if config.cds.hooks_dir.is_dir() {
            cds::load_services(&config.cds.hooks_dir)?
        } else {
            tracing::warn!(dir = %config.cds.hooks_dir.display(), "no hooks folder; no CDS services");
            Vec::new()
        };
        let cds = Arc::new(cds::CdsApi {
            services,
            policies: policies.clone(),
            settings: cds::CdsSettings {
                review_app_url: config.cds.review_app_url.clone(),
            },
            fetcher: cds::prefetch::PrefetchFetcher::new(
                &config.cds.fhir_servers,
                Duration::from_secs(config.cds.fetch_timeout_secs),
                remotes.outbound.client(),
            )?,
            auth: cds::auth::ClientAuth::new(
                config.cds.require_jwt,
                &config.cds.issuers,
                remotes
                    .outbound
                    .client()
                    .redirect(reqwest::redirect::Policy::none())
                    .timeout(Duration::from_secs(config.cds.fetch_timeout_secs))
                    .build()?,
            )?,
            public_base: public_base.trim_end_matches('/').to_owned(),
            store: store.clone(),
        });
        let routes = server::router(fhir)
            .merge(cds::router(cds))
            .merge(pas::router(pas.clone()))
            .merge(sync::router(sync_api.clone()))
            .merge(http::ops_router(store.clone()))
            .merge(auth::router(auth.clone()))
            .merge(webhooks::router(Arc::new(
                webhooks::Webhooks::new(&config.webhooks, sync_api.clone(), store.clone())
                    .context("setting up webhooks")?,
            )))
            .merge(pipeline::app::router(pipeline.clone()))
            .merge(audit::events::router(Arc::new(audit::events::AuditApi {
                log: audit.clone(),
                fhir_base: format!("{}/fhir", public_base.trim_end_matches('/')),
            })))
            .layer(http::RouteLabelLayer);
        // Around the routes, not inside each of them: the guard runs first, so nothing runs
        // for a caller before it is allowed; sources' requests leave before routing.
        let routes = tower::ServiceBuilder::new()
            .layer(axum::middleware::from_fn_with_state(auth, auth::guard))
            .layer(axum::middleware::from_fn_with_state(
                pas,
                pas::subscription::intercept_create,
            ))
            .layer(axum::middleware::from_fn_with_state(
                proxies,
                server::proxy::route_to_source,
            ))
            .service(routes);
        Ok(Self {
            router: http::app(routes, &config.server),
            store,
            policies,
            sync: engine,
            sync_api,
            audit,
            pipeline,
        })
    }
}

/// Loads the payer policies; any error stops startup with every problem's file and line.
fn load_policies(dir: &std::path::Path) -> anyhow::Result<pa::PolicySet> {
    if !dir.is_dir() {
        tracing::warn!(dir = %dir.display(), "no policy folder; every payer will be unknown");
        return Ok(pa::PolicySet::default());
    }
    let set = pa::PolicySet::load_dir(dir)
        .map_err(|errors| anyhow::anyhow!("the payer policies have errors:\n{errors}"))?;
    let rules: usize = set.payers.iter().map(|p| p.rules.len()).sum();
    tracing::info!(payers = set.payers.len(), rules, "payer policies loaded");
    Ok(set)
}

/// Asks the allocator (mimalloc, in the binary) to return the memory it holds free.
pub fn return_free_memory() {
    // SAFETY: `mi_collect` only frees mimalloc's own unused pages; it may be called at any
    // time from any thread, and does nothing to memory that is in use.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Runs the server on `listener` until `shutdown` resolves, then drains in-flight requests and
/// closes the store cleanly.
pub async fn run<F>(listener: TcpListener, config: Config, shutdown: F) -> anyhow::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let started = std::time::Instant::now();
    let local = listener.local_addr().context("listener has no address")?;
    let tls = match &config.server.tls {
        Some(tls) => Some(http::tls::server_config(tls).context("setting up TLS")?),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let public_base = match &config.server.public_url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => format!("{scheme}://{local}"),
    };
    let app = App::build(&config, &public_base).await?;
    tracing::info!(
        address = %local,
        data_dir = %config.store.data_dir.display(),
        validation = config.fhir.validate,
        tls = config.server.tls.is_some(),
        startup_ms = started.elapsed().as_millis() as u64,
        "fhirgate ready"
    );
    // Starting up parses the FHIR schema and more; what that left free goes back to the
    // system instead of staying in the allocator's caches for the life of the process.
    return_free_memory();
    // Histogram samples wait in the metrics recorder until they are drained into their
    // buckets; draining them every few seconds keeps memory flat when nobody scrapes /metrics.
    let upkeep = tokio::spawn(async {
        let metrics = http::metrics_handle();
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            metrics.run_upkeep();
        }
    });
    let listener = http::CappedListener::new(listener, config.server.max_connections);
    // Event streams never end by themselves: they are closed as soon as the shutdown starts,
    // so open review pages do not hold it for the whole grace period.
    let pipeline = app.pipeline.clone();
    let shutdown = async move {
        shutdown.await;
        pipeline.events.close();
    };
    let served = http::serve(
        listener,
        app.router,
        shutdown,
        http::ServeOptions {
            grace: Duration::from_secs(config.server.shutdown_grace_secs),
            header_read_timeout: Duration::from_secs(config.server.header_read_timeout_secs.max(1)),
            workers: config.server.workers,
            tls,
        },
    )
    .await;
    upkeep.abort();
    app.pipeline.shutdown();
    app.sync
        .shutdown(Duration::from_secs(config.server.shutdown_grace_secs))
        .await;
    app.audit
        .shutdown(Duration::from_secs(config.server.shutdown_grace_secs))
        .await;
    app.store.close().await;
    tracing::info!("store closed; bye");
    served.context("serving HTTP")
}

/// Installs the global `tracing` subscriber (JSON lines by default). Safe to call twice.
pub fn init_logging(config: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&config.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_is_lowercase_two_digits_a_byte() {
        assert_eq!(super::hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(super::hex(&[]), "");
    }
}
