//! HTTP handlers of the CDS services.

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::Response;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::crd::{self, OrderAnswer, ResponseOptions};
use super::request::CdsRequest;
use super::{CdsApi, ServiceDefinition};
use crate::fhir::{FhirError, Issue};
use crate::pa::ClinicalContext;

fn json_answer(status: StatusCode, value: &Value) -> Response {
    let mut response = Response::new(axum::body::Body::from(
        serde_json::to_vec(value).unwrap_or_default(),
    ));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn service<'a>(api: &'a CdsApi, id: &str) -> Result<&'a ServiceDefinition, FhirError> {
    api.services
        .iter()
        .find(|s| s.id == id)
        .ok_or_else(|| FhirError::not_found(format!("no CDS service '{id}'")))
}

fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, FhirError> {
    body.map_err(|r| FhirError::new(r.status(), Issue::error("invalid", r.body_text())))
}

/// Checks the caller's JWT; its audience is the URL called: the service's, plus `suffix`
/// (e.g. `/feedback`).
async fn authenticate<'a>(
    api: &'a CdsApi,
    headers: &HeaderMap,
    service: &ServiceDefinition,
    suffix: &str,
) -> Result<Option<&'a crate::config::TrustedIssuer>, FhirError> {
    let audience = format!("{}/cds-services/{}{suffix}", api.public_base, service.id);
    api.auth
        .verify(headers.get(header::AUTHORIZATION), &audience)
        .await
}

/// `GET /cds-services`.
pub async fn discovery(State(api): State<Arc<CdsApi>>) -> Response {
    json_answer(StatusCode::OK, &json!({ "services": api.services }))
}

/// `POST /cds-services/{id}`.
pub async fn call(
    State(api): State<Arc<CdsApi>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, FhirError> {
    let service = service(&api, &id)?;
    let caller = authenticate(&api, &headers, service, "").await?;
    let raw = body(raw)?;
    let mut request = CdsRequest::parse(&raw, &service.hook, &service.prefetch)?;
    // A client may only point fhirgate at its own FHIR servers.
    let allowed = caller.map(|c| c.fhir_servers.as_slice());
    api.fetcher
        .complete(&mut request, &service.prefetch, allowed)
        .await?;
    let today = time::OffsetDateTime::now_utc().date();
    let record = request.record();
    let mut ctx = ClinicalContext::new(today);
    ctx.add_resources(record.iter().copied());
    for (key, value) in &request.prefetch {
        if !value.is_null() {
            ctx.mark_supplied(key);
        }
    }
    // The patient's own coverage, active and in force today.
    let today_day = crate::pa::context::day_of_date(today);
    let patient = request.patient_id().unwrap_or_default().to_owned();
    let coverage = record.iter().copied().find(|r| {
        let beneficiary = r["beneficiary"]["reference"].as_str();
        let in_force = crate::pa::context::period_contains(&r["period"], today_day);
        r["resourceType"] == "Coverage"
            && r["status"].as_str().is_none_or(|s| s == "active")
            && beneficiary.is_none_or(|b| b.ends_with(&format!("Patient/{patient}")))
            && in_force
    });
    let payer = coverage.and_then(|c| api.policies.payer_for(c, &record));
    let orders = request.orders();
    let answers: Vec<OrderAnswer<'_>> = orders
        .iter()
        .map(|order| OrderAnswer {
            order,
            determination: api.policies.determine(order, payer, &ctx),
        })
        .collect();
    for a in &answers {
        metrics::counter!(
            "fhirgate_cds_determinations_total",
            "service" => service.id.clone(),
            "prior_auth" => match a.determination.prior_auth {
                crate::pa::PriorAuth::NotNeeded => "not-needed",
                crate::pa::PriorAuth::Needed => "needed",
                crate::pa::PriorAuth::Satisfied => "satisfied",
                crate::pa::PriorAuth::Unknown => "unknown",
            }
        )
        .increment(1);
    }
    let options = ResponseOptions {
        coverage_info: request
            .configuration("coverage-info")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        max_cards: request
            .configuration("max-cards")
            .and_then(Value::as_u64)
            .map_or(10, |n| n as usize),
        coverage_reference: coverage.map(super::request::reference_of),
        review_app_url: api.settings.review_app_url.as_deref(),
        hook_instance: &request.hook_instance,
        today: format!(
            "{:04}-{:02}-{:02}",
            today.year(),
            today.month() as u8,
            today.day()
        ),
    };
    Ok(json_answer(
        StatusCode::OK,
        &crd::response(&answers, &options),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackBody {
    feedback: Vec<FeedbackItem>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FeedbackItem {
    card: String,
    outcome: String,
    #[serde(default)]
    accepted_suggestions: Vec<Value>,
    #[serde(default)]
    override_reason: Option<Value>,
    outcome_timestamp: String,
}

/// `POST /cds-services/{id}/feedback`: outcomes of cards (accepted, overridden with a reason),
/// kept in the store and counted in metrics. All items are checked before any is kept.
pub async fn feedback(
    State(api): State<Arc<CdsApi>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, FhirError> {
    let service = service(&api, &id)?;
    authenticate(&api, &headers, service, "/feedback").await?;
    let raw = body(raw)?;
    let parsed: FeedbackBody = serde_json::from_slice(&raw)
        .map_err(|e| FhirError::bad_request("invalid", format!("not CDS Hooks feedback: {e}")))?;
    for item in &parsed.feedback {
        if !matches!(item.outcome.as_str(), "accepted" | "overridden") {
            return Err(FhirError::bad_request(
                "value",
                format!(
                    "feedback outcome '{}' is neither accepted nor overridden",
                    item.outcome
                ),
            ));
        }
        if crate::fhir::date::parse_range(&item.outcome_timestamp).is_none() {
            return Err(FhirError::bad_request(
                "value",
                "outcomeTimestamp is not an instant",
            ));
        }
    }
    for item in &parsed.feedback {
        // The reason is kept in the store; the label only says whether one was given, so clients
        // cannot mint metric series.
        let reason = if item.override_reason.is_some() {
            "given"
        } else {
            "none"
        };
        let record = json!({
            "service": service.id,
            "card": item.card,
            "outcome": item.outcome,
            "acceptedSuggestions": item.accepted_suggestions,
            "overrideReason": item.override_reason,
            "outcomeTimestamp": item.outcome_timestamp,
            "receivedAt": crate::fhir::date::format_instant(crate::fhir::date::now_micros()),
        });
        api.store
            .append(
                super::FEEDBACK_STREAM,
                serde_json::to_vec(&record).unwrap_or_default(),
            )
            .await
            .map_err(crate::server::store_error)?;
        metrics::counter!(
            "fhirgate_cds_feedback_total",
            "service" => service.id.clone(),
            "outcome" => item.outcome.clone(),
            "override_reason" => reason
        )
        .increment(1);
        tracing::info!(
            service = %service.id,
            card = %item.card,
            outcome = %item.outcome,
            accepted_suggestions = item.accepted_suggestions.len(),
            "CDS card feedback"
        );
    }
    Ok(json_answer(StatusCode::OK, &json!({})))
}
