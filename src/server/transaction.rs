//! `POST /fhir` with a `batch` or `transaction` Bundle.
//!
//! A transaction is all or nothing: every entry is checked first, then all writes go to the
//! store as one atomic write, in which `urn:uuid:` and other `fullUrl` references are pointed at
//! the ids the server assigns and conditional references (`Patient?identifier=…`) are resolved.
//! Any failure answers with one OperationOutcome naming the entry (`Bundle.entry[49]…`) and
//! stores nothing. A batch runs each entry on its own and reports each entry's result. Read
//! entries (`GET`) are checked before anything is written and run after the writes; what they
//! find, a 404 included, is that entry's result.

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde_json::{json, Value};

use super::bundle::BundleWriter;
use super::response::{
    check_accept, check_content_type, instant, parse_etag, parse_json, raw_json_response,
    store_error, RequestPrefs, ReturnPreference,
};
use super::rest::{body_bytes, check_id, format_param, query_pairs};
use super::search::run_search;
use super::FhirApi;
use crate::fhir::{operation_outcome, FhirError, Issue};
use crate::store::{Action, Mutation, Outcome, ResourceVersion, WriteResult};

/// What one Bundle entry asks for.
enum EntryRequest {
    Write(Mutation),
    Read(ReadRequest),
}

enum ReadRequest {
    Read {
        resource_type: String,
        id: String,
    },
    VRead {
        resource_type: String,
        id: String,
        version: u64,
    },
    Search {
        resource_type: String,
        pairs: Vec<(String, String)>,
    },
}

/// The answer to one entry, rendered into the response Bundle.
enum EntryResponse {
    Written(Outcome),
    Resource {
        status: StatusCode,
        body: Bytes,
        version: Option<ResourceVersion>,
    },
    Failed(FhirError),
}

pub async fn batch_or_transaction(
    State(api): State<Arc<FhirApi>>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, FhirError> {
    let pairs = query_pairs(raw.as_deref())?;
    check_accept(&headers, format_param(&pairs))?;
    check_content_type(&headers)?;
    let prefs = RequestPrefs::from_headers(&headers);
    let mut bundle = parse_json(&body_bytes(body)?)?;
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(FhirError::bad_request(
            "invalid",
            "POST /fhir takes a Bundle of type batch or transaction",
        )
        .at("resourceType"));
    }
    let atomic = match bundle.get("type").and_then(Value::as_str) {
        Some("transaction") => true,
        Some("batch") => false,
        other => {
            return Err(FhirError::bad_request(
                "value",
                format!(
                    "Bundle.type must be batch or transaction, not {}",
                    other.unwrap_or("missing")
                ),
            )
            .at("Bundle.type"))
        }
    };
    let entries = match bundle.get_mut("entry").map(Value::take) {
        None => Vec::new(),
        Some(Value::Array(entries)) => entries,
        Some(_) => {
            return Err(
                FhirError::bad_request("structure", "Bundle.entry must be an array")
                    .at("Bundle.entry"),
            )
        }
    };
    // Kept to name the resource type in errors once the entries are consumed.
    let entry_types: Vec<Option<String>> = entries
        .iter()
        .map(|e| e["resource"]["resourceType"].as_str().map(str::to_owned))
        .collect();

    let mut responses: Vec<Option<EntryResponse>> = Vec::with_capacity(entries.len());
    let mut writes = Vec::new();
    let mut write_slots = Vec::new();
    let mut reads = Vec::new();
    for (index, entry) in entries.into_iter().enumerate() {
        match plan_entry(&api, index, entry).await {
            Ok(EntryRequest::Write(mutation)) => {
                write_slots.push(index);
                writes.push(mutation);
                responses.push(None);
            }
            Ok(EntryRequest::Read(read)) => {
                reads.push((index, read));
                responses.push(None);
            }
            Err(error) if atomic => return Err(error),
            Err(error) => responses.push(Some(EntryResponse::Failed(error))),
        }
    }

    if !writes.is_empty() {
        match api.store.write(writes, atomic).await.map_err(store_error)? {
            WriteResult::Committed(outcomes) => {
                for (slot, outcome) in write_slots.iter().zip(outcomes) {
                    responses[*slot] = Some(EntryResponse::Written(outcome));
                }
            }
            WriteResult::Aborted { index, error } => {
                let entry = write_slots.get(index).copied().unwrap_or(index);
                let resource_type = entry_types.get(entry).cloned().flatten();
                return Err(error.within(
                    &format!("Bundle.entry[{entry}].resource"),
                    resource_type.as_deref(),
                ));
            }
            WriteResult::Each(results) => {
                for (slot, result) in write_slots.iter().zip(results) {
                    responses[*slot] = Some(match result {
                        Ok(outcome) => EntryResponse::Written(outcome),
                        Err(e) => EntryResponse::Failed(e.at(format!("Bundle.entry[{slot}]"))),
                    });
                }
            }
        }
    }

    // Reads run after the writes, so a transaction's GETs see its own changes. They were
    // checked before the commit; what they find (or a 404) is reported per entry.
    for (index, read) in reads {
        let response = match execute_read(&api, read).await {
            Ok(r) => r,
            Err(e) => EntryResponse::Failed(e.at(format!("Bundle.entry[{index}]"))),
        };
        responses[index] = Some(response);
    }

    let bundle_type = if atomic {
        "transaction-response"
    } else {
        "batch-response"
    };
    let mut out = BundleWriter::new(bundle_type, None, &[]);
    for response in responses.into_iter().flatten() {
        render_entry(&api, &mut out, response, prefs.return_pref);
    }
    Ok(raw_json_response(StatusCode::OK, out.finish()))
}

