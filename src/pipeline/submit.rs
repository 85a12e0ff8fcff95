//! Submit: the reviewed packet goes back into the chart as a DocumentReference.
//!
//! The DocumentReference is kept (sealed) until the sync outbox has delivered it, and the
//! transaction turns Submitted in the same commit; the outbox job follows. A stop between the
//! two is repaired at the next start; a second Submit answers with what the first did.

use std::sync::Arc;

use base64::Engine;
use serde_json::{json, Value};

use super::{instant, now_micros, process, Pipeline, Status, Transaction};
use crate::remote::{FhirSource, Page, RemoteError, Remotes};
use crate::store::{KvOp, Store, StoreError};
use crate::sync::{JobRequest, Scope};

/// DocumentReferences waiting to be written back, by id.
pub const OUTGOING: &str = "pipeline_outgoing";
/// The internal sync source the outbox reads them from.
pub const OUTGOING_SOURCE: &str = "pipeline-outgoing";

/// Why a Submit was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("no transaction {0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the write-back could not be queued: {0}")]
    Sync(String),
    #[error("{0}")]
    Render(String),
}

/// Adds the outgoing-documents source to `remotes` (before the sync engine starts, so
/// deliveries queued before a stop carry on).
pub fn prepare(store: &Arc<dyn Store>, remotes: &mut Remotes) {
    remotes.internal.insert(OUTGOING_SOURCE.into());
    remotes.sources.insert(
        OUTGOING_SOURCE.into(),
        Arc::new(OutgoingSource {
            store: store.clone(),
        }),
    );
}

/// The write-back destination of a tenant.
fn destination(pipeline: &Pipeline, tenant: &str) -> String {
    pipeline
        .tenants
        .get(tenant)
        .and_then(|t| t.config.write_back.clone())
        .unwrap_or_else(|| tenant.to_owned())
}

/// Submits transaction `id` with the clinician's `rationale` (the draft's when `None`).
/// Answers the transaction and whether this call submitted it (false: it already was).
pub async fn submit(
    pipeline: &Arc<Pipeline>,
    id: &str,
    rationale: Option<String>,
) -> Result<(Transaction, bool), SubmitError> {
    let _guard = pipeline.changes.lock().await;
    let mut transaction = pipeline
        .transaction(id)
        .await?
        .ok_or_else(|| SubmitError::NotFound(id.to_owned()))?;
    match transaction.status {
        Status::Submitted => return Ok((transaction, false)),
        Status::Ready => {}
        Status::Processing => {
            return Err(SubmitError::Conflict(
                "the packet is still being prepared".into(),
            ))
        }
        Status::Failed => {
            return Err(SubmitError::Conflict(format!(
                "this item failed: {}",
                transaction.reason.as_deref().unwrap_or("unknown")
            )))
        }
    }
    let mut draft = pipeline.draft(id).await?.ok_or_else(|| {
        SubmitError::Conflict("the draft has expired; the encounter must be processed again".into())
    })?;
    if let Some(rationale) = rationale {
        draft.rationale = rationale;
    }
    let payer = transaction.payer.clone().unwrap_or_default();
    let pdf = process::render(&draft, &transaction.encounter, &payer)
        .await
        .map_err(SubmitError::Render)?;
    draft.pdf = base64::engine::general_purpose::STANDARD.encode(&pdf);
    let document_id = uuid::Uuid::new_v4().to_string();
    let now = now_micros();
    let mut related = vec![json!({"reference": transaction.encounter})];
    related.extend(
        draft
            .determinations
            .iter()
            .filter_map(|d| d["order"].as_str())
            .map(|o| json!({"reference": o})),
    );
    let author = transaction
        .practitioners
        .first()
        .map(|p| json!({"reference": p}));
    let mut document = crate::packet::build::document_reference(
        &document_id,
        &pdf,
        &json!({"reference": draft.patient}),
        author.as_ref(),
        &related,
        &format!(
            "Prior authorization packet: {}",
            transaction.title.as_deref().unwrap_or("requested service")
        ),
        &instant(now),
    );
    document["context"]["encounter"] = json!([{"reference": transaction.encounter}]);
    transaction.status = Status::Submitted;
    transaction.submitted_at = Some(instant(now));
    transaction.updated = instant(now);
    transaction.document = Some(format!("DocumentReference/{document_id}"));
    pipeline
        .save(
            &transaction,
            Some(&draft),
            vec![KvOp::put(
                OUTGOING,
                document_id.clone(),
                serde_json::to_vec(&document).unwrap_or_default(),
            )],
        )
        .await?;
    tracing::info!(transaction = %transaction.id, document = %document_id, "packet submitted for write-back");
    metrics::counter!("fhirgate_pipeline_submitted_total", "tenant" => transaction.tenant.clone())
        .increment(1);
    queue(pipeline, &mut transaction).await?;
    Ok((transaction, true))
}

