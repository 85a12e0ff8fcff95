//! Signed webhooks: `POST /webhooks/{source}` lets an EHR say that resources changed, and
//! fhirgate syncs them from that source.
//!
//! Requests are signed the way the Standard Webhooks specification says: headers
//! `webhook-id`, `webhook-timestamp` (Unix seconds) and `webhook-signature` (space-separated
//! `v1,{base64}` values), the signature an HMAC-SHA256 over `{id}.{timestamp}.{raw body}` with
//! the source's secret (`whsec_{base64}`, or the secret's bytes). Signatures are compared in
//! constant time; a timestamp further than the tolerance (5 minutes) from now is refused, and an
//! id already seen is answered without being processed again, so a captured request cannot be
//! replayed. Every call, refused or not, is in the audit log (see `auth::guard`).
//!
//! The body names what changed: a FHIR resource, a Bundle (entries' resources, `fullUrl`s or
//! request URLs, and the focus references of an R4 subscription notification), or
//! `{"resources": ["Patient/1", …]}`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use aws_lc_rs::hmac;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::audit::AuditNote;
use crate::config::WebhookConfig;
use crate::fhir::{FhirError, Issue};
use crate::store::{KvOp, Store};
use crate::sync::api::SyncApi;
use crate::sync::model::Scope;
use crate::sync::JobRequest;

/// Ids seen, by `{source}/{id}`, with the request's timestamp.
const SEEN: &str = "webhook.seen";
/// Most resources one call may name.
const MAX_REFERENCES: usize = 1000;

struct Hook {
    key: hmac::Key,
    destination: Option<String>,
    tolerance_secs: i64,
}

/// The webhook endpoints' state.
pub struct Webhooks {
    hooks: BTreeMap<String, Hook>,
    sync: Arc<SyncApi>,
    store: Arc<dyn Store>,
    /// Held from the duplicate check until the id is recorded.
    seen: Mutex<i64>,
}

/// The HMAC key of a secret: `whsec_{base64}` decoded, else the secret's own bytes.
fn key_of(secret: &str) -> Result<hmac::Key, String> {
    let bytes = match secret.strip_prefix("whsec_") {
        Some(encoded) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| format!("the whsec_ secret is not base64: {e}"))?,
        None => secret.as_bytes().to_vec(),
    };
    if bytes.len() < 16 {
        return Err("the secret is shorter than 16 bytes".into());
    }
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &bytes))
}

impl Webhooks {
    /// Checks the configuration: every webhook belongs to a configured source and has a
    /// usable secret.
    pub fn new(
        config: &BTreeMap<String, WebhookConfig>,
        sync: Arc<SyncApi>,
        store: Arc<dyn Store>,
    ) -> anyhow::Result<Self> {
        let mut hooks = BTreeMap::new();
        for (source, hook) in config {
            if !sync.sources.contains(source) {
                anyhow::bail!("webhooks.{source}: there is no source {source:?}");
            }
            let key = key_of(hook.secret.expose())
                .map_err(|e| anyhow::anyhow!("webhooks.{source}.secret: {e}"))?;
            hooks.insert(
                source.clone(),
                Hook {
                    key,
                    destination: hook.destination.clone(),
                    tolerance_secs: hook.tolerance_secs.clamp(1, 7 * 24 * 3600) as i64,
                },
            );
        }
        Ok(Self {
            hooks,
            sync,
            store,
            seen: Mutex::new(0),
        })
    }
}

pub fn router(api: Arc<Webhooks>) -> Router {
    Router::new()
        .route("/webhooks/{source}", post(receive))
        .with_state(api)
}

/// A refusal with what the audit log should say about it.
fn refuse(status: StatusCode, code: &'static str, message: &str) -> Response {
    let mut response = FhirError::new(status, Issue::error(code, message)).into_response();
    response
        .extensions_mut()
        .insert(AuditNote(format!("refused: {message}")));
    response
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Whether one of the `v1,{base64}` signatures is the HMAC of the signed content.
fn signature_matches(key: &hmac::Key, signed: &[u8], signatures: &str) -> bool {
    signatures.split(' ').any(|candidate| {
        candidate
            .strip_prefix("v1,")
            .and_then(|encoded| {
                base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .ok()
            })
            // `verify` compares in constant time.
            .is_some_and(|tag| hmac::verify(key, signed, &tag).is_ok())
    })
}

/// Signs `body` as a sender would (for tests and tools): the `webhook-signature` value.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
    let key = key_of(secret).ok()?;
    let signed = [format!("{id}.{timestamp}.").as_bytes(), body].concat();
    let tag = hmac::sign(&key, &signed);
    Some(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    ))
}