fn render_entry(
    api: &FhirApi,
    out: &mut BundleWriter,
    response: EntryResponse,
    prefer: Option<ReturnPreference>,
) {
    let status_line =
        |s: StatusCode| format!("{} {}", s.as_u16(), s.canonical_reason().unwrap_or(""));
    match response {
        EntryResponse::Failed(error) => out.entry(
            &[],
            None,
            &[(
                "response",
                json!({"status": status_line(error.status), "outcome": error.to_operation_outcome()}),
            )],
        ),
        EntryResponse::Resource { status, body, version } => {
            let mut meta = json!({"status": status_line(status)});
            if let Some(rv) = version {
                meta["etag"] = json!(format!("W/\"{}\"", rv.version));
                meta["lastModified"] = json!(instant(rv.last_updated));
            }
            out.entry(&[], Some(&body), &[("response", meta)]);
        }
        EntryResponse::Written(outcome) => {
            let (status, rv) = match &outcome {
                Outcome::Created(rv) => (StatusCode::CREATED, Some(rv)),
                Outcome::Updated(rv) | Outcome::Existing(rv) => (StatusCode::OK, Some(rv)),
                Outcome::Deleted(rv) => (StatusCode::NO_CONTENT, rv.as_ref()),
            };
            let mut meta = json!({"status": status_line(status)});
            let mut before = Vec::new();
            let mut resource = None;
            if let Some(rv) = rv {
                meta["etag"] = json!(format!("W/\"{}\"", rv.version));
                meta["lastModified"] = json!(instant(rv.last_updated));
                if !rv.is_deleted() {
                    meta["location"] =
                        json!(format!("{}/{}/_history/{}", rv.resource_type, rv.id, rv.version));
                    before.push((
                        "fullUrl",
                        json!(format!("{}/{}/{}", api.base_url, rv.resource_type, rv.id)),
                    ));
                    if prefer == Some(ReturnPreference::Representation) {
                        resource = Some(&rv.body[..]);
                    }
                }
            }
            if prefer == Some(ReturnPreference::OperationOutcome) {
                meta["outcome"] = operation_outcome(&[Issue::information("informational", "ok")]);
            }
            out.entry(&before, resource, &[("response", meta)]);
        }
    }
}

