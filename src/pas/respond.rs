//! The PAS response Bundle, built from a claim's record: the ClaimResponse (an X12 306 review
//! action per item, authorization numbers and periods, denial reasons), the resources it
//! points at, and for pended items a Task listing what is missing. Built the same way every
//! time, so a resubmission or an inquiry gets the same answer while nothing has changed.

use serde_json::{json, Map, Value};

use super::decide::{ItemDecision, ReviewAction};
use super::ClaimRecord;

const PAS: &str = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition";
const PAS_TEMP_CODES: &str = "http://hl7.org/fhir/us/davinci-pas/CodeSystem/PASTempCodes";
const X12_306: &str = "https://codesystem.x12.org/005010/306";

/// The response Bundle for `record`, with full URLs under `base` (`{public}/fhir`).
pub fn response_bundle(record: &ClaimRecord, base: &str) -> Value {
    let claim = &record.request["entry"][0]["resource"];
    let mut entries = vec![json!({
        "fullUrl": format!("{base}/ClaimResponse/{}", record.id),
        "resource": claim_response(record, claim),
    })];
    // The resources the ClaimResponse points at, as the request carried them.
    for field in ["patient", "insurer", "provider"] {
        if let Some(entry) = request_entry(record, claim[field]["reference"].as_str(), base) {
            let same = |e: &Value| {
                e["resource"]["resourceType"] == entry["resource"]["resourceType"]
                    && e["resource"]["id"] == entry["resource"]["id"]
            };
            if !entries.iter().any(same) {
                entries.push(entry);
            }
        }
    }
    if let Some(task) = information_task(record, claim) {
        entries.push(json!({
            "fullUrl": format!("{base}/Task/{}", task["id"].as_str().unwrap_or_default()),
            "resource": task,
        }));
    }
    let mut bundle = json!({
        "resourceType": "Bundle",
        "id": format!("{}-{}", record.id, record.revision),
        "meta": {"profile": [format!("{PAS}/profile-pas-response-bundle")]},
        "type": "collection",
        "timestamp": record.updated,
        "entry": entries,
    });
    if let Some(identifier) = record.request.get("identifier") {
        bundle["identifier"] = identifier.clone();
    }
    bundle
}

/// The request entry a reference points at, with its full URL (made from `base` when the
/// request gave none).
fn request_entry(record: &ClaimRecord, reference: Option<&str>, base: &str) -> Option<Value> {
    let reference = reference?;
    let tail: Vec<&str> = reference.rsplit('/').take(2).collect();
    record.request["entry"]
        .as_array()?
        .iter()
        .find(|e| {
            e["fullUrl"].as_str() == Some(reference)
                || matches!(tail.as_slice(), [id, t]
                    if e["resource"]["resourceType"] == *t && e["resource"]["id"] == *id)
        })
        .and_then(|e| {
            let resource = &e["resource"];
            let full_url = match e["fullUrl"].as_str() {
                Some(url) => url.to_owned(),
                None => format!(
                    "{base}/{}/{}",
                    resource["resourceType"].as_str()?,
                    resource["id"].as_str()?
                ),
            };
            Some(json!({"fullUrl": full_url, "resource": resource.clone()}))
        })
}

fn claim_response(record: &ClaimRecord, claim: &Value) -> Value {
    let pended = record
        .items
        .iter()
        .any(|i| i.action == ReviewAction::Pended);
    let mut response = Map::new();
    response.insert("resourceType".into(), json!("ClaimResponse"));
    response.insert("id".into(), json!(record.id));
    response.insert(
        "meta".into(),
        json!({"profile": [format!("{PAS}/profile-claimresponse")]}),
    );
    response.insert(
        "identifier".into(),
        json!([{"system": record.identifier.0, "value": record.identifier.1}]),
    );
    response.insert("status".into(), json!("active"));
    response.insert(
        "type".into(),
        claim.get("type").cloned().unwrap_or_else(|| {
            json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]})
        }),
    );
    response.insert("use".into(), json!("preauthorization"));
    response.insert("patient".into(), claim["patient"].clone());
    response.insert("created".into(), json!(record.updated));
    if claim.get("insurer").is_some() {
        response.insert("insurer".into(), claim["insurer"].clone());
    }
    if claim.get("provider").is_some() {
        response.insert("requestor".into(), claim["provider"].clone());
    }
    response.insert(
        "request".into(),
        json!({
            "reference": format!("Claim/{}", record.claim_id),
            "identifier": {"system": record.identifier.0, "value": record.identifier.1},
        }),
    );
    response.insert(
        "outcome".into(),
        json!(if pended { "queued" } else { "complete" }),
    );
    response.insert("disposition".into(), json!(disposition(&record.items)));
    if let Some(first) = record.items.iter().find(|i| i.pre_auth_ref.is_some()) {
        if let Some(number) = &first.pre_auth_ref {
            response.insert("preAuthRef".into(), json!(number));
        }
        if let Some((start, end)) = &first.period {
            response.insert("preAuthPeriod".into(), json!({"start": start, "end": end}));
        }
    }
    response.insert(
        "item".into(),
        Value::Array(record.items.iter().map(response_item).collect()),
    );
    let notes: Vec<Value> = record
        .items
        .iter()
        .flat_map(|i| {
            i.reasons
                .iter()
                .map(move |r| format!("Item {}: {r}", i.sequence))
                .chain(
                    i.missing
                        .iter()
                        .map(move |m| format!("Item {}: needed: {m}", i.sequence)),
                )
        })
        .enumerate()
        .map(|(n, text)| json!({"number": n + 1, "type": "display", "text": text}))
        .collect();
    if !notes.is_empty() {
        response.insert("processNote".into(), Value::Array(notes));
    }
    Value::Object(response)
}

