//! One encounter's way from "signed" to "Ready for review": chart, facts, decisions, packet.
//!
//! A transaction is recorded (Processing) before any of this starts, in the same commit as the
//! "seen" mark of the encounter version, so a crash leaves either nothing (the next poll picks
//! the encounter up) or a Processing transaction that the next start resumes. Encounters that
//! are not for prior authorization here — no Coverage, a payer the tenant does not target, no
//! orders, nothing needing authorization — are skipped and leave only their "seen" mark.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;

use super::hydrate::{self, Chart};
use super::{
    instant, now_micros, Draft, Pipeline, Status, Tenant, Transaction, ENCOUNTERS, SEEN,
    TRANSACTIONS,
};
use crate::extract::llm::Identity;
use crate::extract::{describe, Extraction};
use crate::pa::{Determination, PriorAuth};
use crate::packet::build::{packet_document, DecidedItem, PacketSource};
use crate::packet::ServiceLine;
use crate::remote::RemoteError;
use crate::store::{KvOp, StoreError};

/// Attempts at gathering a chart before the transaction fails: waits double from 1 s to a
/// minute, so an EHR outage of about ten minutes is ridden out.
const ATTEMPTS: u32 = 15;

/// Records `encounter` as taken on (a Processing transaction and its "seen" mark, durably).
pub async fn take_on(
    pipeline: &Arc<Pipeline>,
    tenant: &Arc<Tenant>,
    encounter: &Value,
    seen_key: String,
) -> Result<Option<Transaction>, StoreError> {
    let Some(patient) = encounter["subject"]["reference"]
        .as_str()
        .and_then(hydrate::local_reference)
    else {
        pipeline
            .store
            .kv_apply(vec![KvOp::put(
                SEEN,
                seen_key,
                b"skipped: no subject".to_vec(),
            )])
            .await?;
        return Ok(None);
    };
    // A later version of an encounter already taken on (an addendum, a billing edit) does not
    // make a second packet, unless the first failed.
    let encounter_key = format!(
        "{}|{}",
        tenant.name,
        encounter["id"].as_str().unwrap_or_default()
    );
    let earlier = pipeline
        .store
        .kv_get(ENCOUNTERS, vec![encounter_key.clone()])
        .await?
        .into_iter()
        .next()
        .flatten();
    if let Some(earlier) = earlier {
        let id = String::from_utf8_lossy(&earlier).into_owned();
        let failed = pipeline
            .transaction(&id)
            .await?
            .is_none_or(|t| t.status == Status::Failed);
        if !failed {
            pipeline
                .store
                .kv_apply(vec![KvOp::put(
                    SEEN,
                    seen_key,
                    format!("skipped: a later version of {id}").into_bytes(),
                )])
                .await?;
            return Ok(None);
        }
    }
    let now = instant(now_micros());
    let transaction = Transaction {
        id: format!("t-{}", uuid::Uuid::new_v4()),
        tenant: tenant.name.clone(),
        encounter: format!("Encounter/{}", encounter["id"].as_str().unwrap_or_default()),
        version: super::poller::version_of(encounter),
        patient_hash: pipeline.patient_hash(&tenant.name, &patient),
        practitioners: encounter["participant"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["individual"]["reference"].as_str())
            .filter_map(hydrate::local_reference)
            .filter(|r| r.starts_with("Practitioner/"))
            .collect(),
        status: Status::Processing,
        reason: None,
        title: None,
        payer: None,
        prior_auth: None,
        created: now.clone(),
        updated: now,
        ready_at: None,
        submitted_at: None,
        document: None,
        job: None,
        draft_expires: None,
    };
    pipeline
        .save(
            &transaction,
            None,
            vec![
                KvOp::put(SEEN, seen_key, transaction.id.clone().into_bytes()),
                KvOp::put(
                    ENCOUNTERS,
                    encounter_key,
                    transaction.id.clone().into_bytes(),
                ),
            ],
        )
        .await?;
    tracing::info!(tenant = %tenant.name, transaction = %transaction.id, encounter = %transaction.encounter, "signed encounter taken on");
    metrics::counter!("fhirgate_pipeline_encounters_total", "tenant" => tenant.name.clone())
        .increment(1);
    Ok(Some(transaction))
}

/// Carries on the Processing transactions a stop cut off.
pub(super) async fn resume(pipeline: &Arc<Pipeline>) -> Result<(), StoreError> {
    for transaction in pipeline.transactions().await? {
        if transaction.status != Status::Processing {
            continue;
        }
        match pipeline.tenants.get(&transaction.tenant) {
            Some(tenant) => {
                pipeline.spawn(run(pipeline.clone(), tenant.clone(), transaction, None));
            }
            None => {
                tracing::warn!(transaction = %transaction.id, tenant = %transaction.tenant, "a transaction of a tenant no longer configured was left as it is")
            }
        }
    }
    Ok(())
}

