//! Typed configuration: a TOML file, then `FHIRGATE_*` environment overrides.
//!
//! Every option has a default that works on a laptop, so `fhirgate serve` with no file runs the
//! embedded store on `127.0.0.1:8080` with data under `./data`. Secrets are wrapped in [`Secret`],
//! whose `Debug` and `Display` print `***`, so a config dump in a log never leaks them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod pipeline;
pub use pipeline::{
    ExtractConfig, LlmConfig, LlmProvider, PipelineConfig, ReviewAppConfig, TenantConfig,
};

/// Errors while loading configuration; reported once at startup.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid value for {var}: {message}")]
    Env { var: String, message: String },
}

/// A value that must never be printed: `Debug` and `Display` show `***`.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }
    /// The wrapped value; call sites that use it should be few and obvious.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The whole configuration of one fhirgate process.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub fhir: FhirConfig,
    pub pa: PaConfig,
    pub cds: CdsConfig,
    pub log: LogConfig,
    /// EHRs and FHIR servers resources are read from, by name (`/fhir/{name}/…`, sync jobs).
    pub sources: BTreeMap<String, SourceConfig>,
    /// FHIR stores resources are synced to, by name. `local` (the embedded store) always exists.
    pub destinations: BTreeMap<String, DestinationConfig>,
    pub sync: SyncConfig,
    pub auth: AuthConfig,
    pub audit: AuditConfig,
    /// Signed change notifications, by source name (`POST /webhooks/{source}`).
    pub webhooks: BTreeMap<String, WebhookConfig>,
    pub outbound: OutboundConfig,
    pub extract: ExtractConfig,
    pub pipeline: PipelineConfig,
}

/// Outbound connections (see `remote::outbound`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundConfig {
    /// Hosts (`host`, `host:port`, `*.domain`) that URLs named by callers (PAS subscription
    /// endpoints) may point at. Only exact entries may be private addresses.
    pub allow_hosts: Vec<String>,
    /// PEM bundle of CAs trusted for outbound TLS besides the system's.
    pub ca_file: Option<PathBuf>,
}

/// A source's webhook (see `webhooks`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The shared secret: `whsec_{base64}` (Standard Webhooks) or at least 16 bytes of text.
    pub secret: Secret<String>,
    /// Where the named resources are synced; the sync default when absent.
    #[serde(default)]
    pub destination: Option<String>,
    /// How far a request's timestamp may be from now, in seconds.
    #[serde(default = "default_webhook_tolerance")]
    pub tolerance_secs: u64,
}

fn default_webhook_tolerance() -> u64 {
    300
}

/// The audit log.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Records older than this many days are removed (daily); the chain stays verifiable.
    /// `0` keeps everything. Default: six years, as HIPAA keeps its documentation.
    pub retention_days: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention_days: 2190,
        }
    }
}

/// Who may call fhirgate, and how callers prove it.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Every endpoint but health checks, the CapabilityStatement, CDS Hooks (which checks its
    /// own JWTs) and the token endpoint needs an authenticated caller. `false` is for local
    /// development only, and the server says so loudly.
    pub required: bool,
    /// Identity providers whose bearer JWTs are accepted (RS256/RS384/ES256/ES384).
    pub issuers: Vec<JwtIssuer>,
    /// Backend clients that may get tokens from `POST /auth/token` (SMART Backend Services).
    pub clients: Vec<BackendClient>,
    /// Service accounts with API keys given in configuration (the key's SHA-256, hex).
    pub api_keys: Vec<ConfiguredApiKey>,
    /// Lifetime of tokens fhirgate issues, in seconds (at most 300).
    pub token_lifetime_secs: u64,
    /// Let anyone read `/metrics` (for a scraper on a private network).
    pub open_metrics: bool,
    /// Service clients known by their TLS client certificate (`sha256` of the certificate's
    /// DER, hex), when `server.tls.client_ca_file` is set.
    pub mtls_clients: Vec<ConfiguredApiKey>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            required: true,
            issuers: Vec::new(),
            clients: Vec::new(),
            api_keys: Vec::new(),
            token_lifetime_secs: 300,
            open_metrics: false,
            mtls_clients: Vec::new(),
        }
    }
}

