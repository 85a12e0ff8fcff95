//! From FHIR to a packet: the resources of a request (a PAS Bundle, or a patient's record with
//! orders) and the determination of each item become a [`PacketDocument`]; the rendered PDF
//! becomes a DocumentReference that can be written back to the EHR's chart.

use base64::Engine;
use serde_json::{json, Value};

use super::pdf::{
    Attachment, CriterionLine, CriterionStatus, DeterminationSection, PacketDocument,
    PatientSection, PayerSection, ProviderSection, ServiceLine,
};

/// The LOINC document type of a packet: 34133-9 "Summary of episode note" — the packet
/// summarizes the episode of care the requested service belongs to, with its rationale.
pub const DOCUMENT_TYPE: (&str, &str) = ("34133-9", "Summary of episode note");

const ATTESTATION: &str = "I attest that the information in this request is true, accurate and \
complete to the best of my knowledge, that the requested services are medically necessary, and \
that the supporting documentation is available in the patient's medical record.";

/// One requested item and how it was decided.
#[derive(Debug, Clone)]
pub struct DecidedItem {
    pub sequence: u32,
    /// The decision as printed, e.g. "Approved (PA-1234-1)".
    pub decision: String,
    /// The policy determination, as [`crate::pa::Determination`] serializes it.
    pub determination: Value,
    pub reasons: Vec<String>,
    pub missing: Vec<String>,
}

/// What a packet is made from.
#[derive(Debug, Clone)]
pub struct PacketSource<'a> {
    /// Every resource the request carries (Patient, Coverage, organizations, notes…), as a Bundle.
    pub bundle: &'a Value,
    /// The claim or request identifier the payer files the packet under.
    pub reference: String,
    pub payer: String,
    pub services: Vec<ServiceLine>,
    pub items: Vec<DecidedItem>,
    /// The requesting provider (Organization, Practitioner or PractitionerRole).
    pub provider: Option<&'a Value>,
    pub generated: String,
}

fn resources<'a>(bundle: &'a Value) -> impl Iterator<Item = &'a Value> + 'a {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| &e["resource"])
}

fn first_of<'a>(bundle: &'a Value, resource_type: &str) -> Option<&'a Value> {
    resources(bundle).find(|r| r["resourceType"] == resource_type)
}

