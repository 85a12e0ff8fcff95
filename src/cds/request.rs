//! A CDS Hooks request: parsed, checked against its hook, and opened into orders and record.

use std::collections::BTreeMap;

use http::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::Secret;
use crate::fhir::{FhirError, Issue};

/// The body of `POST /cds-services/{id}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CdsRequest {
    pub hook: String,
    pub hook_instance: String,
    #[serde(default)]
    pub fhir_server: Option<String>,
    #[serde(default)]
    pub fhir_authorization: Option<FhirAuthorization>,
    pub context: Map<String, Value>,
    #[serde(default)]
    pub prefetch: BTreeMap<String, Value>,
    #[serde(default)]
    pub extension: Option<Value>,
}

/// The token the CDS client lends for reading its FHIR server.
#[derive(Debug, Deserialize)]
pub struct FhirAuthorization {
    pub access_token: Secret<String>,
    pub token_type: String,
    #[serde(default)]
    pub expires_in: Option<u64>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub subject: Option<String>,
}

fn bad(message: impl Into<String>) -> FhirError {
    FhirError::new(StatusCode::BAD_REQUEST, Issue::error("invalid", message))
}

/// Context fields each hook requires (CDS Hooks 2.0 hook definitions).
fn required_context(hook: &str) -> &'static [&'static str] {
    match hook {
        "order-sign" => &["userId", "patientId", "draftOrders"],
        "order-select" => &["userId", "patientId", "selections", "draftOrders"],
        "order-dispatch" => &["patientId", "dispatchedOrders", "performer"],
        "appointment-book" => &["userId", "patientId", "appointments"],
        "encounter-start" | "encounter-discharge" => &["userId", "patientId", "encounterId"],
        _ => &[],
    }
}

impl CdsRequest {
    /// Parses and checks a request for a service of `hook` with the given prefetch templates.
    pub fn parse(
        body: &[u8],
        hook: &str,
        templates: &BTreeMap<String, String>,
    ) -> Result<Self, FhirError> {
        let mut request: CdsRequest = serde_json::from_slice(body).map_err(|e| {
            let what = e.to_string();
            let what = what
                .rsplit_once(" at line ")
                .map_or(what.as_str(), |(m, _)| m);
            bad(format!("not a CDS Hooks request: {what}"))
        })?;
        if request.hook != hook {
            return Err(bad(format!(
                "this service answers '{hook}', not '{}'",
                request.hook
            )));
        }
        if request.hook_instance.trim().is_empty() {
            return Err(bad("hookInstance is empty"));
        }
        // Older drafts spelled order-dispatch's context in kebab case.
        for (old, new) in [
            ("dispatched-orders", "dispatchedOrders"),
            ("fulfillment-tasks", "fulfillmentTasks"),
        ] {
            if let Some(v) = request.context.remove(old) {
                request.context.entry(new).or_insert(v);
            }
        }
        let missing: Vec<&str> = required_context(hook)
            .iter()
            .copied()
            .filter(|k| request.context.get(*k).is_none_or(Value::is_null))
            .collect();
        if !missing.is_empty() {
            return Err(bad(format!(
                "the {hook} context lacks {}",
                missing.join(", ")
            )));
        }
        if request.fhir_authorization.is_some() && request.fhir_server.is_none() {
            return Err(bad("fhirAuthorization is given without fhirServer"));
        }
        if let Some(auth) = &request.fhir_authorization {
            if !auth.token_type.eq_ignore_ascii_case("bearer") {
                return Err(bad("fhirAuthorization.token_type must be Bearer"));
            }
        }
        for (key, value) in &request.prefetch {
            if value.is_null() {
                continue;
            }
            let Some(template) = templates.get(key) else {
                continue;
            };
            let expected = expected_type(template);
            let actual = value.get("resourceType").and_then(Value::as_str);
            if actual != Some(expected) {
                return Err(bad(format!(
                    "prefetch '{key}' should be a {expected}, not {}",
                    actual.unwrap_or("a non-resource")
                )));
            }
        }
        Ok(request)
    }

    pub fn patient_id(&self) -> Option<&str> {
        self.context.get("patientId").and_then(Value::as_str)
    }