/// An identity provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuer {
    pub iss: String,
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// The `aud` its tokens must carry (default: this server's public base URL).
    #[serde(default)]
    pub audience: Option<String>,
}

/// A backend client of the token endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendClient {
    pub client_id: String,
    /// Its public keys, to check its signed assertions.
    pub jwks_file: PathBuf,
    /// Scopes it may be granted (SMART, e.g. `system/Claim.c system/ClaimResponse.r`).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// fhirgate roles its tokens carry.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// A service account's API key, by its SHA-256.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfiguredApiKey {
    pub name: String,
    /// Hex SHA-256 of the key.
    pub sha256: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// What kind of server a source is; it decides URL shapes and search rules.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// OpenEMR: FHIR at `{base_url}/apis/{site_id}/fhir`, token at `{base_url}/oauth2/{site_id}/token`.
    Openemr,
    /// athenahealth: FHIR at `{base_url}/fhir/r4`, token at `{base_url}/oauth2/v1/token`; every
    /// search carries `ah-practice`.
    Athena,
    /// Any FHIR R4 server; `base_url` is its FHIR base.
    Fhir,
    /// The embedded store of this process.
    Embedded,
}

/// An EHR or FHIR server fhirgate reads from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub kind: SourceKind,
    /// The site (OpenEMR), the API host (athenahealth) or the FHIR base (fhir).
    #[serde(default)]
    pub base_url: Option<String>,
    /// OpenEMR site id.
    #[serde(default = "default_site_id")]
    pub site_id: String,
    /// athenahealth practice id (e.g. `195900` in the preview sandbox), sent as `ah-practice`.
    #[serde(default)]
    pub practice_id: Option<String>,
    /// OAuth2 client credentials; without it requests carry no token.
    #[serde(default)]
    pub auth: Option<OAuthConfig>,
    /// Requests per second to this source (athenahealth: 15 in preview, 150 in production).
    /// Unset: athenahealth 15, others unlimited.
    #[serde(default)]
    pub rate_limit_per_sec: Option<u32>,
    /// `_count` of the searches sync issues.
    #[serde(default = "default_page_size")]
    pub page_size: usize,
    /// Time one request may take.
    #[serde(default = "default_remote_timeout")]
    pub timeout_secs: u64,
    /// Let `/fhir/{name}/…` pass writes through (reads only by default).
    #[serde(default)]
    pub allow_writes: bool,
    /// Use `Patient/{id}/$everything` for patient syncs instead of one search per type.
    #[serde(default)]
    pub everything: bool,
    /// Types searched with `patient={id}` in a patient sync (a default list when empty).
    #[serde(default)]
    pub patient_types: Vec<String>,
}

/// Where a sync writes.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DestinationKind {
    /// Azure Health Data Services FHIR service, with an Azure AD token.
    Azure,
    /// Any FHIR R4 server.
    Fhir,
    /// The embedded store of this process.
    Embedded,
}

/// How ids are kept at a destination.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum IdStrategy {
    /// The source's id.
    #[default]
    Preserve,
    /// `{id_prefix}{id}`, with every reference rewritten to match.
    Prefix,
}

/// How a resource is written at a destination.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpsertMode {
    /// `PUT Type/id`.
    #[default]
    Id,
    /// `PUT Type?identifier=system|value` (first identifier with both), else by id.
    Identifier,
    /// `POST Type` (the destination assigns the id) with `If-None-Exist` on the first
    /// identifier, so a retry never creates twice: for EHRs that accept new documents but not
    /// client-assigned ids.
    Create,
}

