//! OAuth2 client-credentials tokens with a cache: one refresh in flight at a time, refreshed
//! before expiry, dropped when a server answers 401 so the next call fetches a new one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Deserialize;

use super::RemoteError;
use crate::config::{ClientAuthMethod, OAuthConfig, Secret};

/// Gives out bearer tokens for one remote server.
#[async_trait::async_trait]
pub trait TokenProvider: Send + Sync {
    /// A token valid for at least a little while.
    async fn token(&self) -> Result<Arc<str>, RemoteError>;
    /// Forgets `stale` (a server refused it), so the next [`TokenProvider::token`] refreshes.
    fn invalidate(&self, stale: &str);
}

/// The `client_credentials` grant against one token endpoint.
pub struct ClientCredentials {
    remote: String,
    http: reqwest::Client,
    token_url: String,
    client_id: String,
    secret: Option<Secret<String>>,
    method: ClientAuthMethod,
    signing: Option<(EncodingKey, Algorithm, Option<String>)>,
    scope: Option<String>,
    cached: Mutex<Option<Cached>>,
    refreshing: tokio::sync::Mutex<()>,
}

struct Cached {
    token: Arc<str>,
    refresh_at: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// Lifetime assumed when the token endpoint does not say.
const DEFAULT_LIFETIME: u64 = 300;

/// SMART Backend Services caps an assertion at five minutes; fhirgate uses less.
const ASSERTION_LIFETIME: i64 = 240;

impl ClientCredentials {
    /// `remote` names the server in logs and metrics; `scope` overrides the configured scopes
    /// (Azure's `{fhir}/.default`).
    pub fn new(
        remote: &str,
        http: reqwest::Client,
        token_url: String,
        config: &OAuthConfig,
        scope: Option<String>,
    ) -> anyhow::Result<Self> {
        let signing = match config.method {
            ClientAuthMethod::PrivateKeyJwt => {
                let path = config.private_key_file.as_ref().ok_or_else(|| {
                    anyhow::anyhow!("{remote}: private_key_jwt needs auth.private_key_file")
                })?;
                let pem = std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("{remote}: reading {}: {e}", path.display()))?;
                let (key, algorithm) = match config.algorithm.as_deref().unwrap_or("RS384") {
                    "RS384" => (EncodingKey::from_rsa_pem(&pem)?, Algorithm::RS384),
                    "ES384" => (EncodingKey::from_ec_pem(&pem)?, Algorithm::ES384),
                    other => anyhow::bail!("{remote}: algorithm {other} is not RS384 or ES384"),
                };
                Some((key, algorithm, config.key_id.clone()))
            }
            _ => {
                if config.client_secret.is_none() {
                    anyhow::bail!("{remote}: {:?} needs auth.client_secret", config.method);
                }
                None
            }
        };
        Ok(Self {
            remote: remote.to_owned(),
            http,
            token_url,
            client_id: config.client_id.clone(),
            secret: config.client_secret.clone(),
            method: config.method,
            signing,
            scope: scope.or_else(|| config.scopes.clone()),
            cached: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
        })
    }

    fn fresh(&self) -> Option<Arc<str>> {
        let cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        cached
            .as_ref()
            .filter(|c| Instant::now() < c.refresh_at)
            .map(|c| c.token.clone())
    }

    fn assertion(&self) -> Result<String, RemoteError> {
        let Some((key, algorithm, kid)) = &self.signing else {
            return Err(RemoteError::auth(0, "no signing key".into()));
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = serde_json::json!({
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        let mut header = Header::new(*algorithm);
        header.kid = kid.clone();
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(&header, &claims, key)
            .map_err(|e| RemoteError::auth(0, format!("signing the client assertion: {e}")))
    }

    async fn fetch(&self) -> Result<Cached, RemoteError> {
        let mut form: Vec<(&str, String)> = vec![("grant_type", "client_credentials".into())];
        if let Some(scope) = &self.scope {
            form.push(("scope", scope.clone()));
        }
        let mut request = self.http.post(&self.token_url);
        match self.method {
            ClientAuthMethod::ClientSecretBasic => {
                let secret = self.secret.as_ref().map(|s| s.expose().as_str());
                request = request.basic_auth(form_encode(&self.client_id), secret.map(form_encode));
            }
            ClientAuthMethod::ClientSecretPost => {
                form.push(("client_id", self.client_id.clone()));
                if let Some(secret) = &self.secret {
                    form.push(("client_secret", secret.expose().clone()));
                }
            }
            ClientAuthMethod::PrivateKeyJwt => {
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push(("client_assertion", self.assertion()?));
            }
        }
        let body = serde_urlencoded::to_string(&form)
            .map_err(|e| RemoteError::auth(0, format!("encoding the token request: {e}")))?;
        let started = Instant::now();
        let response = request
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| {
                self.count("unreachable");
                RemoteError::auth(
                    0,
                    format!("token endpoint unreachable: {}", super::describe(&e)),
                )
            })?;
        let status = response.status();
        if !status.is_success() {
            self.count("refused");
            return Err(RemoteError::auth(
                status.as_u16(),
                format!("token endpoint answered {status}"),
            ));
        }
        let parsed: TokenResponse = response.json().await.map_err(|e| {
            self.count("invalid");
            RemoteError::auth(status.as_u16(), format!("token response unreadable: {e}"))
        })?;
        self.count("issued");
        let lifetime = parsed.expires_in.unwrap_or(DEFAULT_LIFETIME).max(1);
        // Refresh a fifth of the lifetime early (at most a minute), so a token never expires
        // in the middle of a request.
        let margin = (lifetime / 5).min(60);
        Ok(Cached {
            token: parsed.access_token.into(),
            refresh_at: started + Duration::from_secs(lifetime - margin),
        })
    }

    fn count(&self, outcome: &'static str) {
        metrics::counter!("fhirgate_remote_token_requests_total", "remote" => self.remote.clone(), "outcome" => outcome)
            .increment(1);
    }
}

/// `client_secret_basic` form-encodes id and secret before Base64 (RFC 6749 §2.3.1).
fn form_encode(value: &str) -> String {
    serde_urlencoded::to_string([("", value)])
        .map(|s| s.trim_start_matches('=').to_owned())
        .unwrap_or_default()
}

#[async_trait::async_trait]
impl TokenProvider for ClientCredentials {
    async fn token(&self) -> Result<Arc<str>, RemoteError> {
        if let Some(token) = self.fresh() {
            return Ok(token);
        }
        let _one_at_a_time = self.refreshing.lock().await;
        if let Some(token) = self.fresh() {
            return Ok(token);
        }
        let cached = self.fetch().await?;
        let token = cached.token.clone();
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some(cached);
        tracing::debug!(remote = %self.remote, "access token refreshed");
        Ok(token)
    }

    fn invalidate(&self, stale: &str) {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if cached.as_ref().is_some_and(|c| &*c.token == stale) {
            *cached = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_form_encoded_first() {
        assert_eq!(form_encode("a b:c"), "a+b%3Ac");
        assert_eq!(form_encode("plain"), "plain");
    }
}
