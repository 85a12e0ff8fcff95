//! Signed encounter → prior-authorization packet ready for review → back in the chart.
//!
//! Per tenant (an EHR source with `[pipeline.tenants.{name}]`), the [`poller`] asks for
//! encounters finished since its cursor; each new encounter version becomes a transaction.
//! [`hydrate`] gathers the patient's chart into one Bundle, [`process`] extracts the rationale
//! from the notes, decides every order against the payer's policy and renders the packet,
//! and the transaction turns Ready: [`events`] tells the review page ([`app`]) over SSE. The
//! clinician's Submit writes the DocumentReference back to the EHR through the sync outbox
//! ([`submit`]).
//!
//! What is kept: a transaction record (tenant, encounter id, the patient reference as an
//! HMAC under a server key, status, timestamps) and, for two hours, the draft — the chart
//! Bundle, facts, decisions and the clinician's edits — sealed like every key-value record
//! of the store (AES-256-GCM). Everything else is read from the EHR again when needed.

pub mod app;
pub mod events;
pub mod hydrate;
pub mod poller;
pub mod process;
pub mod submit;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{PipelineConfig, TenantConfig};
use crate::extract::Extractor;
use crate::pa::PolicySet;
use crate::remote::{FhirSource, RemoteFhir};
use crate::store::{KvOp, Store, StoreError};
use crate::sync::SyncEngine;

/// Transaction records, by id.
pub const TRANSACTIONS: &str = "pipeline_transactions";
/// Drafts (chart, decisions, edits), by transaction id; deleted after the TTL.
pub const DRAFTS: &str = "pipeline_drafts";
/// Encounter versions already taken on: `{tenant}|{id}|{version}` → transaction id or `skipped`.
pub const SEEN: &str = "pipeline_seen";
/// Poll cursors, by tenant.
pub const CURSORS: &str = "pipeline_cursors";
/// Server secrets of the pipeline (the patient-reference HMAC key).
pub const SECRETS: &str = "pipeline_secrets";
/// The transaction of each encounter: `{tenant}|{encounter id}` → transaction id.
pub const ENCOUNTERS: &str = "pipeline_encounters";
/// Encounters of one tenant processed at once.
const CONCURRENT_ENCOUNTERS: usize = 4;

/// Where a transaction is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Processing,
    Ready,
    Submitted,
    Failed,
}

/// What is kept of one encounter's way through the pipeline: metadata only.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transaction {
    pub id: String,
    pub tenant: String,
    /// `Encounter/{id}` at the EHR.
    pub encounter: String,
    /// The encounter's version as seen (its `meta.versionId` or `meta.lastUpdated`).
    pub version: String,
    /// HMAC-SHA256 of the patient reference under the server key (hex).
    pub patient_hash: String,
    /// The encounter's practitioners (`Practitioner/{id}`), for notifications.
    #[serde(default)]
    pub practitioners: Vec<String>,
    pub status: Status,
    /// Why it failed.
    #[serde(default)]
    pub reason: Option<String>,
    /// The service decided ("MRI of the lumbar spine").
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub payer: Option<String>,
    /// `needed`, `satisfied`, `not-needed` or `unknown` (the most demanding of the orders).
    #[serde(default)]
    pub prior_auth: Option<String>,
    pub created: String,
    pub updated: String,
    #[serde(default)]
    pub ready_at: Option<String>,
    #[serde(default)]
    pub submitted_at: Option<String>,
    /// The DocumentReference written back, and the sync job writing it.
    #[serde(default)]
    pub document: Option<String>,
    #[serde(default)]
    pub job: Option<u64>,
    /// When the draft is deleted (microseconds since the epoch).
    #[serde(default)]
    pub draft_expires: Option<i64>,
}

impl Transaction {
    /// What the review page and SSE events show of it.
    pub fn summary(&self) -> Value {
        serde_json::json!({
            "id": self.id,
            "tenant": self.tenant,
            "encounter": self.encounter,
            "status": self.status,
            "reason": self.reason,
            "title": self.title.clone().unwrap_or_else(|| "Prior authorization".into()),
            "payer": self.payer,
            "priorAuth": self.prior_auth.clone().unwrap_or_else(|| "unknown".into()),
            "created": self.created,
            "updated": self.updated,
            "submitted": self.submitted_at,
        })
    }
}

/// The draft of a Ready transaction: what the review page shows and Submit sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Draft {
    /// The chart as gathered (Patient, Coverage, problems, notes, orders…).
    pub bundle: Value,
    /// `Patient/{id}` at the EHR.
    pub patient: String,
    /// One determination per order (as [`crate::pa::Determination`] serializes).
    pub determinations: Vec<Value>,
    pub facts: Vec<crate::extract::NoteFact>,
    pub extractor: String,
    /// The rationale as generated, then as the clinician edited it.
    pub rationale: String,
    /// The packet PDF as last rendered (base64).
    pub pdf: String,
}

