//! Outbound FHIR: EHR sources (OpenEMR, athenahealth, any FHIR R4 server, the embedded store)
//! behind [`FhirSource`], and destinations (Azure Health Data Services, any FHIR R4 server, the
//! embedded store) behind [`FhirSink`]. One pooled `reqwest` client per remote; OAuth2 tokens
//! come from [`oauth::ClientCredentials`].

mod embedded;
mod h1;
pub mod oauth;
pub mod outbound;
mod rest_hook;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::Method;
use serde_json::Value;

pub use embedded::{EmbeddedSink, EmbeddedSource};
pub use oauth::{ClientCredentials, TokenProvider};
pub use rest_hook::RestHookSink;

use crate::config::{
    Config, DestinationConfig, DestinationKind, SourceConfig, SourceKind, UpsertMode,
};
use crate::fhir::{SchemaValidator, SearchRegistry};
use crate::store::Store;

/// Why a call to a remote server failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RemoteError {
    /// No answer: connection refused or reset, DNS, timeout.
    #[error("{0}")]
    Transport(String),
    /// An HTTP error status.
    #[error("{message}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
        /// The server's OperationOutcome, when it sent one.
        outcome: Option<Value>,
        message: String,
    },
    /// No token could be obtained (`status` 0 when the endpoint did not answer).
    #[error("{message}")]
    Auth { status: u16, message: String },
    /// An answer that is not what FHIR promises (not JSON, not a Bundle, …).
    #[error("{0}")]
    Invalid(String),
    /// A request the gateway will not send (it would leave the source's base, or reach data
    /// the gateway's credentials must not be used for).
    #[error("{0}")]
    Refused(String),
}

impl RemoteError {
    pub(crate) fn auth(status: u16, message: String) -> Self {
        Self::Auth { status, message }
    }

    /// Whether trying again later may succeed: outages, throttling, server errors and token
    /// trouble are; a request the server rejected is not.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Transport(_) | Self::Auth { .. } => true,
            Self::Status { status, .. } => is_retriable_status(*status),
            Self::Invalid(_) | Self::Refused(_) => false,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            Self::Auth { status, .. } if *status > 0 => Some(*status),
            _ => None,
        }
    }

    pub fn outcome(&self) -> Option<&Value> {
        match self {
            Self::Status { outcome, .. } => outcome.as_ref(),
            _ => None,
        }
    }
}

/// 408, 429 and 5xx are worth retrying.
pub fn is_retriable_status(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

/// Whether a write answered with `status` may still have been applied: server errors other
/// than "unavailable", and no answer at all (0).
fn may_have_applied(status: u16) -> bool {
    status == 0 || (status >= 500 && status != 503)
}

/// A transport error in a few words, without the URL (which may carry identifiers).
pub(crate) fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "response body failed"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(inner) = source {
        detail = inner.to_string();
        source = inner.source();
    }
    if detail.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {detail}")
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let at = time::PrimitiveDateTime::parse(value, format)
        .ok()?
        .assume_utc();
    let wait = at - time::OffsetDateTime::now_utc();
    Some(Duration::from_secs(wait.whole_seconds().max(0) as u64))
}

/// One page of a search.
#[derive(Debug, Default)]
pub struct Page {
    pub resources: Vec<Value>,
    /// The `next` link, when there are more pages.
    pub next: Option<String>,
}

impl Page {
    /// The matches and includes of a searchset or history Bundle (not its OperationOutcomes).
    pub fn from_bundle(bundle: Value) -> Result<Self, RemoteError> {
        let Value::Object(mut bundle) = bundle else {
            return Err(RemoteError::Invalid("the page is not a JSON object".into()));
        };
        if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
            return Err(RemoteError::Invalid("the page is not a Bundle".into()));
        }
        let next = bundle
            .get("link")
            .and_then(Value::as_array)
            .and_then(|links| {
                links
                    .iter()
                    .find(|l| l.get("relation").and_then(Value::as_str) == Some("next"))
            })
            .and_then(|l| l.get("url"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let mut resources = Vec::new();
        if let Some(Value::Array(entries)) = bundle.remove("entry") {
            for entry in entries {
                let Value::Object(mut entry) = entry else {
                    continue;
                };
                let mode = entry
                    .get("search")
                    .and_then(|s| s.get("mode"))
                    .and_then(Value::as_str);
                if mode == Some("outcome") {
                    continue;
                }
                if let Some(resource) = entry.remove("resource") {
                    if resource.get("resourceType").and_then(Value::as_str)
                        != Some("OperationOutcome")
                    {
                        resources.push(resource);
                    }
                }
            }
        }
        Ok(Self { resources, next })
    }
}

/// Where sync reads resources.
#[async_trait::async_trait]
pub trait FhirSource: Send + Sync {
    fn name(&self) -> &str;
    /// The first page of `{type}?{params}`.
    async fn search(
        &self,
        resource_type: &str,
        params: &[(String, String)],
    ) -> Result<Page, RemoteError>;
    /// A later page, by the `next` link of the one before.
    async fn page(&self, url: &str) -> Result<Page, RemoteError>;
    /// The current version; `None` when it does not exist (any more).
    async fn read(&self, resource_type: &str, id: &str) -> Result<Option<Value>, RemoteError>;
    /// `Patient/{id}/$everything`, when the source is configured to use it.
    async fn everything(&self, patient: &str) -> Result<Option<Page>, RemoteError>;
    /// Types searched with `patient=` in a patient sync.
    fn patient_types(&self) -> &[String];
}

/// One resource to write at a destination.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub resource_type: String,
    pub id: String,
    pub resource: Value,
}

