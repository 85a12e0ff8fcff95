//! Bearer tokens: JWTs from configured identity providers (RS256/RS384/ES256/ES384, checked
//! against their JWKS with `iss`, `aud`, `exp` and `nbf`), and fhirgate's own tokens, issued by
//! `POST /auth/token` to backend clients that prove themselves with a signed assertion (SMART
//! Backend Services: client_credentials + private_key_jwt) and signed with a server secret.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Deserialize;
use serde_json::{json, Value};

use super::scopes::Scope;
use super::{AuthFailure, Principal};
use crate::config::{BackendClient, JwtIssuer};

/// Allowed clock difference, in seconds.
const SKEW: u64 = 60;
/// Longest a client assertion may live (SMART Backend Services: five minutes).
const MAX_ASSERTION: i64 = 300;
/// How long a fetched JWKS is trusted.
const JWKS_TTL: Duration = Duration::from_secs(300);

#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<Value>,
    #[serde(default)]
    roles: Option<Vec<String>>,
    #[serde(default)]
    fhirgate_roles: Option<Vec<String>>,
    #[serde(default)]
    patient: Option<String>,
}

/// What a verifier needs: who is trusted, and fhirgate's own issuer and secret.
pub struct Tokens {
    issuers: Vec<(JwtIssuer, Option<JwkSet>)>,
    clients: Vec<(BackendClient, JwkSet)>,
    /// `{public base}`: the `iss` and `aud` of fhirgate's own tokens, and the default `aud`.
    own_issuer: String,
    secret: Vec<u8>,
    lifetime: u64,
    http: reqwest::Client,
    fetched: Mutex<HashMap<String, (Instant, JwkSet)>>,
    assertions_seen: Mutex<HashMap<String, i64>>,
}

fn read_jwks(path: &std::path::Path) -> anyhow::Result<JwkSet> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: not a JWKS: {e}", path.display()))
}