/// A tenant as the pipeline runs it.
pub struct Tenant {
    pub name: String,
    pub config: TenantConfig,
    pub source: Arc<dyn FhirSource>,
    /// The same source over HTTP, for Binary fetches and the SMART endpoints.
    pub remote: Option<Arc<RemoteFhir>>,
    /// The `iss` the EHR launches the review page with.
    pub iss: String,
    /// Encounters of this tenant processed at once (a backlog waits its turn).
    pub permits: tokio::sync::Semaphore,
}

/// Everything the pipeline's tasks and handlers share.
pub struct Pipeline {
    pub store: Arc<dyn Store>,
    pub policies: Arc<PolicySet>,
    pub extractor: Extractor,
    pub engine: Arc<SyncEngine>,
    pub tenants: BTreeMap<String, Arc<Tenant>>,
    pub config: PipelineConfig,
    pub events: events::Hub,
    pub public_base: String,
    /// HMAC key for patient references.
    patient_key: Vec<u8>,
    /// Outbound HTTP for the SMART endpoints of the EHRs.
    pub http: reqwest::Client,
    /// Serializes state changes of transactions (Submit clicked twice, purge, processing).
    pub(crate) changes: tokio::sync::Mutex<()>,
    /// The pollers, processing, heartbeat and purge tasks, stopped at shutdown (work they
    /// leave is resumed at the next start).
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    stopped: std::sync::atomic::AtomicBool,
}

/// Microseconds since the Unix epoch.
pub fn now_micros() -> i64 {
    crate::fhir::date::now_micros()
}

/// An instant as RFC 3339.
pub fn instant(micros: i64) -> String {
    crate::fhir::date::format_instant(micros)
}

impl Pipeline {
    /// Sets up the configured tenants; the tasks start with [`Pipeline::start`].
    pub async fn new(
        store: Arc<dyn Store>,
        policies: Arc<PolicySet>,
        extractor: Extractor,
        engine: Arc<SyncEngine>,
        remotes: &crate::remote::Remotes,
        config: &crate::config::Config,
        public_base: &str,
    ) -> anyhow::Result<Arc<Self>> {
        let mut tenants = BTreeMap::new();
        for (name, tenant) in &config.pipeline.tenants {
            let source = remotes.sources.get(name).cloned().ok_or_else(|| {
                anyhow::anyhow!("pipeline.tenants.{name}: there is no source named {name}")
            })?;
            let destination = tenant.write_back.as_deref().unwrap_or(name);
            if !remotes.sinks.contains_key(destination) {
                anyhow::bail!(
                    "pipeline.tenants.{name}.write_back: there is no destination named {destination} \
                     (approved packets are written back there)"
                );
            }
            let remote = remotes.proxies.get(name).cloned();
            let iss = tenant
                .smart_iss
                .clone()
                .or_else(|| remote.as_ref().map(|r| r.base_url().to_owned()))
                .unwrap_or_default()
                .trim_end_matches('/')
                .to_owned();
            tenants.insert(
                name.clone(),
                Arc::new(Tenant {
                    name: name.clone(),
                    config: tenant.clone(),
                    source,
                    remote,
                    iss,
                    permits: tokio::sync::Semaphore::new(CONCURRENT_ENCOUNTERS),
                }),
            );
        }
        let patient_key = secret(&store, "patient-hmac").await?;
        Ok(Arc::new(Self {
            store,
            policies,
            extractor,
            engine,
            tenants,
            config: config.pipeline.clone(),
            events: events::Hub::new(),
            public_base: public_base.trim_end_matches('/').to_owned(),
            patient_key,
            http: remotes
                .outbound
                .client()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(15))
                .build()?,
            changes: tokio::sync::Mutex::new(()),
            tasks: std::sync::Mutex::new(Vec::new()),
            stopped: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Starts the pollers, the heartbeat and the purge; resumes work a stop cut off.
    pub async fn start(self: &Arc<Self>) -> anyhow::Result<()> {
        process::resume(self).await?;
        submit::resume(self).await?;
        for tenant in self.tenants.values() {
            if tenant.config.enabled {
                self.spawn(poller::run(self.clone(), tenant.clone()));
            }
        }
        self.spawn(events::heartbeat(
            self.clone(),
            Duration::from_secs(self.config.heartbeat_secs.max(1)),
        ));
        self.spawn(purge_loop(self.clone()));
        Ok(())
    }

    /// Runs `task` until it ends or the pipeline shuts down.
    pub fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        // Checked under the lock `shutdown` takes, so nothing starts after it.
        if self.stopped.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        tasks.retain(|t| !t.is_finished());
        tasks.push(tokio::spawn(task));
    }

    /// Stops every task; a transaction cut off in Processing is resumed at the next start.
    pub fn shutdown(&self) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        self.stopped
            .store(true, std::sync::atomic::Ordering::Release);
        for task in tasks.drain(..) {
            task.abort();
        }
    }

    /// The patient reference as kept: HMAC-SHA256 under the server key, with the tenant.
    pub fn patient_hash(&self, tenant: &str, patient: &str) -> String {
        use aws_lc_rs::hmac;
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.patient_key);
        let mut context = hmac::Context::with_key(&key);
        context.update(tenant.as_bytes());
        context.update(b"|");
        context.update(patient.as_bytes());
        crate::hex(context.sign().as_ref())
    }

