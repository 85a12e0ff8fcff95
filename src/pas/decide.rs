//! One decision per Claim item, from the payer's policy: the item's service code becomes an
//! order for the determination engine, the Bundle's resources (and the Claim's diagnoses) its
//! clinical record. The policy answer maps onto X12 306 review actions.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::check::PasRequest;
use crate::pa::{CoverageStatus, Determination, PolicyFile, PolicySet, PriorAuth, Status};

/// X12 306 (Action Code) values PAS uses for an item's review.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReviewAction {
    /// A1: certified in total.
    Approved,
    /// A3: not certified.
    Denied,
    /// A4: pended, waiting for information or a reviewer.
    Pended,
    /// NA: no action required (the service needs no prior authorization).
    NoActionRequired,
}

impl ReviewAction {
    pub fn code(self) -> &'static str {
        match self {
            Self::Approved => "A1",
            Self::Denied => "A3",
            Self::Pended => "A4",
            Self::NoActionRequired => "NA",
        }
    }

    pub fn display(self) -> &'static str {
        match self {
            Self::Approved => "Certified in total",
            Self::Denied => "Not Certified",
            Self::Pended => "Pended",
            Self::NoActionRequired => "No Action Required",
        }
    }

    pub fn is_final(self) -> bool {
        self != Self::Pended
    }
}

/// The decision on one item, and how it came about.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ItemDecision {
    pub sequence: u32,
    pub action: ReviewAction,
    /// The code decided on (`system|code`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<Value>,
    /// The authorization number of an approved item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_auth_ref: Option<String>,
    /// Start and end (dates) of the authorization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<(String, String)>,
    /// Why an item was denied (or pended).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// What a pended item still needs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    /// The policy's answer in full (criteria, evidence), for packets and reviewers.
    pub determination: Value,
    /// RFC 3339 instant.
    pub decided_at: String,
    /// `policy`, or `reviewer:{name}`.
    pub decided_by: String,
}

/// Days an authorization lasts when the request names no service period.
const DEFAULT_AUTH_DAYS: i64 = 90;

/// Decides every item of `request` for `payer`. `claim_key` makes authorization numbers.
pub fn decide_items(
    request: &PasRequest<'_>,
    policies: &PolicySet,
    payer: &PolicyFile,
    claim_key: &str,
    now: &str,
    today: time::Date,
) -> Vec<ItemDecision> {
    let resources = request.resources();
    let mut ctx = crate::pa::ClinicalContext::new(today);
    ctx.add_resources(resources.iter().copied());
    request
        .items
        .iter()
        .map(|item| {
            let order = order_for(request, item.item, item.sequence);
            let determination = policies.determine(&order, Some(payer), &ctx);
            decision_from(
                &determination,
                item.sequence,
                item.item,
                claim_key,
                now,
                today,
            )
        })
        .collect()
}

/// The order the policy decides: the item's requested service (ServiceRequest, DeviceRequest,
/// MedicationRequest…) when it points at one, with the item's billing code, which is what the
/// payer authorizes.
fn order_for(request: &PasRequest<'_>, item: &Value, sequence: u32) -> Value {
    let claim_id = request.claim["id"].as_str().unwrap_or("claim");
    let kind = request
        .requested_service(item)
        .and_then(|r| r["resourceType"].as_str())
        .unwrap_or("ServiceRequest");
    let mut order = json!({
        "resourceType": kind,
        "id": format!("{claim_id}-item-{sequence}"),
        "subject": request.claim["patient"],
    });
    let codes = &item["productOrService"];
    match kind {
        "MedicationRequest" => order["medicationCodeableConcept"] = codes.clone(),
        "DeviceRequest" => order["codeCodeableConcept"] = codes.clone(),
        _ => order["code"] = codes.clone(),
    }
    order
}

fn decision_from(
    determination: &Determination,
    sequence: u32,
    item: &Value,
    claim_key: &str,
    now: &str,
    today: time::Date,
) -> ItemDecision {
    let unmet = determination
        .criteria
        .as_ref()
        .is_some_and(|c| c.status == Status::Unmet);
    let (action, reasons, missing) = match (determination.coverage, determination.prior_auth) {
        (CoverageStatus::NotCovered, _) => (
            ReviewAction::Denied,
            vec![determination.reason.clone()],
            Vec::new(),
        ),
        (_, PriorAuth::NotNeeded) => (ReviewAction::NoActionRequired, Vec::new(), Vec::new()),
        (_, PriorAuth::Satisfied) => (ReviewAction::Approved, Vec::new(), Vec::new()),
        (_, PriorAuth::Needed) if unmet => {
            let mut reasons = vec![determination.reason.clone()];
            reasons.extend(
                determination
                    .missing
                    .iter()
                    .map(|m| format!("not met: {m}")),
            );
            (ReviewAction::Denied, reasons, Vec::new())
        }
        (_, PriorAuth::Needed) => {
            let mut missing = if determination.missing.is_empty() {
                determination.documentation.clone()
            } else {
                determination.missing.clone()
            };
            if missing.is_empty() {
                missing.push("clinical documentation of medical necessity".to_owned());
            }
            (
                ReviewAction::Pended,
                vec![determination.reason.clone()],
                missing,
            )
        }
        (_, PriorAuth::Unknown) => (
            ReviewAction::Pended,
            vec![determination.reason.clone()],
            vec!["a service code the payer's policy can decide on".to_owned()],
        ),
    };
    let approved = action == ReviewAction::Approved;
    ItemDecision {
        sequence,
        action,
        code: determination
            .billing_code
            .as_ref()
            .and_then(|c| serde_json::to_value(c).ok()),
        pre_auth_ref: approved.then(|| authorization_number(claim_key, sequence)),
        period: approved.then(|| service_period(item, today)),
        reasons,
        missing,
        determination: serde_json::to_value(determination).unwrap_or(Value::Null),
        decided_at: now.to_owned(),
        decided_by: "policy".into(),
    }
}

/// `PA-{claim}-{sequence}`: stable for a claim, so a resubmission gets the same number.
pub fn authorization_number(claim_key: &str, sequence: u32) -> String {
    let short: String = claim_key
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(10)
        .collect::<String>()
        .to_uppercase();
    format!("PA-{short}-{sequence}")
}

/// The item's service date or period, else today through 90 days from now.
pub fn service_period(item: &Value, today: time::Date) -> (String, String) {
    if let Some(date) = item["servicedDate"].as_str() {
        return (date.to_owned(), date.to_owned());
    }
    let period = &item["servicedPeriod"];
    if let (Some(start), Some(end)) = (period["start"].as_str(), period["end"].as_str()) {
        return (start.to_owned(), end.to_owned());
    }
    let end = today + time::Duration::days(DEFAULT_AUTH_DAYS);
    (date_text(today), date_text(end))
}

pub fn date_text(date: time::Date) -> String {
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_numbers_are_stable_and_short() {
        assert_eq!(
            authorization_number("3f2a9c4e-1b2d-4c3e-8f9a-0b1c2d3e4f5a", 2),
            "PA-3F2A9C4E1B-2"
        );
    }

    #[test]
    fn service_periods_come_from_the_item_or_default_to_90_days() {
        let today = time::macros::date!(2025 - 01 - 15);
        assert_eq!(
            service_period(&json!({"servicedDate": "2025-02-01"}), today),
            ("2025-02-01".into(), "2025-02-01".into())
        );
        assert_eq!(
            service_period(&json!({}), today),
            ("2025-01-15".into(), "2025-04-15".into())
        );
    }
}