/// What became of one [`Outgoing`].
#[derive(Debug, Clone)]
pub enum Delivery {
    Done,
    /// Not written; may succeed later (throttled, outage, server error).
    Retry {
        reason: String,
        after: Option<Duration>,
        /// The request may have been applied even so (a timeout, a server error): check the
        /// destination before writing again.
        uncertain: bool,
    },
    /// Refused for good; `outcome` is the destination's OperationOutcome.
    Reject {
        status: u16,
        reason: String,
        outcome: Option<Value>,
    },
}

impl Delivery {
    fn from_error(error: &RemoteError) -> Self {
        if error.is_retriable() {
            Self::Retry {
                reason: error.to_string(),
                after: error.retry_after(),
                uncertain: match error {
                    RemoteError::Transport(_) => true,
                    RemoteError::Status { status, .. } => may_have_applied(*status),
                    _ => false,
                },
            }
        } else {
            Self::Reject {
                status: error.status().unwrap_or(0),
                reason: error.to_string(),
                outcome: error.outcome().cloned(),
            }
        }
    }
}

/// Where sync writes resources.
#[async_trait::async_trait]
pub trait FhirSink: Send + Sync {
    fn name(&self) -> &str;
    /// Resources per call to [`FhirSink::upsert`].
    fn batch_size(&self) -> usize;
    /// Creates or updates each resource at its id; one [`Delivery`] per input, in order.
    async fn upsert(&self, batch: Vec<Outgoing>) -> Vec<Delivery>;
    /// The current resource at each of `ids` (`None` where there is none), to check whether an
    /// attempt whose answer was lost in fact succeeded before writing again.
    async fn current(
        &self,
        resource_type: &str,
        ids: &[String],
    ) -> Result<Vec<Option<Value>>, RemoteError>;
}

/// A FHIR server over HTTP, as a source or a destination.
pub struct RemoteFhir {
    name: String,
    base: String,
    kind: Option<SourceKind>,
    http: reqwest::Client,
    tokens: Option<Arc<dyn TokenProvider>>,
    limiter: Option<governor::DefaultDirectRateLimiter>,
    practice: Option<String>,
    page_size: usize,
    everything: bool,
    patient_types: Vec<String>,
    batch_size: usize,
    transaction: bool,
    upsert: UpsertMode,
    allow_writes: bool,
    /// The lean client for reads relayed to a plain-HTTP source.
    h1: Option<Arc<h1::H1>>,
}

/// The patient-compartment types OpenEMR's FHIR API (7.x) searches by patient.
const OPENEMR_PATIENT_TYPES: &[&str] = &[
    "AllergyIntolerance",
    "CarePlan",
    "CareTeam",
    "Condition",
    "Coverage",
    "Device",
    "DiagnosticReport",
    "DocumentReference",
    "Encounter",
    "Goal",
    "Immunization",
    "MedicationRequest",
    "Observation",
    "Procedure",
    "ServiceRequest",
];

/// The US Core 3.1.1 types searchable by patient, which athenahealth's FHIR R4 API serves.
const US_CORE_PATIENT_TYPES: &[&str] = &[
    "AllergyIntolerance",
    "CarePlan",
    "CareTeam",
    "Condition",
    "Device",
    "DiagnosticReport",
    "DocumentReference",
    "Encounter",
    "Goal",
    "Immunization",
    "MedicationRequest",
    "Observation",
    "Procedure",
];

/// Types a patient sync searches with `patient=` unless the source lists its own. Referenced
/// resources outside the compartment (Practitioner, Organization, …) are read afterwards.
pub const PATIENT_TYPES: &[&str] = &[
    "AllergyIntolerance",
    "CarePlan",
    "CareTeam",
    "Claim",
    "Condition",
    "Coverage",
    "Device",
    "DiagnosticReport",
    "DocumentReference",
    "Encounter",
    "ExplanationOfBenefit",
    "Goal",
    "ImagingStudy",
    "Immunization",
    "MedicationAdministration",
    "MedicationRequest",
    "MedicationStatement",
    "Observation",
    "Procedure",
    "ServiceRequest",
];

fn http_client(
    outbound: &outbound::Outbound,
    timeout_secs: u64,
) -> anyhow::Result<reqwest::Client> {
    Ok(outbound
        .client()
        .timeout(Duration::from_secs(timeout_secs.max(1)))
        .connect_timeout(Duration::from_secs(timeout_secs.clamp(1, 10)))
        .pool_max_idle_per_host(64)
        // Paging links are followed explicitly; a redirect could leak the bearer token.
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

fn required<'a>(name: &str, value: &'a Option<String>, what: &str) -> anyhow::Result<&'a str> {
    value
        .as_deref()
        .map(|v| v.trim_end_matches('/'))
        .filter(|v| !v.is_empty())
        .ok_or_else(|| anyhow::anyhow!("{name}: {what} is required"))
}

