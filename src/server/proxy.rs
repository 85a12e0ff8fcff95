//! `/fhir/{source}/…`: a configured EHR or FHIR server read through the gateway. The caller
//! uses one endpoint and one credential; the gateway adds the source's token (and
//! athenahealth's `ah-practice`), relays the answer, and rewrites `Bundle.link` and
//! `entry.fullUrl` (and `Location`) to its own base so paging stays on the gateway. Writes pass
//! only to sources configured with `allow_writes`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderName, HeaderValue, Method, StatusCode};
use serde_json::Value;

use crate::fhir::{FhirError, Issue};
use crate::remote::{RemoteError, RemoteFhir};

/// The sources reachable under `/fhir/{name}/`.
pub struct Proxies {
    pub sources: BTreeMap<String, Arc<RemoteFhir>>,
    /// `{public base}/fhir`.
    pub base_url: String,
    pub max_body_bytes: usize,
}

/// Request headers relayed to the source.
const FORWARDED_REQUEST: [HeaderName; 6] = [
    header::CONTENT_TYPE,
    header::IF_NONE_MATCH,
    header::IF_MATCH,
    header::IF_MODIFIED_SINCE,
    HeaderName::from_static("if-none-exist"),
    HeaderName::from_static("prefer"),
];

/// Answer headers relayed back (`Location` is rewritten separately).
const FORWARDED_RESPONSE: [HeaderName; 5] = [
    header::CONTENT_TYPE,
    header::ETAG,
    header::LAST_MODIFIED,
    header::RETRY_AFTER,
    header::CACHE_CONTROL,
];

/// Middleware on the FHIR routes: requests under a source's name go to that source; the rest
/// go on to the embedded store's handlers.
pub async fn route_to_source(
    State(proxies): State<Arc<Proxies>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let Some(rest) = path.strip_prefix("/fhir/") else {
        return next.run(request).await;
    };
    let (name, below) = rest.split_once('/').unwrap_or((rest, ""));
    let Some(remote) = proxies.sources.get(name).cloned() else {
        return next.run(request).await;
    };
    let below = below.to_owned();
    let name = name.to_owned();
    match relay(&proxies, &name, &remote, &below, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

fn is_read(method: &Method, below: &str) -> bool {
    match *method {
        Method::GET | Method::HEAD => true,
        // A search by POST reads.
        Method::POST => below.ends_with("/_search"),
        _ => false,
    }
}

async fn relay(
    proxies: &Proxies,
    name: &str,
    remote: &RemoteFhir,
    below: &str,
    request: Request,
) -> Result<Response, FhirError> {
    let method = request.method().clone();
    if let Err(e) = crate::remote::check_relative_path(below) {
        return Err(FhirError::bad_request(
            "invalid",
            format!("source {name}: {e}"),
        ));
    }
    if !is_read(&method, below) && !remote.allows_writes() {
        return Err(FhirError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Issue::error(
                "not-supported",
                format!("source {name} is read-only through the gateway"),
            ),
        ));
    }
    let mut extra = Vec::new();
    for name in &FORWARDED_REQUEST {
        if let Some(value) = request.headers().get(name) {
            extra.push((name.clone(), value.clone()));
        }
    }
    let path_and_query = match request.uri().query() {
        Some(query) => format!("{below}?{query}"),
        None => below.to_owned(),
    };
    let body = if matches!(method, Method::GET | Method::HEAD) {
        None
    } else {
        let bytes = axum::body::to_bytes(request.into_body(), proxies.max_body_bytes)
            .await
            .map_err(|_| {
                FhirError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    Issue::error("too-costly", "the request body is too large"),
                )
            })?;
        Some(bytes)
    };
    let answer = remote
        .forward(method, &path_and_query, body, &extra)
        .await
        .map_err(|e| upstream_error(name, &e))?;
    let gateway_base = format!("{}/{name}", proxies.base_url);
    let upstream_base = remote.base_url().to_owned();
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = http::HeaderMap::new();
    for name in &FORWARDED_RESPONSE {
        if let Some(value) = answer.headers().get(name.as_str()) {
            if let Ok(value) = HeaderValue::from_bytes(value.as_bytes()) {
                headers.insert(name.clone(), value);
            }
        }
    }
    if let Some(location) = answer
        .headers()
        .get(header::LOCATION.as_str())
        .and_then(|v| v.to_str().ok())
    {
        if let Ok(value) = HeaderValue::from_str(&rebase(location, &upstream_base, &gateway_base)) {
            headers.insert(header::LOCATION, value);
        }
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.contains("json"));
    let body = if is_json && !is_instance_read(below) {
        // Searches, histories and operations answer with Bundles whose links must stay on
        // the gateway; they are read (up to the body limit) and rewritten. A larger answer
        // streams through as it is.
        let mut stream = answer.bytes_stream();
        let mut head: Vec<Bytes> = Vec::new();
        let mut size = 0usize;
        let mut complete = true;
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| upstream_error(name, &RemoteError::Transport(e.to_string())))?;
            size += chunk.len();
            head.push(chunk);
            if size > proxies.max_body_bytes {
                complete = false;
                break;
            }
        }
        if complete {
            let bytes: Vec<u8> = head.concat();
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(mut bundle) if is_bundle(&bundle) => {
                    rewrite_bundle(&mut bundle, &upstream_base, &gateway_base);
                    Body::from(serde_json::to_vec(&bundle).unwrap_or_default())
                }
                _ => Body::from(bytes),
            }
        } else {
            let head =
                futures_util::stream::iter(head.into_iter().map(Ok::<Bytes, reqwest::Error>));
            Body::from_stream(head.chain(stream))
        }
    } else {
        Body::from_stream(answer.bytes_stream())
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

fn upstream_error(name: &str, error: &RemoteError) -> FhirError {
    let (status, code) = match error {
        RemoteError::Auth { .. } => (StatusCode::BAD_GATEWAY, "security"),
        RemoteError::Transport(_) => (StatusCode::BAD_GATEWAY, "transient"),
        _ => (StatusCode::BAD_GATEWAY, "exception"),
    };
    FhirError::new(
        status,
        Issue::error(code, format!("source {name}: {error}")),
    )
}

/// `Type/id` or `Type/id/_history/n`: one resource, relayed as it streams.
fn is_instance_read(below: &str) -> bool {
    let segments: Vec<&str> = below.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        [_, id] => !id.starts_with('$') && !id.starts_with('_'),
        [_, id, "_history", version] => !id.starts_with('$') && !version.is_empty(),
        _ => false,
    }
}

