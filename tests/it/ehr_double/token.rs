//! The token endpoint: the `client_credentials` grant with `client_secret_basic`,
//! `client_secret_post` or `private_key_jwt`, answered in each vendor's JSON shape, with the
//! refusals and injected failures a sync client has to handle.

use base64::Engine as _;
use http::header::{AUTHORIZATION, CACHE_CONTROL};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::*;

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// SMART Backend Services: a client assertion expires at most five minutes after it is made.
const MAX_ASSERTION_LIFETIME: i64 = 300;
const CLOCK_SKEW: i64 = 5;

#[derive(Deserialize)]
struct AssertionClaims {
    exp: i64,
    jti: String,
}

impl Shared {
    pub(super) fn token(&self, request: &RecordedRequest) -> Response {
        let mut state = self.state();
        state.token_requests += 1;
        if let Some(status) = state.take_token_fault() {
            let error = match status.as_u16() {
                400 => "invalid_request",
                401 => "invalid_client",
                429 | 503 => "temporarily_unavailable",
                _ => "server_error",
            };
            return self.oauth_error(status, error, "the token endpoint is failing (injected)");
        }
        let Some(auth) = &self.auth else {
            return self.oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_client",
                "no client is registered",
            );
        };
        let is_form = request
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        let form: Vec<(String, String)> = match serde_urlencoded::from_bytes(&request.body) {
            Ok(form) if is_form => form,
            _ => {
                return self.oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "the body must be application/x-www-form-urlencoded",
                )
            }
        };
        let field = |name: &str| form_field(&form, name);
        if field("grant_type") != Some("client_credentials") {
            return self.oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only client_credentials is supported",
            );
        }
        let authenticated = match auth.method {
            ClientAuth::Basic => basic_credentials(&request.headers)
                .ok_or_else(|| "no HTTP Basic client credentials".to_owned())
                .and_then(|(id, secret)| check_secret(auth, &id, &secret)),
            ClientAuth::Post => match (field("client_id"), field("client_secret")) {
                (Some(id), Some(secret)) => check_secret(auth, id, secret),
                _ => Err("client_id and client_secret are required in the form".into()),
            },
            ClientAuth::PrivateKeyJwt => self.verify_assertion(&mut state, auth, &form),
        };
        if let Err(problem) = authenticated {
            return self.oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", &problem);
        }
        if let Flavor::Azure { .. } = self.flavor {
            let expected = format!("{}/.default", self.fhir_base());
            if field("scope") != Some(expected.as_str()) {
                return self.oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_scope",
                    &format!("the scope must be {expected}"),
                );
            }
        }
        let lifetime = auth.expires_in.unwrap_or(match self.flavor {
            Flavor::OpenEmr { .. } => 60,
            Flavor::Athena { .. } => 3600,
            Flavor::Azure { .. } => 3599,
            Flavor::Plain => 300,
        });
        let token = uuid::Uuid::new_v4().simple().to_string();
        let expiry = tokio::time::Instant::now() + Duration::from_secs(lifetime);
        state.tokens.insert(token.clone(), expiry);
        let scope = field("scope").unwrap_or("system/*.read");
        let body = match self.flavor {
            Flavor::Azure { .. } => json!({
                "token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime,
                "access_token": token,
            }),
            Flavor::OpenEmr { .. } => json!({
                "token_type": "Bearer", "expires_in": lifetime, "access_token": token,
                "scope": scope,
            }),
            Flavor::Athena { .. } | Flavor::Plain => json!({
                "access_token": token, "token_type": "Bearer", "expires_in": lifetime,
                "scope": scope,
            }),
        };
        oauth_response(StatusCode::OK, &body)
    }

    fn verify_assertion(
        &self,
        state: &mut State,
        auth: &Auth,
        form: &[(String, String)],
    ) -> Result<(), String> {
        let field = |name: &str| form_field(form, name);
        if field("client_assertion_type") != Some(ASSERTION_TYPE) {
            return Err(format!("client_assertion_type must be {ASSERTION_TYPE}"));
        }
        let assertion = field("client_assertion").ok_or("no client_assertion")?;
        let header = jsonwebtoken::decode_header(assertion)
            .map_err(|e| format!("the client assertion is malformed: {e}"))?;
        if header.alg != Algorithm::RS384 {
            return Err(format!("the assertion is {:?}, not RS384", header.alg));
        }
        let kid = header.kid.ok_or("the assertion header has no kid")?;
        let jwk = self
            .jwks
            .as_ref()
            .and_then(|set| set.find(&kid))
            .ok_or_else(|| format!("no registered key has kid {kid}"))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("registered key: {e}"))?;
        let mut validation = Validation::new(Algorithm::RS384);
        validation.set_audience(&[self.token_url()]);
        validation.set_issuer(&[&auth.client_id]);
        validation.sub = Some(auth.client_id.clone());
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        validation.leeway = CLOCK_SKEW as u64;
        let claims = jsonwebtoken::decode::<AssertionClaims>(assertion, &key, &validation)
            .map_err(|e| format!("the client assertion is refused: {e}"))?
            .claims;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        if claims.exp > now + MAX_ASSERTION_LIFETIME + CLOCK_SKEW {
            return Err("the assertion expires more than five minutes from now".into());
        }
        if !state.assertion_ids.insert(claims.jti) {
            return Err("the assertion's jti was used before".into());
        }
        Ok(())
    }

    /// An OAuth2 error (RFC 6749 §5.2) with the vendor's additions: Entra ID's `AADSTS`
    /// codes, OpenEMR's `message`.
    fn oauth_error(&self, status: StatusCode, error: &str, description: &str) -> Response {
        let body = match self.flavor {
            Flavor::Azure { .. } => {
                let code = match error {
                    "invalid_client" => 7000215,
                    "invalid_scope" => 1002012,
                    "unsupported_grant_type" => 70003,
                    "invalid_request" => 900144,
                    _ => 50000,
                };
                json!({
                    "error": error,
                    "error_description": format!("AADSTS{code}: {description}"),
                    "error_codes": [code],
                })
            }
            Flavor::OpenEmr { .. } => {
                json!({"error": error, "error_description": description, "message": description})
            }
            Flavor::Athena { .. } | Flavor::Plain => {
                json!({"error": error, "error_description": description})
            }
        };
        let mut response = oauth_response(status, &body);
        if matches!(status.as_u16(), 429 | 503) {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl State {
    /// The status to fail this token request with, counting it against a limited fault.
    fn take_token_fault(&mut self) -> Option<StatusCode> {
        let fault = self.token_fault.as_mut()?;
        let status = fault.status;
        if let Some(left) = fault.remaining.as_mut() {
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.token_fault = None;
            }
        }
        Some(status)
    }
}

fn oauth_response(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// RFC 6749 §2.3.1 form-encodes id and secret before Base64; many clients do not, so both
/// spellings are accepted.
fn check_secret(auth: &Auth, id: &str, secret: &str) -> Result<(), String> {
    let matches = |sent: &str, expected: &str| {
        sent == expected || form_decode(sent).as_deref() == Some(expected)
    };
    if matches(id, &auth.client_id) && matches(secret, &auth.client_secret) {
        Ok(())
    } else {
        Err("client authentication failed".into())
    }
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let (id, secret) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

fn form_field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn form_decode(value: &str) -> Option<String> {
    let mut pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(&format!("v={value}")).ok()?;
    pairs.pop().map(|(_, v)| v)
}