/// Why an encounter leaves the pipeline without a packet.
enum Outcome {
    Ready(Box<(Transaction, Draft)>),
    Skipped(String),
}

/// Processes one transaction to Ready, Failed or skipped.
pub async fn run(
    pipeline: Arc<Pipeline>,
    tenant: Arc<Tenant>,
    transaction: Transaction,
    encounter: Option<Value>,
) {
    let Ok(_permit) = tenant.permits.acquire().await else {
        return;
    };
    let started = std::time::Instant::now();
    let mut attempt = 0;
    let result = loop {
        attempt += 1;
        match prepare(&pipeline, &tenant, &transaction, encounter.as_ref()).await {
            Err(e) if e.is_retriable() && attempt < ATTEMPTS => {
                let wait = e
                    .retry_after()
                    .unwrap_or(Duration::from_millis(500 * 2u64.pow(attempt.min(7))));
                tracing::info!(transaction = %transaction.id, attempt, error = %e, "gathering the chart failed; trying again");
                tokio::time::sleep(wait.min(Duration::from_secs(60))).await;
            }
            other => break other,
        }
    };
    let _guard = pipeline.changes.lock().await;
    let saved = match result {
        Ok(Outcome::Ready(ready)) => {
            let (ready, draft) = *ready;
            metrics::histogram!("fhirgate_pipeline_ready_seconds")
                .record(started.elapsed().as_secs_f64());
            tracing::info!(transaction = %ready.id, ms = started.elapsed().as_millis() as u64, "packet ready for review");
            pipeline.save(&ready, Some(&draft), Vec::new()).await
        }
        Ok(Outcome::Skipped(why)) => {
            tracing::info!(transaction = %transaction.id, encounter = %transaction.encounter, why = %why, "encounter skipped");
            let key = format!(
                "{}|{}|{}",
                transaction.tenant,
                transaction.encounter.trim_start_matches("Encounter/"),
                transaction.version
            );
            pipeline
                .store
                .kv_apply(vec![
                    KvOp::delete(TRANSACTIONS, transaction.id.clone()),
                    KvOp::put(SEEN, key, format!("skipped: {why}").into_bytes()),
                ])
                .await
        }
        Err(e) => {
            let reason = reason_of(&e);
            tracing::warn!(transaction = %transaction.id, reason = %reason, "the encounter could not be processed");
            let mut failed = transaction.clone();
            failed.status = Status::Failed;
            failed.reason = Some(reason);
            failed.updated = instant(now_micros());
            pipeline.save(&failed, None, Vec::new()).await
        }
    };
    if let Err(e) = saved {
        tracing::warn!(transaction = %transaction.id, error = %e, "the transaction's result could not be saved; it is resumed at the next start");
    }
}

/// Why a transaction failed, as kept and shown: never the EHR's own wording, which may name
/// the patient.
fn reason_of(error: &RemoteError) -> String {
    match error {
        RemoteError::Status { status, .. } | RemoteError::Auth { status, .. } => {
            format!("the EHR answered {status}")
        }
        RemoteError::Transport(_) => "the EHR could not be reached".into(),
        RemoteError::Invalid(message) | RemoteError::Refused(message) => message.clone(),
    }
}

/// The most demanding prior-authorization answer of several orders.
fn rank(prior_auth: PriorAuth) -> u8 {
    match prior_auth {
        PriorAuth::Needed => 3,
        PriorAuth::Unknown => 2,
        PriorAuth::Satisfied => 1,
        PriorAuth::NotNeeded => 0,
    }
}