/// A FHIR store fhirgate writes to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    pub kind: DestinationKind,
    /// The FHIR base URL (Azure: `https://{workspace}-{service}.fhir.azurehealthcareapis.com`).
    #[serde(default)]
    pub base_url: Option<String>,
    /// Azure AD tenant, for the token URL.
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// OAuth2 client credentials (Azure: the app registration; scope defaults to
    /// `{base_url}/.default`).
    #[serde(default)]
    pub auth: Option<OAuthConfig>,
    /// Entries per batch Bundle; 1 sends one `PUT` per resource. Azure's limit is 500.
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Send batches as `transaction` Bundles (all-or-nothing) instead of `batch`.
    #[serde(default)]
    pub transaction: bool,
    #[serde(default)]
    pub id_strategy: IdStrategy,
    /// Prefix for [`IdStrategy::Prefix`]; defaults to `{source}-`.
    #[serde(default)]
    pub id_prefix: Option<String>,
    #[serde(default)]
    pub upsert: UpsertMode,
    /// Batches in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Time one request may take.
    #[serde(default = "default_remote_timeout")]
    pub timeout_secs: u64,
}

impl DestinationConfig {
    /// A destination of `kind` at `base_url`, every other setting at its default.
    pub fn new(kind: DestinationKind, base_url: Option<String>) -> Self {
        Self {
            kind,
            base_url,
            tenant_id: None,
            auth: None,
            batch_size: None,
            transaction: false,
            id_strategy: IdStrategy::default(),
            id_prefix: None,
            upsert: UpsertMode::default(),
            concurrency: default_concurrency(),
            timeout_secs: default_remote_timeout(),
        }
    }
}

/// How a client authenticates at a token endpoint.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMethod {
    #[default]
    ClientSecretBasic,
    ClientSecretPost,
    /// A signed JWT assertion (SMART Backend Services), RS384 or ES384.
    PrivateKeyJwt,
}

/// OAuth2 client-credentials settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthConfig {
    /// Overrides the token URL derived from the kind and base URL.
    #[serde(default)]
    pub token_url: Option<String>,
    pub client_id: String,
    #[serde(default)]
    pub client_secret: Option<Secret<String>>,
    #[serde(default)]
    pub method: ClientAuthMethod,
    /// PEM private key for `private_key_jwt`.
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    /// `kid` of that key, as registered with the EHR.
    #[serde(default)]
    pub key_id: Option<String>,
    /// `RS384` (default) or `ES384`.
    #[serde(default)]
    pub algorithm: Option<String>,
    /// Space-separated scopes, e.g. `system/Patient.read system/Observation.read`.
    #[serde(default)]
    pub scopes: Option<String>,
}

/// The sync engine.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncConfig {
    /// Delivery attempts per resource before it is dead-lettered.
    pub max_attempts: u32,
    /// First retry delay; each retry doubles it (with full jitter) up to `backoff_max_ms`.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// Resources held in memory per destination waiting for delivery; reading the source pauses
    /// beyond it.
    pub queue_limit: usize,
    /// How long `/api/sync-*` waits for its job before answering 202.
    pub api_wait_secs: u64,
    /// Source and destination of `/api/sync-*` (the OpenEMR → Azure connector endpoints).
    pub default_source: Option<String>,
    pub default_destination: Option<String>,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            backoff_base_ms: 500,
            backoff_max_ms: 300_000,
            queue_limit: 20_000,
            api_wait_secs: 25,
            default_source: None,
            default_destination: None,
        }
    }
}

fn default_site_id() -> String {
    "default".into()
}

fn default_page_size() -> usize {
    200
}

fn default_remote_timeout() -> u64 {
    30
}

fn default_concurrency() -> usize {
    4
}

