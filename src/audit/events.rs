//! The audit log as FHIR: each record as an `AuditEvent` in the style of IHE Basic Audit Log
//! Patterns (BALP), and `GET /fhir/AuditEvent` (search) and `GET /fhir/AuditEvent/{id}` for
//! admins. The log is append-only: the routes answer reads and nothing else.
//!
//! Codes are from the FHIR R4 terminology (`audit-event-type`, `restful-interaction`,
//! `audit-entity-type`, `security-source-type`), DICOM PS3.16 (DCM) and BALP's
//! `BasicAuditEntityType` for the request id.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use http::StatusCode;
use serde_json::{json, Value};

use super::{AuditLog, Record, STREAM};
use crate::fhir::date::{parse_range, DateRange};
use crate::fhir::{FhirError, Issue};
use crate::server::response::{json_response, store_error};

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const EVENT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
const INTERACTION: &str = "http://hl7.org/fhir/restful-interaction";
const ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
const SOURCE_TYPE: &str = "http://terminology.hl7.org/CodeSystem/security-source-type";
const BALP_ENTITY: &str = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType";

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({"system": system, "code": code, "display": display})
}

/// The event type and subtype of an action.
fn kind(action: &str) -> (Value, Value) {
    let rest = || coding(EVENT_TYPE, "rest", "RESTful Operation");
    match action {
        "login" => (
            coding(DCM, "110114", "User Authentication"),
            coding(DCM, "110122", "Login"),
        ),
        "start" => (
            coding(DCM, "110100", "Application Activity"),
            coding(DCM, "110120", "Application Start"),
        ),
        "export" => (
            coding(DCM, "110106", "Export"),
            coding(INTERACTION, "operation", "operation"),
        ),
        "admin" => (
            coding(DCM, "110136", "Security Roles Changed"),
            coding(INTERACTION, "operation", "operation"),
        ),
        "webhook" => (rest(), coding(INTERACTION, "create", "create")),
        interaction => (rest(), coding(INTERACTION, interaction, interaction)),
    }
}

/// The AuditEvent `action` code: Create, Read, Update, Delete or Execute.
fn action_code(action: &str) -> &'static str {
    match action {
        "create" | "webhook" => "C",
        "read" | "vread" | "history-instance" | "history-type" | "search-type"
        | "search-system" => "R",
        "update" | "patch" => "U",
        "delete" => "D",
        _ => "E",
    }
}

/// 0 success, 4 minor failure (the caller's), 8 serious failure (the server's).
fn outcome_code(status: u16) -> &'static str {
    match status {
        0..=399 => "0",
        400..=499 => "4",
        _ => "8",
    }
}

/// One record as an AuditEvent.
pub fn audit_event(record: &Record) -> Value {
    let entry = &record.entry;
    let (event_type, subtype) = kind(&entry.action);
    let mut client = json!({
        "type": {"coding": [coding(DCM, "110153", "Source Role ID")]},
        "who": {
            "identifier": {"system": format!("urn:fhirgate:caller:{}", entry.via), "value": entry.who},
            "display": entry.who,
        },
        "requestor": true,
    });
    if let Some(address) = &entry.source {
        client["network"] = json!({"address": address, "type": "2"});
    }
    let server = json!({
        "type": {"coding": [coding(DCM, "110152", "Destination Role ID")]},
        "who": {"display": "fhirgate"},
        "requestor": false,
    });
    let mut entities = Vec::new();
    if let Some(resource_type) = &entry.resource_type {
        let mut entity = json!({
            "type": if resource_type == "Patient" {
                coding(ENTITY_TYPE, "1", "Person")
            } else {
                coding(ENTITY_TYPE, "2", "System Object")
            },
        });
        entity["what"] = match &entry.resource_id {
            Some(id) => json!({"reference": format!("{resource_type}/{id}")}),
            None => json!({"type": resource_type}),
        };
        if let Some(detail) = &entry.detail {
            entity["description"] = json!(detail);
        }
        entities.push(entity);
    }
    if let Some(request_id) = &entry.request_id {
        entities.push(json!({
            "what": {"identifier": {"value": request_id}},
            "type": coding(BALP_ENTITY, "XrequestId", "X-Request-Id"),
        }));
    }
    let mut event = json!({
        "resourceType": "AuditEvent",
        "id": record.seq.to_string(),
        "type": event_type,
        "subtype": [subtype],
        "action": action_code(&entry.action),
        "recorded": entry.time,
        "outcome": outcome_code(entry.outcome),
        "agent": [client, server],
        "source": {
            "observer": {"display": "fhirgate"},
            "type": [coding(SOURCE_TYPE, "4", "Application Server")],
        },
    });
    // A change is recorded before it runs (status 0), and again with its result.
    let started = entry.outcome == 0 && entry.action != "start";
    if started {
        event.as_object_mut().map(|e| e.remove("outcome"));
        event["outcomeDesc"] = json!("started; the record with the same request id has its result");
    } else if entry.outcome >= 400 || entry.resource_type.is_none() {
        let status = if entry.outcome > 0 {
            format!("HTTP {}", entry.outcome)
        } else {
            String::new()
        };
        let description = match (&entry.detail, status.is_empty()) {
            (Some(detail), true) => detail.clone(),
            (Some(detail), false) => format!("{status}: {detail}"),
            (None, _) => status,
        };
        if !description.is_empty() {
            event["outcomeDesc"] = json!(description);
        }
    }
    if !entities.is_empty() {
        event["entity"] = Value::Array(entities);
    }
    event
}

