//! Turning results into FHIR HTTP responses, and reading the FHIR request headers.
//!
//! The one place a [`FhirError`] becomes an HTTP answer (an `OperationOutcome` body with the
//! error's status), and where `Prefer`, `If-Match`, content types and `_format` are understood.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::StatusCode;
use serde_json::Value;

use crate::fhir::date::{format_http_date, format_instant};
use crate::fhir::{operation_outcome, FhirError, Issue};
use crate::store::{ResourceVersion, StoreError};

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

impl IntoResponse for FhirError {
    fn into_response(self) -> Response {
        json_response(self.status, &self.to_operation_outcome())
    }
}

/// Storage failures are the server's fault: 503 while closed, else 500, without internals.
pub fn store_error(e: StoreError) -> FhirError {
    match e {
        StoreError::Closed => FhirError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Issue::error("transient", "the store is shutting down; retry"),
        ),
        StoreError::Expired => FhirError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Issue::error(
                "transient",
                "the server was too busy to apply the write in time; nothing was stored, retry",
            ),
        ),
        other => {
            tracing::error!(error = %other, "store failure");
            FhirError::internal("the server could not access its store")
        }
    }
}

pub fn json_response(status: StatusCode, value: &Value) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    raw_json_response(status, body.into())
}

pub fn raw_json_response(status: StatusCode, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

/// `Prefer: return=…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnPreference {
    Minimal,
    Representation,
    OperationOutcome,
}

/// What the request's headers ask for.
#[derive(Debug, Clone)]
pub struct RequestPrefs {
    pub return_pref: Option<ReturnPreference>,
    pub strict: bool,
}

impl RequestPrefs {
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut prefs = Self {
            return_pref: None,
            strict: false,
        };
        for value in headers.get_all("prefer") {
            let Ok(value) = value.to_str() else { continue };
            for token in value.split([',', ';']).map(str::trim) {
                match token {
                    "return=minimal" => prefs.return_pref = Some(ReturnPreference::Minimal),
                    "return=representation" => {
                        prefs.return_pref = Some(ReturnPreference::Representation)
                    }
                    "return=OperationOutcome" => {
                        prefs.return_pref = Some(ReturnPreference::OperationOutcome)
                    }
                    "handling=strict" => prefs.strict = true,
                    "handling=lenient" => prefs.strict = false,
                    _ => {}
                }
            }
        }
        prefs
    }
}

/// Parses an `If-Match` / ETag value (`W/"3"`, `"3"`) into a version number.
pub fn parse_etag(value: &HeaderValue) -> Result<u64, FhirError> {
    let text = value.to_str().unwrap_or_default().trim();
    let inner = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    inner.parse().map_err(|_| {
        FhirError::bad_request(
            "invalid",
            format!("'{text}' is not a version ETag such as W/\"3\""),
        )
    })
}

pub fn if_match(headers: &HeaderMap) -> Result<Option<u64>, FhirError> {
    headers.get(header::IF_MATCH).map(parse_etag).transpose()
}

/// Rejects XML and other non-JSON request bodies with 415.
pub fn check_content_type(headers: &HeaderMap) -> Result<(), FhirError> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
    let mime = ct.split(';').next().unwrap_or_default().trim();
    match mime {
        "application/fhir+json" | "application/json" | "application/json+fhir" | "" => Ok(()),
        other => Err(FhirError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Issue::error(
                "not-supported",
                format!(
                    "content type '{other}' is not supported; only JSON (application/fhir+json) is"
                ),
            ),
        )),
    }
}

