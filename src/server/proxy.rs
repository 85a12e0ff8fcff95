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
    let mut response = match relay(&proxies, &name, &remote, &below, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    response
        .extensions_mut()
        .insert(crate::http::RouteName::Fixed("/fhir/{source}/{*path}"));
    response
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
    let (answer, body) = answer.into_parts();
    let mut headers = http::HeaderMap::new();
    for name in &FORWARDED_RESPONSE {
        if let Some(value) = answer.headers.get(name) {
            headers.insert(name.clone(), value.clone());
        }
    }
    if let Some(location) = answer
        .headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Ok(value) =
            HeaderValue::from_str(&rebase_url(location, remote.base_url(), &gateway_base))
        {
            headers.insert(header::LOCATION, value);
        }
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.contains("json"));
    let body = if is_json && !is_instance_read(below) {
        // Searches, histories and operations answer with Bundles whose links must stay on
        // the gateway: the source's base is replaced by the gateway's as the body streams.
        Body::from_stream(rebase_stream(
            body.into_data_stream(),
            remote.base_url(),
            &gateway_base,
        ))
    } else {
        // Relayed as it arrives (with its length, when the source gave one).
        body
    };
    let mut response = Response::new(body);
    *response.status_mut() = answer.status;
    *response.headers_mut() = headers;
    Ok(response)
}

fn upstream_error(name: &str, error: &RemoteError) -> FhirError {
    let (status, code) = match error {
        RemoteError::Refused(_) => (StatusCode::FORBIDDEN, "forbidden"),
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

/// `url` under `from` moved under `to`; anything else unchanged.
fn rebase_url(url: &str, from: &str, to: &str) -> String {
    match url.strip_prefix(from) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') || rest.starts_with('?') => {
            format!("{to}{rest}")
        }
        _ => url.to_owned(),
    }
}

/// Rewrites every JSON string that starts with the source's base URL (`"{from}/…`,
/// `"{from}?…`, or `"{from}"`, also with `\/`-escaped slashes as some servers write them) to
/// start with the gateway's, chunk by chunk: `Bundle.link`, `entry.fullUrl`, and absolute
/// references to the source all point at the gateway. Nothing is held beyond a pattern's
/// length.
fn rebase_stream<S>(
    upstream: S,
    from: &str,
    to: &str,
) -> impl futures_util::Stream<Item = Result<Bytes, axum::Error>> + Send + 'static
where
    S: futures_util::Stream<Item = Result<Bytes, axum::Error>> + Send + Unpin + 'static,
{
    let patterns = vec![
        (
            format!("\"{from}").into_bytes(),
            format!("\"{to}").into_bytes(),
        ),
        (
            format!("\"{}", from.replace('/', "\\/")).into_bytes(),
            format!("\"{}", to.replace('/', "\\/")).into_bytes(),
        ),
    ];
    let keep = patterns.iter().map(|(p, _)| p.len()).max().unwrap_or(0) + 1;
    futures_util::stream::unfold(
        (upstream, Vec::<u8>::new(), false, patterns),
        move |(mut upstream, mut carry, mut ended, patterns)| async move {
            loop {
                if ended {
                    if carry.is_empty() {
                        return None;
                    }
                    let (out, _) = rebase(&carry, carry.len(), &patterns);
                    return Some((Ok(Bytes::from(out)), (upstream, Vec::new(), true, patterns)));
                }
                match upstream.next().await {
                    Some(Ok(chunk)) => {
                        carry.extend_from_slice(&chunk);
                        if carry.len() <= keep {
                            continue;
                        }
                        let (out, used) = rebase(&carry, carry.len() - keep, &patterns);
                        carry.drain(..used);
                        return Some((Ok(Bytes::from(out)), (upstream, carry, false, patterns)));
                    }
                    Some(Err(e)) => return Some((Err(e), (upstream, carry, true, patterns))),
                    None => ended = true,
                }
            }
        },
    )
}

