//! HTTP handlers: `POST /fhir/Claim/$submit`, `POST /fhir/Claim/$inquire`, and the reviewer's
//! `GET /pas/claims/{id}` and `POST /pas/claims/{id}/decision`.

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::Value;

use super::check::{check_request, PasRequest, RelatedClaim};
use super::decide::{
    authorization_number, decide_items, service_period, ItemDecision, ReviewAction,
};
use super::respond::response_bundle;
use super::{identifier_keys, ClaimRecord, PasApi, CLAIMS, CLAIM_IDENTIFIERS};
use crate::fhir::{FhirError, Issue};
use crate::server::{check_content_type, json_response, parse_json, store_error};
use crate::store::KvOp;

/// The PAS routes.
pub fn router(api: Arc<PasApi>) -> Router {
    Router::new()
        .route("/fhir/Claim/$submit", post(submit))
        .route("/fhir/Claim/$inquire", post(inquire))
        .route("/pas/claims/{id}", get(show_claim))
        .route("/pas/claims/{id}/decision", post(reviewer_decision))
        .route("/packets", post(super::packets::create))
        .route("/packets/{id}", get(super::packets::pdf))
        .route("/packets/{id}/write-back", post(super::packets::write_back))
        .route(
            "/fhir/Subscription/{id}/$status",
            get(super::subscription::status),
        )
        .with_state(api)
}

fn unprocessable(code: &'static str, message: impl Into<String>, at: &str) -> FhirError {
    FhirError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        Issue::error(code, message).at(at),
    )
}

fn now_and_today() -> (String, time::Date) {
    let micros = crate::fhir::date::now_micros();
    let now = time::OffsetDateTime::now_utc();
    (crate::fhir::date::format_instant(micros), now.date())
}

/// Reads a FHIR JSON body and checks it against the R4 schema.
async fn fhir_body(
    api: &PasApi,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, FhirError> {
    check_content_type(headers)?;
    let bytes =
        body.map_err(|r| FhirError::new(r.status(), Issue::error("invalid", r.body_text())))?;
    let value = parse_json(&bytes)?;
    if value["resourceType"] != "Bundle" {
        return Err(
            FhirError::bad_request("structure", "the body must be a Bundle").at("resourceType"),
        );
    }
    if !api.schema.is_valid(&value) {
        let schema = api.schema.clone();
        let copy = value.clone();
        let error = tokio::task::spawn_blocking(move || schema.explain(&copy))
            .await
            .map_err(|_| FhirError::internal("validation did not complete"))?;
        return Err(error);
    }
    Ok(value)
}

pub(super) async fn load(api: &PasApi, id: &str) -> Result<Option<ClaimRecord>, FhirError> {
    let found = api
        .store
        .kv_get(CLAIMS, vec![id.to_owned()])
        .await
        .map_err(store_error)?;
    match found.into_iter().next().flatten() {
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| FhirError::internal(format!("claim record {id} is unreadable: {e}"))),
        None => Ok(None),
    }
}

/// The record a key names, and the hash of the Claim that was filed under that key.
async fn find_by_key(api: &PasApi, key: &str) -> Result<Option<(ClaimRecord, String)>, FhirError> {
    let found = api
        .store
        .kv_get(CLAIM_IDENTIFIERS, vec![key.to_owned()])
        .await
        .map_err(store_error)?;
    let Some(value) = found.into_iter().next().flatten() else {
        return Ok(None);
    };
    let value = String::from_utf8_lossy(&value).into_owned();
    let (id, hash) = value.split_once('|').unwrap_or((value.as_str(), ""));
    Ok(load(api, id).await?.map(|record| (record, hash.to_owned())))
}