/// Rejects requests that insist on XML (via `_format` or `Accept`) with 406.
pub fn check_accept(headers: &HeaderMap, format: Option<&str>) -> Result<(), FhirError> {
    let not_acceptable = || {
        FhirError::new(
            StatusCode::NOT_ACCEPTABLE,
            Issue::error(
                "not-supported",
                "only JSON is supported (application/fhir+json); XML and other formats are not",
            ),
        )
    };
    if let Some(format) = format {
        let f = format.to_ascii_lowercase();
        if f.contains("xml") || f.contains("turtle") || f == "ttl" {
            return Err(not_acceptable());
        }
        return Ok(());
    }
    let Some(accept) = headers.get(header::ACCEPT).and_then(|a| a.to_str().ok()) else {
        return Ok(());
    };
    let accept = accept.to_ascii_lowercase();
    let acceptable = accept.split(',').any(|part| {
        let mime = part.split(';').next().unwrap_or_default().trim();
        mime.is_empty() || mime.contains("json") || mime == "*/*" || mime == "application/*"
    });
    if acceptable {
        Ok(())
    } else {
        Err(not_acceptable())
    }
}

/// Parses a JSON request body into a resource, with a precise error for malformed JSON.
pub fn parse_json(body: &[u8]) -> Result<Value, FhirError> {
    if body.is_empty() {
        return Err(FhirError::bad_request(
            "required",
            "the request has no body",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        let why = if e.to_string().contains("recursion limit") {
            "the JSON is nested too deeply".to_string()
        } else {
            e.to_string()
        };
        FhirError::bad_request("structure", format!("the body is not valid JSON: {why}"))
    })
}

/// Adds `ETag`, `Last-Modified` and, when given, `Location` for a stored version.
pub fn version_headers(response: &mut Response, rv: &ResourceVersion, location: Option<&str>) {
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("W/\"{}\"", rv.version)) {
        headers.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format_http_date(rv.last_updated)) {
        headers.insert(header::LAST_MODIFIED, v);
    }
    if let Some(location) = location.and_then(|l| HeaderValue::from_str(l).ok()) {
        headers.insert(header::LOCATION, location.clone());
        if matches!(
            rv.change,
            crate::store::ChangeKind::Create | crate::store::ChangeKind::CreateAtId
        ) {
            headers.insert("content-location", location);
        }
    }
}

/// A write's answer shaped by `Prefer: return=…` (representation by default).
pub fn write_response(
    status: StatusCode,
    rv: &ResourceVersion,
    location: Option<&str>,
    prefer: Option<ReturnPreference>,
    message: &str,
) -> Response {
    let mut response = match prefer.unwrap_or(ReturnPreference::Representation) {
        ReturnPreference::Representation => raw_json_response(status, rv.body.clone()),
        ReturnPreference::Minimal => {
            let mut r = Response::new(Body::empty());
            *r.status_mut() = status;
            r
        }
        ReturnPreference::OperationOutcome => json_response(
            status,
            &operation_outcome(&[Issue::information("informational", message)]),
        ),
    };
    version_headers(&mut response, rv, location);
    response
}

/// `meta.lastUpdated` rendering shared by Bundles.
pub fn instant(micros: i64) -> String {
    format_instant(micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefer_and_etags() {
        let mut h = HeaderMap::new();
        h.insert(
            "prefer",
            HeaderValue::from_static("return=minimal, handling=strict"),
        );
        let p = RequestPrefs::from_headers(&h);
        assert_eq!(p.return_pref, Some(ReturnPreference::Minimal));
        assert!(p.strict);
        assert_eq!(
            parse_etag(&HeaderValue::from_static("W/\"12\"")).expect("etag"),
            12
        );
        assert_eq!(
            parse_etag(&HeaderValue::from_static("\"3\"")).expect("etag"),
            3
        );
        assert!(parse_etag(&HeaderValue::from_static("W/\"x\"")).is_err());
    }

    #[test]
    fn xml_is_refused() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/fhir+xml"),
        );
        assert_eq!(
            check_content_type(&h).expect_err("xml").status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/fhir+xml"),
        );
        assert!(check_accept(&h, None).is_err());
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/fhir+xml, application/fhir+json;q=0.5"),
        );
        assert!(check_accept(&h, None).is_ok());
        assert!(check_accept(&HeaderMap::new(), Some("xml")).is_err());
        assert!(check_accept(&HeaderMap::new(), Some("json")).is_ok());
    }

    #[test]
    fn deep_json_is_a_clean_error() {
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        let err = parse_json(deep.as_bytes()).expect_err("too deep");
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.issues[0].diagnostics.contains("nested too deeply"));
    }
}