fn disposition(items: &[ItemDecision]) -> String {
    let count = |action| items.iter().filter(|i| i.action == action).count();
    let mut parts = Vec::new();
    for (action, word) in [
        (ReviewAction::Approved, "approved"),
        (ReviewAction::Denied, "denied"),
        (ReviewAction::Pended, "pended"),
        (
            ReviewAction::NoActionRequired,
            "need no prior authorization",
        ),
    ] {
        let n = count(action);
        if n > 0 {
            parts.push(format!("{n} {word}"));
        }
    }
    format!("Items: {}", parts.join(", "))
}

fn response_item(decision: &ItemDecision) -> Value {
    let mut review = vec![];
    if let Some(number) = &decision.pre_auth_ref {
        review.push(json!({"url": "number", "valueString": number}));
    }
    review.push(json!({
        "url": format!("{PAS}/extension-reviewActionCode"),
        "valueCodeableConcept": {"coding": [{
            "system": X12_306,
            "code": decision.action.code(),
            "display": decision.action.display(),
        }]},
    }));
    let mut adjudication = json!({
        "extension": [{"url": format!("{PAS}/extension-reviewAction"), "extension": review}],
        "category": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/adjudication",
            "code": "submitted",
        }]},
    });
    if !decision.reasons.is_empty() && decision.action == ReviewAction::Denied {
        adjudication["reason"] = json!({"text": decision.reasons.join("; ")});
    }
    let mut item = json!({
        "itemSequence": decision.sequence,
        "adjudication": [adjudication],
    });
    if decision.action == ReviewAction::Approved {
        let mut extensions = vec![json!({
            "url": format!("{PAS}/extension-itemPreAuthIssueDate"),
            "valueDate": decision.decided_at.get(..10).unwrap_or_default(),
        })];
        if let Some((start, end)) = &decision.period {
            extensions.push(json!({
                "url": format!("{PAS}/extension-itemPreAuthPeriod"),
                "valuePeriod": {"start": start, "end": end},
            }));
        }
        item["extension"] = Value::Array(extensions);
    }
    item
}

/// A Task asking the provider for what the pended items need, item by item.
fn information_task(record: &ClaimRecord, claim: &Value) -> Option<Value> {
    let pended: Vec<&ItemDecision> = record
        .items
        .iter()
        .filter(|i| i.action == ReviewAction::Pended)
        .collect();
    if pended.is_empty() {
        return None;
    }
    let inputs: Vec<Value> = pended
        .iter()
        .flat_map(|item| {
            item.missing.iter().map(move |needed| {
                json!({
                    "extension": [{
                        "url": format!("{PAS}/extension-serviceLineNumber"),
                        "valuePositiveInt": item.sequence,
                    }],
                    "type": {
                        "coding": [{"system": PAS_TEMP_CODES, "code": "attachments-needed"}],
                        "text": "Information needed",
                    },
                    "valueString": needed,
                })
            })
        })
        .collect();
    let mut task = json!({
        "resourceType": "Task",
        "id": format!("{}-info", record.id),
        "meta": {"profile": [format!("{PAS}/profile-task")]},
        "status": "requested",
        "intent": "order",
        "code": {"coding": [{"system": PAS_TEMP_CODES, "code": "attachment-request-code"}]},
        "description": "Send the information listed for each service line; the request stays pended until then.",
        "for": claim["patient"].clone(),
        "authoredOn": record.updated,
        "reasonCode": {"coding": [{"system": PAS_TEMP_CODES, "code": "priorAuthorization"}]},
        "reasonReference": {"reference": format!("Claim/{}", record.claim_id)},
        "input": inputs,
    });
    if claim.get("insurer").is_some() {
        task["requester"] = claim["insurer"].clone();
    }
    if claim.get("provider").is_some() {
        task["owner"] = claim["provider"].clone();
    }
    Some(task)
}
