//! Hydration: the patient's chart around one encounter, gathered into one R4 Bundle.
//!
//! The searches go out together (the source's rate limit paces them); a type the EHR does not
//! offer (a 4xx) is left out and said so, an outage fails the whole so it is tried again.
//! Notes are decoded here: base64 text in any charset, HTML, or a `Binary` on the same server.

use std::sync::Arc;

use base64::Engine;
use futures_util::future::join_all;
use serde_json::{json, Value};

use super::Tenant;
use crate::extract::notes::{attachment_body, decode, note_date, Body};
use crate::extract::Note;
use crate::remote::{FhirSource, RemoteError};

/// Types searched with `patient={id}`.
const PATIENT_TYPES: [&str; 10] = [
    "Coverage",
    "Condition",
    "MedicationStatement",
    "MedicationRequest",
    "Observation",
    "DocumentReference",
    "ServiceRequest",
    "DeviceRequest",
    "Procedure",
    "AllergyIntolerance",
];
/// Notes read when the encounter has none of its own.
const MAX_FALLBACK_NOTES: usize = 10;
/// Pages of one search at most.
const MAX_PAGES: usize = 5;
/// Order types: requests whose `encounter` is the signed encounter are decided.
const ORDER_TYPES: [&str; 3] = ["ServiceRequest", "MedicationRequest", "DeviceRequest"];

/// The chart of one encounter.
#[derive(Debug, Clone)]
pub struct Chart {
    /// A `collection` Bundle of everything gathered.
    pub bundle: Value,
    pub patient: Value,
    /// `Patient/{id}`.
    pub patient_ref: String,
    pub coverages: Vec<Value>,
    /// The encounter's orders.
    pub orders: Vec<Value>,
    pub notes: Vec<Note>,
    /// What could not be read, for the record (no PHI: types, ids and reasons).
    pub gaps: Vec<String>,
}

/// `Type/id` of a reference, relative or absolute.
pub fn local_reference(reference: &str) -> Option<String> {
    let mut parts = reference.trim_end_matches('/').rsplit('/');
    let id = parts.next()?;
    let resource_type = parts.next()?;
    (resource_type.starts_with(|c: char| c.is_ascii_uppercase()) && !id.is_empty())
        .then(|| format!("{resource_type}/{id}"))
}

fn refers_to(value: &Value, target: &str) -> bool {
    value["reference"]
        .as_str()
        .and_then(local_reference)
        .is_some_and(|r| r == target)
}

async fn search_all(
    source: &dyn FhirSource,
    resource_type: &str,
    params: &[(String, String)],
) -> Result<Vec<Value>, RemoteError> {
    let mut page = source.search(resource_type, params).await?;
    let mut out = std::mem::take(&mut page.resources);
    let mut pages = 1;
    while let Some(next) = page.next.take() {
        if pages >= MAX_PAGES {
            break;
        }
        page = source.page(&next).await?;
        out.append(&mut page.resources);
        pages += 1;
    }
    Ok(out)
}

/// A 4xx other than 401/429 means "not offered here"; the rest means "try again later".
fn is_absent(error: &RemoteError) -> bool {
    matches!(error, RemoteError::Status { status, .. } if (400..500).contains(status) && *status != 401 && *status != 429)
}