async fn receive(
    State(api): State<Arc<Webhooks>>,
    Path(source): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(hook) = api.hooks.get(&source) else {
        return refuse(
            StatusCode::NOT_FOUND,
            "not-found",
            "no webhook is configured for this source",
        );
    };
    let (Some(id), Some(timestamp), Some(signatures)) = (
        header(&headers, "webhook-id"),
        header(&headers, "webhook-timestamp"),
        header(&headers, "webhook-signature"),
    ) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "required",
            "webhook-id, webhook-timestamp and webhook-signature are required",
        );
    };
    if id.is_empty() || id.len() > 256 {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid",
            "webhook-id: 1 to 256 characters",
        );
    }
    let signed = [format!("{id}.{timestamp}.").as_bytes(), &body[..]].concat();
    if !signature_matches(&hook.key, &signed, signatures) {
        tracing::warn!(source = %source, "webhook signature refused");
        return refuse(
            StatusCode::UNAUTHORIZED,
            "security",
            "the signature does not match",
        );
    }
    let now = crate::fhir::date::now_micros() / 1_000_000;
    let Ok(sent) = timestamp.parse::<i64>() else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid",
            "webhook-timestamp: Unix seconds",
        );
    };
    if (now - sent).abs() > hook.tolerance_secs {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "security",
            "webhook-timestamp is too far from now (a replay, or a wrong clock)",
        );
    }
    let references = match serde_json::from_slice::<Value>(&body) {
        Ok(value) => references(&value),
        Err(_) => return refuse(StatusCode::BAD_REQUEST, "structure", "the body is not JSON"),
    };
    if references.is_empty() {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "the body names no resource (Type/id) to sync",
        );
    }
    if references.len() > MAX_REFERENCES {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-long",
            "a webhook may name at most 1000 resources",
        );
    }
    let (source_name, destination) = match crate::sync::api::endpoints(
        &api.sync,
        Some(source.clone()),
        hook.destination.clone(),
    ) {
        Ok(pair) => pair,
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, "exception", &e),
    };
    // One at a time from the duplicate check to recording the id: a request sent twice at
    // once is processed once.
    let mut last_prune = api.seen.lock().await;
    let seen_key = format!("{source}/{id}");
    match api.store.kv_get(SEEN, vec![seen_key.clone()]).await {
        Ok(values) if values.first().is_some_and(Option::is_some) => {
            let mut response = (
                StatusCode::OK,
                Json(json!({"status": "duplicate", "id": id})),
            )
                .into_response();
            response
                .extensions_mut()
                .insert(AuditNote(format!("replay of {id}; not processed again")));
            return response;
        }
        Ok(_) => {}
        Err(e) => return FhirError::from(crate::sync::SyncError::Store(e)).into_response(),
    }
    let count = references.len();
    let job = match api
        .sync
        .engine
        .submit(JobRequest {
            source: source_name,
            destination,
            scope: Scope::Resources { references },
            track_results: false,
            internal: false,
        })
        .await
    {
        Ok(job) => job,
        Err(e) => return FhirError::from(e).into_response(),
    };
    // Recorded after the job is queued: a crash in between means the sender's retry queues
    // the same resources again, which syncs them once more and loses nothing.
    if let Err(e) = api
        .store
        .kv_apply(vec![KvOp::put(
            SEEN,
            seen_key,
            sent.to_string().into_bytes(),
        )])
        .await
    {
        tracing::error!(error = %e, "a webhook id could not be recorded");
    }
    if now - *last_prune > 600 {
        *last_prune = now;
        // Ids of every source are kept as long as the most tolerant source needs them.
        let longest = api
            .hooks
            .values()
            .map(|h| h.tolerance_secs)
            .max()
            .unwrap_or(300);
        let horizon = now - 2 * longest.max(300);
        if let Err(e) = forget_before(api.store.as_ref(), horizon).await {
            tracing::warn!(error = %e, "old webhook ids could not be removed");
        }
    }
    drop(last_prune);
    let mut response = (
        StatusCode::ACCEPTED,
        [(http::header::LOCATION, format!("/sync/jobs/{}", job.id))],
        Json(json!({"status": "accepted", "job": job.id, "resources": count})),
    )
        .into_response();
    response.extensions_mut().insert(AuditNote(format!(
        "sync job {} for {count} resources",
        job.id
    )));
    response
}

/// Forgets ids whose timestamps are before `horizon`: such requests are refused as too old.
async fn forget_before(store: &dyn Store, horizon: i64) -> Result<(), crate::store::StoreError> {
    let mut after = None;
    loop {
        let page = store.kv_scan(SEEN, after.clone(), 1000).await?;
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        after = Some(last.clone());
        let old: Vec<KvOp> = page
            .iter()
            .filter(|(_, sent)| {
                std::str::from_utf8(sent)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .is_none_or(|t| t < horizon)
            })
            .map(|(key, _)| KvOp::delete(SEEN, key.clone()))
            .collect();
        if !old.is_empty() {
            store.kv_apply(old).await?;
        }
    }
}