fn is_bundle(value: &Value) -> bool {
    value.get("resourceType").and_then(Value::as_str) == Some("Bundle")
}

/// `url` under `from` moved under `to`; anything else unchanged.
fn rebase(url: &str, from: &str, to: &str) -> String {
    match url.strip_prefix(from) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') || rest.starts_with('?') => {
            format!("{to}{rest}")
        }
        _ => url.to_owned(),
    }
}

fn rewrite_bundle(bundle: &mut Value, from: &str, to: &str) {
    if let Some(links) = bundle.get_mut("link").and_then(Value::as_array_mut) {
        for link in links {
            if let Some(Value::String(url)) = link.get_mut("url") {
                *url = rebase(url, from, to);
            }
        }
    }
    if let Some(entries) = bundle.get_mut("entry").and_then(Value::as_array_mut) {
        for entry in entries {
            if let Some(Value::String(url)) = entry.get_mut("fullUrl") {
                *url = rebase(url, from, to);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn links_and_full_urls_move_to_the_gateway() {
        let mut bundle = json!({
            "resourceType": "Bundle",
            "link": [
                {"relation": "self", "url": "https://ehr.test/fhir/r4/Patient?name=x"},
                {"relation": "next", "url": "https://ehr.test/fhir/r4?_getpages=abc"},
                {"relation": "other", "url": "https://elsewhere.test/fhir/Patient"}
            ],
            "entry": [{"fullUrl": "https://ehr.test/fhir/r4/Patient/1"}]
        });
        rewrite_bundle(
            &mut bundle,
            "https://ehr.test/fhir/r4",
            "http://gw/fhir/athena",
        );
        assert_eq!(
            bundle["link"][0]["url"],
            "http://gw/fhir/athena/Patient?name=x"
        );
        assert_eq!(
            bundle["link"][1]["url"],
            "http://gw/fhir/athena?_getpages=abc"
        );
        assert_eq!(
            bundle["link"][2]["url"],
            "https://elsewhere.test/fhir/Patient"
        );
        assert_eq!(
            bundle["entry"][0]["fullUrl"],
            "http://gw/fhir/athena/Patient/1"
        );
        // A longer path that merely starts with the same characters is not under the base.
        assert_eq!(
            rebase(
                "https://ehr.test/fhir/r44/X",
                "https://ehr.test/fhir/r4",
                "gw"
            ),
            "https://ehr.test/fhir/r44/X"
        );
    }

    #[test]
    fn instance_reads_stream_and_the_rest_are_rewritten() {
        assert!(is_instance_read("Patient/1"));
        assert!(is_instance_read("Patient/1/_history/2"));
        assert!(!is_instance_read("Patient"));
        assert!(!is_instance_read("Patient/1/$everything"));
        assert!(!is_instance_read("Patient/_history"));
        assert!(!is_instance_read("Patient/$match"));
    }
}
