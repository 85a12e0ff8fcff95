//! Who may call the CDS services: each call carries a JWT signed by the CDS client (CDS Hooks 2.0,
//! "Trusting CDS Clients").
//!
//! Accepted: RS384 or ES384 only (`none` and HMAC are refused, so a public key can never be used
//! as an HMAC secret), a `kid` found in the issuer's JWKS — from an allow-listed `jku` or the
//! configured set — an allow-listed `iss`, `aud` equal to the exact service URL called, a live
//! `exp` at most five minutes ahead, an `iat` not in the future, and a `jti` never seen before.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::{HeaderValue, StatusCode};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::TrustedIssuer;
use crate::fhir::{FhirError, Issue};

/// Allowed clock difference with the client, in seconds.
const SKEW: i64 = 60;
/// Longest a token may live (CDS Hooks: five minutes).
const MAX_LIFETIME: i64 = 300;
/// How long a fetched JWKS is trusted before it is fetched again.
const JWKS_TTL: Duration = Duration::from_secs(300);

pub struct ClientAuth {
    required: bool,
    issuers: Vec<(TrustedIssuer, Option<JwkSet>)>,
    http: reqwest::Client,
    fetched: Mutex<HashMap<String, (Instant, JwkSet)>>,
    seen: Mutex<HashMap<String, i64>>,
}

#[derive(Debug, Deserialize)]
struct Claims {
    #[allow(dead_code)]
    iss: String,
    exp: i64,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    jti: Option<String>,
}

fn refuse(reason: &str) -> FhirError {
    metrics::counter!("fhirgate_cds_auth_failures_total", "reason" => reason.to_owned())
        .increment(1);
    tracing::warn!(reason, "CDS client refused");
    FhirError::new(
        StatusCode::UNAUTHORIZED,
        Issue::error(
            "security",
            format!("the CDS client's JWT is not accepted: {reason}"),
        ),
    )
}

impl ClientAuth {
    /// `required = false` turns checking off (local development only; logged loudly).
    pub fn new(
        required: bool,
        issuers: &[TrustedIssuer],
        http: reqwest::Client,
    ) -> anyhow::Result<Self> {
        if !required {
            tracing::warn!("CDS client authentication is OFF: anyone can call the CDS services; never run like this with real data");
        }
        let mut loaded = Vec::new();
        for issuer in issuers {
            let set = match &issuer.jwks_file {
                Some(path) => {
                    let text = std::fs::read_to_string(path).map_err(|e| {
                        anyhow::anyhow!("JWKS of {}: {}: {e}", issuer.iss, path.display())
                    })?;
                    Some(
                        serde_json::from_str::<JwkSet>(&text)
                            .map_err(|e| anyhow::anyhow!("JWKS {}: {e}", path.display()))?,
                    )
                }
                None => None,
            };
            if set.is_none() && issuer.jwks_url.is_none() && issuer.jku.is_empty() {
                anyhow::bail!(
                    "trusted CDS issuer {} has no jwks_file, jwks_url or jku",
                    issuer.iss
                );
            }
            loaded.push((issuer.clone(), set));
        }
        Ok(Self {
            required,
            issuers: loaded,
            http,
            fetched: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
        })
    }

    /// Checks the `Authorization` header of a call to the service at `audience` (its full URL)
    /// and returns the trusted client that made it (`None` when checking is off).
    pub async fn verify(
        &self,
        authorization: Option<&HeaderValue>,
        audience: &str,
    ) -> Result<Option<&TrustedIssuer>, FhirError> {
        if !self.required {
            return Ok(None);
        }
        let token = authorization
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| refuse("no bearer token"))?;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| refuse("malformed token or algorithm not accepted"))?;
        if !matches!(header.alg, Algorithm::RS384 | Algorithm::ES384) {
            return Err(refuse("only RS384 and ES384 are accepted"));
        }
        let kid = header.kid.as_deref().ok_or_else(|| refuse("no kid"))?;
        let iss = unverified_issuer(token).ok_or_else(|| refuse("no iss"))?;
        let (issuer, configured) = self
            .issuers
            .iter()
            .find(|(i, _)| i.iss == iss)
            .ok_or_else(|| refuse("issuer not trusted"))?;
        let set = match (&header.jku, configured, &issuer.jwks_url) {
            (Some(jku), _, _) => {
                if !issuer.jku.iter().any(|allowed| allowed == jku) {
                    return Err(refuse("jku not allowed for this issuer"));
                }
                self.fetch_jwks(jku).await?
            }
            (None, Some(set), _) => set.clone(),
            (None, None, Some(url)) => self.fetch_jwks(url).await?,
            (None, None, None) => return Err(refuse("no key source for this issuer")),
        };
        let jwk = set.find(kid).ok_or_else(|| refuse("unknown kid"))?;
        if let Some(alg) = &jwk.common.key_algorithm {
            if format!("{alg:?}") != format!("{:?}", header.alg) {
                return Err(refuse("key algorithm does not match the token"));
            }
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|_| refuse("unusable key"))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[issuer.iss.as_str()]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = SKEW as u64;
        validation.validate_nbf = true;
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                refuse(match e.kind() {
                    ErrorKind::InvalidSignature => "bad signature",
                    ErrorKind::ExpiredSignature => "expired",
                    ErrorKind::InvalidAudience => "wrong audience",
                    ErrorKind::InvalidIssuer => "wrong issuer",
                    ErrorKind::ImmatureSignature => "not yet valid",
                    ErrorKind::MissingRequiredClaim(_) => "missing claim",
                    _ => "invalid token",
                })
            })?
            .claims;
        let now = crate::fhir::date::now_micros() / 1_000_000;
        if claims.exp > now + MAX_LIFETIME + SKEW {
            return Err(refuse("lives longer than five minutes"));
        }
        match claims.iat {
            Some(iat) if iat <= now + SKEW => {}
            Some(_) => return Err(refuse("issued in the future")),
            None => return Err(refuse("no iat")),
        }
        let jti = claims.jti.ok_or_else(|| refuse("no jti"))?;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, exp| *exp + SKEW >= now);
        if seen
            .insert(format!("{iss}\u{1f}{jti}"), claims.exp)
            .is_some()
        {
            return Err(refuse("jti replayed"));
        }
        Ok(Some(issuer))
    }

    async fn fetch_jwks(&self, url: &str) -> Result<JwkSet, FhirError> {
        if let Some((at, set)) = self
            .fetched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(url)
        {
            if at.elapsed() < JWKS_TTL {
                return Ok(set.clone());
            }
        }
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|_| refuse("JWKS unreachable"))?;
        if !response.status().is_success() {
            return Err(refuse("JWKS unreachable"));
        }
        let set: JwkSet = response
            .json()
            .await
            .map_err(|_| refuse("JWKS is not a key set"))?;
        self.fetched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(url.to_owned(), (Instant::now(), set.clone()));
        Ok(set)
    }
}

/// The `iss` claim, read before the signature is checked (only to pick the keys to check with).
fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("iss")?.as_str().map(str::to_owned)
}