/// Rewrites pattern occurrences starting before `limit` in `buf`; returns the output and how
/// much of `buf` it covers. A pattern counts only when followed by `/`, `?`, `"` or `\`, so
/// `https://ehr/fhir` does not match inside `https://ehr/fhir2`.
fn rebase(buf: &[u8], limit: usize, patterns: &[(Vec<u8>, Vec<u8>)]) -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(buf.len());
    let mut i = 0;
    while i < limit {
        let Some(offset) = buf[i..limit].iter().position(|&b| b == b'"') else {
            out.extend_from_slice(&buf[i..limit]);
            i = limit;
            break;
        };
        let at = i + offset;
        out.extend_from_slice(&buf[i..at]);
        let found = patterns.iter().find(|(pattern, _)| {
            buf[at..].starts_with(pattern)
                && matches!(
                    buf.get(at + pattern.len()),
                    Some(b'/' | b'?' | b'"' | b'\\')
                )
        });
        match found {
            Some((pattern, replacement)) => {
                out.extend_from_slice(replacement);
                i = at + pattern.len();
            }
            None => {
                out.push(b'"');
                i = at + 1;
            }
        }
    }
    (out, i)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn rebased(chunks: Vec<&str>, from: &str, to: &str) -> String {
        let upstream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<Bytes, axum::Error>(Bytes::from(c.to_owned())))
                .collect::<Vec<_>>(),
        );
        let out: Vec<Result<Bytes, axum::Error>> =
            rebase_stream(upstream, from, to).collect().await;
        let bytes: Vec<u8> = out
            .into_iter()
            .flat_map(|c| c.expect("chunk").to_vec())
            .collect();
        String::from_utf8(bytes).expect("utf-8")
    }

    #[tokio::test]
    async fn links_and_full_urls_move_to_the_gateway_across_chunks() {
        let body = r#"{"resourceType":"Bundle","link":[{"relation":"next","url":"https://ehr.test/fhir/r4?_getpages=abc"},{"relation":"other","url":"https://elsewhere.test/fhir/r4/Patient"},{"relation":"x","url":"https://ehr.test/fhir/r44/Patient"}],"entry":[{"fullUrl":"https://ehr.test/fhir/r4/Patient/1","resource":{"resourceType":"Patient","id":"1","text":{"div":"see https://ehr.test/fhir/r4/Patient/1"}}}]}"#;
        let want = r#"{"resourceType":"Bundle","link":[{"relation":"next","url":"http://gw/fhir/athena?_getpages=abc"},{"relation":"other","url":"https://elsewhere.test/fhir/r4/Patient"},{"relation":"x","url":"https://ehr.test/fhir/r44/Patient"}],"entry":[{"fullUrl":"http://gw/fhir/athena/Patient/1","resource":{"resourceType":"Patient","id":"1","text":{"div":"see https://ehr.test/fhir/r4/Patient/1"}}}]}"#;
        // Whole, and cut into pieces of every size (so a URL straddles chunk boundaries).
        assert_eq!(
            rebased(
                vec![body],
                "https://ehr.test/fhir/r4",
                "http://gw/fhir/athena"
            )
            .await,
            want
        );
        for size in [1, 2, 7, 25, 64] {
            let chunks: Vec<&str> = body
                .as_bytes()
                .chunks(size)
                .map(|c| std::str::from_utf8(c).expect("ascii"))
                .collect();
            assert_eq!(
                rebased(chunks, "https://ehr.test/fhir/r4", "http://gw/fhir/athena").await,
                want,
                "chunks of {size}"
            );
        }
        // Slashes escaped the way PHP writes JSON (OpenEMR).
        let escaped = r#"{"fullUrl":"https:\/\/emr.test\/apis\/default\/fhir\/Patient\/1"}"#;
        assert_eq!(
            rebased(
                vec![escaped],
                "https://emr.test/apis/default/fhir",
                "http://gw/fhir/openemr"
            )
            .await,
            r#"{"fullUrl":"http:\/\/gw\/fhir\/openemr\/Patient\/1"}"#
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