async fn prepare(
    pipeline: &Arc<Pipeline>,
    tenant: &Arc<Tenant>,
    transaction: &Transaction,
    encounter: Option<&Value>,
) -> Result<Outcome, RemoteError> {
    let id = transaction.encounter.trim_start_matches("Encounter/");
    let encounter = match encounter {
        Some(e) => e.clone(),
        None => match tenant.source.read("Encounter", id).await? {
            Some(e) => e,
            None => return Ok(Outcome::Skipped("the encounter is gone".into())),
        },
    };
    let chart = hydrate::gather(tenant, &encounter).await?;
    if chart.coverages.is_empty() {
        return Ok(Outcome::Skipped(
            "the patient has no active Coverage".into(),
        ));
    }
    let resources: Vec<&Value> = chart
        .bundle
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| &e["resource"])
        .collect();
    let Some(payer) = chart
        .coverages
        .iter()
        .find_map(|c| pipeline.policies.payer_for(c, &resources))
    else {
        return Ok(Outcome::Skipped("no policy for the patient's payer".into()));
    };
    let targeted = tenant.config.payers.is_empty()
        || tenant.config.payers.iter().any(|p| {
            p.eq_ignore_ascii_case(&payer.payer.name)
                || p == &payer.payer.id
                || payer.payer.identifiers.iter().any(|i| &i.value == p)
        });
    if !targeted {
        return Ok(Outcome::Skipped(format!(
            "{} is not one of the tenant's payers",
            payer.payer.name
        )));
    }
    if chart.orders.is_empty() {
        return Ok(Outcome::Skipped("the encounter has no orders".into()));
    }
    let extraction = pipeline
        .extractor
        .extract(&chart.notes, &Identity::of_patient(&chart.patient))
        .await;
    let today = time::OffsetDateTime::now_utc().date();
    let determinations: Vec<Determination> = chart
        .orders
        .iter()
        .map(|order| {
            pipeline.policies.determine_with(
                order,
                &[&chart.bundle],
                Some(
                    extraction
                        .facts
                        .iter()
                        .map(|f| f.to_policy_fact())
                        .collect(),
                ),
                today,
            )
        })
        .collect();
    let Some(lead) = determinations
        .iter()
        .filter(|d| d.prior_auth != PriorAuth::NotNeeded)
        .max_by_key(|d| rank(d.prior_auth))
    else {
        return Ok(Outcome::Skipped(
            "no order needs prior authorization".into(),
        ));
    };
    let rationale = rationale(&determinations, &extraction, &chart);
    let determinations: Vec<Value> = determinations
        .iter()
        .map(|d| serde_json::to_value(d).unwrap_or(Value::Null))
        .collect();
    let mut draft = Draft {
        bundle: chart.bundle.clone(),
        patient: chart.patient_ref.clone(),
        determinations,
        facts: extraction.facts.clone(),
        extractor: extraction.extractor.clone(),
        rationale,
        pdf: String::new(),
    };
    let pdf = render(&draft, &transaction.encounter, &payer.payer.name)
        .await
        .map_err(RemoteError::Invalid)?;
    draft.pdf = base64::engine::general_purpose::STANDARD.encode(pdf);
    let now = now_micros();
    let mut ready = transaction.clone();
    ready.status = Status::Ready;
    ready.title = lead
        .rule_title
        .clone()
        .or_else(|| lead.billing_code.as_ref().and_then(|c| c.display.clone()));
    ready.payer = Some(payer.payer.name.clone());
    ready.prior_auth = serde_json::to_value(lead.prior_auth)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned));
    ready.updated = instant(now);
    ready.ready_at = Some(instant(now));
    ready.draft_expires =
        Some(now + i64::try_from(pipeline.config.draft_ttl_secs).unwrap_or(7200) * 1_000_000);
    Ok(Outcome::Ready(Box::new((ready, draft))))
}

/// The rationale as first proposed: each decision's reason, then what the notes say.
fn rationale(determinations: &[Determination], extraction: &Extraction, chart: &Chart) -> String {
    let mut out = Vec::new();
    for d in determinations {
        out.push(format!("{}.", d.reason.trim_end_matches('.')));
    }
    if !extraction.facts.is_empty() {
        out.push("From the clinical notes:".into());
        out.extend(
            extraction
                .facts
                .iter()
                .map(|f| format!("- {}", describe(f))),
        );
    } else if chart.notes.is_empty() {
        out.push("No clinical notes were found for this encounter.".into());
    }
    out.join("\n")
}

/// Renders the packet of `draft` (with its current rationale).
pub async fn render(draft: &Draft, reference: &str, payer: &str) -> Result<Vec<u8>, String> {
    let mut items = Vec::new();
    let mut services = Vec::new();
    for (n, d) in draft.determinations.iter().enumerate() {
        let sequence = u32::try_from(n + 1).unwrap_or(u32::MAX);
        let code = &d["billing_code"];
        services.push(ServiceLine {
            sequence,
            system: code["system"].as_str().unwrap_or_default().to_owned(),
            code: code["code"].as_str().unwrap_or_default().to_owned(),
            display: code["display"].as_str().map(str::to_owned),
            quantity: None,
        });
        let decision = match d["prior_auth"].as_str() {
            Some("not-needed") => "No prior authorization required",
            Some("satisfied") => "Criteria met",
            Some("needed") => "Prior authorization needed",
            _ => "Not determined",
        };
        items.push(DecidedItem {
            sequence,
            decision: decision.into(),
            determination: d.clone(),
            reasons: Vec::new(),
            missing: d["missing"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m.as_str().map(str::to_owned))
                .collect(),
        });
    }
    let source = PacketSource {
        bundle: &draft.bundle,
        reference: reference.to_owned(),
        payer: payer.to_owned(),
        services,
        items,
        provider: None,
        generated: instant(now_micros()),
    };
    let mut document = packet_document(&source);
    document.rationale = draft
        .rationale
        .lines()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    tokio::task::spawn_blocking(move || crate::packet::render(&document))
        .await
        .map_err(|_| "rendering did not complete".to_owned())?
        .map_err(|e| format!("the packet could not be rendered: {e}"))
}