impl RemoteFhir {
    /// A source from its configuration (not [`SourceKind::Embedded`]).
    pub fn source(
        name: &str,
        config: &SourceConfig,
        outbound: &outbound::Outbound,
    ) -> anyhow::Result<Self> {
        let http = http_client(outbound, config.timeout_secs)?;
        let site = required(name, &config.base_url, "base_url")?;
        let (base, token_url) = match config.kind {
            SourceKind::Openemr => (
                format!("{site}/apis/{}/fhir", config.site_id),
                format!("{site}/oauth2/{}/token", config.site_id),
            ),
            SourceKind::Athena => (format!("{site}/fhir/r4"), format!("{site}/oauth2/v1/token")),
            SourceKind::Fhir => (site.to_owned(), String::new()),
            SourceKind::Embedded => anyhow::bail!("{name}: the embedded store is not remote"),
        };
        if config.kind == SourceKind::Athena && config.practice_id.is_none() {
            anyhow::bail!("{name}: athenahealth sources need practice_id (ah-practice)");
        }
        let tokens = match &config.auth {
            Some(auth) => {
                let token_url = auth.token_url.clone().unwrap_or(token_url);
                if token_url.is_empty() {
                    anyhow::bail!("{name}: auth.token_url is required for a fhir source");
                }
                let provider = ClientCredentials::new(name, http.clone(), token_url, auth, None)?;
                Some(Arc::new(provider) as Arc<dyn TokenProvider>)
            }
            None => None,
        };
        let rate = config.rate_limit_per_sec.or(match config.kind {
            SourceKind::Athena => Some(15),
            _ => None,
        });
        let limiter = rate
            .and_then(NonZeroU32::new)
            .map(|rate| governor::RateLimiter::direct(governor::Quota::per_second(rate)));
        Ok(Self {
            name: name.to_owned(),
            kind: Some(config.kind),
            http,
            tokens,
            limiter,
            practice: config.practice_id.clone(),
            page_size: config.page_size.max(1),
            everything: config.everything,
            patient_types: if config.patient_types.is_empty() {
                let defaults = match config.kind {
                    SourceKind::Openemr => OPENEMR_PATIENT_TYPES,
                    SourceKind::Athena => US_CORE_PATIENT_TYPES,
                    _ => PATIENT_TYPES,
                };
                defaults.iter().map(|t| (*t).to_owned()).collect()
            } else {
                config.patient_types.clone()
            },
            batch_size: 1,
            transaction: false,
            upsert: UpsertMode::Id,
            allow_writes: config.allow_writes,
            h1: h1::H1::for_base(
                &base,
                Duration::from_secs(config.timeout_secs.max(1)),
                Duration::from_secs(config.timeout_secs.clamp(1, 10)),
            )
            .map(Arc::new),
            base,
        })
    }

    /// A destination from its configuration (not [`DestinationKind::Embedded`]).
    pub fn destination(
        name: &str,
        config: &DestinationConfig,
        outbound: &outbound::Outbound,
    ) -> anyhow::Result<Self> {
        let http = http_client(outbound, config.timeout_secs)?;
        let base = required(name, &config.base_url, "base_url")?.to_owned();
        let tokens = match (&config.auth, config.kind) {
            (Some(auth), DestinationKind::Azure) => {
                let token_url = match &auth.token_url {
                    Some(url) => url.clone(),
                    None => format!(
                        "https://login.microsoftonline.com/{}/oauth2/v2.0/token",
                        required(name, &config.tenant_id, "tenant_id")?
                    ),
                };
                let scope = auth.scopes.clone().or(Some(format!("{base}/.default")));
                let provider = ClientCredentials::new(name, http.clone(), token_url, auth, scope)?;
                Some(Arc::new(provider) as Arc<dyn TokenProvider>)
            }
            (Some(auth), _) => {
                let token_url = auth.token_url.clone().ok_or_else(|| {
                    anyhow::anyhow!("{name}: auth.token_url is required for a fhir destination")
                })?;
                let provider = ClientCredentials::new(name, http.clone(), token_url, auth, None)?;
                Some(Arc::new(provider) as Arc<dyn TokenProvider>)
            }
            (None, DestinationKind::Azure) => {
                anyhow::bail!("{name}: an Azure destination needs auth (an Azure AD app)")
            }
            (None, _) => None,
        };
        let default_batch = match config.kind {
            DestinationKind::Azure => 500,
            _ => 100,
        };
        Ok(Self {
            name: name.to_owned(),
            base,
            kind: None,
            http,
            tokens,
            limiter: None,
            practice: None,
            page_size: 100,
            everything: false,
            patient_types: Vec::new(),
            batch_size: config.batch_size.unwrap_or(default_batch).max(1),
            transaction: config.transaction,
            upsert: config.upsert,
            allow_writes: true,
            h1: None,
        })
    }