/// Gathers the chart of `encounter` from the tenant's EHR.
pub async fn gather(tenant: &Arc<Tenant>, encounter: &Value) -> Result<Chart, RemoteError> {
    let source = tenant.source.as_ref();
    let encounter_ref = format!("Encounter/{}", encounter["id"].as_str().unwrap_or_default());
    let patient_ref = encounter["subject"]["reference"]
        .as_str()
        .and_then(local_reference)
        .filter(|r| r.starts_with("Patient/"))
        .ok_or_else(|| RemoteError::Invalid(format!("{encounter_ref} has no Patient subject")))?;
    let patient_id = patient_ref.trim_start_matches("Patient/").to_owned();
    let params = vec![("patient".to_owned(), patient_id.clone())];
    let (patient, searches) = tokio::join!(
        source.read("Patient", &patient_id),
        join_all(PATIENT_TYPES.iter().map(|t| search_all(source, t, &params)))
    );
    let patient = patient?
        .ok_or_else(|| RemoteError::Invalid("the encounter's patient is not at the EHR".into()))?;
    let mut gaps = Vec::new();
    let mut found: Vec<Value> = Vec::new();
    for (resource_type, result) in PATIENT_TYPES.iter().zip(searches) {
        match result {
            Ok(resources) => found.extend(resources),
            Err(e) if is_absent(&e) => gaps.push(format!("{resource_type}: {e}")),
            Err(e) => return Err(e),
        }
    }
    let coverages: Vec<Value> = found
        .iter()
        .filter(|r| r["resourceType"] == "Coverage")
        .filter(|c| c["status"].as_str().is_none_or(|s| s == "active"))
        .cloned()
        .collect();
    // The payers, so policies can be matched by the Organization's name or identifier.
    let payor_ids: Vec<String> = coverages
        .iter()
        .flat_map(|c| c["payor"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["reference"].as_str().and_then(local_reference))
        .filter_map(|r| r.strip_prefix("Organization/").map(str::to_owned))
        .collect();
    for organization in join_all(payor_ids.iter().map(|id| source.read("Organization", id))).await {
        match organization {
            Ok(Some(o)) => found.push(o),
            Ok(None) => gaps.push("Organization: a payor is not at the EHR".into()),
            Err(e) if is_absent(&e) => gaps.push(format!("Organization: {e}")),
            Err(e) => return Err(e),
        }
    }
    let orders: Vec<Value> = found
        .iter()
        .filter(|r| ORDER_TYPES.contains(&r["resourceType"].as_str().unwrap_or_default()))
        .filter(|r| refers_to(&r["encounter"], &encounter_ref))
        .filter(|r| {
            r["status"]
                .as_str()
                .is_none_or(|s| matches!(s, "active" | "draft" | "on-hold"))
        })
        .cloned()
        .collect();
    let documents: Vec<&Value> = found
        .iter()
        .filter(|r| r["resourceType"] == "DocumentReference")
        .filter(|r| r["status"].as_str() != Some("entered-in-error"))
        .collect();
    // The encounter's own notes when it has any, else the patient's notes.
    let own: Vec<&Value> = documents
        .iter()
        .copied()
        .filter(|d| {
            d["context"]["encounter"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| refers_to(e, &encounter_ref))
        })
        .collect();
    // Without notes of its own, the patient's most recent notes stand in (not the whole chart).
    let chosen = if own.is_empty() {
        let mut recent = documents;
        recent.sort_by(|a, b| b["date"].as_str().cmp(&a["date"].as_str()));
        recent.truncate(MAX_FALLBACK_NOTES);
        recent
    } else {
        own
    };
    let mut notes = Vec::new();
    for document in chosen {
        let reference = format!(
            "DocumentReference/{}",
            document["id"].as_str().unwrap_or_default()
        );
        for content in document["content"].as_array().into_iter().flatten() {
            let text = match attachment_body(&content["attachment"]) {
                Body::Text(text) => text,
                Body::Url(url) => match fetch_binary(tenant, &url).await {
                    Ok(Some(text)) => text,
                    Ok(None) => {
                        gaps.push(format!("{reference}: the attachment is not text"));
                        continue;
                    }
                    Err(e) if is_absent(&e) => {
                        gaps.push(format!("{reference}: {e}"));
                        continue;
                    }
                    Err(e) => return Err(e),
                },
                Body::Skipped(why) => {
                    gaps.push(format!("{reference}: {why}"));
                    continue;
                }
            };
            if text.trim().is_empty() {
                gaps.push(format!("{reference}: the note is empty"));
                continue;
            }
            notes.push(Note {
                reference: reference.clone(),
                text,
                date: note_date(document),
            });
        }
    }
    let mut entries = vec![json!({"fullUrl": patient_ref, "resource": patient})];
    entries.push(json!({"fullUrl": encounter_ref, "resource": encounter}));
    for resource in &found {
        let url = format!(
            "{}/{}",
            resource["resourceType"].as_str().unwrap_or_default(),
            resource["id"].as_str().unwrap_or_default()
        );
        entries.push(json!({"fullUrl": url, "resource": resource}));
    }
    Ok(Chart {
        bundle: json!({"resourceType": "Bundle", "type": "collection", "entry": entries}),
        patient,
        patient_ref,
        coverages,
        orders,
        notes,
        gaps,
    })
}

/// The text of a `Binary` named by an attachment URL — only on the tenant's own server.
async fn fetch_binary(tenant: &Arc<Tenant>, url: &str) -> Result<Option<String>, RemoteError> {
    let base = tenant
        .remote
        .as_ref()
        .map(|r| r.base_url().to_owned())
        .unwrap_or_default();
    let relative = url
        .strip_prefix(&base)
        .map(|r| r.trim_start_matches('/'))
        .unwrap_or(url);
    let Some(id) = relative.strip_prefix("Binary/").filter(|id| {
        !id.is_empty()
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    }) else {
        return Err(RemoteError::Status {
            status: 400,
            retry_after: None,
            message: "the attachment URL is not a Binary of this EHR".into(),
            outcome: None,
        });
    };
    let Some(binary) = tenant.source.read("Binary", id).await? else {
        return Ok(None);
    };
    let content_type = binary["contentType"].as_str().unwrap_or("text/plain");
    let Some(data) = binary["data"].as_str() else {
        return Ok(None);
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|_| RemoteError::Invalid("the Binary's data is not base64".into()))?;
    Ok(decode(&bytes, content_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_read_relative_or_absolute() {
        assert_eq!(local_reference("Patient/1").as_deref(), Some("Patient/1"));
        assert_eq!(
            local_reference("https://ehr.example/fhir/Patient/a-1.E-2").as_deref(),
            Some("Patient/a-1.E-2")
        );
        assert_eq!(local_reference("urn:uuid:x"), None);
    }
}