    /// The orders the hook is about.
    pub fn orders(&self) -> Vec<&Value> {
        let draft_orders = || bundle_resources(self.context.get("draftOrders"));
        match self.hook.as_str() {
            "order-sign" => draft_orders(),
            "order-select" => {
                let selected: Vec<&str> = self.context["selections"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                draft_orders()
                    .into_iter()
                    .filter(|r| selected.contains(&reference_of(r).as_str()))
                    .collect()
            }
            "order-dispatch" => {
                let wanted: Vec<&str> = self.context["dispatchedOrders"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                self.record()
                    .into_iter()
                    .filter(|r| wanted.contains(&reference_of(r).as_str()))
                    .collect()
            }
            "appointment-book" => bundle_resources(self.context.get("appointments")),
            _ => self
                .record()
                .into_iter()
                .filter(|r| {
                    matches!(
                        r["resourceType"].as_str(),
                        Some("ServiceRequest" | "DeviceRequest" | "MedicationRequest")
                    ) && matches!(r["status"].as_str(), Some("draft" | "active" | "on-hold"))
                        // Only this encounter's orders, not every long-standing prescription.
                        && r["encounter"]["reference"].as_str().is_some_and(|e| {
                            self.context["encounterId"]
                                .as_str()
                                .is_some_and(|id| e.ends_with(&format!("Encounter/{id}")))
                        })
                })
                .collect(),
        }
    }

    /// Every resource prefetched (Bundles opened).
    pub fn record(&self) -> Vec<&Value> {
        let mut out = Vec::new();
        for value in self.prefetch.values() {
            if value["resourceType"] == "Bundle" {
                out.extend(bundle_resources(Some(value)));
            } else if value.is_object() {
                out.push(value);
            }
        }
        out
    }

    /// A `davinci-crd.configuration` option from the request's extension.
    pub fn configuration(&self, code: &str) -> Option<&Value> {
        self.extension
            .as_ref()?
            .get("davinci-crd.configuration")?
            .get(code)
    }
}

/// The resource type a prefetch template yields: `Patient/{{…}}` a Patient, a search a Bundle.
pub fn expected_type(template: &str) -> &str {
    let head = template.split(['/', '?']).next().unwrap_or_default();
    if template.contains('?') {
        "Bundle"
    } else {
        head
    }
}

/// Resources in a Bundle, or in a plain array (older appointment-book examples).
fn bundle_resources(value: Option<&Value>) -> Vec<&Value> {
    match value {
        Some(Value::Array(items)) => items.iter().filter(|r| r.is_object()).collect(),
        Some(bundle) => bundle["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| &e["resource"])
            .filter(|r| r.is_object())
            .collect(),
        None => Vec::new(),
    }
}

pub fn reference_of(resource: &Value) -> String {
    format!(
        "{}/{}",
        resource["resourceType"].as_str().unwrap_or_default(),
        resource["id"].as_str().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn templates() -> BTreeMap<String, String> {
        [
            ("patient", "Patient/{{context.patientId}}"),
            ("coverage", "Coverage?patient={{context.patientId}}"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
    }

    fn parse(body: &str) -> Result<CdsRequest, FhirError> {
        CdsRequest::parse(body.as_bytes(), "order-sign", &templates())
    }

    #[test]
    fn checks_the_envelope() {
        let ok = r#"{"hook":"order-sign","hookInstance":"x","context":{"userId":"Practitioner/1","patientId":"1","draftOrders":{"resourceType":"Bundle","entry":[]}}}"#;
        assert!(parse(ok).is_ok());
        let cases = [
            (
                r#"{"hookInstance":"x","context":{}}"#,
                "missing field `hook`",
            ),
            (
                r#"{"hook":"order-sign","context":{}}"#,
                "missing field `hookInstance`",
            ),
            (
                r#"{"hook":"order-sign","hookInstance":"x"}"#,
                "missing field `context`",
            ),
            (
                r#"{"hook":"order-select","hookInstance":"x","context":{}}"#,
                "not 'order-select'",
            ),
            (
                r#"{"hook":"order-sign","hookInstance":"x","context":{"patientId":"1"}}"#,
                "lacks userId, draftOrders",
            ),
            (
                r#"{"hook":"order-sign","hookInstance":"x","fhirAuthorization":{"access_token":"t","token_type":"Bearer"},"context":{"userId":"u","patientId":"1","draftOrders":{}}}"#,
                "without fhirServer",
            ),
            (
                r#"{"hook":"order-sign","hookInstance":"x","prefetch":{"patient":{"resourceType":"Observation"}},"context":{"userId":"u","patientId":"1","draftOrders":{}}}"#,
                "should be a Patient",
            ),
            (
                r#"{"hook":"order-sign","hookInstance":"x","prefetch":{"coverage":{"resourceType":"Coverage"}},"context":{"userId":"u","patientId":"1","draftOrders":{}}}"#,
                "should be a Bundle",
            ),
            ("{not json", "not a CDS Hooks request"),
        ];
        for (body, want) in cases {
            let err = parse(body).expect_err(body);
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert!(
                err.issues[0].diagnostics.contains(want),
                "{body}: {}",
                err.issues[0].diagnostics
            );
        }
    }

    #[test]
    fn secrets_in_the_request_do_not_print() {
        let body = r#"{"hook":"order-sign","hookInstance":"x","fhirServer":"https://ehr.example/fhir","fhirAuthorization":{"access_token":"sekrit","token_type":"Bearer"},"context":{"userId":"u","patientId":"1","draftOrders":{}}}"#;
        let request = parse(body).expect("valid");
        assert!(!format!("{request:?}").contains("sekrit"));
    }
}