/// `Type/id` from a reference or URL (`…/Patient/1/_history/2` → `Patient/1`).
fn reference_of(text: &str) -> Option<String> {
    let path = text.split(['?', '#']).next()?;
    let path = path.split("/_history/").next()?;
    let mut segments = path.rsplit('/');
    let id = segments.next()?;
    let resource_type = segments.next()?;
    let is_type = resource_type.starts_with(|c: char| c.is_ascii_uppercase())
        && resource_type.bytes().all(|b| b.is_ascii_alphabetic());
    (is_type && crate::fhir::is_valid_id(id)).then(|| format!("{resource_type}/{id}"))
}

/// The resources a webhook body names, without repeats, in order.
pub fn references(body: &Value) -> Vec<String> {
    let mut found = Vec::new();
    let mut add = |reference: Option<String>| {
        if let Some(reference) = reference {
            found.push(reference);
        }
    };
    if let Some(listed) = body.get("resources").and_then(Value::as_array) {
        for item in listed {
            add(item.as_str().and_then(reference_of));
        }
    } else if body["resourceType"] == "Bundle" {
        for entry in body["entry"].as_array().into_iter().flatten() {
            let resource = &entry["resource"];
            match resource["resourceType"].as_str() {
                // An R4 subscription notification: its status names the focus resources.
                Some("Parameters" | "SubscriptionStatus") => {
                    for event in notification_events(resource) {
                        add(event.as_str().and_then(reference_of));
                    }
                }
                Some(resource_type) if resource["id"].is_string() => add(reference_of(&format!(
                    "{resource_type}/{}",
                    resource["id"].as_str().unwrap_or_default()
                ))),
                _ => add(entry["fullUrl"]
                    .as_str()
                    .and_then(reference_of)
                    .or_else(|| entry["request"]["url"].as_str().and_then(reference_of))),
            }
        }
    } else if let (Some(resource_type), Some(id)) =
        (body["resourceType"].as_str(), body["id"].as_str())
    {
        add(reference_of(&format!("{resource_type}/{id}")));
    }
    let mut seen = BTreeSet::new();
    found.retain(|r| seen.insert(r.clone()));
    found
}

/// The focus references of a subscription status (R4 backport `Parameters`, or R4B/R5
/// `SubscriptionStatus`).
fn notification_events(status: &Value) -> Vec<Value> {
    let mut focus = Vec::new();
    if status["resourceType"] == "SubscriptionStatus" {
        for event in status["notificationEvent"].as_array().into_iter().flatten() {
            focus.push(event["focus"]["reference"].clone());
        }
        return focus;
    }
    for parameter in status["parameter"].as_array().into_iter().flatten() {
        if parameter["name"] != "notification-event" {
            continue;
        }
        for part in parameter["part"].as_array().into_iter().flatten() {
            if part["name"] == "focus" {
                focus.push(part["valueReference"]["reference"].clone());
            }
        }
    }
    focus
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_name_their_resources() {
        assert_eq!(
            references(
                &json!({"resources": ["Patient/1", "https://ehr.test/fhir/Observation/o-2/_history/3", "nonsense", "Patient/1"]})
            ),
            vec!["Patient/1", "Observation/o-2"]
        );
        let notification = json!({
            "resourceType": "Bundle", "type": "history",
            "entry": [
                {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Parameters", "parameter": [
                    {"name": "notification-event", "part": [
                        {"name": "event-number", "valueString": "1"},
                        {"name": "focus", "valueReference": {"reference": "https://ehr.test/fhir/Encounter/e-1"}}
                    ]}
                ]}},
                {"fullUrl": "https://ehr.test/fhir/Encounter/e-1", "resource": {"resourceType": "Encounter", "id": "e-1"}},
                {"fullUrl": "https://ehr.test/fhir/Condition/c-9"},
                {"request": {"method": "PUT", "url": "MedicationRequest/m-3"}}
            ]
        });
        assert_eq!(
            references(&notification),
            vec!["Encounter/e-1", "Condition/c-9", "MedicationRequest/m-3"]
        );
        assert_eq!(
            references(&json!({"resourceType": "Patient", "id": "p-7"})),
            vec!["Patient/p-7"]
        );
        assert!(references(&json!({"resourceType": "Patient"})).is_empty());
        assert!(references(&json!({"resources": ["patient/1", "Patient/a b"]})).is_empty());
    }

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example of the Standard Webhooks specification.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let signature =
            sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body).expect("signature");
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let key = key_of(secret).expect("key");
        let signed = [b"msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330.".as_slice(), body].concat();
        assert!(signature_matches(
            &key,
            &signed,
            &format!("v1,bm90aGluZw== {signature}")
        ));
        assert!(!signature_matches(
            &key,
            &signed,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OF="
        ));
        assert!(!signature_matches(
            &key,
            &signed,
            "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        ));
        assert!(key_of("short").is_err());
    }
}