/// The payload of a JWT, read before its signature is checked (only to pick the keys).
fn unverified_payload(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn now_secs() -> i64 {
    crate::fhir::date::now_micros() / 1_000_000
}

impl Tokens {
    pub fn new(
        issuers: &[JwtIssuer],
        clients: &[BackendClient],
        own_issuer: &str,
        secret: Vec<u8>,
        lifetime: u64,
        http: reqwest::ClientBuilder,
    ) -> anyhow::Result<Self> {
        let mut loaded = Vec::new();
        for issuer in issuers {
            let set = issuer.jwks_file.as_deref().map(read_jwks).transpose()?;
            if set.is_none() && issuer.jwks_url.is_none() {
                anyhow::bail!("auth issuer {}: give jwks_file or jwks_url", issuer.iss);
            }
            loaded.push((issuer.clone(), set));
        }
        let mut backend = Vec::new();
        for client in clients {
            backend.push((client.clone(), read_jwks(&client.jwks_file)?));
        }
        Ok(Self {
            issuers: loaded,
            clients: backend,
            own_issuer: own_issuer.trim_end_matches('/').to_owned(),
            secret,
            lifetime: lifetime.clamp(1, 300),
            http: http
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(5))
                .build()?,
            fetched: Mutex::new(HashMap::new()),
            assertions_seen: Mutex::new(HashMap::new()),
        })
    }

    /// The URL of the token endpoint (the `aud` of client assertions).
    pub fn token_url(&self) -> String {
        format!("{}/auth/token", self.own_issuer)
    }

    /// Verifies a bearer JWT and says who it is.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthFailure> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| AuthFailure::new("malformed token"))?;
        let payload =
            unverified_payload(token).ok_or_else(|| AuthFailure::new("malformed token"))?;
        let iss = payload["iss"].as_str().unwrap_or_default();
        let (key, algorithms, audience) = if iss == self.own_issuer {
            if header.alg != Algorithm::HS256 {
                return Err(AuthFailure::new("algorithm not accepted"));
            }
            (
                DecodingKey::from_secret(&self.secret),
                vec![Algorithm::HS256],
                self.own_issuer.clone(),
            )
        } else {
            // An HMAC algorithm here could make a public key the secret: only asymmetric ones.
            if !matches!(
                header.alg,
                Algorithm::RS256 | Algorithm::RS384 | Algorithm::ES256 | Algorithm::ES384
            ) {
                return Err(AuthFailure::new("algorithm not accepted"));
            }
            let (issuer, configured) = self
                .issuers
                .iter()
                .find(|(i, _)| i.iss == iss)
                .ok_or_else(|| AuthFailure::new("issuer not trusted"))?;
            let set = match (configured, &issuer.jwks_url) {
                (Some(set), _) => set.clone(),
                (None, Some(url)) => self.fetch_jwks(url).await?,
                (None, None) => return Err(AuthFailure::new("no keys for this issuer")),
            };
            let kid = header
                .kid
                .as_deref()
                .ok_or_else(|| AuthFailure::new("no kid"))?;
            let jwk = set
                .find(kid)
                .ok_or_else(|| AuthFailure::new("unknown kid"))?;
            let key = DecodingKey::from_jwk(jwk).map_err(|_| AuthFailure::new("unusable key"))?;
            let audience = issuer
                .audience
                .clone()
                .unwrap_or_else(|| self.own_issuer.clone());
            (key, vec![header.alg], audience)
        };
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        validation.set_issuer(&[iss]);
        validation.set_audience(&[audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = SKEW;
        validation.validate_nbf = true;
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                AuthFailure::new(match e.kind() {
                    ErrorKind::InvalidSignature => "bad signature",
                    ErrorKind::ExpiredSignature => "expired",
                    ErrorKind::InvalidAudience => "wrong audience",
                    ErrorKind::InvalidIssuer => "wrong issuer",
                    ErrorKind::ImmatureSignature => "not yet valid",
                    ErrorKind::MissingRequiredClaim(_) => "missing claim",
                    ErrorKind::InvalidAlgorithm => "algorithm not accepted",
                    _ => "invalid token",
                })
            })?
            .claims;
        let scope_text = match (&claims.scope, &claims.scp) {
            (Some(scope), _) => scope.clone(),
            (None, Some(Value::String(scp))) => scp.clone(),
            (None, Some(Value::Array(list))) => list
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        };
        let roles: BTreeSet<String> = claims
            .roles
            .into_iter()
            .chain(claims.fhirgate_roles)
            .flatten()
            .collect();
        Ok(Principal {
            subject: claims.sub.unwrap_or_else(|| "unknown".into()),
            via: if iss == self.own_issuer {
                "token"
            } else {
                "jwt"
            },
            roles,
            scopes: Scope::parse_all(&scope_text),
            patient: claims.patient,
        })
    }

    async fn fetch_jwks(&self, url: &str) -> Result<JwkSet, AuthFailure> {
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
        let unreachable = || AuthFailure::new("the issuer's keys could not be fetched");
        let response = self.http.get(url).send().await.map_err(|_| unreachable())?;
        if !response.status().is_success() {
            return Err(unreachable());
        }
        let set: JwkSet = response.json().await.map_err(|_| unreachable())?;
        self.fetched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(url.to_owned(), (Instant::now(), set.clone()));
        Ok(set)
    }

    /// The client-credentials grant with a signed assertion. Answers the OAuth2 token
    /// response, or an OAuth2 error (`error`, `error_description`) with its status.
    pub fn grant(&self, form: &HashMap<String, String>) -> Result<Value, (u16, Value)> {
        let oauth_error = |status: u16, error: &str, description: &str| {
            (
                status,
                json!({"error": error, "error_description": description}),
            )
        };
        if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
            return Err(oauth_error(
                400,
                "unsupported_grant_type",
                "use client_credentials",
            ));
        }
        if form.get("client_assertion_type").map(String::as_str)
            != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        {
            return Err(oauth_error(
                400,
                "invalid_request",
                "a jwt-bearer client_assertion is required",
            ));
        }
        let assertion = form
            .get("client_assertion")
            .ok_or_else(|| oauth_error(400, "invalid_request", "client_assertion is missing"))?;
        let invalid = |why: &str| oauth_error(401, "invalid_client", why);
        let header =
            jsonwebtoken::decode_header(assertion).map_err(|_| invalid("malformed assertion"))?;
        if !matches!(header.alg, Algorithm::RS384 | Algorithm::ES384) {
            return Err(invalid("assertions are signed with RS384 or ES384"));
        }
        let payload =
            unverified_payload(assertion).ok_or_else(|| invalid("malformed assertion"))?;
        let client_id = payload["iss"].as_str().unwrap_or_default();
        let (client, set) = self
            .clients
            .iter()
            .find(|(c, _)| c.client_id == client_id)
            .ok_or_else(|| invalid("unknown client"))?;
        let kid = header.kid.as_deref().ok_or_else(|| invalid("no kid"))?;
        let jwk = set.find(kid).ok_or_else(|| invalid("unknown kid"))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|_| invalid("unusable key"))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[client_id]);
        validation.sub = Some(client_id.to_owned());
        validation.set_audience(&[self.token_url()]);
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        validation.leeway = SKEW;
        let claims = jsonwebtoken::decode::<Value>(assertion, &key, &validation)
            .map_err(|_| invalid("the assertion does not verify"))?
            .claims;
        let now = now_secs();
        let exp = claims["exp"].as_i64().unwrap_or(0);
        if exp > now + MAX_ASSERTION + SKEW as i64 {
            return Err(invalid("the assertion lives longer than five minutes"));
        }
        let jti = claims["jti"]
            .as_str()
            .ok_or_else(|| invalid("the assertion has no jti"))?;
        {
            let mut seen = self
                .assertions_seen
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            seen.retain(|_, until| *until + SKEW as i64 >= now);
            if seen
                .insert(format!("{client_id}\u{1f}{jti}"), exp)
                .is_some()
            {
                return Err(invalid("the assertion was used before"));
            }
        }
        let allowed: Vec<Scope> = client
            .scopes
            .iter()
            .filter_map(|s| Scope::parse(s))
            .collect();
        let requested = form.get("scope").map(String::as_str).unwrap_or_default();
        let granted: Vec<String> = if requested.trim().is_empty() {
            client.scopes.clone()
        } else {
            requested
                .split_whitespace()
                .filter(|asked| {
                    Scope::parse(asked)
                        .is_some_and(|asked| allowed.iter().any(|a| a.includes(&asked)))
                })
                .map(str::to_owned)
                .collect()
        };
        if granted.is_empty() && client.roles.is_empty() {
            return Err(oauth_error(
                400,
                "invalid_scope",
                "none of the requested scopes is allowed for this client",
            ));
        }
        let scope = granted.join(" ");
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({
                "iss": self.own_issuer,
                "aud": self.own_issuer,
                "sub": client_id,
                "iat": now,
                "exp": now + self.lifetime as i64,
                "jti": uuid::Uuid::new_v4().to_string(),
                "scope": scope,
                "fhirgate_roles": client.roles,
            }),
            &EncodingKey::from_secret(&self.secret),
        )
        .map_err(|_| oauth_error(500, "server_error", "the token could not be signed"))?;
        Ok(json!({
            "access_token": token,
            "token_type": "bearer",
            "expires_in": self.lifetime,
            "scope": scope,
        }))
    }
}