    /// The FHIR base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn allows_writes(&self) -> bool {
        self.allow_writes
    }

    /// Sends one request with the bearer token; on a 401 the token is dropped, a new one
    /// fetched, and the request sent once more.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<Bytes>,
        extra: &[(http::HeaderName, http::HeaderValue)],
    ) -> Result<reqwest::Response, RemoteError> {
        let attempt = |token: Option<Arc<str>>| {
            let mut request = self
                .http
                .request(method.clone(), url)
                .header(reqwest::header::ACCEPT, "application/fhir+json");
            for (name, value) in extra {
                request = request.header(name, value);
            }
            if let Some(token) = &token {
                request = request.bearer_auth(token);
            }
            if let Some(body) = &body {
                if !extra
                    .iter()
                    .any(|(name, _)| name == http::header::CONTENT_TYPE)
                {
                    request =
                        request.header(reqwest::header::CONTENT_TYPE, "application/fhir+json");
                }
                request = request.body(body.clone());
            }
            async move {
                request
                    .send()
                    .await
                    .map_err(|e| RemoteError::Transport(describe(&e)))
            }
        };
        self.authorized(attempt, |r| r.status().as_u16()).await
    }

    /// Runs `attempt` under the source's rate limit with its bearer token (if it has one);
    /// on a 401 the token is dropped, a new one fetched, and the attempt made once more.
    async fn authorized<R, F>(
        &self,
        mut attempt: impl FnMut(Option<Arc<str>>) -> F,
        status: impl Fn(&R) -> u16,
    ) -> Result<R, RemoteError>
    where
        F: std::future::Future<Output = Result<R, RemoteError>>,
    {
        let mut refreshed = false;
        loop {
            if let Some(limiter) = &self.limiter {
                limiter.until_ready().await;
            }
            let token = match &self.tokens {
                Some(tokens) => Some(tokens.token().await.inspect_err(|_| {
                    metrics::counter!("fhirgate_remote_auth_failures_total", "remote" => self.name.clone())
                        .increment(1);
                })?),
                None => None,
            };
            let response = attempt(token.clone()).await.inspect_err(|_| {
                metrics::counter!("fhirgate_remote_requests_total", "remote" => self.name.clone(), "status" => "error")
                    .increment(1);
            })?;
            let code = status(&response);
            metrics::counter!("fhirgate_remote_requests_total", "remote" => self.name.clone(), "status" => status_label(code))
                .increment(1);
            if code == 401 && !refreshed {
                if let (Some(tokens), Some(token)) = (&self.tokens, &token) {
                    metrics::counter!("fhirgate_remote_auth_failures_total", "remote" => self.name.clone())
                        .increment(1);
                    tokens.invalidate(token);
                    refreshed = true;
                    continue;
                }
            }
            return Ok(response);
        }
    }

    /// A GET whose answer must be a 2xx JSON body.
    async fn get_json(&self, url: &str) -> Result<Value, RemoteError> {
        let response = self.send(Method::GET, url, None, &[]).await?;
        json_or_error(&self.name, response).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    /// A page link must stay on this server: the token goes with it.
    fn check_link(&self, url: &str) -> Result<(), RemoteError> {
        let origin = |u: &str| -> Option<String> {
            let parsed = reqwest::Url::parse(u).ok()?;
            Some(format!(
                "{}://{}:{}",
                parsed.scheme(),
                parsed.host_str()?,
                parsed.port_or_known_default()?
            ))
        };
        match (origin(url), origin(&self.base)) {
            (Some(a), Some(b)) if a == b => Ok(()),
            _ => Err(RemoteError::Invalid(format!(
                "{}: the next link does not point at the source's server",
                self.name
            ))),
        }
    }

    async fn put_one(&self, item: &Outgoing) -> Delivery {
        let target = self.write_target(item);
        let body = match serde_json::to_vec(&*self.write_body(item, &target)) {
            Ok(body) => Bytes::from(body),
            Err(e) => {
                return Delivery::Reject {
                    status: 0,
                    reason: format!("cannot encode the resource: {e}"),
                    outcome: None,
                }
            }
        };
        let mut headers = vec![minimal()];
        let method = match &target {
            WriteTarget::Put(_) => Method::PUT,
            WriteTarget::Create { if_none_exist, .. } => {
                if let Some(value) = if_none_exist
                    .as_deref()
                    .and_then(|q| http::HeaderValue::from_str(q).ok())
                {
                    headers.push((http::HeaderName::from_static("if-none-exist"), value));
                }
                Method::POST
            }
        };
        match self
            .send(method, &self.url(target.url()), Some(body), &headers)
            .await
        {
            Ok(response) => match json_or_error(&self.name, response).await {
                Ok(_) => Delivery::Done,
                Err(e) => Delivery::from_error(&e),
            },
            Err(e) => Delivery::from_error(&e),
        }
    }

    /// How a resource is written: `PUT Type/id`, a conditional `PUT Type?identifier=…`, or a
    /// `POST Type` create guarded by `If-None-Exist`.
    fn write_target(&self, item: &Outgoing) -> WriteTarget {
        let query = identifier_query(&item.resource);
        match (self.upsert, query) {
            (UpsertMode::Identifier, Some(query)) => {
                WriteTarget::Put(format!("{}?{query}", item.resource_type))
            }
            (UpsertMode::Create, if_none_exist) => WriteTarget::Create {
                url: item.resource_type.clone(),
                if_none_exist,
            },
            _ => WriteTarget::Put(format!("{}/{}", item.resource_type, item.id)),
        }
    }

    /// The body of a write. A conditional update by identifier and a create go without `id`:
    /// the destination keeps its own ids (FHIR refuses a body id that differs from the match).
    fn write_body<'a>(
        &self,
        item: &'a Outgoing,
        target: &WriteTarget,
    ) -> std::borrow::Cow<'a, Value> {
        let conditional = match target {
            WriteTarget::Put(url) => url.contains('?'),
            WriteTarget::Create { .. } => true,
        };
        if conditional {
            let mut copy = item.resource.clone();
            if let Some(object) = copy.as_object_mut() {
                object.remove("id");
            }
            std::borrow::Cow::Owned(copy)
        } else {
            std::borrow::Cow::Borrowed(&item.resource)
        }
    }

    /// Writes `batch`: one Bundle, and when the destination refuses the Bundle as a whole (one
    /// bad entry in a transaction, a Bundle too large), each half on its own, down to single
    /// resources, so one refusal does not take the rest down with it.
    fn send_batch<'a>(
        &'a self,
        batch: &'a [Outgoing],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Delivery>> + Send + 'a>> {
        Box::pin(async move {
            if batch.len() == 1 {
                return vec![self.put_one(&batch[0]).await];
            }
            let (results, refused) = self.post_bundle(batch).await;
            if !refused {
                return results;
            }
            let (first, second) = batch.split_at(batch.len() / 2);
            let mut results = self.send_batch(first).await;
            results.extend(self.send_batch(second).await);
            results
        })
    }

    /// One Bundle; also says whether the destination refused it as a whole in a way that
    /// splitting it may get past.
    async fn post_bundle(&self, batch: &[Outgoing]) -> (Vec<Delivery>, bool) {
        let body = match self.bundle_body(batch) {
            Ok(body) => body,
            Err(e) => {
                let reason = format!("cannot encode the Bundle: {e}");
                let rejected = batch
                    .iter()
                    .map(|_| Delivery::Reject {
                        status: 0,
                        reason: reason.clone(),
                        outcome: None,
                    })
                    .collect();
                return (rejected, false);
            }
        };
        let answer = match self
            .send(Method::POST, &self.base, Some(body), &[minimal()])
            .await
        {
            Ok(response) => json_or_error(&self.name, response).await,
            Err(e) => Err(e),
        };
        let refused = matches!(
            &answer,
            Err(RemoteError::Status {
                status: 400 | 409 | 412 | 413 | 422,
                ..
            })
        ) && batch.len() > 1;
        let results = match answer {
            Ok(bundle) => bundle_results(&bundle, batch.len()),
            Err(e) => {
                // The Bundle failed as a whole; each entry shares the answer.
                vec![Delivery::from_error(&e); batch.len()]
            }
        };
        (results, refused)
    }

    /// A batch (or transaction) Bundle of writes, written straight from the resources without
    /// copying them.
    fn bundle_body(&self, batch: &[Outgoing]) -> Result<Bytes, serde_json::Error> {
        use std::io::Write;
        let kind = if self.transaction {
            "transaction"
        } else {
            "batch"
        };
        let mut out: Vec<u8> = Vec::with_capacity(batch.len() * 2048);
        let _ = write!(
            out,
            r#"{{"resourceType":"Bundle","type":"{kind}","entry":["#
        );
        let mut first = true;
        for item in batch {
            let target = self.write_target(item);
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(br#"{"fullUrl":"#);
            serde_json::to_writer(
                &mut out,
                &format!("{}/{}/{}", self.base, item.resource_type, item.id),
            )?;
            out.extend_from_slice(br#","resource":"#);
            serde_json::to_writer(&mut out, &*self.write_body(item, &target))?;
            let request = match &target {
                WriteTarget::Put(url) => serde_json::json!({"method": "PUT", "url": url}),
                WriteTarget::Create { url, if_none_exist } => match if_none_exist {
                    Some(query) => {
                        serde_json::json!({"method": "POST", "url": url, "ifNoneExist": query})
                    }
                    None => serde_json::json!({"method": "POST", "url": url}),
                },
            };
            out.extend_from_slice(br#","request":"#);
            serde_json::to_writer(&mut out, &request)?;
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
        Ok(out.into())
    }

    /// Relays a facade request to this source: the path below its base, the query, and the
    /// body of a write.
    pub async fn forward(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
        extra: &[(http::HeaderName, http::HeaderValue)],
    ) -> Result<http::Response<axum::body::Body>, RemoteError> {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        check_relative_path(path)?;
        let mut query = query.to_owned();
        let mut body = body;
        if let (Some(SourceKind::Athena), Some(practice)) = (self.kind, &self.practice) {
            // The practice is the gateway's to set: a caller's own is dropped (from the query
            // and from a form-encoded `_search` body), and ids of another practice are not
            // read, so nobody reaches another practice with the gateway's credentials.
            check_practice_of_id(path, practice)?;
            query = without_param(&query, "ah-practice");
            let post_search = method == Method::POST && path.ends_with("/_search");
            if post_search {
                body = body.map(|b| {
                    Bytes::from(without_param(&String::from_utf8_lossy(&b), "ah-practice"))
                });
            }
            if (method == Method::GET && is_search(path)) || post_search {
                if !query.is_empty() {
                    query.push('&');
                }
                query.push_str("ah-practice=Organization%2Fa-1.Practice-");
                query.push_str(
                    &serde_urlencoded::to_string([("", practice.as_str())])
                        .map(|s| s.trim_start_matches('=').to_owned())
                        .unwrap_or_default(),
                );
            }
        }
        if let (Some(h1), &Method::GET | &Method::HEAD) = (&self.h1, &method) {
            // The path has no dot segments or encoded slashes (checked above) and is sent as
            // it is, so it stays under the base.
            let target = if query.is_empty() {
                Cow::Borrowed(path)
            } else {
                Cow::Owned(format!("{path}?{query}"))
            };
            let read = |token: Option<Arc<str>>| {
                let target = &target;
                let method = &method;
                async move { h1.read(method, target, extra, token.as_deref()).await }
            };
            let answer = self.authorized(read, |r| r.status().as_u16()).await?;
            return Ok(answer.map(axum::body::Body::new));
        }
        let mut url = self.url(path);
        if !query.is_empty() {
            url.push('?');
            url.push_str(&query);
        }
        // Whatever the path did, the request must stay under the source's base.
        let parsed = reqwest::Url::parse(&url)
            .map_err(|e| RemoteError::Invalid(format!("not a URL: {e}")))?;
        let base = reqwest::Url::parse(&format!("{}/", self.base))
            .map_err(|e| RemoteError::Invalid(format!("the base is not a URL: {e}")))?;
        let inside = parsed.origin() == base.origin()
            && (parsed.path().starts_with(base.path())
                || format!("{}/", parsed.path()) == base.path());
        if !inside {
            return Err(RemoteError::Refused(
                "the path leaves the source's FHIR base".into(),
            ));
        }
        let answer = self.send(method, parsed.as_str(), body, extra).await?;
        let status = answer.status();
        let headers = answer.headers().clone();
        let mut relayed = http::Response::new(axum::body::Body::from_stream(answer.bytes_stream()));
        *relayed.status_mut() = status;
        *relayed.headers_mut() = headers;
        Ok(relayed)
    }
}

/// A status code as a metric label, without allocating for the usual ones.
pub fn status_label(code: u16) -> metrics::SharedString {
    let known = match code {
        200 => "200",
        201 => "201",
        204 => "204",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        410 => "410",
        412 => "412",
        422 => "422",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        _ => return metrics::SharedString::from_owned(code.to_string()),
    };
    metrics::SharedString::const_str(known)
}

/// `query` (raw, as the caller wrote it) without the pairs named `name`; the rest stays
/// byte for byte.
fn without_param(query: &str, name: &str) -> String {
    query
        .split('&')
        .filter(|pair| {
            let raw_name = pair.split('=').next().unwrap_or("");
            let decoded: Vec<(String, String)> =
                serde_urlencoded::from_str(&format!("{raw_name}=")).unwrap_or_default();
            !pair.is_empty() && decoded.first().is_none_or(|(n, _)| n != name)
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// athenahealth ids carry their practice (`a-195900.E-60178`; the practice itself is
/// `a-1.Practice-195900`): an id of another practice is refused.
fn check_practice_of_id(path: &str, practice: &str) -> Result<(), RemoteError> {
    let Some(id) = path.trim_matches('/').split('/').nth(1) else {
        return Ok(());
    };
    let Some((owner, rest)) = id.strip_prefix("a-").and_then(|r| r.split_once('.')) else {
        return Ok(());
    };
    let ours = owner == practice || (owner == "1" && rest == format!("Practice-{practice}"));
    if owner.bytes().all(|b| b.is_ascii_digit()) && !ours {
        return Err(RemoteError::Refused(format!(
            "{id} belongs to another practice than {practice}"
        )));
    }
    Ok(())
}

/// Refuses paths that could climb out of the FHIR base: `.` and `..` segments (also
/// percent-encoded), encoded slashes and backslashes.
pub fn check_relative_path(path: &str) -> Result<(), RemoteError> {
    let lower = path.to_ascii_lowercase();
    let sneaky = lower.contains("%2f") || lower.contains("%5c") || path.contains('\\');
    let climbs = path.split('/').any(|segment| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    });
    if sneaky || climbs {
        Err(RemoteError::Refused(
            "the path has dot segments or encoded slashes".into(),
        ))
    } else {
        Ok(())
    }
}

/// Where and how one resource is written.
enum WriteTarget {
    /// `PUT` to `Type/id` or `Type?identifier=…`.
    Put(String),
    /// `POST` to `Type`, with `If-None-Exist` when the resource has an identifier.
    Create {
        url: String,
        if_none_exist: Option<String>,
    },
}

impl WriteTarget {
    fn url(&self) -> &str {
        match self {
            Self::Put(url) | Self::Create { url, .. } => url,
        }
    }
}

/// `Prefer: return=minimal`: the destination need not send the written resources back.
fn minimal() -> (http::HeaderName, http::HeaderValue) {
    (
        http::HeaderName::from_static("prefer"),
        http::HeaderValue::from_static("return=minimal"),
    )
}

/// `Type` or `Type?…` (a search), not `Type/id`.
fn is_search(path_and_query: &str) -> bool {
    let path = path_and_query.split('?').next().unwrap_or("");
    !path.trim_matches('/').contains('/')
}

/// `identifier=system|value` of the first identifier that has both.
fn identifier_query(resource: &Value) -> Option<String> {
    let identifier = resource
        .get("identifier")?
        .as_array()?
        .iter()
        .find(|i| i.get("system").is_some() && i.get("value").is_some())?;
    let token = format!(
        "{}|{}",
        identifier.get("system")?.as_str()?,
        identifier.get("value")?.as_str()?
    );
    serde_urlencoded::to_string([("identifier", token)]).ok()
}

/// Per-entry results of a batch-response or transaction-response Bundle.
fn bundle_results(bundle: &Value, expected: usize) -> Vec<Delivery> {
    let entries = bundle
        .get("entry")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if entries.len() != expected {
        let reason = format!(
            "the response Bundle has {} entries for {expected} sent",
            entries.len()
        );
        return (0..expected)
            .map(|_| Delivery::Retry {
                reason: reason.clone(),
                after: None,
                uncertain: true,
            })
            .collect();
    }
    entries
        .iter()
        .map(|entry| {
            let response = entry.get("response");
            let status_text = response
                .and_then(|r| r.get("status"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let status: u16 = status_text
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if (200..300).contains(&status) {
                return Delivery::Done;
            }
            let outcome = response.and_then(|r| r.get("outcome")).cloned();
            let reason = format!(
                "the destination answered {status_text}{}",
                outcome_summary(outcome.as_ref())
            );
            if status == 0 || is_retriable_status(status) {
                Delivery::Retry {
                    reason,
                    after: None,
                    uncertain: may_have_applied(status),
                }
            } else {
                Delivery::Reject {
                    status,
                    reason,
                    outcome,
                }
            }
        })
        .collect()
}

/// `: {first issue's diagnostics}` of an OperationOutcome, for a one-line reason.
fn outcome_summary(outcome: Option<&Value>) -> String {
    outcome
        .and_then(|o| o.get("issue"))
        .and_then(|i| i.get(0))
        .and_then(|i| {
            i.get("diagnostics")
                .or_else(|| i.get("details").and_then(|d| d.get("text")))
        })
        .and_then(Value::as_str)
        .map(|d| format!(": {d}"))
        .unwrap_or_default()
}

/// The JSON body of a 2xx answer, or the error the status means.
async fn json_or_error(remote: &str, response: reqwest::Response) -> Result<Value, RemoteError> {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let body = response
        .bytes()
        .await
        .map_err(|e| RemoteError::Transport(describe(&e)))?;
    if status.is_success() {
        if body.is_empty() {
            return Ok(Value::Null);
        }
        return serde_json::from_slice(&body).map_err(|e| {
            RemoteError::Invalid(format!("{remote} sent a body that is not JSON: {e}"))
        });
    }
    let outcome = serde_json::from_slice::<Value>(&body)
        .ok()
        .filter(|v| v.get("resourceType").and_then(Value::as_str) == Some("OperationOutcome"));
    Err(RemoteError::Status {
        status: status.as_u16(),
        retry_after,
        message: format!(
            "{remote} answered {status}{}",
            outcome_summary(outcome.as_ref())
        ),
        outcome,
    })
}

#[async_trait::async_trait]
impl FhirSource for RemoteFhir {
    fn name(&self) -> &str {
        &self.name
    }

    async fn search(
        &self,
        resource_type: &str,
        params: &[(String, String)],
    ) -> Result<Page, RemoteError> {
        let mut query: Vec<(String, String)> = params.to_vec();
        query.push(("_count".into(), self.page_size.to_string()));
        if let (Some(SourceKind::Athena), Some(practice)) = (self.kind, &self.practice) {
            query.push((
                "ah-practice".into(),
                format!("Organization/a-1.Practice-{practice}"),
            ));
        }
        let query = serde_urlencoded::to_string(&query)
            .map_err(|e| RemoteError::Invalid(format!("encoding the search: {e}")))?;
        let url = format!("{}/{resource_type}?{query}", self.base);
        Page::from_bundle(self.get_json(&url).await?)
    }

    async fn page(&self, url: &str) -> Result<Page, RemoteError> {
        self.check_link(url)?;
        Page::from_bundle(self.get_json(url).await?)
    }

    async fn read(&self, resource_type: &str, id: &str) -> Result<Option<Value>, RemoteError> {
        match self
            .get_json(&self.url(&format!("{resource_type}/{id}")))
            .await
        {
            Ok(resource) => Ok(Some(resource)),
            Err(RemoteError::Status {
                status: 404 | 410, ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn everything(&self, patient: &str) -> Result<Option<Page>, RemoteError> {
        if !self.everything {
            return Ok(None);
        }
        let url = self.url(&format!("Patient/{patient}/$everything"));
        Ok(Some(Page::from_bundle(self.get_json(&url).await?)?))
    }

    fn patient_types(&self) -> &[String] {
        &self.patient_types
    }
}

#[async_trait::async_trait]
impl FhirSink for RemoteFhir {
    fn name(&self) -> &str {
        &self.name
    }

    fn batch_size(&self) -> usize {
        self.batch_size
    }

    async fn upsert(&self, batch: Vec<Outgoing>) -> Vec<Delivery> {
        if self.batch_size > 1 && batch.len() > 1 {
            return self.send_batch(&batch).await;
        }
        let mut out = Vec::with_capacity(batch.len());
        for item in &batch {
            out.push(self.put_one(item).await);
        }
        out
    }

    async fn current(
        &self,
        resource_type: &str,
        ids: &[String],
    ) -> Result<Vec<Option<Value>>, RemoteError> {
        // `_id` searches, a few dozen ids each, keep the URL short.
        const IDS_PER_SEARCH: usize = 40;
        let mut found: std::collections::HashMap<String, Value> = Default::default();
        for chunk in ids.chunks(IDS_PER_SEARCH) {
            let query = serde_urlencoded::to_string([
                ("_id", chunk.join(",")),
                ("_count", chunk.len().to_string()),
            ])
            .map_err(|e| RemoteError::Invalid(format!("encoding the search: {e}")))?;
            let url = format!("{}/{resource_type}?{query}", self.base);
            for resource in Page::from_bundle(self.get_json(&url).await?)?.resources {
                if resource.get("resourceType").and_then(Value::as_str) != Some(resource_type) {
                    continue;
                }
                if let Some(id) = resource.get("id").and_then(Value::as_str) {
                    found.insert(id.to_owned(), resource.clone());
                }
            }
        }
        Ok(ids.iter().map(|id| found.remove(id)).collect())
    }
}

/// Every configured source and destination, built once at startup.
#[derive(Default)]
pub struct Remotes {
    pub sources: BTreeMap<String, Arc<dyn FhirSource>>,
    /// The remote sources again, for the `/fhir/{source}/…` facade.
    pub proxies: BTreeMap<String, Arc<RemoteFhir>>,
    pub sinks: BTreeMap<String, Arc<dyn FhirSink>>,
    pub destinations: BTreeMap<String, DestinationConfig>,
    /// Sources and destinations only fhirgate's own jobs may use (PAS notifications and
    /// subscribers' endpoints), never one a caller asks for.
    pub internal: std::collections::BTreeSet<String>,
    /// Certificates trusted and hosts callers may name (see [`outbound`]).
    pub outbound: Arc<outbound::Outbound>,
}

/// The name of the embedded store as a source and as a destination.
pub const LOCAL: &str = "local";

impl Remotes {
    pub fn build(
        config: &Config,
        store: Arc<dyn Store>,
        schema: Arc<SchemaValidator>,
        registry: Arc<SearchRegistry>,
    ) -> anyhow::Result<Self> {
        let validate = config.fhir.validate;
        let mut remotes = Self {
            outbound: Arc::new(outbound::Outbound::new(&config.outbound)?),
            ..Self::default()
        };
        let local_source: Arc<dyn FhirSource> =
            Arc::new(EmbeddedSource::new(LOCAL, store.clone(), registry.clone()));
        remotes.sources.insert(LOCAL.into(), local_source);
        remotes.sinks.insert(
            LOCAL.into(),
            Arc::new(EmbeddedSink::new(
                LOCAL,
                store.clone(),
                schema.clone(),
                validate,
            )),
        );
        remotes.destinations.insert(
            LOCAL.into(),
            DestinationConfig::new(DestinationKind::Embedded, None),
        );
        for (name, source) in &config.sources {
            check_name(name)?;
            let built: Arc<dyn FhirSource> = match source.kind {
                SourceKind::Embedded => {
                    Arc::new(EmbeddedSource::new(name, store.clone(), registry.clone()))
                }
                _ => {
                    let remote = Arc::new(RemoteFhir::source(name, source, &remotes.outbound)?);
                    remotes.proxies.insert(name.clone(), remote.clone());
                    remote
                }
            };
            remotes.sources.insert(name.clone(), built);
        }
        for (name, destination) in &config.destinations {
            check_name(name)?;
            let sink: Arc<dyn FhirSink> = match destination.kind {
                DestinationKind::Embedded => Arc::new(EmbeddedSink::new(
                    name,
                    store.clone(),
                    schema.clone(),
                    validate,
                )),
                _ => Arc::new(RemoteFhir::destination(
                    name,
                    destination,
                    &remotes.outbound,
                )?),
            };
            remotes.sinks.insert(name.clone(), sink);
            remotes
                .destinations
                .insert(name.clone(), destination.clone());
        }
        Ok(remotes)
    }
}

/// Names appear in URLs (`/fhir/{source}/…`) and environment variables: lowercase letters,
/// digits, `-` and `_`, starting with a letter — never a resource type.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        anyhow::bail!(
            "{name:?}: source and destination names are lowercase letters, digits, - and _"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn batch_response_entries_are_classified() {
        let bundle = json!({"resourceType": "Bundle", "type": "batch-response", "entry": [
            {"response": {"status": "201 Created"}},
            {"response": {"status": "422 Unprocessable Entity", "outcome": {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "invalid", "diagnostics": "bad gender"}]}}},
            {"response": {"status": "503"}},
        ]});
        let results = bundle_results(&bundle, 3);
        assert!(matches!(results[0], Delivery::Done));
        assert!(
            matches!(&results[1], Delivery::Reject { status: 422, reason, outcome: Some(_) } if reason.contains("bad gender"))
        );
        assert!(matches!(results[2], Delivery::Retry { .. }));
        assert!(matches!(
            bundle_results(&bundle, 2)[0],
            Delivery::Retry { .. }
        ));
    }

    #[test]
    fn names_cannot_look_like_resource_types() {
        assert!(check_name("openemr").is_ok());
        assert!(check_name("athena-prod_2").is_ok());
        assert!(check_name("Patient").is_err());
        assert!(check_name("a/b").is_err());
    }

    #[test]
    fn facade_paths_cannot_climb_out_of_the_base() {
        for bad in [
            "../admin",
            "Patient/../../x",
            "%2e%2e/%2E%2E/admin",
            ".%2e/x",
            "Patient%2f..%2fx",
            "Patient/./1",
            "a\\b",
        ] {
            assert!(check_relative_path(bad).is_err(), "{bad}");
        }
        for good in [
            "Patient",
            "Patient/1",
            "Patient/1/_history/2",
            "",
            "Patient/a-1.E-2",
        ] {
            assert!(check_relative_path(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn athena_practice_parameters_and_ids_stay_with_the_configured_practice() {
        assert_eq!(
            without_param("name=a+b&ah-practice=X&code=http%3A%2F%2Floinc.org%7C1&_include=Observation:patient&ah%2Dpractice=Y", "ah-practice"),
            "name=a+b&code=http%3A%2F%2Floinc.org%7C1&_include=Observation:patient"
        );
        assert_eq!(without_param("", "ah-practice"), "");
        assert!(check_practice_of_id("Patient/a-195900.E-1", "195900").is_ok());
        assert!(check_practice_of_id("Organization/a-1.Practice-195900", "195900").is_ok());
        assert!(check_practice_of_id("Patient/a-999.E-1", "195900").is_err());
        assert!(check_practice_of_id("Organization/a-1.Practice-999", "195900").is_err());
        assert!(check_practice_of_id("Patient", "195900").is_ok());
        assert!(check_practice_of_id("Patient/12", "195900").is_ok());
    }

    #[test]
    fn only_type_level_paths_are_searches() {
        assert!(is_search("Patient?name=x"));
        assert!(is_search("/Observation"));
        assert!(!is_search("Patient/1"));
    }
}
