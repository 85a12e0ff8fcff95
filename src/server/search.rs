//! Search and history: `GET /fhir/{type}?…`, `POST /fhir/{type}/_search`, and `_history`.

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde_json::{json, Value};

use super::bundle::BundleWriter;
use super::response::{check_accept, instant, raw_json_response, store_error, RequestPrefs};
use super::rest::{body_bytes, check_id, format_param, query_pairs};
use super::FhirApi;
use crate::fhir::date::parse_range;
use crate::fhir::{operation_outcome, FhirError, Issue};
use crate::store::{ChangeKind, Page};

pub async fn search_type(
    State(api): State<Arc<FhirApi>>,
    Path(resource_type): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, FhirError> {
    let pairs = query_pairs(raw.as_deref())?;
    check_accept(&headers, format_param(&pairs))?;
    api.check_type(&resource_type)?;
    let strict = RequestPrefs::from_headers(&headers).strict;
    let bundle = run_search(&api, &resource_type, &pairs, strict).await?;
    Ok(raw_json_response(StatusCode::OK, bundle))
}

/// `POST /fhir/{type}/_search` with form-encoded parameters (and possibly a query string).
pub async fn search_post(
    State(api): State<Arc<FhirApi>>,
    Path(resource_type): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, FhirError> {
    let mut pairs = query_pairs(raw.as_deref())?;
    let body = body_bytes(body)?;
    pairs.extend(query_pairs(std::str::from_utf8(&body).ok())?);
    check_accept(&headers, format_param(&pairs))?;
    api.check_type(&resource_type)?;
    let strict = RequestPrefs::from_headers(&headers).strict;
    let bundle = run_search(&api, &resource_type, &pairs, strict).await?;
    Ok(raw_json_response(StatusCode::OK, bundle))
}

/// Runs a search and renders the `searchset` Bundle (also used by batch GET entries).
pub(super) async fn run_search(
    api: &FhirApi,
    resource_type: &str,
    pairs: &[(String, String)],
    strict: bool,
) -> Result<Bytes, FhirError> {
    let query = api.search.parse_query(resource_type, pairs, strict)?;
    let count = if query.summary_count {
        0
    } else {
        query
            .count
            .unwrap_or(api.config.default_page_size)
            .min(api.config.max_page_size)
    };
    let page = Page {
        offset: query.offset,
        count,
    };
    let result = api
        .store
        .search(resource_type, &query, page)
        .await
        .map_err(store_error)?;

    let filters = query.filter_pairs(pairs);
    let link = |offset: usize| {
        let mut link_pairs: Vec<(String, String)> = filters
            .iter()
            .filter(|(k, _)| k != "_count")
            .cloned()
            .collect();
        link_pairs.push(("_count".into(), count.to_string()));
        if offset > 0 {
            link_pairs.push(("_offset".into(), offset.to_string()));
        }
        let qs = serde_urlencoded::to_string(&link_pairs).unwrap_or_default();
        format!("{}/{resource_type}?{qs}", api.base_url)
    };
    let mut links = vec![("self", link(query.offset))];
    if count > 0 && query.offset.saturating_add(count) < result.total {
        links.push(("next", link(query.offset.saturating_add(count))));
    }
    if count > 0 && query.offset > 0 {
        links.push(("previous", link(query.offset.saturating_sub(count))));
    }

    let mut bundle = BundleWriter::new("searchset", Some(result.total), &links);
    for rv in &result.entries {
        bundle.entry(
            &[(
                "fullUrl",
                Value::String(format!("{}/{}/{}", api.base_url, rv.resource_type, rv.id)),
            )],
            Some(&rv.body),
            &[("search", json!({"mode": "match"}))],
        );
    }
    if !query.ignored.is_empty() {
        let outcome = operation_outcome(&[Issue::warning(
            "not-supported",
            format!(
                "ignored unknown or unsupported search parameters: {}",
                query.ignored.join(", ")
            ),
        )]);
        bundle.entry(
            &[],
            Some(&serde_json::to_vec(&outcome).unwrap_or_default()),
            &[("search", json!({"mode": "outcome"}))],
        );
    }
    Ok(bundle.finish())
}

pub async fn type_history(
    State(api): State<Arc<FhirApi>>,
    Path(resource_type): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, FhirError> {
    history(&api, &resource_type, None, raw.as_deref(), &headers).await
}

pub async fn instance_history(
    State(api): State<Arc<FhirApi>>,
    Path((resource_type, id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, FhirError> {
    check_id(&resource_type, &id)?;
    history(&api, &resource_type, Some(&id), raw.as_deref(), &headers).await
}

async fn history(
    api: &FhirApi,
    resource_type: &str,
    id: Option<&str>,
    raw: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, FhirError> {
    let pairs = query_pairs(raw)?;
    check_accept(headers, format_param(&pairs))?;
    api.check_type(resource_type)?;
    let mut since = None;
    let mut count = api.config.default_page_size;
    let mut offset = 0;
    for (name, value) in &pairs {
        let bad = |why: &str| FhirError::bad_request("invalid", format!("{name}: {why}"));
        match name.as_str() {
            "_since" => {
                since = Some(
                    parse_range(&value.replace(' ', "+"))
                        .ok_or_else(|| bad("expected an instant"))?
                        .start,
                )
            }
            "_count" => count = value.parse().map_err(|_| bad("expected a number"))?,
            "_offset" => offset = value.parse().map_err(|_| bad("expected a number"))?,
            _ => {}
        }
    }
    let count = count.min(api.config.max_page_size);
    if let Some(id) = id {
        // History of an unknown resource is a 404, not an empty Bundle.
        if api
            .store
            .read(resource_type, id)
            .await
            .map_err(store_error)?
            .is_none()
        {
            return Err(FhirError::not_found(format!(
                "{resource_type}/{id} is not known"
            )));
        }
    }
    let result = api
        .store
        .history(resource_type, id, since, Page { offset, count })
        .await
        .map_err(store_error)?;
    let path = match id {
        Some(id) => format!("{}/{resource_type}/{id}/_history", api.base_url),
        None => format!("{}/{resource_type}/_history", api.base_url),
    };
    let page_link = |offset: usize| {
        let mut qs = format!("_count={count}");
        if offset > 0 {
            qs.push_str(&format!("&_offset={offset}"));
        }
        if let Some(since) = since {
            qs.push_str(&format!("&_since={}", instant(since)));
        }
        format!("{path}?{qs}")
    };
    let mut links = vec![("self", page_link(offset))];
    if count > 0 && offset.saturating_add(count) < result.total {
        links.push(("next", page_link(offset.saturating_add(count))));
    }
    let mut bundle = BundleWriter::new("history", Some(result.total), &links);
    for rv in &result.entries {
        let full_url = format!("{}/{}/{}", api.base_url, rv.resource_type, rv.id);
        let (method, url, status) = match rv.change {
            ChangeKind::Create => ("POST", rv.resource_type.clone(), "201 Created"),
            ChangeKind::CreateAtId => (
                "PUT",
                format!("{}/{}", rv.resource_type, rv.id),
                "201 Created",
            ),
            ChangeKind::Update => ("PUT", format!("{}/{}", rv.resource_type, rv.id), "200 OK"),
            ChangeKind::Delete => (
                "DELETE",
                format!("{}/{}", rv.resource_type, rv.id),
                "204 No Content",
            ),
        };
        bundle.entry(
            &[("fullUrl", Value::String(full_url))],
            (!rv.is_deleted()).then_some(&rv.body[..]),
            &[
                ("request", json!({"method": method, "url": url})),
                (
                    "response",
                    json!({
                        "status": status,
                        "etag": format!("W/\"{}\"", rv.version),
                        "lastModified": instant(rv.last_updated),
                    }),
                ),
            ],
        );
    }
    Ok(raw_json_response(StatusCode::OK, bundle.finish()))
}
