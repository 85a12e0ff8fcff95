//! Instance-level interactions: read, vread, create, update (plain and conditional), delete.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use bytes::Bytes;
use http::{header, HeaderMap, StatusCode};
use serde_json::Value;

use super::response::{
    check_accept, check_content_type, if_match, parse_etag, parse_json, raw_json_response,
    store_error, version_headers, write_response, RequestPrefs,
};
use super::FhirApi;
use crate::fhir::{is_valid_id, FhirError, Issue};
use crate::store::{Action, Mutation, Outcome, ResourceVersion, WriteResult};

/// Decoded `name=value` pairs of a query string.
pub(super) fn query_pairs(raw: Option<&str>) -> Result<Vec<(String, String)>, FhirError> {
    match raw {
        None | Some("") => Ok(Vec::new()),
        Some(q) => serde_urlencoded::from_str(q)
            .map_err(|e| FhirError::bad_request("invalid", format!("malformed query string: {e}"))),
    }
}

pub(super) fn format_param(pairs: &[(String, String)]) -> Option<&str> {
    pairs
        .iter()
        .find(|(k, _)| k == "_format")
        .map(|(_, v)| v.as_str())
}

pub(super) fn check_id(resource_type: &str, id: &str) -> Result<(), FhirError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(FhirError::bad_request(
            "value",
            "invalid id: 1 to 64 characters of A-Z, a-z, 0-9, '-' and '.'",
        )
        .at(format!("{resource_type}.id")))
    }
}

/// The request body as bytes; a body over the configured limit is a 413 OperationOutcome.
pub(super) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, FhirError> {
    body.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            FhirError::new(
                status,
                Issue::error(
                    "too-long",
                    "the request body is larger than this server accepts",
                ),
            )
        } else {
            FhirError::new(status, Issue::error("invalid", rejection.body_text()))
        }
    })
}

fn location(api: &FhirApi, rv: &ResourceVersion) -> String {
    format!(
        "{}/{}/{}/_history/{}",
        api.base_url, rv.resource_type, rv.id, rv.version
    )
}

fn stored(rv: ResourceVersion) -> Result<Response, FhirError> {
    if rv.is_deleted() {
        let mut response = FhirError::gone(format!("{}/{} was deleted", rv.resource_type, rv.id))
            .into_response_with_version(&rv);
        response.headers_mut().remove(header::LOCATION);
        return Ok(response);
    }
    let mut response = raw_json_response(StatusCode::OK, rv.body.clone());
    version_headers(&mut response, &rv, None);
    Ok(response)
}

trait GoneResponse {
    fn into_response_with_version(self, rv: &ResourceVersion) -> Response;
}

impl GoneResponse for FhirError {
    fn into_response_with_version(self, rv: &ResourceVersion) -> Response {
        let mut response = axum::response::IntoResponse::into_response(self);
        version_headers(&mut response, rv, None);
        response
    }
}