/// CDS Hooks services.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CdsConfig {
    /// Folder of service definitions; a missing folder means no services.
    pub hooks_dir: PathBuf,
    /// SMART app that reviews prior-authorization requests; cards link to it when set.
    pub review_app_url: Option<String>,
    /// FHIR servers (exact base URLs) that missing prefetch may be fetched from when JWT checking
    /// is off (development); with JWTs, each issuer's own `fhir_servers` apply. Empty: never
    /// fetch; a request without its patient gets 412.
    pub fhir_servers: Vec<String>,
    /// Time a prefetch fetch may take.
    pub fetch_timeout_secs: u64,
    /// Require every CDS call to carry a JWT from a trusted issuer. Turn off only for local
    /// development; the server warns loudly when it is off.
    pub require_jwt: bool,
    /// CDS clients whose JWTs are accepted.
    pub issuers: Vec<TrustedIssuer>,
}

/// A CDS client whose signed JWTs are accepted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedIssuer {
    /// The `iss` the client puts in its tokens.
    pub iss: String,
    /// Its public keys, from a file (e.g. `certs/test-cds-client.jwks.json`).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Or from a URL fetched (and cached for five minutes) when needed.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// `jku` header values accepted from this client (exact URLs).
    #[serde(default)]
    pub jku: Vec<String>,
    /// FHIR servers (exact base URLs) this client may ask fhirgate to fetch missing prefetch
    /// from, with the token it lends. A client can only point fhirgate at its own EHR.
    #[serde(default)]
    pub fhir_servers: Vec<String>,
}

impl Default for CdsConfig {
    fn default() -> Self {
        Self {
            hooks_dir: PathBuf::from("hooks"),
            review_app_url: None,
            fhir_servers: Vec::new(),
            fetch_timeout_secs: 5,
            require_jwt: true,
            issuers: Vec::new(),
        }
    }
}

/// Prior-authorization policies.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PaConfig {
    /// Folder of payer policy files. A file with errors stops startup; a missing folder means no
    /// payer policies (every payer is then unknown).
    pub policies_dir: PathBuf,
}

impl Default for PaConfig {
    fn default() -> Self {
        Self {
            policies_dir: PathBuf::from("policies"),
        }
    }
}

/// HTTP listener and request limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub bind: SocketAddr,
    /// Base URL that clients see, used in `Location`, `fullUrl` and paging links.
    /// Defaults to `http://{bind}`.
    pub public_url: Option<String>,
    /// Largest accepted request body, in bytes (413 beyond it).
    pub max_body_bytes: usize,
    /// Time a request may take before it is answered with 503.
    pub request_timeout_secs: u64,
    /// Open connections accepted at once; further clients wait in the accept queue.
    pub max_connections: usize,
    /// Time in-flight requests get to finish after a shutdown signal.
    pub shutdown_grace_secs: u64,
    /// Time a client has to send a request's headers (HTTP/1) before the connection is closed.
    pub header_read_timeout_secs: u64,
    /// Largest total size of a request's headers (431 beyond it).
    pub max_header_bytes: usize,
    /// Requests per second each caller (an authenticated client, else an IP address) may
    /// make; more are answered 429 with `Retry-After`. `0` turns the limit off.
    pub rate_limit_per_sec: u32,
    /// Requests a caller may make at once above its rate.
    pub rate_limit_burst: u32,
    /// Threads serving connections, each with its own event loop (a connection stays on one
    /// thread); `0` means one per CPU core.
    pub workers: usize,
    /// Serve HTTPS instead of HTTP.
    pub tls: Option<TlsConfig>,
}

/// The server's certificate, and client certificates for mTLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM: the server's certificate, then its chain.
    pub cert_file: PathBuf,
    /// PEM: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM: the CAs client certificates must chain to; without it no client certificate is
    /// asked for.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Refuse the handshake of clients without a certificate.
    #[serde(default)]
    pub require_client_cert: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: None,
            max_body_bytes: 16 * 1024 * 1024,
            request_timeout_secs: 30,
            max_connections: 1024,
            shutdown_grace_secs: 20,
            header_read_timeout_secs: 10,
            max_header_bytes: 32 * 1024,
            rate_limit_per_sec: 1000,
            rate_limit_burst: 2000,
            workers: 0,
            tls: None,
        }
    }
}

