//! The structural rules of a PAS request Bundle, checked before anything is decided: a
//! `collection` Bundle whose first entry is a preauthorization Claim, every reference
//! resolving inside the Bundle, the Claim's insurance pointing at a Coverage, items with
//! service codes and distinct sequences. Each failure names its place as FHIRPath.

use std::collections::{HashMap, HashSet};

use http::StatusCode;
use serde_json::Value;

use crate::fhir::{FhirError, Issue};

/// A request Bundle that passed the checks, with the parts the determination needs.
pub struct PasRequest<'a> {
    pub bundle: &'a Value,
    pub claim: &'a Value,
    /// `Claim.identifier[0]` as `(system, value)`: what makes a resubmission the same request.
    pub identifier: (String, String),
    pub patient: &'a Value,
    pub coverage: &'a Value,
    pub insurer: Option<&'a Value>,
    pub provider: Option<&'a Value>,
    pub items: Vec<RequestItem<'a>>,
    /// `Claim.related[].claim` of an update: a reference or an identifier of the earlier claim.
    pub related: Option<RelatedClaim>,
    index: ReferenceIndex<'a>,
}

pub struct RequestItem<'a> {
    pub sequence: u32,
    pub item: &'a Value,
}

/// How an update names the claim it updates.
#[derive(Debug, Clone)]
pub enum RelatedClaim {
    /// `Claim/{id}` (the id the submitter gave the earlier Claim).
    Reference(String),
    Identifier(String, String),
}

impl<'a> PasRequest<'a> {
    /// The entry a reference points at, if it is in the Bundle.
    pub fn resolve(&self, reference: &str) -> Option<&'a Value> {
        self.index.resolve(reference)
    }

    /// Every resource in the Bundle.
    pub fn resources(&self) -> Vec<&'a Value> {
        self.bundle["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| &e["resource"])
            .filter(|r| r.is_object())
            .collect()
    }

    /// The resource an item's `requestedService` extension points at (the order).
    pub fn requested_service(&self, item: &Value) -> Option<&'a Value> {
        item["extension"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| {
                e["url"]
                    .as_str()
                    .is_some_and(|u| u.ends_with("extension-requestedService"))
            })
            .and_then(|e| e["valueReference"]["reference"].as_str())
            .and_then(|r| self.resolve(r))
    }
}

/// Entries by `fullUrl` and by `Type/id`.
struct ReferenceIndex<'a> {
    by_url: HashMap<&'a str, &'a Value>,
    by_type_id: HashMap<String, &'a Value>,
}

impl<'a> ReferenceIndex<'a> {
    fn new(entries: &'a [Value]) -> Self {
        let mut by_url = HashMap::new();
        let mut by_type_id = HashMap::new();
        for entry in entries {
            let resource = &entry["resource"];
            if let Some(url) = entry["fullUrl"].as_str() {
                by_url.insert(url, resource);
            }
            if let (Some(t), Some(id)) =
                (resource["resourceType"].as_str(), resource["id"].as_str())
            {
                by_type_id.insert(format!("{t}/{id}"), resource);
            }
        }
        Self { by_url, by_type_id }
    }

    fn resolve(&self, reference: &str) -> Option<&'a Value> {
        if let Some(found) = self.by_url.get(reference) {
            return Some(found);
        }
        // Relative (`Type/id`, `Type/id/_history/n`) or absolute with the same tail.
        let without_history = reference.split("/_history/").next().unwrap_or(reference);
        let mut parts = without_history.rsplit('/');
        let id = parts.next()?;
        let resource_type = parts.next()?;
        self.by_type_id
            .get(&format!("{resource_type}/{id}"))
            .copied()
    }
}

fn unprocessable(
    code: &'static str,
    message: impl Into<String>,
    at: impl Into<String>,
) -> FhirError {
    FhirError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        Issue::error(code, message).at(at),
    )
}

