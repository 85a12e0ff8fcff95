//! `/packets`: prior-authorization packets for a PAS claim (or a patient's record with orders):
//! the PDF, and a DocumentReference kept in the embedded store that can be written back to the
//! EHR's chart through the sync outbox.

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::Response;
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::handlers::load;
use super::{ClaimRecord, PasApi};
use crate::fhir::FhirError;
use crate::packet::build::{
    claim_services, document_reference, packet_document, DecidedItem, PacketSource,
};
use crate::packet::ServiceLine;
use crate::server::{json_response, store_error};
use crate::store::{Action, Mutation, WriteResult};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PacketRequest {
    /// A PAS claim (the id of its ClaimResponse).
    claim_id: Option<String>,
    /// Or: the patient's record (Patient, Coverage, payer Organization, problems, notes…).
    bundle: Option<Value>,
    /// …and the orders to decide and include.
    #[serde(default)]
    orders: Vec<Value>,
}

fn now() -> String {
    crate::fhir::date::format_instant(crate::fhir::date::now_micros())
}

fn decision_text(item: &super::ItemDecision) -> String {
    match (item.action, &item.pre_auth_ref) {
        (super::ReviewAction::Approved, Some(number)) => format!("Approved ({number})"),
        (super::ReviewAction::Approved, None) => "Approved".into(),
        (super::ReviewAction::Denied, _) => "Denied".into(),
        (super::ReviewAction::Pended, _) => "Pended: information needed".into(),
        (super::ReviewAction::NoActionRequired, _) => "No prior authorization required".into(),
    }
}

