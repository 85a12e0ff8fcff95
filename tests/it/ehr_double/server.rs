//! The HTTP face of the double: one handler that routes by hand (the FHIR base moves with the
//! flavor), checks bearer tokens, applies throttling, records every request, and answers errors
//! as OperationOutcomes.

use http::header::WWW_AUTHENTICATE;

use super::*;

/// Every request: answered, then recorded with the status it got.
pub(super) async fn handle(
    AxumState(shared): AxumState<Arc<Shared>>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 256 << 20)
        .await
        .unwrap_or_default();
    let mut recorded = RecordedRequest {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query: parts
            .uri
            .query()
            .and_then(|q| serde_urlencoded::from_str(q).ok())
            .unwrap_or_default(),
        headers: parts.headers,
        body,
        // Replaced by the answer's status below.
        status: StatusCode::OK,
        at: std::time::Instant::now(),
    };
    // On its own task, so a request whose client gave up (a timeout fault) still finishes and
    // is recorded.
    let answered = tokio::spawn(async move {
        let response = shared.route(&recorded).await;
        recorded.status = response.status();
        shared.state().requests.push(recorded);
        response
    });
    answered.await.unwrap_or_else(|e| {
        Failure::new(500, "exception", format!("the double failed: {e}")).into_response()
    })
}

impl Shared {
    async fn route(&self, request: &RecordedRequest) -> Response {
        if request.path == self.token_path {
            if request.method != Method::POST {
                return Failure::new(405, "not-supported", "the token endpoint takes POST")
                    .into_response();
            }
            return self.token(request);
        }
        let relative = if self.fhir_path.is_empty() {
            Some(request.path.as_str())
        } else {
            request
                .path
                .strip_prefix(&self.fhir_path)
                .filter(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        let Some(relative) = relative else {
            return Failure::new(404, "not-found", format!("no route for {}", request.path))
                .into_response();
        };
        let segments: Vec<&str> = relative.split('/').filter(|s| !s.is_empty()).collect();
        if request.method == Method::GET && segments == ["metadata"] {
            return fhir_response(StatusCode::OK, &capability_statement());
        }
        if matches!(request.method, Method::PUT | Method::POST) {
            self.state().write_requests += 1;
        }
        if let Some(refused) = self.refusal(request) {
            return refused;
        }
        if let Some(throttled) = self.throttled() {
            return throttled;
        }
        let answer = match (&request.method, segments.as_slice()) {
            (&Method::GET, [resource_type]) if is_type(resource_type) => {
                self.search(request, resource_type)
            }
            (&Method::GET, ["Patient", id, "$everything"]) => self.everything(request, id),
            (&Method::GET, [resource_type, id]) if is_type(resource_type) => {
                self.read(resource_type, id)
            }
            (&Method::PUT, [resource_type, ..])
                if is_type(resource_type) && segments.len() <= 2 =>
            {
                return self.write(request, &segments).await;
            }
            (&Method::POST, []) => return self.write(request, &segments).await,
            (&Method::POST, [resource_type]) if is_type(resource_type) => {
                return self.write(request, &segments).await;
            }
            (&Method::GET, _) => Err(Failure::new(
                404,
                "not-found",
                format!("no route for {}", request.path),
            )),
            _ => Err(Failure::new(
                405,
                "not-supported",
                format!("{} {} is not supported", request.method, request.path),
            )),
        };
        respond(answer)
    }

    /// A 401, unless auth is off or the request carries a live bearer token.
    fn refusal(&self, request: &RecordedRequest) -> Option<Response> {
        self.auth.as_ref()?;
        let token = request.bearer();
        let expiry = token.and_then(|t| self.state().tokens.get(t).copied());
        let problem = match (token, expiry) {
            (None, _) => "no bearer token",
            (Some(_), None) => "unknown access token",
            (Some(_), Some(expiry)) if tokio::time::Instant::now() >= expiry => {
                "the access token has expired"
            }
            (Some(_), Some(_)) => return None,
        };
        let mut response = Failure::new(401, "login", problem).into_response();
        response.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
        Some(response)
    }

    fn throttled(&self) -> Option<Response> {
        let mut state = self.state();
        let (left, seconds) = state.throttle.as_mut()?;
        let seconds = *seconds;
        *left -= 1;
        if *left == 0 {
            state.throttle = None;
        }
        let mut response = Failure::new(429, "throttled", "too many requests").into_response();
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(seconds));
        Some(response)
    }
}

/// What a handler answers when it succeeds: status, FHIR JSON body and extra headers.
pub(super) type Answer = Result<(StatusCode, Value, HeaderMap), Failure>;

/// An error answered as an OperationOutcome.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    pub(super) status: StatusCode,
    pub(super) code: &'static str,
    pub(super) diagnostics: String,
}

impl Failure {
    pub(super) fn new(status: u16, code: &'static str, diagnostics: impl Into<String>) -> Self {
        Self {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            diagnostics: diagnostics.into(),
        }
    }

    pub(super) fn outcome(&self) -> Value {
        json!({
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": self.code, "diagnostics": self.diagnostics}],
        })
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        fhir_response(self.status, &self.outcome())
    }
}

pub(super) fn respond(answer: Answer) -> Response {
    match answer {
        Ok((status, body, headers)) => {
            let mut response = fhir_response(status, &body);
            response.headers_mut().extend(headers);
            response
        }
        Err(failure) => failure.into_response(),
    }
}

fn fhir_response(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+json; charset=utf-8"),
    );
    response
}

fn capability_statement() -> Value {
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "kind": "instance",
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [{"mode": "server"}],
    })
}

pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
}

/// A resource type name: `Patient`, `ExplanationOfBenefit`, not `metadata` or `$export`.
pub(super) fn is_type(segment: &str) -> bool {
    segment.starts_with(|c: char| c.is_ascii_uppercase())
        && segment.chars().all(|c| c.is_ascii_alphanumeric())
}