pub async fn read(
    State(api): State<Arc<FhirApi>>,
    Path((resource_type, id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, FhirError> {
    let pairs = query_pairs(raw.as_deref())?;
    check_accept(&headers, format_param(&pairs))?;
    api.check_type(&resource_type)?;
    check_id(&resource_type, &id)?;
    let rv = api
        .store
        .read(&resource_type, &id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| FhirError::not_found(format!("{resource_type}/{id} is not known")))?;
    if let Some(tag) = headers.get(header::IF_NONE_MATCH) {
        if !rv.is_deleted() && parse_etag(tag).ok() == Some(rv.version) {
            let mut response = Response::new(Body::empty());
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            version_headers(&mut response, &rv, None);
            return Ok(response);
        }
    }
    stored(rv)
}

pub async fn vread(
    State(api): State<Arc<FhirApi>>,
    Path((resource_type, id, vid)): Path<(String, String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, FhirError> {
    let pairs = query_pairs(raw.as_deref())?;
    check_accept(&headers, format_param(&pairs))?;
    api.check_type(&resource_type)?;
    check_id(&resource_type, &id)?;
    let version: u64 = vid
        .parse()
        .map_err(|_| FhirError::bad_request("value", format!("'{vid}' is not a version number")))?;
    let rv = api
        .store
        .vread(&resource_type, &id, version)
        .await
        .map_err(store_error)?
        .ok_or_else(|| {
            FhirError::not_found(format!("{resource_type}/{id} has no version {version}"))
        })?;
    stored(rv)
}

/// Parses and checks the body of a create or update.
async fn resource_body(
    api: &FhirApi,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    resource_type: &str,
) -> Result<Value, FhirError> {
    check_content_type(headers)?;
    let body = body_bytes(body)?;
    let resource = parse_json(&body)?;
    api.check_resource(resource, resource_type).await
}

async fn write_one(api: &FhirApi, mutation: Mutation) -> Result<Outcome, FhirError> {
    match api
        .store
        .write(vec![mutation], true)
        .await
        .map_err(store_error)?
    {
        WriteResult::Committed(mut outcomes) => outcomes
            .pop()
            .ok_or_else(|| FhirError::internal("the store returned no outcome")),
        WriteResult::Aborted { error, .. } => Err(error),
        WriteResult::Each(_) => Err(FhirError::internal("unexpected store result")),
    }
}

fn answer(api: &FhirApi, outcome: Outcome, prefs: &RequestPrefs) -> Result<Response, FhirError> {
    Ok(match outcome {
        Outcome::Created(rv) => {
            let loc = location(api, &rv);
            write_response(
                StatusCode::CREATED,
                &rv,
                Some(&loc),
                prefs.return_pref,
                &format!("created {}/{}", rv.resource_type, rv.id),
            )
        }
        Outcome::Updated(rv) => {
            let loc = location(api, &rv);
            write_response(
                StatusCode::OK,
                &rv,
                Some(&loc),
                prefs.return_pref,
                &format!("updated {}/{}", rv.resource_type, rv.id),
            )
        }
        Outcome::Existing(rv) => {
            let loc = location(api, &rv);
            write_response(
                StatusCode::OK,
                &rv,
                Some(&loc),
                prefs.return_pref,
                "a matching resource already exists; nothing was created",
            )
        }
        Outcome::Deleted(_) => {
            return Err(FhirError::internal("unexpected delete outcome"));
        }
    })
}

pub async fn create(
    State(api): State<Arc<FhirApi>>,
    Path(resource_type): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, FhirError> {
    let pairs = query_pairs(raw.as_deref())?;
    check_accept(&headers, format_param(&pairs))?;
    api.check_type(&resource_type)?;
    let prefs = RequestPrefs::from_headers(&headers);
    let resource = resource_body(&api, &headers, body, &resource_type).await?;
    let if_none_exist = match headers.get("if-none-exist") {
        None => None,
        Some(value) => {
            let text = value.to_str().unwrap_or_default();
            let text = text.split_once('?').map_or(text, |(_, q)| q);
            let condition = query_pairs(Some(text))?;
            Some(api.search.parse_condition(&resource_type, &condition)?)
        }
    };
    let outcome = write_one(
        &api,
        Mutation {
            resource_type,
            action: Action::Create {
                id: None,
                resource,
                if_none_exist,
            },
            full_url: None,
        },
    )
    .await?;
    answer(&api, outcome, &prefs)
}

pub async fn update(
    State(api): State<Arc<FhirApi>>,
    Path((resource_type, id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, FhirError> {
    let pairs = query_pairs(raw.as_deref())?;
    check_accept(&headers, format_param(&pairs))?;
    api.check_type(&resource_type)?;
    check_id(&resource_type, &id)?;
    let prefs = RequestPrefs::from_headers(&headers);
    let expected = if_match(&headers)?;
    let resource = resource_body(&api, &headers, body, &resource_type).await?;
    match resource.get("id").and_then(Value::as_str) {
        Some(body_id) if body_id == id => {}
        Some(body_id) => {
            return Err(FhirError::bad_request(
                "invalid",
                format!("the body's id '{body_id}' does not match the URL's id '{id}'"),
            )
            .at(format!("{resource_type}.id")))
        }
        None => {
            return Err(FhirError::bad_request(
                "required",
                "an update must carry the resource id in the body",
            )
            .at(format!("{resource_type}.id")))
        }
    }
    let outcome = write_one(
        &api,
        Mutation {
            resource_type,
            action: Action::Update {
                id,
                resource,
                if_match: expected,
            },
            full_url: None,
        },
    )
    .await?;
    answer(&api, outcome, &prefs)
}

pub async fn conditional_update(
    State(api): State<Arc<FhirApi>>,
    Path(resource_type): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, FhirError> {
    let pairs = query_pairs(raw.as_deref())?;
    check_accept(&headers, format_param(&pairs))?;
    api.check_type(&resource_type)?;
    let prefs = RequestPrefs::from_headers(&headers);
    let condition: Vec<(String, String)> = pairs
        .into_iter()
        .filter(|(k, _)| k != "_format" && k != "_pretty")
        .collect();
    let query = api.search.parse_condition(&resource_type, &condition)?;
    let expected = if_match(&headers)?;
    let resource = resource_body(&api, &headers, body, &resource_type).await?;
    if let Some(id) = resource.get("id").and_then(Value::as_str) {
        check_id(&resource_type, id)?;
    }
    let outcome = write_one(
        &api,
        Mutation {
            resource_type,
            action: Action::ConditionalUpdate {
                query,
                resource,
                if_match: expected,
            },
            full_url: None,
        },
    )
    .await?;
    answer(&api, outcome, &prefs)
}

pub async fn delete(
    State(api): State<Arc<FhirApi>>,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, FhirError> {
    api.check_type(&resource_type)?;
    check_id(&resource_type, &id)?;
    let prefs = RequestPrefs::from_headers(&headers);
    let expected = if_match(&headers)?;
    let outcome = write_one(
        &api,
        Mutation {
            resource_type: resource_type.clone(),
            action: Action::Delete {
                id: id.clone(),
                if_match: expected,
            },
            full_url: None,
        },
    )
    .await?;
    let Outcome::Deleted(tombstone) = outcome else {
        return Err(FhirError::internal("unexpected outcome of delete"));
    };
    let message = match &tombstone {
        Some(_) => format!("deleted {resource_type}/{id}"),
        None => format!("{resource_type}/{id} did not exist or was already deleted"),
    };
    let mut response = match prefs.return_pref {
        Some(super::response::ReturnPreference::OperationOutcome)
        | Some(super::response::ReturnPreference::Representation) => {
            super::response::json_response(
                StatusCode::OK,
                &crate::fhir::operation_outcome(&[Issue::information("informational", message)]),
            )
        }
        _ => {
            let mut r = Response::new(Body::empty());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
    };
    if let Some(rv) = &tombstone {
        version_headers(&mut response, rv, None);
    }
    Ok(response)
}