/// Checks `bundle` against PAS's structural rules (the R4 schema is checked before).
pub fn check_request(bundle: &Value) -> Result<PasRequest<'_>, FhirError> {
    if bundle["resourceType"] != "Bundle" {
        return Err(
            FhirError::bad_request("structure", "a PAS request is a Bundle").at("resourceType"),
        );
    }
    if bundle["type"] != "collection" {
        return Err(unprocessable(
            "value",
            format!(
                "a PAS request Bundle has type collection, not {}",
                bundle["type"].as_str().unwrap_or("(none)")
            ),
            "Bundle.type",
        ));
    }
    let entries = bundle["entry"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let Some(first) = entries.first() else {
        return Err(unprocessable(
            "required",
            "the Bundle has no entries",
            "Bundle.entry",
        ));
    };
    let claim = &first["resource"];
    if claim["resourceType"] != "Claim" {
        let where_claim = entries
            .iter()
            .position(|e| e["resource"]["resourceType"] == "Claim");
        let message = match where_claim {
            Some(i) => format!("the Claim must be the first entry, not entry {i}"),
            None => "the Bundle has no Claim".to_owned(),
        };
        return Err(unprocessable(
            "structure",
            message,
            "Bundle.entry[0].resource",
        ));
    }
    const CLAIM: &str = "Bundle.entry[0].resource";
    if claim["use"] != "preauthorization" {
        return Err(unprocessable(
            "value",
            format!(
                "Claim.use must be preauthorization, not {}",
                claim["use"].as_str().unwrap_or("(none)")
            ),
            format!("{CLAIM}.use"),
        ));
    }
    let identifier = claim["identifier"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|i| {
            Some((
                i["system"].as_str()?.to_owned(),
                i["value"].as_str()?.to_owned(),
            ))
        })
        .ok_or_else(|| {
            unprocessable(
                "required",
                "the Claim needs an identifier with a system and a value",
                format!("{CLAIM}.identifier"),
            )
        })?;
    let index = ReferenceIndex::new(entries);
    // The Claim's references, and its Coverage's, must resolve inside the Bundle: they are
    // what the decision rests on. (Other resources may point further — the IG's own examples
    // have a PractitionerRole whose Practitioner is not included.)
    check_references(claim, &index, CLAIM)?;
    let required_reference = |field: &str, wanted: &[&str]| -> Result<&Value, FhirError> {
        let at = format!("{CLAIM}.{field}");
        let reference = claim[field]["reference"]
            .as_str()
            .ok_or_else(|| unprocessable("required", format!("Claim.{field} is required"), &at))?;
        let target = index.resolve(reference).ok_or_else(|| {
            unprocessable(
                "not-found",
                format!("{reference} is not in the Bundle"),
                &at,
            )
        })?;
        let kind = target["resourceType"].as_str().unwrap_or_default();
        if !wanted.contains(&kind) {
            return Err(unprocessable(
                "invalid",
                format!(
                    "Claim.{field} points at a {kind}, not a {}",
                    wanted.join(" or ")
                ),
                at,
            ));
        }
        Ok(target)
    };
    let patient = required_reference("patient", &["Patient"])?;
    let insurer = required_reference("insurer", &["Organization"]).ok();
    let provider = required_reference(
        "provider",
        &["Organization", "Practitioner", "PractitionerRole"],
    )
    .ok();
    let insurance = claim["insurance"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let focal = insurance
        .iter()
        .position(|i| i["focal"] == true)
        .unwrap_or(0);
    let coverage_at = format!("{CLAIM}.insurance[{focal}].coverage");
    let coverage = insurance
        .get(focal)
        .and_then(|i| i["coverage"]["reference"].as_str())
        .and_then(|r| index.resolve(r))
        .filter(|c| c["resourceType"] == "Coverage")
        .ok_or_else(|| {
            unprocessable(
                "required",
                "Claim.insurance must point at a Coverage in the Bundle",
                coverage_at,
            )
        })?;
    if let Some(at) = entries
        .iter()
        .position(|e| std::ptr::eq(&e["resource"], coverage))
    {
        check_references(coverage, &index, &format!("Bundle.entry[{at}].resource"))?;
    }
    let mut items = Vec::new();
    let mut sequences = HashSet::new();
    let claim_items = claim["item"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if claim_items.is_empty() {
        return Err(unprocessable(
            "required",
            "the Claim has no items",
            format!("{CLAIM}.item"),
        ));
    }
    for (i, item) in claim_items.iter().enumerate() {
        let at = format!("{CLAIM}.item[{i}]");
        let sequence = item["sequence"]
            .as_u64()
            .and_then(|s| u32::try_from(s).ok())
            .ok_or_else(|| {
                unprocessable(
                    "required",
                    "the item has no sequence",
                    format!("{at}.sequence"),
                )
            })?;
        if !sequences.insert(sequence) {
            return Err(unprocessable(
                "duplicate",
                format!("item sequence {sequence} is used twice"),
                format!("{at}.sequence"),
            ));
        }
        let has_code = item["productOrService"]["coding"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["code"].as_str().is_some_and(|code| !code.is_empty()));
        if !has_code {
            return Err(unprocessable(
                "required",
                format!("item {sequence} carries no productOrService code"),
                format!("{at}.productOrService"),
            ));
        }
        items.push(RequestItem { sequence, item });
    }
    let related = claim["related"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|r| {
            let claim_ref = &r["claim"];
            if let Some(reference) = claim_ref["reference"].as_str() {
                let tail: Vec<&str> = reference.rsplit('/').take(2).collect();
                return match tail.as_slice() {
                    [id, "Claim"] => Some(RelatedClaim::Reference(format!("Claim/{id}"))),
                    _ => None,
                };
            }
            let identifier = &claim_ref["identifier"];
            Some(RelatedClaim::Identifier(
                identifier["system"].as_str()?.to_owned(),
                identifier["value"].as_str()?.to_owned(),
            ))
        });
    Ok(PasRequest {
        bundle,
        claim,
        identifier,
        patient,
        coverage,
        insurer,
        provider,
        items,
        related,
        index,
    })
}

/// Every `reference` in `resource` resolves inside the Bundle (contained `#…` references
/// resolve inside the resource). An update's `related.claim` may name an earlier claim that is
/// not in the Bundle.
fn check_references(
    resource: &Value,
    index: &ReferenceIndex<'_>,
    path: &str,
) -> Result<(), FhirError> {
    fn walk(
        value: &Value,
        path: &str,
        index: &ReferenceIndex<'_>,
        contained: &HashSet<String>,
    ) -> Result<(), FhirError> {
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    let here = format!("{path}.{key}");
                    if key == "contained" {
                        continue;
                    }
                    if key == "related" && path.ends_with(".resource") {
                        // Claim.related points at earlier claims, kept by the payer.
                        continue;
                    }
                    if key == "reference" {
                        if let Value::String(reference) = child {
                            let found = match reference.strip_prefix('#') {
                                Some(id) => contained.contains(id),
                                None => index.resolve(reference).is_some(),
                            };
                            if !found {
                                return Err(unprocessable(
                                    "not-found",
                                    format!("{reference} is not in the Bundle"),
                                    here,
                                ));
                            }
                        }
                        continue;
                    }
                    walk(child, &here, index, contained)?;
                }
                Ok(())
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(item, &format!("{path}[{i}]"), index, contained)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
    let contained: HashSet<String> = resource["contained"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["id"].as_str().map(str::to_owned))
        .collect();
    walk(resource, path, index, &contained)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bundle() -> Value {
        json!({
            "resourceType": "Bundle", "type": "collection",
            "entry": [
                {"fullUrl": "urn:uuid:c1", "resource": {
                    "resourceType": "Claim", "id": "c1", "use": "preauthorization",
                    "identifier": [{"system": "urn:test", "value": "1"}],
                    "patient": {"reference": "Patient/p"},
                    "insurer": {"reference": "http://example.org/fhir/Organization/ins"},
                    "provider": {"reference": "urn:uuid:prov"},
                    "insurance": [{"sequence": 1, "focal": true, "coverage": {"reference": "Coverage/cov"}}],
                    "item": [{"sequence": 1, "productOrService": {"coding": [{"code": "72148"}]}}]
                }},
                {"fullUrl": "http://example.org/fhir/Patient/p", "resource": {"resourceType": "Patient", "id": "p"}},
                {"fullUrl": "http://example.org/fhir/Organization/ins", "resource": {"resourceType": "Organization", "id": "ins"}},
                {"fullUrl": "urn:uuid:prov", "resource": {"resourceType": "Organization"}},
                {"fullUrl": "http://example.org/fhir/Coverage/cov", "resource": {"resourceType": "Coverage", "id": "cov",
                    "beneficiary": {"reference": "Patient/p"}, "payor": [{"reference": "Organization/ins"}]}}
            ]
        })
    }

    fn error_at(bundle: &Value) -> (u16, String, String) {
        let Err(error) = check_request(bundle) else {
            panic!("accepted");
        };
        let issue = &error.issues[0];
        (
            error.status.as_u16(),
            issue.code.to_owned(),
            issue.expression.first().cloned().unwrap_or_default(),
        )
    }

    #[test]
    fn a_well_formed_request_resolves_every_way_of_referring() {
        let b = bundle();
        let request = check_request(&b).expect("valid");
        assert_eq!(request.identifier, ("urn:test".into(), "1".into()));
        assert_eq!(request.coverage["id"], "cov");
        assert_eq!(request.items.len(), 1);
        assert!(request.provider.is_some() && request.insurer.is_some());
    }

    #[test]
    fn structural_problems_are_named_where_they_are() {
        let mut b = bundle();
        b["entry"][0]["resource"]["use"] = json!("claim");
        assert_eq!(
            error_at(&b),
            (422, "value".into(), "Bundle.entry[0].resource.use".into())
        );
        let mut b = bundle();
        b["entry"].as_array_mut().expect("entries").swap(0, 1);
        assert_eq!(error_at(&b).2, "Bundle.entry[0].resource");
        let mut b = bundle();
        b["entry"][4]["resource"]["payor"][0]["reference"] = json!("Organization/nowhere");
        assert_eq!(
            error_at(&b),
            (
                422,
                "not-found".into(),
                "Bundle.entry[4].resource.payor[0].reference".into()
            )
        );
        let mut b = bundle();
        b["entry"][0]["resource"]["item"][0]["productOrService"] = json!({"text": "MRI"});
        assert_eq!(
            error_at(&b).2,
            "Bundle.entry[0].resource.item[0].productOrService"
        );
        let mut b = bundle();
        let item = b["entry"][0]["resource"]["item"][0].clone();
        b["entry"][0]["resource"]["item"]
            .as_array_mut()
            .expect("items")
            .push(item);
        assert_eq!(
            error_at(&b),
            (
                422,
                "duplicate".into(),
                "Bundle.entry[0].resource.item[1].sequence".into()
            )
        );
        let mut b = bundle();
        b["entry"][0]["resource"]["insurance"] = json!([]);
        assert_eq!(error_at(&b).1, "required");
        let mut b = bundle();
        b["type"] = json!("transaction");
        assert_eq!(error_at(&b).2, "Bundle.type");
    }
}