/// Reads one entry's `request` (and `resource`) into a write or a read.
async fn plan_entry(
    api: &FhirApi,
    index: usize,
    mut entry: Value,
) -> Result<EntryRequest, FhirError> {
    let at = |field: &str| format!("Bundle.entry[{index}].{field}");
    let resource_body = entry.get_mut("resource").map(Value::take);
    let Some(request) = entry.get("request").filter(|r| r.is_object()) else {
        return Err(FhirError::bad_request("required", "entry has no request").at(at("request")));
    };
    let method = request
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let url = request.get("url").and_then(Value::as_str).ok_or_else(|| {
        FhirError::bad_request("required", "entry request has no url").at(at("request.url"))
    })?;
    let relative = url
        .strip_prefix(&api.base_url)
        .unwrap_or(url)
        .trim_start_matches('/');
    let (path, query) = match relative.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (relative, None),
    };
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let url_error =
        |why: &str| FhirError::bad_request("invalid", why.to_string()).at(at("request.url"));
    let Some(resource_type) = segments.first().map(|s| s.to_string()) else {
        return Err(url_error("the url names no resource type"));
    };
    api.check_type(&resource_type).map_err(|e| {
        FhirError::with_issues(StatusCode::BAD_REQUEST, e.issues).at(at("request.url"))
    })?;
    let full_url = entry
        .get("fullUrl")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let if_match = request
        .get("ifMatch")
        .and_then(Value::as_str)
        .map(|v| {
            http::HeaderValue::from_str(v)
                .map_err(|_| url_error("bad ifMatch"))
                .and_then(|h| parse_etag(&h).map_err(|e| e.at(at("request.ifMatch"))))
        })
        .transpose()?;
    if resource_type == "AuditEvent" {
        // The audit log is fhirgate's own, append-only, and read at `/fhir/AuditEvent`.
        return Err(FhirError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Issue::error(
                "not-supported",
                "AuditEvents are written by the server alone; read them at /fhir/AuditEvent",
            ),
        )
        .at(at("request.url")));
    }
    let needs_resource = matches!(method, "POST" | "PUT");
    let resource_body = match resource_body {
        Some(body) if needs_resource => Some(
            api.check_resource(body, &resource_type)
                .await
                .map_err(|e| e.within(&at("resource"), Some(&resource_type)))?,
        ),
        other => other,
    };
    let resource = |body: Option<Value>| -> Result<Value, FhirError> {
        body.ok_or_else(|| {
            FhirError::bad_request("required", format!("a {method} entry needs a resource"))
                .at(at("resource"))
        })
    };
    let condition = |query: Option<&str>| -> Result<Option<crate::fhir::SearchQuery>, FhirError> {
        match query {
            None | Some("") => Ok(None),
            Some(q) => {
                let pairs = query_pairs(Some(q)).map_err(|e| e.at(at("request")))?;
                api.search
                    .parse_condition(&resource_type, &pairs)
                    .map(Some)
                    .map_err(|e| e.at(at("request")))
            }
        }
    };

    let action = match (method, segments.len(), query) {
        ("POST", 1, None) => Action::Create {
            id: None,
            resource: resource(resource_body)?,
            if_none_exist: condition(
                request
                    .get("ifNoneExist")
                    .and_then(Value::as_str)
                    .map(|q| q.split_once('?').map_or(q, |(_, q)| q)),
            )?,
        },
        ("PUT", 2, None) => {
            let id = segments[1].to_string();
            check_id(&resource_type, &id).map_err(|e| e.at(at("request.url")))?;
            let mut resource = resource(resource_body)?;
            match resource.get("id").and_then(Value::as_str) {
                Some(body_id) if body_id != id => {
                    return Err(FhirError::bad_request(
                        "invalid",
                        format!("the resource id '{body_id}' does not match the url's id '{id}'"),
                    )
                    .at(at("resource.id")))
                }
                Some(_) => {}
                None => {
                    if let Some(object) = resource.as_object_mut() {
                        object.insert("id".into(), Value::String(id.clone()));
                    }
                }
            }
            Action::Update {
                id,
                resource,
                if_match,
            }
        }
        ("PUT", 1, Some(q)) => Action::ConditionalUpdate {
            query: condition(Some(q))?.ok_or_else(|| url_error("empty condition"))?,
            resource: resource(resource_body)?,
            if_match,
        },
        ("DELETE", 2, None) => {
            let id = segments[1].to_string();
            check_id(&resource_type, &id).map_err(|e| e.at(at("request.url")))?;
            Action::Delete { id, if_match }
        }
        // Reads are checked now, before anything is written, and run after the writes.
        ("GET" | "HEAD", 1, q) => {
            let pairs = query_pairs(q).map_err(|e| e.at(at("request.url")))?;
            api.search
                .parse_query(&resource_type, &pairs, false)
                .map_err(|e| e.at(at("request.url")))?;
            return Ok(EntryRequest::Read(ReadRequest::Search {
                resource_type,
                pairs,
            }));
        }
        ("GET" | "HEAD", 2, None) => {
            check_id(&resource_type, segments[1]).map_err(|e| e.at(at("request.url")))?;
            return Ok(EntryRequest::Read(ReadRequest::Read {
                id: segments[1].to_string(),
                resource_type,
            }));
        }
        ("GET" | "HEAD", 4, None) if segments[2] == "_history" => {
            check_id(&resource_type, segments[1]).map_err(|e| e.at(at("request.url")))?;
            let version = segments[3].parse().map_err(|_| url_error("bad version"))?;
            return Ok(EntryRequest::Read(ReadRequest::VRead {
                id: segments[1].to_string(),
                resource_type,
                version,
            }));
        }
        ("PATCH", _, _) => {
            return Err(FhirError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                Issue::error("not-supported", "PATCH is not supported"),
            )
            .at(at("request.method")))
        }
        ("DELETE", 1, Some(_)) => {
            return Err(FhirError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                Issue::error("not-supported", "conditional delete is not supported"),
            )
            .at(at("request.method")))
        }
        _ => {
            return Err(FhirError::bad_request(
                "not-supported",
                format!("cannot {method} '{url}' in a Bundle entry"),
            )
            .at(at("request")))
        }
    };
    Ok(EntryRequest::Write(Mutation {
        resource_type,
        action,
        full_url,
    }))
}

async fn execute_read(api: &FhirApi, read: ReadRequest) -> Result<EntryResponse, FhirError> {
    let found = match read {
        ReadRequest::Search {
            resource_type,
            pairs,
        } => {
            let body = run_search(api, &resource_type, &pairs, false).await?;
            return Ok(EntryResponse::Resource {
                status: StatusCode::OK,
                body,
                version: None,
            });
        }
        ReadRequest::Read { resource_type, id } => {
            check_id(&resource_type, &id)?;
            api.store
                .read(&resource_type, &id)
                .await
                .map_err(store_error)?
        }
        ReadRequest::VRead {
            resource_type,
            id,
            version,
        } => {
            check_id(&resource_type, &id)?;
            api.store
                .vread(&resource_type, &id, version)
                .await
                .map_err(store_error)?
        }
    };
    match found {
        None => Err(FhirError::not_found("no such resource")),
        Some(rv) if rv.is_deleted() => Err(FhirError::gone("the resource was deleted")),
        Some(rv) => Ok(EntryResponse::Resource {
            status: StatusCode::OK,
            body: rv.body.clone(),
            version: Some(rv),
        }),
    }
}
