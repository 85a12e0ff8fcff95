//! Da Vinci CRD answers: a coverage-information system action per order and the cards a
//! clinician acts on.
//!
//! Each order comes back as a copy carrying the `ext-coverage-information` extension (covered,
//! pa-needed, doc-needed, billing code, reason, date, assertion id), so the EHR can store the
//! answer with the order. Cards say what needs doing: an Instructions card with what is missing,
//! an External Reference to the policy, a Launch SMART app card to the review page (when one is
//! configured), and a Propose Alternate Request card when the policy prefers another product.

use serde_json::{json, Value};

use crate::pa::{CoverageStatus, Determination, PriorAuth};

pub const COVERAGE_INFORMATION: &str =
    "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information";
const CARD_TYPES: &str = "http://terminology.hl7.org/CodeSystem/cdshooks-card-type";

/// What the answer for one order is built from.
pub struct OrderAnswer<'a> {
    pub order: &'a Value,
    pub determination: Determination,
}

/// Options that shape the response.
pub struct ResponseOptions<'a> {
    pub coverage_info: bool,
    pub max_cards: usize,
    pub coverage_reference: Option<String>,
    pub review_app_url: Option<&'a str>,
    pub hook_instance: &'a str,
    /// `YYYY-MM-DD`.
    pub today: String,
}

/// The CDS Hooks response body.
pub fn response(answers: &[OrderAnswer<'_>], options: &ResponseOptions<'_>) -> Value {
    let mut cards: Vec<(u8, Value)> = Vec::new();
    let mut actions = Vec::new();
    let mut unknown = Vec::new();
    for answer in answers {
        let d = &answer.determination;
        if d.coverage == CoverageStatus::Unknown {
            unknown.push(d);
            continue;
        }
        if options.coverage_info {
            actions.push(json!({
                "type": "update",
                "description": format!("Coverage information for {}", d.order),
                "resource": annotate(answer.order, d, options),
            }));
        }
        cards.extend(order_cards(d, options));
    }
    if !unknown.is_empty() {
        let orders: Vec<&str> = unknown.iter().map(|d| d.order.as_str()).collect();
        let why: Vec<&str> = unknown.iter().map(|d| d.reason.as_str()).collect();
        cards.push((
            3,
            card(
                "Coverage requirements could not be determined",
                "info",
                &format!(
                    "{}\n\nOrders: {}",
                    dedup(&why).join("\n"),
                    orders.join(", ")
                ),
                "fhirgate",
                None,
                "coverage",
                &orders,
            ),
        ));
    }
    // Most important first: not covered and PA needed before references and information.
    cards.sort_by_key(|(rank, _)| *rank);
    let cards: Vec<Value> = cards
        .into_iter()
        .map(|(_, c)| c)
        .take(options.max_cards)
        .collect();
    let mut body = json!({ "cards": cards });
    if !actions.is_empty() {
        body["systemActions"] = Value::Array(actions);
    }
    body
}

fn dedup<'a>(items: &[&'a str]) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for i in items {
        if !out.contains(i) {
            out.push(i);
        }
    }
    out
}

/// The order with the coverage-information extension added.
fn annotate(order: &Value, d: &Determination, options: &ResponseOptions<'_>) -> Value {
    let mut parts = Vec::new();
    if let Some(coverage) = &options.coverage_reference {
        parts.push(json!({"url": "coverage", "valueReference": {"reference": coverage}}));
    }
    let covered = match d.coverage {
        CoverageStatus::Covered => "covered",
        CoverageStatus::NotCovered => "not-covered",
        _ => "conditional",
    };
    parts.push(json!({"url": "covered", "valueCode": covered}));
    if d.coverage != CoverageStatus::NotCovered {
        let pa = match d.prior_auth {
            PriorAuth::NotNeeded => "no-auth",
            PriorAuth::Satisfied => "satisfied",
            _ => "auth-needed",
        };
        parts.push(json!({"url": "pa-needed", "valueCode": pa}));
    }
    if d.prior_auth == PriorAuth::Needed && !d.documentation.is_empty() {
        parts.push(json!({"url": "doc-needed", "valueCode": "clinical"}));
    }
    if let Some(code) = &d.billing_code {
        parts.push(json!({"url": "billingCode", "valueCoding": {"system": code.system, "code": code.code}}));
    }
    parts.push(json!({"url": "reason", "valueCodeableConcept": {"text": d.reason}}));
    parts.push(json!({"url": "date", "valueDate": options.today}));
    let assertion = format!("{}-{}", options.hook_instance, d.order.replace('/', "-"));
    parts.push(json!({"url": "coverage-assertion-id", "valueString": assertion}));
    if d.prior_auth == PriorAuth::Satisfied {
        parts.push(json!({"url": "satisfied-pa-id", "valueString": format!("{assertion}-sat")}));
    }
    let mut annotated = order.clone();
    let extension = json!({"url": COVERAGE_INFORMATION, "extension": parts});
    match annotated.get_mut("extension").and_then(Value::as_array_mut) {
        Some(list) => {
            list.retain(|e| e["url"] != COVERAGE_INFORMATION);
            list.push(extension);
        }
        None => {
            if let Some(object) = annotated.as_object_mut() {
                object.insert("extension".into(), Value::Array(vec![extension]));
            }
        }
    }
    annotated
}

