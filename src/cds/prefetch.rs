//! Fetching the prefetch a CDS client did not send, from its own FHIR server with the token it
//! lent (`fhirAuthorization`).
//!
//! Only FHIR servers on the configured allow-list are contacted (a CDS request names the server,
//! so without the list anyone could make fhirgate fetch from any address), redirects are not
//! followed, and context values are percent-encoded into the query so they cannot change the
//! request's path or host.

use std::collections::BTreeMap;
use std::time::Duration;

use http::StatusCode;
use serde_json::Value;

use super::request::{expected_type, CdsRequest};
use crate::fhir::{FhirError, Issue};

/// Prefetch keys without which no answer can be given.
const ESSENTIAL: [&str; 2] = ["patient", "coverage"];

pub struct PrefetchFetcher {
    client: reqwest::Client,
    allowed: Vec<String>,
}

impl PrefetchFetcher {
    /// `client` carries the outbound trust settings (see `remote::outbound`).
    pub fn new(
        allowed: &[String],
        timeout: Duration,
        client: reqwest::ClientBuilder,
    ) -> anyhow::Result<Self> {
        let client = client
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .build()?;
        Ok(Self {
            client,
            allowed: allowed
                .iter()
                .map(|s| s.trim_end_matches('/').to_owned())
                .collect(),
        })
    }

    /// Whether `server` is on the list: the caller's own list when given, else the global one.
    pub fn is_allowed(&self, server: &str, caller: Option<&[String]>) -> bool {
        let server = server.trim_end_matches('/');
        match caller {
            Some(list) => list.iter().any(|a| a.trim_end_matches('/') == server),
            None => self.allowed.iter().any(|a| a == server),
        }
    }

    /// Fills in every template whose prefetch is missing. Fails with 412 when the patient or
    /// coverage is still missing afterwards; other missing data just counts as not supplied.
    pub async fn complete(
        &self,
        request: &mut CdsRequest,
        templates: &BTreeMap<String, String>,
        caller_servers: Option<&[String]>,
    ) -> Result<(), FhirError> {
        let missing: Vec<(String, String)> = templates
            .iter()
            .filter(|(k, _)| request.prefetch.get(*k).is_none_or(Value::is_null))
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let unavailable = |why: String| -> Result<(), FhirError> {
            match missing
                .iter()
                .find(|(k, _)| ESSENTIAL.contains(&k.as_str()))
            {
                Some((key, _)) => Err(FhirError::new(
                    StatusCode::PRECONDITION_FAILED,
                    Issue::error(
                        "incomplete",
                        format!("prefetch '{key}' is missing and cannot be fetched: {why}"),
                    ),
                )),
                None => Ok(()),
            }
        };
        let Some(server) = request.fhir_server.clone() else {
            return unavailable("the request names no fhirServer".into());
        };
        let Some(token) = request
            .fhir_authorization
            .as_ref()
            .map(|a| a.access_token.expose().clone())
        else {
            return unavailable("the request lends no fhirAuthorization".into());
        };
        if !self.is_allowed(&server, caller_servers) {
            return unavailable(format!("{server} is not an allowed FHIR server"));
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (key, template) in missing.iter().cloned() {
            let Some(path) = render(&template, &request.context) else {
                continue;
            };
            let url = format!("{}/{path}", server.trim_end_matches('/'));
            let client = self.client.clone();
            let token = token.clone();
            tasks.spawn(async move {
                let fetched = fetch(&client, &url, &token, expected_type(&template)).await;
                (key, fetched)
            });
        }
        let mut failures = Vec::new();
        while let Some(done) = tasks.join_next().await {
            let Ok((key, fetched)) = done else { continue };
            match fetched {
                Ok(resource) => {
                    request.prefetch.insert(key, resource);
                }
                Err(why) => {
                    tracing::warn!(prefetch = %key, error = %why, "prefetch fetch failed");
                    failures.push((key, why));
                }
            }
        }
        for key in ESSENTIAL {
            if templates.contains_key(key) && request.prefetch.get(key).is_none_or(Value::is_null) {
                let why = failures.iter().find(|(k, _)| k == key).map_or(
                    "its template cannot be filled from the context".to_string(),
                    |(_, w)| w.clone(),
                );
                return Err(FhirError::new(
                    StatusCode::PRECONDITION_FAILED,
                    Issue::error(
                        "incomplete",
                        format!("prefetch '{key}' is missing and cannot be fetched: {why}"),
                    ),
                ));
            }
        }
        Ok(())
    }
}

async fn fetch(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    expected: &str,
) -> Result<Value, String> {
    let response = client
        .get(url)
        .bearer_auth(token)
        .header("accept", "application/fhir+json")
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("the FHIR server answered {status}"));
    }
    let value: Value = response
        .json()
        .await
        .map_err(|e| format!("not JSON: {e}"))?;
    match value["resourceType"].as_str() {
        Some(t) if t == expected => Ok(value),
        other => Err(format!(
            "expected a {expected}, got {}",
            other.unwrap_or("no resource")
        )),
    }
}