/// Who sent a claim: the provider's first identifier, else its reference. Claim identifiers
/// are the submitter's, so they are only unique together with it.
fn submitter(request: &PasRequest<'_>) -> String {
    request
        .provider
        .and_then(|p| identifier_keys(p).into_iter().next())
        .or_else(|| {
            request.claim["provider"]["reference"]
                .as_str()
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

/// The hash of a Claim's content, to tell a resubmission from a reused identifier.
fn claim_hash(claim: &Value) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(serde_json::to_vec(claim).unwrap_or_default());
    crate::hex(&digest[..12])
}

/// Saves `record` with index entries for `keys`, durably.
/// Saves `record` with index entries for `keys` (each filed with the hash of the Claim sent
/// under it), durably.
async fn save(
    api: &PasApi,
    record: &ClaimRecord,
    keys: &[String],
    hash: &str,
) -> Result<(), FhirError> {
    let bytes = serde_json::to_vec(record)
        .map_err(|e| FhirError::internal(format!("claim record did not serialize: {e}")))?;
    let mut ops = vec![KvOp::put(CLAIMS, record.id.clone(), bytes)];
    for key in keys {
        ops.push(KvOp::put(
            CLAIM_IDENTIFIERS,
            key.clone(),
            format!("{}|{hash}", record.id).into_bytes(),
        ));
    }
    api.store.kv_apply(ops).await.map_err(store_error)
}

fn answer(api: &PasApi, record: &ClaimRecord) -> Response {
    json_response(StatusCode::OK, &response_bundle(record, &api.base_url))
}

/// `POST /fhir/Claim/$submit`.
async fn submit(
    State(api): State<Arc<PasApi>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, FhirError> {
    let bundle = fhir_body(&api, &headers, body).await?;
    let request = check_request(&bundle)?;
    let payer = api
        .policies
        .payer_for(request.coverage, &request.resources())
        .ok_or_else(|| {
            unprocessable(
                "not-supported",
                "the Coverage's payer is not one this server decides for",
                "Bundle.entry[0].resource.insurance.coverage",
            )
        })?;
    let from = submitter(&request);
    let key = format!("{from}#{}|{}", request.identifier.0, request.identifier.1);
    let hash = claim_hash(request.claim);
    let lock = api.claim_lock(&key);
    let _one_at_a_time = lock.lock().await;
    // The same Claim again: the same answer, nothing new. The same identifier on a different
    // Claim is a mistake the submitter must hear about.
    if let Some((record, filed)) = find_by_key(&api, &key).await? {
        if filed != hash {
            return Err(unprocessable(
                "duplicate",
                "this Claim identifier was already used for a different request; use a new identifier, or Claim.related to update it",
                "Bundle.entry[0].resource.identifier",
            ));
        }
        return Ok(answer(&api, &record));
    }
    let (now, today) = now_and_today();
    if let Some(related) = &request.related {
        return update(
            &api, &request, related, payer, &from, &key, &hash, &now, today,
        )
        .await;
    }
    let id = uuid::Uuid::new_v4().to_string();
    let decisions = decide_items(&request, &api.policies, payer, &id, &now, today);
    let mut record = ClaimRecord {
        id,
        identifier: request.identifier.clone(),
        claim_id: request.claim["id"].as_str().unwrap_or("claim").to_owned(),
        submitter: from.clone(),
        payer: payer.payer.name.clone(),
        request: Value::Null,
        items: Vec::new(),
        history: Vec::new(),
        updates: Vec::new(),
        revision: 0,
        created: now.clone(),
        updated: now.clone(),
        patient_keys: patient_keys(&request),
        provider_keys: request.provider.map(identifier_keys).unwrap_or_default(),
    };
    // The request is done with: the Bundle moves into the record rather than being copied.
    drop(request);
    record.request = bundle;
    record.apply(decisions, &now);
    let mut keys = vec![key];
    if record.claim_id != "claim" {
        keys.push(format!("{from}#ref|Claim/{}", record.claim_id));
    }
    save(&api, &record, &keys, &hash).await?;
    tracing::info!(claim = %record.id, items = record.items.len(), pended = record.is_pended(), "prior authorization decided");
    Ok(answer(&api, &record))
}

fn patient_keys(request: &PasRequest<'_>) -> Vec<String> {
    let mut keys = identifier_keys(request.patient);
    if let Some(reference) = request.claim["patient"]["reference"].as_str() {
        keys.push(format!("ref|{reference}"));
    }
    keys
}

/// An update of an earlier claim: items still pended, or marked changed, are decided again
/// with the update's information; the answer lists every item of the claim.
#[allow(clippy::too_many_arguments)]
async fn update(
    api: &PasApi,
    request: &PasRequest<'_>,
    related: &RelatedClaim,
    payer: &crate::pa::PolicyFile,
    from: &str,
    key: &str,
    hash: &str,
    now: &str,
    today: time::Date,
) -> Result<Response, FhirError> {
    let original_key = match related {
        RelatedClaim::Identifier(system, value) => format!("{from}#{system}|{value}"),
        RelatedClaim::Reference(reference) => format!("{from}#ref|{reference}"),
    };
    let related_at = "Bundle.entry[0].resource.related[0].claim";
    let Some((found, _)) = find_by_key(api, &original_key).await? else {
        return Err(unprocessable(
            "not-found",
            "the claim this update refers to is not known here (for this provider)",
            related_at,
        ));
    };
    let patient = patient_keys(request);
    if !found.patient_keys.iter().any(|k| patient.contains(k)) {
        return Err(unprocessable(
            "conflict",
            "the update is for another patient than the claim it refers to",
            related_at,
        ));
    }
    let lock = api.claim_lock(&record_lock_key(&found));
    let _original_too = lock.lock().await;
    // Read again under the original's lock: a reviewer may have just decided.
    let mut record = load(api, &found.id).await?.unwrap_or(found);
    let decided = decide_items(request, &api.policies, payer, &record.id, now, today);
    let again: Vec<ItemDecision> = decided
        .into_iter()
        .filter(|d| {
            let changed = request
                .items
                .iter()
                .find(|i| i.sequence == d.sequence)
                .is_some_and(|i| info_changed(i.item));
            let current = record.items.iter().find(|i| i.sequence == d.sequence);
            // Decided again: what is pended, what the provider marks changed, and an item whose
            // service is not the one decided before.
            current.is_none_or(|c| c.action == ReviewAction::Pended || changed || c.code != d.code)
        })
        .collect();
    let was_pended = record.is_pended();
    let before = record.items.clone();
    record.request = request.bundle.clone();
    record
        .updates
        .push((request.identifier.0.clone(), request.identifier.1.clone()));
    record.apply(again, now);
    save(api, &record, &[key.to_owned()], hash).await?;
    tracing::info!(
        claim = %record.id,
        pended = record.is_pended(),
        was_pended,
        "prior authorization updated"
    );
    if decisions_changed(&before, &record.items) {
        super::subscription::notify(api, &record).await;
    }
    Ok(answer(api, &record))
}

/// Whether any item's decision changed (a pended item decided, a decision reversed): what
/// subscribers hear about.
fn decisions_changed(before: &[ItemDecision], after: &[ItemDecision]) -> bool {
    after.iter().any(|item| {
        before
            .iter()
            .any(|old| old.sequence == item.sequence && old.action != item.action)
    })
}

/// The lock of a claim record (its original key).
fn record_lock_key(record: &ClaimRecord) -> String {
    format!(
        "{}#{}|{}",
        record.submitter, record.identifier.0, record.identifier.1
    )
}

/// The PAS `infoChanged` extension on an item.
fn info_changed(item: &Value) -> bool {
    item["extension"].as_array().into_iter().flatten().any(|e| {
        e["url"]
            .as_str()
            .is_some_and(|u| u.ends_with("extension-infoChanged"))
    })
}

/// `POST /fhir/Claim/$inquire`: the latest answer for the request the inquiry names, by
/// Claim identifier, else by patient and provider.
async fn inquire(
    State(api): State<Arc<PasApi>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, FhirError> {
    let bundle = fhir_body(&api, &headers, body).await?;
    let claim = bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| &e["resource"])
        .find(|r| r["resourceType"] == "Claim")
        .ok_or_else(|| {
            unprocessable(
                "required",
                "an inquiry Bundle carries a Claim",
                "Bundle.entry",
            )
        })?;
    let resolve =
        |field: &str| -> Option<&Value> {
            let reference = claim[field]["reference"].as_str()?;
            let tail: Vec<&str> = reference.rsplit('/').take(2).collect();
            bundle["entry"].as_array()?.iter().map(|e| &e["resource"]).find(|r| {
            matches!(tail.as_slice(), [id, t] if r["resourceType"] == *t && r["id"] == *id)
        })
        };
    let patient_keys: Vec<String> = resolve("patient").map(identifier_keys).unwrap_or_default();
    let provider_keys: Vec<String> = resolve("provider").map(identifier_keys).unwrap_or_default();
    // By the Claim identifier, as the provider filed it, for the same patient.
    let from = provider_keys
        .first()
        .cloned()
        .or_else(|| claim["provider"]["reference"].as_str().map(str::to_owned))
        .unwrap_or_default();
    for key in identifier_keys(claim) {
        if let Some((record, _)) = find_by_key(&api, &format!("{from}#{key}")).await? {
            if record.patient_keys.iter().any(|k| patient_keys.contains(k)) {
                return Ok(answer(&api, &record));
            }
        }
    }
    if provider_keys.is_empty() {
        return Err(FhirError::not_found(
            "no prior authorization request matches the inquiry's claim identifier, and its provider has no identifier to match by",
        ));
    }
    if patient_keys.is_empty() {
        return Err(FhirError::not_found(
            "no prior authorization request matches the inquiry's claim identifier, and its patient has no identifier to match by",
        ));
    }
    let mut best: Option<ClaimRecord> = None;
    let mut after = None;
    loop {
        let chunk = api
            .store
            .kv_scan(CLAIMS, after.clone(), 1000)
            .await
            .map_err(store_error)?;
        let full = chunk.len() == 1000;
        after = chunk.last().map(|(k, _)| k.clone());
        for (_, bytes) in chunk {
            let Ok(record) = serde_json::from_slice::<ClaimRecord>(&bytes) else {
                continue;
            };
            let patient = record.patient_keys.iter().any(|k| patient_keys.contains(k));
            let provider = record
                .provider_keys
                .iter()
                .any(|k| provider_keys.contains(k));
            if patient && provider && best.as_ref().is_none_or(|b| record.updated > b.updated) {
                best = Some(record);
            }
        }
        if !full {
            break;
        }
    }
    match best {
        Some(record) => Ok(answer(&api, &record)),
        None => Err(FhirError::not_found(
            "no prior authorization request matches the inquiry",
        )),
    }
}

/// `GET /pas/claims/{id}`: the record a reviewer works from (decisions, history, request).
async fn show_claim(
    State(api): State<Arc<PasApi>>,
    Path(id): Path<String>,
) -> Result<Response, FhirError> {
    let record = load(&api, &id)
        .await?
        .ok_or_else(|| FhirError::not_found(format!("no claim {id}")))?;
    let value = serde_json::to_value(&record)
        .map_err(|e| FhirError::internal(format!("claim record did not serialize: {e}")))?;
    Ok(json_response(StatusCode::OK, &value))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewerDecision {
    reviewer: String,
    items: Vec<ReviewedItem>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewedItem {
    sequence: u32,
    /// `approved` or `denied`.
    action: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    period: Option<ReviewedPeriod>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewedPeriod {
    start: String,
    end: String,
}

/// `POST /pas/claims/{id}/decision`: a reviewer approves or denies items.
async fn reviewer_decision(
    State(api): State<Arc<PasApi>>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, FhirError> {
    let decision: ReviewerDecision = super::json_body(body, "a reviewer decision")?;
    if decision.reviewer.trim().is_empty() || decision.items.is_empty() {
        return Err(FhirError::bad_request(
            "required",
            "a decision names its reviewer and at least one item",
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (n, item) in decision.items.iter().enumerate() {
        if !seen.insert(item.sequence) {
            return Err(FhirError::bad_request(
                "duplicate",
                format!("item {} is decided twice", item.sequence),
            )
            .at(format!("items[{n}].sequence")));
        }
        if let Some(period) = &item.period {
            let start = crate::fhir::date::parse_range(&period.start);
            let end = crate::fhir::date::parse_range(&period.end);
            let ordered = matches!((start, end), (Some(s), Some(e)) if s.start <= e.start);
            if !ordered {
                return Err(FhirError::bad_request(
                    "value",
                    "period needs FHIR dates with start no later than end",
                )
                .at(format!("items[{n}].period")));
            }
        }
    }
    let found = load(&api, &id)
        .await?
        .ok_or_else(|| FhirError::not_found(format!("no claim {id}")))?;
    let lock = api.claim_lock(&record_lock_key(&found));
    let _one_at_a_time = lock.lock().await;
    let mut record = load(&api, &id).await?.unwrap_or(found);
    let before = record.items.clone();
    let (now, today) = now_and_today();
    let claim_items = record.request["entry"][0]["resource"]["item"].clone();
    let mut decided = Vec::new();
    for (n, reviewed) in decision.items.iter().enumerate() {
        let Some(current) = record
            .items
            .iter()
            .find(|i| i.sequence == reviewed.sequence)
        else {
            return Err(unprocessable(
                "not-found",
                format!("the claim has no item {}", reviewed.sequence),
                &format!("items[{n}].sequence"),
            ));
        };
        let action = match reviewed.action.as_str() {
            "approved" => ReviewAction::Approved,
            "denied" => ReviewAction::Denied,
            other => {
                return Err(FhirError::bad_request(
                    "value",
                    format!("action must be approved or denied, not {other:?}"),
                )
                .at(format!("items[{n}].action")))
            }
        };
        let item = claim_items
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i["sequence"] == reviewed.sequence)
            .cloned()
            .unwrap_or(Value::Null);
        let approved = action == ReviewAction::Approved;
        decided.push(ItemDecision {
            sequence: reviewed.sequence,
            action,
            code: current.code.clone(),
            pre_auth_ref: approved.then(|| authorization_number(&record.id, reviewed.sequence)),
            period: approved.then(|| match &reviewed.period {
                Some(p) => (p.start.clone(), p.end.clone()),
                None => service_period(&item, today),
            }),
            reasons: reviewed.reason.clone().into_iter().collect(),
            missing: Vec::new(),
            determination: current.determination.clone(),
            decided_at: now.clone(),
            decided_by: format!("reviewer:{}", decision.reviewer.trim()),
        });
    }
    record.apply(decided, &now);
    save(&api, &record, &[], "").await?;
    tracing::info!(claim = %record.id, pended = record.is_pended(), "reviewer decided");
    if decisions_changed(&before, &record.items) {
        super::subscription::notify(&api, &record).await;
    }
    Ok(answer(&api, &record))
}