/// What `GET /fhir/AuditEvent` filters on.
#[derive(Debug, Default)]
struct Query {
    dates: Vec<(String, DateRange)>,
    agent: Option<String>,
    entity: Option<String>,
    patient: Option<String>,
    action: Option<String>,
    subtype: Option<String>,
    outcome: Option<String>,
    address: Option<String>,
    count: usize,
    /// Only records after this sequence number (paging).
    after: u64,
}

const DEFAULT_COUNT: usize = 100;
const MAX_COUNT: usize = 1000;

fn bad(message: impl Into<String>) -> FhirError {
    FhirError::bad_request("invalid", message)
}

/// A token value without its system (`system|code` → `code`).
fn token(value: &str) -> String {
    value.rsplit('|').next().unwrap_or(value).to_owned()
}

impl Query {
    fn parse(raw: Option<&str>) -> Result<Self, FhirError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or_default())
            .map_err(|_| bad("the query cannot be read"))?;
        let mut query = Query {
            count: DEFAULT_COUNT,
            ..Query::default()
        };
        for (name, value) in pairs {
            match name.as_str() {
                "date" => {
                    let (prefix, text) = match value.get(..2) {
                        Some(p @ ("eq" | "ne" | "gt" | "ge" | "lt" | "le" | "sa" | "eb")) => {
                            (p.to_owned(), &value[2..])
                        }
                        _ => ("eq".to_owned(), value.as_str()),
                    };
                    if matches!(prefix.as_str(), "ne" | "sa" | "eb") {
                        return Err(bad(format!("date prefix {prefix} is not supported here")));
                    }
                    let range = parse_range(text)
                        .ok_or_else(|| bad(format!("date: {value:?} is not a FHIR date")))?;
                    query.dates.push((prefix, range));
                }
                "agent" | "agent:identifier" | "altid" => query.agent = Some(token(&value)),
                "entity" => query.entity = Some(value),
                "patient" => {
                    let id = value.strip_prefix("Patient/").unwrap_or(&value);
                    query.patient = Some(id.to_owned());
                }
                "action" => query.action = Some(value),
                "subtype" => query.subtype = Some(token(&value)),
                "outcome" => query.outcome = Some(token(&value)),
                "address" => query.address = Some(value),
                "_count" => {
                    query.count = value
                        .parse::<usize>()
                        .map_err(|_| bad("_count must be a number"))?
                        .min(MAX_COUNT)
                }
                "_cursor" => {
                    query.after = value
                        .parse()
                        .map_err(|_| bad("_cursor is not one this server gave"))?
                }
                "_format" | "_pretty" => {}
                other => {
                    return Err(FhirError::new(
                        StatusCode::BAD_REQUEST,
                        Issue::error(
                            "not-supported",
                            format!("AuditEvent search does not support the parameter {other:?}; it supports date, agent, entity, patient, action, subtype, outcome, address, _count"),
                        ),
                    ))
                }
            }
        }
        Ok(query)
    }

    fn matches(&self, record: &Record, event: &Value) -> bool {
        let entry = &record.entry;
        let when = parse_range(&entry.time).map_or(i64::MIN, |r| r.start);
        let dates_match = self
            .dates
            .iter()
            .all(|(prefix, range)| match prefix.as_str() {
                "gt" => when >= range.end,
                "ge" => when >= range.start,
                "lt" => when < range.start,
                "le" => when < range.end,
                _ => when >= range.start && when < range.end,
            });
        let reference = entry
            .resource_id
            .as_ref()
            .zip(entry.resource_type.as_ref())
            .map(|(id, t)| format!("{t}/{id}"));
        dates_match
            && self.agent.as_ref().is_none_or(|a| *a == entry.who)
            && self.entity.as_ref().is_none_or(|e| {
                reference.as_deref() == Some(e.as_str())
                    || entry.resource_type.as_deref() == Some(e.as_str())
            })
            && self.patient.as_ref().is_none_or(|p| {
                entry.resource_type.as_deref() == Some("Patient")
                    && entry.resource_id.as_deref() == Some(p.as_str())
            })
            && self
                .action
                .as_ref()
                .is_none_or(|a| event["action"].as_str() == Some(a.as_str()))
            && self
                .subtype
                .as_ref()
                .is_none_or(|s| event["subtype"][0]["code"].as_str() == Some(s.as_str()))
            && self
                .outcome
                .as_ref()
                .is_none_or(|o| event["outcome"].as_str() == Some(o.as_str()))
            && self
                .address
                .as_ref()
                .is_none_or(|a| entry.source.as_deref() == Some(a.as_str()))
    }
}