impl ServerConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
}

/// Where and how data is kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Folder for the embedded database (`fhirgate.redb`) and other state.
    pub data_dir: PathBuf,
    /// Page cache of the embedded database, in MiB. Pages not in it are read from the file
    /// (and so usually from the operating system's cache), so it mostly bounds memory.
    pub cache_mb: usize,
    pub encryption: EncryptionConfig,
}

/// Encryption at rest (see `store::crypt`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EncryptionConfig {
    /// AES-256 keys by id; without any, a key is made in `{data_dir}/store.key`.
    pub keys: Vec<EncryptionKey>,
    /// The key new values are sealed with (default: the last listed).
    pub active: Option<String>,
    /// Seal FHIR resource bodies in the embedded store too (key-value data — sync queue, PAS
    /// records, subscriptions, secrets — always is).
    pub resources: bool,
}

/// One key: 32 bytes as 64 hex digits or base64, in a file or an environment variable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionKey {
    pub id: String,
    #[serde(default)]
    pub file: Option<PathBuf>,
    #[serde(default)]
    pub env: Option<String>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            cache_mb: 32,
            encryption: EncryptionConfig::default(),
        }
    }
}

/// Behaviour of the FHIR REST facade.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FhirConfig {
    /// Validate resources against the R4 JSON schema on every write.
    pub validate: bool,
    /// The R4 JSON schema; the copy shipped in `profiles/` is compiled in when this is unset.
    pub schema_path: Option<PathBuf>,
    /// Page size when a search has no `_count`.
    pub default_page_size: usize,
    /// Largest `_count` honoured.
    pub max_page_size: usize,
}