/// Cards for one order, each with a rank (lower is more important).
fn order_cards(d: &Determination, options: &ResponseOptions<'_>) -> Vec<(u8, Value)> {
    let payer = d.payer.as_deref().unwrap_or("The payer");
    let title = d.rule_title.as_deref().unwrap_or("this order");
    let orders = [d.order.as_str()];
    let mut cards = Vec::new();
    match (d.coverage, d.prior_auth) {
        (CoverageStatus::NotCovered, _) => cards.push((
            0,
            card(
                &format!("Not covered by {payer}: {title}"),
                "warning",
                &d.reason,
                payer,
                d.policy_url.as_deref(),
                "coverage",
                &orders,
            ),
        )),
        (_, PriorAuth::Needed) => {
            let mut detail = format!("{}\n", d.reason);
            if !d.missing.is_empty() {
                detail.push_str("\n**Not yet documented:**\n");
                for m in &d.missing {
                    detail.push_str(&format!("- {m}\n"));
                }
            }
            if !d.documentation.is_empty() {
                detail.push_str("\n**Attach to the request:**\n");
                for doc in &d.documentation {
                    detail.push_str(&format!("- {doc}\n"));
                }
            }
            cards.push((
                1,
                card(
                    &format!("{payer} requires prior authorization for {title}"),
                    "warning",
                    &detail,
                    payer,
                    d.policy_url.as_deref(),
                    "prior-auth",
                    &orders,
                ),
            ));
            if let Some(url) = options.review_app_url {
                let mut launch = card(
                    &format!("Review and submit the prior authorization for {title}"),
                    "info",
                    "Opens the review page with the determination, the evidence found and the packet to send.",
                    payer,
                    None,
                    "prior-auth",
                    &orders,
                );
                let app_context = json!({"order": d.order, "hookInstance": options.hook_instance, "rule": d.rule_id}).to_string();
                launch["links"] = json!([{"label": "Review prior authorization", "url": url, "type": "smart", "appContext": app_context}]);
                cards.push((2, launch));
            }
        }
        _ => {}
    }
    let actionable = d.coverage == CoverageStatus::NotCovered || d.prior_auth == PriorAuth::Needed;
    if actionable {
        if let Some(url) = &d.policy_url {
            let mut reference = card(
                &format!("{payer} policy: {title}"),
                "info",
                "The payer's coverage policy for this service.",
                payer,
                Some(url),
                "guideline",
                &orders,
            );
            reference["links"] = json!([{"label": format!("{payer} policy: {title}"), "url": url, "type": "absolute"}]);
            cards.push((4, reference));
        }
        if !d.alternatives.is_empty() {
            cards.push((1, alternatives_card(d, payer, title)));
        }
    }
    cards
}

/// A draft order like the original (same type and subject) for the alternative product.
fn alternative_order(d: &Determination, alt: &crate::pa::BillingCode, label: &str) -> Value {
    let (resource_type, id) = d
        .order
        .split_once('/')
        .unwrap_or(("ServiceRequest", "order"));
    let concept = json!({"coding": [{"system": alt.system, "code": alt.code, "display": label}]});
    let mut order = json!({
        "resourceType": resource_type,
        "id": format!("{id}-alternative"),
        "status": "draft",
        "intent": "proposal",
    });
    let element = match resource_type {
        "MedicationRequest" => "medicationCodeableConcept",
        "DeviceRequest" => "codeCodeableConcept",
        _ => "code",
    };
    order[element] = concept;
    if let Some(subject) = &d.subject {
        order["subject"] = json!({"reference": subject});
    }
    order
}

fn alternatives_card(d: &Determination, payer: &str, title: &str) -> Value {
    let suggestions: Vec<Value> = d
        .alternatives
        .iter()
        .map(|alt| {
            let label = alt.display.clone().unwrap_or_else(|| alt.code.clone());
            json!({
                "label": format!("Order {label} instead"),
                "uuid": uuid::Uuid::new_v4().to_string(),
                "isRecommended": true,
                "actions": [
                    {"type": "delete", "description": format!("Remove the order for {title}"), "resourceId": d.order},
                    {"type": "create", "description": format!("Order {label}"), "resource": alternative_order(d, alt, &label)},
                ],
            })
        })
        .collect();
    let mut c = card(
        &format!("{payer} prefers an alternative to {title}"),
        "info",
        "The payer's policy names a preferred alternative that needs no prior authorization.",
        payer,
        d.policy_url.as_deref(),
        "therapy-alternatives-opt",
        &[d.order.as_str()],
    );
    c["suggestions"] = Value::Array(suggestions);
    c["selectionBehavior"] = json!("at-most-one");
    c
}

/// A card with the fields every card carries.
fn card(
    summary: &str,
    indicator: &str,
    detail: &str,
    source: &str,
    url: Option<&str>,
    topic: &str,
    orders: &[&str],
) -> Value {
    let display = match topic {
        "prior-auth" => "Prior Authorization",
        "coverage" => "Coverage",
        "guideline" => "Guideline",
        "therapy-alternatives-opt" => "Optional Therapy Alternatives",
        other => other,
    };
    let mut source = json!({"label": source, "topic": {"system": CARD_TYPES, "code": topic, "display": display}});
    if let Some(url) = url {
        source["url"] = json!(url);
    }
    let mut c = json!({
        "uuid": uuid::Uuid::new_v4().to_string(),
        "summary": truncate(summary, 140),
        "indicator": indicator,
        "detail": detail,
        "source": source,
    });
    if !orders.is_empty() {
        c["extension"] = json!({"davinci-crd.associated-resource": orders.iter().map(|o| json!({"reference": o})).collect::<Vec<_>>()});
    }
    c
}

/// At most `max` characters, ending with `…` when cut.
fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max - 1).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_fit_in_140_characters() {
        let long = "x".repeat(300);
        let t = truncate(&long, 140);
        assert_eq!(t.chars().count(), 140);
        assert!(t.ends_with('…'));
        assert_eq!(truncate("short", 140), "short");
    }
}