    pub async fn transaction(&self, id: &str) -> Result<Option<Transaction>, StoreError> {
        let found = self.store.kv_get(TRANSACTIONS, vec![id.to_owned()]).await?;
        Ok(found
            .into_iter()
            .next()
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok()))
    }

    pub async fn draft(&self, id: &str) -> Result<Option<Draft>, StoreError> {
        let found = self.store.kv_get(DRAFTS, vec![id.to_owned()]).await?;
        Ok(found
            .into_iter()
            .next()
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// Every transaction record (they are small; a tenant makes a few hundred a day).
    pub async fn transactions(&self) -> Result<Vec<Transaction>, StoreError> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = self.store.kv_scan(TRANSACTIONS, after.clone(), 500).await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            out.extend(
                page.iter()
                    .filter_map(|(_, b)| serde_json::from_slice::<Transaction>(b).ok()),
            );
        }
        Ok(out)
    }

    /// Saves `transaction` (and `draft` with it, when given) in one durable commit, then
    /// tells the review pages when its status is one they show.
    pub async fn save(
        &self,
        transaction: &Transaction,
        draft: Option<&Draft>,
        extra: Vec<KvOp>,
    ) -> Result<(), StoreError> {
        let mut ops = vec![KvOp::put(
            TRANSACTIONS,
            transaction.id.clone(),
            serde_json::to_vec(transaction).unwrap_or_default(),
        )];
        if let Some(draft) = draft {
            ops.push(KvOp::put(
                DRAFTS,
                transaction.id.clone(),
                serde_json::to_vec(draft).unwrap_or_default(),
            ));
        }
        ops.extend(extra);
        self.store.kv_apply(ops).await?;
        let event = match transaction.status {
            Status::Ready => Some("transaction.ready"),
            Status::Submitted => Some("transaction.submitted"),
            Status::Failed => Some("transaction.failed"),
            Status::Processing => None,
        };
        if let Some(event) = event {
            self.events.publish(event, transaction);
        }
        Ok(())
    }

    /// Deletes drafts past their time; a Ready transaction whose draft went is Failed.
    pub async fn purge(&self) -> Result<usize, StoreError> {
        let _guard = self.changes.lock().await;
        let now = now_micros();
        let mut purged = 0;
        for mut transaction in self.transactions().await? {
            let Some(expires) = transaction.draft_expires else {
                continue;
            };
            if expires > now {
                continue;
            }
            transaction.draft_expires = None;
            transaction.updated = instant(now);
            if transaction.status == Status::Ready || transaction.status == Status::Processing {
                transaction.status = Status::Failed;
                transaction.reason = Some("not reviewed before the draft expired".into());
            }
            self.save(
                &transaction,
                None,
                vec![KvOp::delete(DRAFTS, transaction.id.clone())],
            )
            .await?;
            purged += 1;
        }
        if purged > 0 {
            tracing::info!(purged, "expired drafts deleted");
        }
        Ok(purged)
    }
}

async fn purge_loop(pipeline: Arc<Pipeline>) {
    let every = pipeline.config.draft_ttl_secs.clamp(1, 60);
    let mut tick = tokio::time::interval(Duration::from_secs(every));
    loop {
        tick.tick().await;
        if let Err(e) = submit::settle(&pipeline).await {
            tracing::warn!(error = %e, "settling write-backs failed");
        }
        if let Err(e) = app::forget_expired(&pipeline).await {
            tracing::warn!(error = %e, "dropping expired review sessions failed");
        }
        if let Err(e) = pipeline.purge().await {
            if matches!(e, StoreError::Closed) {
                return;
            }
            tracing::warn!(error = %e, "purging drafts failed");
        }
    }
}

/// A random 32-byte server secret kept (sealed) in the store, made on first use.
async fn secret(store: &Arc<dyn Store>, name: &str) -> Result<Vec<u8>, StoreError> {
    if let Some(found) = store
        .kv_get(SECRETS, vec![name.to_owned()])
        .await?
        .into_iter()
        .next()
        .flatten()
    {
        return Ok(found.to_vec());
    }
    let mut key = vec![0u8; 32];
    aws_lc_rs::rand::fill(&mut key).map_err(|_| StoreError::Backend("no randomness".into()))?;
    store
        .kv_apply(vec![KvOp::put(SECRETS, name.to_owned(), key.clone())])
        .await?;
    Ok(key)
}

/// A random token: 32 bytes, hex.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    crate::hex(&bytes)
}