/// A HumanName as people write it.
fn human_name(resource: &Value) -> Option<String> {
    let name = resource["name"].as_array()?.first()?;
    if let Some(text) = name["text"].as_str() {
        return Some(text.to_owned());
    }
    let mut parts: Vec<&str> = name["given"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if let Some(family) = name["family"].as_str() {
        parts.push(family);
    }
    (!parts.is_empty()).then(|| parts.join(" "))
}

fn npi(resource: &Value) -> Option<String> {
    resource["identifier"]
        .as_array()?
        .iter()
        .find(|i| i["system"] == "http://hl7.org/fhir/sid/us-npi")
        .and_then(|i| i["value"].as_str())
        .map(str::to_owned)
}

fn status_of(value: &Value) -> CriterionStatus {
    match value.as_str() {
        Some("met") => CriterionStatus::Met,
        Some("unmet") => CriterionStatus::Unmet,
        _ => CriterionStatus::Unknown,
    }
}

/// The criteria tree of a determination, flattened into checklist lines.
fn criteria_lines(criterion: &Value, depth: usize, out: &mut Vec<CriterionLine>) {
    if !criterion.is_object() {
        return;
    }
    let label = criterion["label"].as_str().unwrap_or_default();
    let detail = criterion["detail"].as_str().unwrap_or_default();
    out.push(CriterionLine {
        depth,
        status: status_of(&criterion["status"]),
        text: if detail.is_empty() {
            label.to_owned()
        } else {
            format!("{label} — {detail}")
        },
        evidence: criterion["evidence"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.as_str().map(str::to_owned))
            .collect(),
    });
    for part in criterion["parts"].as_array().into_iter().flatten() {
        criteria_lines(part, depth + 1, out);
    }
}

/// Text of the clinical notes carried as DocumentReferences (`text/plain` attachments).
fn note_paragraphs(bundle: &Value) -> Vec<String> {
    const MAX_NOTE: usize = 4_000;
    let mut paragraphs = Vec::new();
    for note in resources(bundle).filter(|r| r["resourceType"] == "DocumentReference") {
        for content in note["content"].as_array().into_iter().flatten() {
            let attachment = &content["attachment"];
            let plain = attachment["contentType"]
                .as_str()
                .is_some_and(|t| t.starts_with("text/plain"));
            let Some(data) = attachment["data"].as_str().filter(|_| plain) else {
                continue;
            };
            let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(data) else {
                continue;
            };
            let text = String::from_utf8_lossy(&bytes);
            let mut text: String = text.chars().take(MAX_NOTE).collect();
            if text.len() < bytes.len() {
                text.push('…');
            }
            let title = note["type"]["text"]
                .as_str()
                .or_else(|| note["description"].as_str())
                .unwrap_or("Clinical note");
            paragraphs.push(format!("{title}: {}", text.trim()));
        }
    }
    paragraphs
}

/// The packet's content.
pub fn packet_document(source: &PacketSource<'_>) -> PacketDocument {
    let bundle = source.bundle;
    let patient = first_of(bundle, "Patient");
    let coverage = first_of(bundle, "Coverage");
    let member_id = coverage.and_then(|c| {
        c["subscriberId"]
            .as_str()
            .or_else(|| c["identifier"][0]["value"].as_str())
            .map(str::to_owned)
    });
    let plan = coverage.and_then(|c| {
        c["class"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|class| {
                class["name"]
                    .as_str()
                    .or_else(|| class["value"].as_str())
                    .map(str::to_owned)
            })
    });
    let period = coverage.and_then(|c| {
        let start = c["period"]["start"].as_str();
        let end = c["period"]["end"].as_str();
        match (start, end) {
            (None, None) => None,
            (s, e) => Some(format!("{} to {}", s.unwrap_or("…"), e.unwrap_or("…"))),
        }
    });
    let mut criteria = Vec::new();
    let mut missing = Vec::new();
    let mut rationale = Vec::new();
    for item in &source.items {
        let title = item.determination["rule_title"]
            .as_str()
            .unwrap_or("Requested service");
        let status = match item.decision.split_whitespace().next() {
            Some("Approved" | "No") => CriterionStatus::Met,
            Some("Denied") => CriterionStatus::Unmet,
            _ => CriterionStatus::Unknown,
        };
        criteria.push(CriterionLine {
            depth: 0,
            status,
            text: format!("Item {}: {title} — {}", item.sequence, item.decision),
            evidence: Vec::new(),
        });
        criteria_lines(&item.determination["criteria"], 1, &mut criteria);
        missing.extend(
            item.missing
                .iter()
                .map(|m| format!("Item {}: {m}", item.sequence)),
        );
        if let Some(reason) = item.determination["reason"].as_str() {
            rationale.push(format!("Item {}: {reason}.", item.sequence));
        }
        rationale.extend(
            item.reasons
                .iter()
                .filter(|r| Some(r.as_str()) != item.determination["reason"].as_str())
                .map(|r| format!("Item {}: {r}.", item.sequence)),
        );
    }
    rationale.extend(note_paragraphs(bundle));
    let decision = match source.items.as_slice() {
        [one] => one.decision.clone(),
        items => items
            .iter()
            .map(|i| format!("item {}: {}", i.sequence, i.decision))
            .collect::<Vec<_>>()
            .join("; "),
    };
    let provider = source.provider;
    let provider_name = provider
        .and_then(|p| human_name(p).or_else(|| p["name"].as_str().map(str::to_owned)))
        .unwrap_or_default();
    let organization = provider
        .filter(|p| p["resourceType"] == "Organization")
        .and_then(|p| p["name"].as_str().map(str::to_owned));
    PacketDocument {
        title: "Prior authorization request".into(),
        reference: source.reference.clone(),
        generated: source.generated.clone(),
        patient: PatientSection {
            name: patient.and_then(human_name).unwrap_or_default(),
            birth_date: patient.and_then(|p| p["birthDate"].as_str().map(str::to_owned)),
            member_id: member_id.clone(),
        },
        payer: PayerSection {
            name: source.payer.clone(),
            plan,
            member_id,
            period,
        },
        services: source.services.clone(),
        determination: DeterminationSection {
            summary: format!(
                "{} decided {} requested item(s) against its published policy.",
                source.payer,
                source.items.len()
            ),
            decision,
            criteria,
            missing,
        },
        rationale,
        provider: ProviderSection {
            name: provider_name,
            npi: provider.and_then(npi),
            organization,
        },
        attestation: ATTESTATION.into(),
        attachment: serde_json::to_vec_pretty(bundle)
            .ok()
            .map(|data| Attachment {
                file_name: "request-bundle.json".into(),
                mime: "application/fhir+json".into(),
                data,
            }),
    }
}

/// The services of a PAS Claim's items.
pub fn claim_services(claim: &Value) -> Vec<ServiceLine> {
    claim["item"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|item| {
            let coding = &item["productOrService"]["coding"][0];
            ServiceLine {
                sequence: item["sequence"]
                    .as_u64()
                    .and_then(|s| u32::try_from(s).ok())
                    .unwrap_or(0),
                system: coding["system"].as_str().unwrap_or_default().to_owned(),
                code: coding["code"].as_str().unwrap_or_default().to_owned(),
                display: coding["display"]
                    .as_str()
                    .or_else(|| item["productOrService"]["text"].as_str())
                    .map(str::to_owned),
                quantity: item["quantity"]["value"].as_f64().map(|q| q.to_string()),
            }
        })
        .collect()
}

/// A DocumentReference carrying the packet PDF (base64 `data`, `size`, SHA-1 `hash` in base64
/// as FHIR defines it), about `subject`, by `author`, related to `related`.
pub fn document_reference(
    id: &str,
    pdf: &[u8],
    subject: &Value,
    author: Option<&Value>,
    related: &[Value],
    title: &str,
    created: &str,
) -> Value {
    use sha1::Digest;
    let engine = base64::engine::general_purpose::STANDARD;
    let hash = engine.encode(sha1::Sha1::digest(pdf));
    let identifier = json!({"system": "urn:ietf:rfc:3986", "value": format!("urn:uuid:{id}")});
    let mut document = json!({
        "resourceType": "DocumentReference",
        "id": id,
        "masterIdentifier": identifier,
        "identifier": [identifier],
        "status": "current",
        "docStatus": "final",
        "type": {
            "coding": [{"system": "http://loinc.org", "code": DOCUMENT_TYPE.0, "display": DOCUMENT_TYPE.1}],
            "text": "Prior authorization packet",
        },
        "category": [{"coding": [{
            "system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
            "code": "clinical-note",
            "display": "Clinical Note",
        }]}],
        "subject": subject,
        "date": created,
        "description": title,
        "content": [{"attachment": {
            "contentType": "application/pdf",
            "data": engine.encode(pdf),
            "size": pdf.len(),
            "hash": hash,
            "title": title,
            "creation": created,
        }}],
    });
    if let Some(author) = author {
        document["author"] = json!([author]);
    }
    if !related.is_empty() {
        document["context"] = json!({"related": related});
    }
    document
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_sha1_in_base64_and_the_size_the_byte_count() {
        let document = document_reference(
            "p1",
            b"abc",
            &json!({"reference": "Patient/1"}),
            None,
            &[json!({"reference": "Claim/c"})],
            "Packet",
            "2025-01-01T00:00:00Z",
        );
        let attachment = &document["content"][0]["attachment"];
        // SHA-1("abc") = a9993e364706816aba3e25717850c26c9cd0d89d
        assert_eq!(attachment["hash"], "qZk+NkcGgWq6PiVxeFDCbJzQ2J0=");
        assert_eq!(attachment["size"], 3);
        assert_eq!(attachment["data"], "YWJj");
        assert_eq!(document["context"]["related"][0]["reference"], "Claim/c");
        crate::fhir::SchemaValidator::bundled()
            .expect("schema")
            .validate(&document)
            .expect("valid R4");
    }

    #[test]
    fn criteria_trees_become_indented_checklists() {
        let mut lines = Vec::new();
        criteria_lines(
            &json!({"label": "All", "status": "unknown", "detail": "", "evidence": [], "parts": [
                {"label": "Diagnosis", "status": "met", "detail": "found", "evidence": ["Condition/1"]},
                {"label": "Therapy", "status": "unknown", "detail": "no procedures", "evidence": []}
            ]}),
            0,
            &mut lines,
        );
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1].depth, 1);
        assert_eq!(lines[1].status, CriterionStatus::Met);
        assert_eq!(lines[1].evidence, ["Condition/1"]);
        assert_eq!(lines[2].text, "Therapy — no procedures");
    }
}