/// Fills `{{context.X}}`, `{{userPractitionerId}}` and friends from the context; `None` when a
/// token cannot be filled (e.g. a FHIRPath expression this server does not evaluate).
pub fn render(template: &str, context: &serde_json::Map<String, Value>) -> Option<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}")? + start;
        let token = rest[start + 2..end].trim();
        let value = match token {
            "userPractitionerId"
            | "userPractitionerRoleId"
            | "userPatientId"
            | "userRelatedPersonId" => {
                let user = context.get("userId")?.as_str()?;
                let wanted = match token {
                    "userPractitionerId" => "Practitioner",
                    "userPractitionerRoleId" => "PractitionerRole",
                    "userPatientId" => "Patient",
                    _ => "RelatedPerson",
                };
                let (kind, id) = user.split_once('/')?;
                (kind == wanted).then(|| id.to_owned())?
            }
            t => context
                .get(t.strip_prefix("context.")?)?
                .as_str()?
                .to_owned(),
        };
        // Only FHIR ids (or Type/id) fill a template: nothing that could walk the path.
        let id = value.rsplit('/').next().unwrap_or_default();
        if !crate::fhir::is_valid_id(id)
            || id == "."
            || id == ".."
            || value.matches('/').count() > 1
        {
            return None;
        }
        out.push_str(&encode(&value));
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    Some(out)
}

/// Percent-encodes everything but unreserved characters.
fn encode(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn templates_fill_from_the_context_and_escape() {
        let ctx =
            json!({"patientId": "123", "userId": "Practitioner/abc", "encounterId": "../x?y"});
        let ctx = ctx.as_object().expect("object");
        assert_eq!(
            render("Patient/{{context.patientId}}", ctx).as_deref(),
            Some("Patient/123")
        );
        assert_eq!(
            render("Practitioner/{{userPractitionerId}}", ctx).as_deref(),
            Some("Practitioner/abc")
        );
        assert!(render("Encounter/{{context.encounterId}}", ctx).is_none());
        let dots = json!({"patientId": ".."});
        assert!(render(
            "Patient/{{context.patientId}}",
            dots.as_object().expect("object")
        )
        .is_none());
        assert!(render("PractitionerRole/{{userPractitionerRoleId}}", ctx).is_none());
        assert!(render("X?_id={{context.draftOrders.entry.id}}", ctx).is_none());
    }

    #[test]
    fn only_listed_servers() {
        let f = PrefetchFetcher::new(
            &["https://ehr.example/fhir/".into()],
            Duration::from_secs(1),
            reqwest::Client::builder(),
        )
        .expect("client");
        assert!(f.is_allowed("https://ehr.example/fhir", None));
        assert!(!f.is_allowed("https://ehr.example/fhir/../admin", None));
        assert!(!f.is_allowed("http://169.254.169.254/latest", None));
        // A caller's own list replaces the global one.
        let own = ["https://other.example/fhir".to_string()];
        assert!(!f.is_allowed("https://ehr.example/fhir", Some(&own)));
        assert!(f.is_allowed("https://other.example/fhir/", Some(&own)));
    }
}