/// The audit routes' state.
pub struct AuditApi {
    pub log: Arc<AuditLog>,
    /// `{public base}/fhir`.
    pub fhir_base: String,
}

pub fn router(api: Arc<AuditApi>) -> Router {
    Router::new()
        .route("/fhir/AuditEvent", get(search))
        .route("/fhir/AuditEvent/{id}", get(read))
        .route("/audit/verify", get(verify))
        .with_state(api)
}

/// Records are read this many at a time while searching.
const PAGE: usize = 1000;
/// A search stops after looking at this many records and offers a next page.
const MAX_SCANNED: usize = 200_000;

async fn search(
    State(api): State<Arc<AuditApi>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, FhirError> {
    let query = Query::parse(raw.as_deref())?;
    // Everything recorded before this request is committed before it is read.
    api.log.flush().await;
    let store = api.log.store();
    let mut found = Vec::new();
    let mut after = query.after;
    let mut scanned = 0usize;
    let mut more = false;
    // `_count=0` asks for no entries (and so no next page).
    'scan: loop {
        if query.count == 0 {
            break;
        }
        let page = store
            .records(STREAM, after, PAGE)
            .await
            .map_err(store_error)?;
        if page.is_empty() {
            break;
        }
        for (position, payload) in page {
            if found.len() == query.count || scanned == MAX_SCANNED {
                more = true;
                break 'scan;
            }
            after = position;
            scanned += 1;
            let Ok(record) = serde_json::from_slice::<Record>(&payload) else {
                continue;
            };
            let event = audit_event(&record);
            if query.matches(&record, &event) {
                found.push(event);
            }
        }
    }
    let self_url = match &raw {
        Some(q) if !q.is_empty() => format!("{}/AuditEvent?{q}", api.fhir_base),
        _ => format!("{}/AuditEvent", api.fhir_base),
    };
    let mut links = vec![json!({"relation": "self", "url": self_url})];
    if more {
        let mut pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(raw.as_deref().unwrap_or_default()).unwrap_or_default();
        pairs.retain(|(name, _)| name != "_cursor");
        pairs.push(("_cursor".into(), after.to_string()));
        let next = serde_urlencoded::to_string(&pairs).unwrap_or_default();
        links.push(
            json!({"relation": "next", "url": format!("{}/AuditEvent?{next}", api.fhir_base)}),
        );
    }
    let entries: Vec<Value> = found
        .into_iter()
        .map(|event| {
            json!({
                "fullUrl": format!("{}/AuditEvent/{}", api.fhir_base, event["id"].as_str().unwrap_or_default()),
                "resource": event,
                "search": {"mode": "match"},
            })
        })
        .collect();
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": entries,
    });
    Ok(json_response(StatusCode::OK, &bundle))
}

async fn read(
    State(api): State<Arc<AuditApi>>,
    Path(id): Path<String>,
) -> Result<Response, FhirError> {
    let missing = || FhirError::not_found(format!("no AuditEvent {id}"));
    let seq: u64 = id.parse().map_err(|_| missing())?;
    api.log.flush().await;
    let store = api.log.store();
    // Records sit at the position of their sequence number unless the log was rebuilt; the
    // scan is the fallback.
    let near = store
        .records(STREAM, seq.saturating_sub(1), 1)
        .await
        .map_err(store_error)?;
    let parse = |payload: &[u8]| serde_json::from_slice::<Record>(payload).ok();
    if let Some(record) = near
        .first()
        .and_then(|(_, p)| parse(p))
        .filter(|r| r.seq == seq)
    {
        return Ok(json_response(StatusCode::OK, &audit_event(&record)));
    }
    let mut after = 0;
    loop {
        let page = store
            .records(STREAM, after, PAGE)
            .await
            .map_err(store_error)?;
        let Some((last, _)) = page.last() else {
            return Err(missing());
        };
        after = *last;
        if let Some(record) = page
            .iter()
            .filter_map(|(_, p)| parse(p))
            .find(|r| r.seq == seq)
        {
            return Ok(json_response(StatusCode::OK, &audit_event(&record)));
        }
    }
}

/// `GET /audit/verify` (admins): the chain check, as JSON; 409 when it is broken.
async fn verify(State(api): State<Arc<AuditApi>>) -> Result<Response, FhirError> {
    let answer = api.log.verify().await.map_err(store_error)?;
    Ok(match answer {
        Ok(verified) => json_response(
            StatusCode::OK,
            &json!({"intact": true, "records": verified.records, "first": verified.first, "head": verified.head}),
        ),
        Err(tampered) => json_response(
            StatusCode::CONFLICT,
            &json!({"intact": false, "brokenAt": tampered.seq, "problem": tampered.problem}),
        ),
    })
}