impl Default for FhirConfig {
    fn default() -> Self {
        Self {
            validate: true,
            schema_path: None,
            default_page_size: 50,
            max_page_size: 1000,
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter directive, e.g. `info` or `fhirgate=debug,info`.
    pub level: String,
    /// `json` (one object per line) or `pretty` (for a terminal).
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Json,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

impl Config {
    /// Reads `path` (if given) and applies `FHIRGATE_*` overrides from the process environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        config.apply_env(std::env::vars())?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Applies overrides named `FHIRGATE_{SECTION}__{KEY}` (double underscore between section
    /// and key, e.g. `FHIRGATE_SERVER__BIND=0.0.0.0:8080`). Unknown names are an error, so a
    /// typo does not silently leave a default in place.
    pub fn apply_env<I>(&mut self, vars: I) -> Result<(), ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        for (name, value) in vars {
            let Some(key) = name.strip_prefix("FHIRGATE_") else {
                continue;
            };
            let key = key.to_ascii_lowercase();
            let bad = |message: String| ConfigError::Env {
                var: name.clone(),
                message,
            };
            match key.as_str() {
                "server__bind" => self.server.bind = parse(&value).map_err(bad)?,
                "server__public_url" => self.server.public_url = Some(value.clone()),
                "server__max_body_bytes" => {
                    self.server.max_body_bytes = parse(&value).map_err(bad)?
                }
                "server__request_timeout_secs" => {
                    self.server.request_timeout_secs = parse(&value).map_err(bad)?
                }
                "server__max_connections" => {
                    self.server.max_connections = parse(&value).map_err(bad)?
                }
                "server__shutdown_grace_secs" => {
                    self.server.shutdown_grace_secs = parse(&value).map_err(bad)?
                }
                "server__header_read_timeout_secs" => {
                    self.server.header_read_timeout_secs = parse(&value).map_err(bad)?
                }
                "server__workers" => self.server.workers = parse(&value).map_err(bad)?,
                "server__max_header_bytes" => {
                    self.server.max_header_bytes = parse(&value).map_err(bad)?
                }
                "server__rate_limit_per_sec" => {
                    self.server.rate_limit_per_sec = parse(&value).map_err(bad)?
                }
                "server__rate_limit_burst" => {
                    self.server.rate_limit_burst = parse(&value).map_err(bad)?
                }
                "server__tls__cert_file" | "server__tls__key_file" => {
                    let tls = self.server.tls.get_or_insert_with(|| TlsConfig {
                        cert_file: PathBuf::new(),
                        key_file: PathBuf::new(),
                        client_ca_file: None,
                        require_client_cert: false,
                    });
                    if key.ends_with("cert_file") {
                        tls.cert_file = PathBuf::from(&value);
                    } else {
                        tls.key_file = PathBuf::from(&value);
                    }
                }
                "store__data_dir" => self.store.data_dir = PathBuf::from(&value),
                "store__cache_mb" => self.store.cache_mb = parse(&value).map_err(bad)?,
                "store__encryption__resources" => {
                    self.store.encryption.resources = parse(&value).map_err(bad)?
                }
                "store__encryption__active" => self.store.encryption.active = Some(value.clone()),
                "fhir__validate" => self.fhir.validate = parse(&value).map_err(bad)?,
                "fhir__schema_path" => self.fhir.schema_path = Some(PathBuf::from(&value)),
                "fhir__default_page_size" => {
                    self.fhir.default_page_size = parse(&value).map_err(bad)?
                }
                "fhir__max_page_size" => self.fhir.max_page_size = parse(&value).map_err(bad)?,
                "pa__policies_dir" => self.pa.policies_dir = PathBuf::from(&value),
                "cds__hooks_dir" => self.cds.hooks_dir = PathBuf::from(&value),
                "cds__review_app_url" => self.cds.review_app_url = Some(value.clone()),
                "cds__fhir_servers" => {
                    self.cds.fhir_servers = value
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                }
                "cds__fetch_timeout_secs" => {
                    self.cds.fetch_timeout_secs = parse(&value).map_err(bad)?
                }
                "cds__require_jwt" => self.cds.require_jwt = parse(&value).map_err(bad)?,
                "log__level" => self.log.level = value.clone(),
                "log__format" => {
                    self.log.format = match value.as_str() {
                        "json" => LogFormat::Json,
                        "pretty" => LogFormat::Pretty,
                        other => {
                            return Err(bad(format!("expected json or pretty, got {other:?}")))
                        }
                    }
                }
                "outbound__allow_hosts" => {
                    self.outbound.allow_hosts = value
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                }
                "outbound__ca_file" => self.outbound.ca_file = Some(PathBuf::from(&value)),
                "audit__retention_days" => {
                    self.audit.retention_days = parse(&value).map_err(bad)?
                }
                "auth__required" => self.auth.required = parse(&value).map_err(bad)?,
                "auth__open_metrics" => self.auth.open_metrics = parse(&value).map_err(bad)?,
                "auth__token_lifetime_secs" => {
                    self.auth.token_lifetime_secs = parse(&value).map_err(bad)?
                }
                "sync__max_attempts" => self.sync.max_attempts = parse(&value).map_err(bad)?,
                "sync__backoff_base_ms" => {
                    self.sync.backoff_base_ms = parse(&value).map_err(bad)?
                }
                "sync__backoff_max_ms" => self.sync.backoff_max_ms = parse(&value).map_err(bad)?,
                "sync__api_wait_secs" => self.sync.api_wait_secs = parse(&value).map_err(bad)?,
                "sync__queue_limit" => self.sync.queue_limit = parse(&value).map_err(bad)?,
                "sync__default_source" => self.sync.default_source = Some(value.clone()),
                "sync__default_destination" => self.sync.default_destination = Some(value.clone()),
                "extract__llm__enabled" => self.extract.llm.enabled = parse(&value).map_err(bad)?,
                "extract__llm__base_url" => self.extract.llm.base_url = value.clone(),
                "extract__llm__model" => self.extract.llm.model = value.clone(),
                "pipeline__app__dev_login" => {
                    self.pipeline.app.dev_login = parse(&value).map_err(bad)?
                }
                // The config file path itself is read by the CLI, not here.
                // Read by the command line, not the server: the config file, and the credential
                // `fhirgate sync --server` presents.
                "config" | "api_key" => {}
                other => {
                    if !self.apply_remote_env(other, &value) {
                        return Err(bad("unknown setting".into()));
                    }
                }
            }
        }
        Ok(())
    }

    /// `sources__{name}__{base_url|client_secret|practice_id}` and
    /// `destinations__{name}__{base_url|client_secret|tenant_id}` for an already configured
    /// name, so secrets and hosts can come from the environment.
    fn apply_remote_env(&mut self, key: &str, value: &str) -> bool {
        let parts: Vec<&str> = key.split("__").collect();
        let [section, name, field] = parts.as_slice() else {
            return false;
        };
        let secret = || Some(Secret::new(value.to_owned()));
        match *section {
            "sources" => {
                let Some(source) = self.sources.get_mut(*name) else {
                    return false;
                };
                match *field {
                    "base_url" => source.base_url = Some(value.to_owned()),
                    "practice_id" => source.practice_id = Some(value.to_owned()),
                    "client_secret" => match source.auth.as_mut() {
                        Some(auth) => auth.client_secret = secret(),
                        None => return false,
                    },
                    _ => return false,
                }
            }
            "destinations" => {
                let Some(destination) = self.destinations.get_mut(*name) else {
                    return false;
                };
                match *field {
                    "base_url" => destination.base_url = Some(value.to_owned()),
                    "tenant_id" => destination.tenant_id = Some(value.to_owned()),
                    "client_secret" => match destination.auth.as_mut() {
                        Some(auth) => auth.client_secret = secret(),
                        None => return false,
                    },
                    _ => return false,
                }
            }
            "webhooks" if *field == "secret" => match self.webhooks.get_mut(*name) {
                Some(hook) => hook.secret = Secret::new(value.to_owned()),
                None => return false,
            },
            _ => return false,
        }
        true
    }

    /// The base URL clients use to reach this server, without a trailing slash.
    pub fn public_base_url(&self) -> String {
        match &self.server.public_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!("http://{}", self.server.bind),
        }
    }
}

fn parse<T>(value: &str) -> Result<T, String>
where
    T: std::str::FromStr,
    T::Err: fmt::Display,
{
    value.parse().map_err(|e: T::Err| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_listen_locally_and_keep_data_in_dot_data() {
        let config = Config::default();
        assert_eq!(config.server.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(config.store.data_dir, PathBuf::from("./data"));
        assert!(config.fhir.validate);
    }

    #[test]
    fn file_then_env_overrides() {
        let mut config: Config = toml::from_str(
            "[server]\nbind = \"0.0.0.0:9000\"\nmax_body_bytes = 10\n[fhir]\nvalidate = false\n",
        )
        .expect("valid toml");
        assert_eq!(config.server.max_body_bytes, 10);
        config
            .apply_env([
                (
                    "FHIRGATE_SERVER__BIND".to_string(),
                    "127.0.0.1:1".to_string(),
                ),
                ("PATH".to_string(), "/bin".to_string()),
            ])
            .expect("valid env");
        assert_eq!(config.server.bind.port(), 1);
        assert!(!config.fhir.validate);
    }

    #[test]
    fn unknown_or_malformed_env_is_an_error() {
        let mut config = Config::default();
        let err = config
            .apply_env([("FHIRGATE_SERVER__BINDD".to_string(), "x".to_string())])
            .expect_err("typo must be reported");
        assert!(err.to_string().contains("FHIRGATE_SERVER__BINDD"));
        let err = config
            .apply_env([(
                "FHIRGATE_SERVER__MAX_CONNECTIONS".to_string(),
                "many".to_string(),
            )])
            .expect_err("not a number");
        assert!(err.to_string().contains("invalid value"));
    }

    #[test]
    fn every_documented_variable_is_accepted() {
        let mut config = Config::default();
        let vars = [
            ("FHIRGATE_PA__POLICIES_DIR", "p"),
            ("FHIRGATE_CDS__HOOKS_DIR", "h"),
            ("FHIRGATE_CDS__REVIEW_APP_URL", "https://app.example"),
            (
                "FHIRGATE_CDS__FHIR_SERVERS",
                "https://a.example/fhir, https://b.example/fhir",
            ),
            ("FHIRGATE_CDS__FETCH_TIMEOUT_SECS", "3"),
            ("FHIRGATE_CDS__REQUIRE_JWT", "false"),
        ];
        config
            .apply_env(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .expect("all known");
        assert!(!config.cds.require_jwt);
        assert_eq!(config.cds.fhir_servers.len(), 2);
        assert_eq!(config.cds.fetch_timeout_secs, 3);

        let mut config: Config = toml::from_str(
            "[sources.openemr]\nkind = \"openemr\"\n[sources.openemr.auth]\nclient_id = \"c\"\n\
             method = \"private_key_jwt\"\n[destinations.azure]\nkind = \"azure\"\n\
             [destinations.azure.auth]\nclient_id = \"a\"\n",
        )
        .expect("file");
        let vars = [
            ("FHIRGATE_SYNC__MAX_ATTEMPTS", "5"),
            ("FHIRGATE_SYNC__BACKOFF_BASE_MS", "100"),
            ("FHIRGATE_SYNC__BACKOFF_MAX_MS", "1000"),
            ("FHIRGATE_SYNC__QUEUE_LIMIT", "500"),
            ("FHIRGATE_SYNC__API_WAIT_SECS", "5"),
            ("FHIRGATE_SYNC__DEFAULT_SOURCE", "openemr"),
            ("FHIRGATE_SYNC__DEFAULT_DESTINATION", "azure"),
            ("FHIRGATE_SOURCES__OPENEMR__BASE_URL", "https://emr.example"),
            ("FHIRGATE_SOURCES__OPENEMR__CLIENT_SECRET", "s"),
            ("FHIRGATE_SOURCES__OPENEMR__PRACTICE_ID", "1"),
            (
                "FHIRGATE_DESTINATIONS__AZURE__BASE_URL",
                "https://ws-fhir.fhir.azurehealthcareapis.com",
            ),
            ("FHIRGATE_DESTINATIONS__AZURE__TENANT_ID", "t"),
            ("FHIRGATE_DESTINATIONS__AZURE__CLIENT_SECRET", "z"),
        ];
        config
            .apply_env(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .expect("all known");
        assert_eq!(config.sync.queue_limit, 500);
        assert_eq!(config.sync.default_destination.as_deref(), Some("azure"));
        let azure = &config.destinations["azure"];
        assert_eq!(azure.tenant_id.as_deref(), Some("t"));
        let secret = azure.auth.as_ref().and_then(|a| a.client_secret.as_ref());
        assert_eq!(secret.map(|s| s.expose().as_str()), Some("z"));
        // A name that is not configured is an unknown setting, not a silent no-op.
        let err = config.apply_env([(
            "FHIRGATE_SOURCES__ATHENA__BASE_URL".to_string(),
            "https://x".to_string(),
        )]);
        assert!(err.is_err());
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        assert!(toml::from_str::<Config>("[server]\nbnd = \"x\"\n").is_err());
    }

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("hunter2".to_string());
        assert_eq!(format!("{secret:?} {secret}"), "*** ***");
        assert_eq!(secret.expose(), "hunter2");
    }
}