/// `POST /packets`: renders the packet and keeps its DocumentReference; answers with it.
pub async fn create(
    State(api): State<Arc<PasApi>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, FhirError> {
    let request: PacketRequest = super::json_body(body, "a packet request")?;
    let generated = now();
    let id = uuid::Uuid::new_v4().to_string();
    let (document, subject, author, related) = match (request.claim_id, request.bundle) {
        (Some(claim), None) => {
            let record = load(&api, &claim)
                .await?
                .ok_or_else(|| FhirError::not_found(format!("no claim {claim}")))?;
            from_claim(&record, &generated)
        }
        (None, Some(bundle)) => from_orders(&api, &bundle, &request.orders, &generated)?,
        _ => {
            return Err(FhirError::bad_request(
                "required",
                "give either claimId, or bundle with orders",
            ))
        }
    };
    let pdf = tokio::task::spawn_blocking(move || crate::packet::render(&document))
        .await
        .map_err(|_| FhirError::internal("rendering did not complete"))?
        .map_err(|e| FhirError::internal(format!("the packet could not be rendered: {e}")))?;
    let resource = document_reference(
        &id,
        &pdf,
        &subject,
        author.as_ref(),
        &related,
        "Prior authorization packet",
        &generated,
    );
    let stored = store_document(&api, resource).await?;
    tracing::info!(packet = %id, bytes = pdf.len(), "packet generated");
    let mut response = json_response(StatusCode::CREATED, &stored);
    if let Ok(location) = HeaderValue::from_str(&format!("/packets/{id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

type Assembled = (
    crate::packet::PacketDocument,
    Value,
    Option<Value>,
    Vec<Value>,
);

fn from_claim(record: &ClaimRecord, generated: &str) -> Assembled {
    let bundle = &record.request;
    let claim = &bundle["entry"][0]["resource"];
    let provider_reference = claim["provider"]["reference"].as_str().unwrap_or_default();
    let provider = bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|e| {
            let r = &e["resource"];
            let matches = e["fullUrl"].as_str() == Some(provider_reference)
                || format!(
                    "{}/{}",
                    r["resourceType"].as_str().unwrap_or_default(),
                    r["id"].as_str().unwrap_or_default()
                ) == provider_reference;
            matches.then_some(r)
        });
    let source = PacketSource {
        bundle,
        reference: record.identifier.1.clone(),
        payer: record.payer.clone(),
        services: claim_services(claim),
        items: record
            .items
            .iter()
            .map(|item| DecidedItem {
                sequence: item.sequence,
                decision: decision_text(item),
                determination: item.determination.clone(),
                reasons: item.reasons.clone(),
                missing: item.missing.clone(),
            })
            .collect(),
        provider,
        generated: generated.to_owned(),
    };
    let related = vec![
        json!({"reference": format!("Claim/{}", record.claim_id)}),
        json!({"reference": format!("ClaimResponse/{}", record.id)}),
    ];
    let author = claim.get("provider").cloned();
    (
        packet_document(&source),
        claim["patient"].clone(),
        author,
        related,
    )
}

fn from_orders(
    api: &PasApi,
    bundle: &Value,
    orders: &[Value],
    generated: &str,
) -> Result<Assembled, FhirError> {
    if bundle["resourceType"] != "Bundle" {
        return Err(FhirError::bad_request("invalid", "bundle must be a Bundle").at("bundle"));
    }
    if orders.is_empty() {
        return Err(FhirError::bad_request("required", "orders is empty").at("orders"));
    }
    let patient = bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| &e["resource"])
        .find(|r| r["resourceType"] == "Patient")
        .ok_or_else(|| {
            FhirError::bad_request("required", "the bundle has no Patient").at("bundle")
        })?;
    let today = time::OffsetDateTime::now_utc().date();
    let mut items = Vec::new();
    let mut services = Vec::new();
    let mut payer = String::new();
    for (n, order) in orders.iter().enumerate() {
        let sequence = u32::try_from(n + 1).unwrap_or(u32::MAX);
        let determination = api.policies.determine_with(order, &[bundle], None, today);
        payer = determination
            .payer
            .clone()
            .unwrap_or_else(|| "Unknown payer".into());
        let code = determination.billing_code.clone();
        services.push(ServiceLine {
            sequence,
            system: code.as_ref().map(|c| c.system.clone()).unwrap_or_default(),
            code: code.as_ref().map(|c| c.code.clone()).unwrap_or_default(),
            display: code.and_then(|c| c.display),
            quantity: None,
        });
        let decision = match determination.prior_auth {
            crate::pa::PriorAuth::NotNeeded => "No prior authorization required",
            crate::pa::PriorAuth::Satisfied => "Criteria met",
            crate::pa::PriorAuth::Needed => "Prior authorization needed",
            crate::pa::PriorAuth::Unknown => "Not determined",
        };
        items.push(DecidedItem {
            sequence,
            decision: decision.into(),
            reasons: Vec::new(),
            missing: determination.missing.clone(),
            determination: serde_json::to_value(&determination).unwrap_or(Value::Null),
        });
    }
    let related: Vec<Value> = orders
        .iter()
        .filter_map(|o| {
            Some(json!({"reference": format!("{}/{}", o["resourceType"].as_str()?, o["id"].as_str()?)}))
        })
        .collect();
    let source = PacketSource {
        bundle,
        reference: related
            .first()
            .and_then(|r| r["reference"].as_str())
            .unwrap_or("request")
            .to_owned(),
        payer,
        services,
        items,
        provider: None,
        generated: generated.to_owned(),
    };
    let subject =
        json!({"reference": format!("Patient/{}", patient["id"].as_str().unwrap_or_default())});
    Ok((packet_document(&source), subject, None, related))
}

async fn store_document(api: &PasApi, resource: Value) -> Result<Value, FhirError> {
    let id = resource["id"].as_str().unwrap_or_default().to_owned();
    let written = api
        .store
        .write(
            vec![Mutation {
                resource_type: "DocumentReference".into(),
                action: Action::Create {
                    id: Some(id),
                    resource,
                    if_none_exist: None,
                },
                full_url: None,
            }],
            true,
        )
        .await
        .map_err(store_error)?;
    match written {
        WriteResult::Committed(outcomes) => match outcomes.into_iter().next() {
            Some(crate::store::Outcome::Created(version)) => serde_json::from_slice(&version.body)
                .map_err(|e| FhirError::internal(format!("stored packet unreadable: {e}"))),
            _ => Err(FhirError::internal("the packet was not stored")),
        },
        WriteResult::Aborted { error, .. } => Err(error),
        WriteResult::Each(_) => Err(FhirError::internal("unexpected store answer")),
    }
}

async fn stored_document(api: &PasApi, id: &str) -> Result<Value, FhirError> {
    let version = api
        .store
        .read("DocumentReference", id)
        .await
        .map_err(store_error)?
        .filter(|v| !v.is_deleted())
        .ok_or_else(|| FhirError::not_found(format!("no packet {id}")))?;
    serde_json::from_slice(&version.body)
        .map_err(|e| FhirError::internal(format!("stored packet unreadable: {e}")))
}

/// `GET /packets/{id}`: the PDF.
pub async fn pdf(
    State(api): State<Arc<PasApi>>,
    Path(id): Path<String>,
) -> Result<Response, FhirError> {
    let document = stored_document(&api, &id).await?;
    let data = document["content"][0]["attachment"]["data"]
        .as_str()
        .ok_or_else(|| FhirError::not_found(format!("packet {id} carries no PDF")))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| FhirError::internal(format!("packet {id} is not base64: {e}")))?;
    let mut response = Response::new(axum::body::Body::from(bytes));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/pdf"),
    );
    if let Ok(disposition) = HeaderValue::from_str(&format!("inline; filename=\"packet-{id}.pdf\""))
    {
        response
            .headers_mut()
            .insert(header::CONTENT_DISPOSITION, disposition);
    }
    Ok(response)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteBack {
    destination: String,
}

/// `POST /packets/{id}/write-back` `{"destination": "openemr"}`: the DocumentReference goes to
/// the EHR through the sync outbox (retries, dead letters); answers 202 with the sync job.
pub async fn write_back(
    State(api): State<Arc<PasApi>>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, FhirError> {
    let request: WriteBack = super::json_body(body, "a write-back (a destination)")?;
    stored_document(&api, &id).await?;
    let job = api
        .engine
        .submit(crate::sync::JobRequest {
            source: crate::remote::LOCAL.into(),
            destination: request.destination,
            scope: crate::sync::Scope::Resources {
                references: vec![format!("DocumentReference/{id}")],
            },
            track_results: false,
            internal: false,
        })
        .await?;
    let mut response = json_response(
        StatusCode::ACCEPTED,
        &serde_json::to_value(&job).unwrap_or(Value::Null),
    );
    if let Ok(location) = HeaderValue::from_str(&format!("/sync/jobs/{}", job.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}
