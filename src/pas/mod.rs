//! Da Vinci PAS (Prior Authorization Support): `Claim/$submit` and `Claim/$inquire`.
//!
//! A provider submits a PAS request Bundle; after the R4 schema and PAS's structural rules
//! ([`check`]), every item is decided by the payer's policy ([`decide`]) and the answer is a PAS
//! response Bundle ([`respond`]). Each claim is kept as a [`ClaimRecord`] in the store — the
//! request, the current decision per item and every change with its time — so a resubmission
//! (same Claim identifier) gets the same answer, an update (`Claim.related`) re-decides the
//! claim, an inquiry finds the latest answer, and a reviewer can decide what was pended.

pub mod check;
pub mod decide;
mod handlers;
mod packets;
pub mod respond;
pub mod subscription;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use decide::{ItemDecision, ReviewAction};
pub use handlers::router;

use crate::fhir::SchemaValidator;
use crate::pa::PolicySet;
use crate::store::Store;

/// Key-value spaces of PAS state.
pub const CLAIMS: &str = "pas.claim";
/// `{system}|{value}` of a Claim identifier (the original's and every update's) → claim id.
pub const CLAIM_IDENTIFIERS: &str = "pas.claim-identifier";

/// What the PAS handlers share.
pub struct PasApi {
    pub store: Arc<dyn Store>,
    pub policies: Arc<PolicySet>,
    pub schema: Arc<SchemaValidator>,
    /// `{public base}/fhir`.
    pub base_url: String,
    /// Notifications go out through the sync outbox.
    pub engine: Arc<crate::sync::SyncEngine>,
    pub max_body_bytes: usize,
    /// One submission per Claim identifier at a time, so a resubmission racing the first
    /// cannot create a second record.
    in_progress: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Subscription states change one at a time (event numbers, status).
    subscriptions: tokio::sync::Mutex<()>,
    /// Which subscriber endpoints may be reached.
    pub outbound: Arc<crate::remote::outbound::Outbound>,
}

impl PasApi {
    pub fn new(
        store: Arc<dyn Store>,
        policies: Arc<PolicySet>,
        schema: Arc<SchemaValidator>,
        engine: Arc<crate::sync::SyncEngine>,
        public_base: &str,
        max_body_bytes: usize,
        outbound: Arc<crate::remote::outbound::Outbound>,
    ) -> Self {
        Self {
            outbound,
            store,
            policies,
            schema,
            engine,
            max_body_bytes,
            base_url: format!("{}/fhir", public_base.trim_end_matches('/')),
            in_progress: Mutex::new(HashMap::new()),
            subscriptions: tokio::sync::Mutex::new(()),
        }
    }

    /// The lock for one Claim identifier.
    fn claim_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.in_progress.lock().unwrap_or_else(|p| p.into_inner());
        // Locks nobody holds any more are dropped, so the map stays small.
        map.retain(|_, lock| Arc::strong_count(lock) > 1);
        map.entry(key.to_owned()).or_default().clone()
    }
}

/// A claim as the payer keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimRecord {
    /// The server's id (also the ClaimResponse's).
    pub id: String,
    /// `Claim.identifier` of the original request.
    pub identifier: (String, String),
    /// `Claim.id` as the submitter sent it.
    pub claim_id: String,
    /// Who sent it (the provider's first identifier, else its reference); identifiers and ids
    /// are the submitter's own.
    #[serde(default)]
    pub submitter: String,
    /// The payer whose policy decided it.
    pub payer: String,
    /// The request Bundle; after an update, the latest one.
    pub request: Value,
    /// The current decision per item, by sequence.
    pub items: Vec<ItemDecision>,
    /// Every decision made, oldest first: what each item was decided, when and by whom.
    pub history: Vec<HistoryEntry>,
    /// Identifiers of the updates applied.
    #[serde(default)]
    pub updates: Vec<(String, String)>,
    /// Counts the changes; part of the response Bundle's id.
    pub revision: u32,
    pub created: String,
    pub updated: String,
    /// Patient and provider identifiers (`system|value`) and the patient reference, for
    /// inquiries that do not name the claim.
    #[serde(default)]
    pub patient_keys: Vec<String>,
    #[serde(default)]
    pub provider_keys: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub at: String,
    pub by: String,
    pub sequence: u32,
    pub action: ReviewAction,
}

impl ClaimRecord {
    pub fn is_pended(&self) -> bool {
        self.items.iter().any(|i| i.action == ReviewAction::Pended)
    }

    /// Replaces the decisions of `decided` (by sequence; new sequences are added), recording
    /// each change in the history.
    pub fn apply(&mut self, decided: Vec<ItemDecision>, at: &str) {
        for decision in decided {
            self.history.push(HistoryEntry {
                at: at.to_owned(),
                by: decision.decided_by.clone(),
                sequence: decision.sequence,
                action: decision.action,
            });
            match self
                .items
                .iter_mut()
                .find(|i| i.sequence == decision.sequence)
            {
                Some(current) => *current = decision,
                None => self.items.push(decision),
            }
        }
        self.items.sort_by_key(|i| i.sequence);
        self.revision += 1;
        self.updated = at.to_owned();
    }
}

/// A JSON request body as `T` (`what` names it in the error).
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<bytes::Bytes, axum::extract::rejection::BytesRejection>,
    what: &str,
) -> Result<T, crate::fhir::FhirError> {
    use crate::fhir::{FhirError, Issue};
    let bytes =
        body.map_err(|r| FhirError::new(r.status(), Issue::error("invalid", r.body_text())))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| FhirError::bad_request("structure", format!("the body is not {what}: {e}")))
}

/// `system|value` identifiers of a resource.
pub fn identifier_keys(resource: &Value) -> Vec<String> {
    resource["identifier"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| {
            Some(format!(
                "{}|{}",
                i["system"].as_str()?,
                i["value"].as_str()?
            ))
        })
        .collect()
}