/// Starts the outbox job of a Submitted transaction and records it.
async fn queue(pipeline: &Pipeline, transaction: &mut Transaction) -> Result<(), SubmitError> {
    let Some(document) = transaction.document.clone() else {
        return Ok(());
    };
    let job = pipeline
        .engine
        .submit(JobRequest {
            source: OUTGOING_SOURCE.into(),
            destination: destination(pipeline, &transaction.tenant),
            scope: Scope::Resources {
                references: vec![document],
            },
            track_results: false,
            internal: true,
        })
        .await
        .map_err(|e| SubmitError::Sync(e.to_string()))?;
    transaction.job = Some(job.id);
    pipeline
        .store
        .kv_apply(vec![KvOp::put(
            super::TRANSACTIONS,
            transaction.id.clone(),
            serde_json::to_vec(&transaction).unwrap_or_default(),
        )])
        .await?;
    Ok(())
}

/// Queues the write-backs a stop cut off (Submitted without a job), and drops outgoing
/// documents whose job has finished.
pub(super) async fn resume(pipeline: &Arc<Pipeline>) -> Result<(), SubmitError> {
    for mut transaction in pipeline.transactions().await? {
        if transaction.status == Status::Submitted && transaction.job.is_none() {
            tracing::info!(transaction = %transaction.id, "queueing a write-back a stop cut off");
            // One that cannot be queued now is tried again by the purge loop, not fatal here.
            if let Err(e) = queue(pipeline, &mut transaction).await {
                tracing::warn!(transaction = %transaction.id, error = %e, "a write-back could not be queued yet");
            }
        }
    }
    Ok(())
}

/// Settles write-backs: a delivered document is forgotten; one the outbox gave up on (dead
/// letter) turns its transaction Failed, keeping the document for a retry of the dead letter;
/// a Submitted transaction without a job (the queue refused it) is queued again.
pub async fn settle(pipeline: &Pipeline) -> Result<(), StoreError> {
    let _guard = pipeline.changes.lock().await;
    for mut transaction in pipeline.transactions().await? {
        if transaction.status != Status::Submitted {
            continue;
        }
        let (Some(job), Some(document)) = (transaction.job, transaction.document.clone()) else {
            if let Err(e) = queue(pipeline, &mut transaction).await {
                tracing::warn!(transaction = %transaction.id, error = %e, "a write-back could not be queued yet");
            }
            continue;
        };
        let Some(state) = pipeline.engine.job(job).map(|j| j.state) else {
            continue;
        };
        let id = document.trim_start_matches("DocumentReference/").to_owned();
        match state {
            crate::sync::JobState::Completed => {
                let kept = pipeline.store.kv_get(OUTGOING, vec![id.clone()]).await?;
                if kept.first().is_some_and(Option::is_some) {
                    pipeline
                        .store
                        .kv_apply(vec![KvOp::delete(OUTGOING, id)])
                        .await?;
                }
            }
            crate::sync::JobState::CompletedWithErrors => {
                transaction.status = Status::Failed;
                transaction.reason = Some(
                    "the packet could not be written to the chart (see the sync dead letters)"
                        .into(),
                );
                transaction.updated = instant(now_micros());
                pipeline.save(&transaction, None, Vec::new()).await?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// The documents waiting for write-back, read by the sync engine as `DocumentReference/{id}`.
pub struct OutgoingSource {
    store: Arc<dyn Store>,
}

#[async_trait::async_trait]
impl FhirSource for OutgoingSource {
    fn name(&self) -> &str {
        OUTGOING_SOURCE
    }

    async fn search(&self, _: &str, _: &[(String, String)]) -> Result<Page, RemoteError> {
        Ok(Page::default())
    }

    async fn page(&self, _: &str) -> Result<Page, RemoteError> {
        Ok(Page::default())
    }

    async fn read(&self, resource_type: &str, id: &str) -> Result<Option<Value>, RemoteError> {
        if resource_type != "DocumentReference" {
            return Ok(None);
        }
        let found = self
            .store
            .kv_get(OUTGOING, vec![id.to_owned()])
            .await
            .map_err(|e| RemoteError::Transport(format!("store: {e}")))?;
        match found.into_iter().next().flatten() {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| RemoteError::Invalid(format!("document unreadable: {e}"))),
            None => Ok(None),
        }
    }

    async fn everything(&self, _: &str) -> Result<Option<Page>, RemoteError> {
        Ok(None)
    }

    fn patient_types(&self) -> &[String] {
        &[]
    }
}
