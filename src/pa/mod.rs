//! Prior-authorization determination against payer policies.
//!
//! [`PolicySet::load_dir`] reads `policies/` (one JSON file per payer, see [`policy`]) and refuses
//! files with errors, naming file and line. [`PolicySet::determine`] answers for one order: is it
//! covered, is prior authorization needed, and — criterion by criterion, with evidence — is the
//! documentation already there or what is missing. CDS Hooks, CRD and PAS build their answers
//! from a [`Determination`].

pub mod context;
pub mod evaluate;
pub mod policy;

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

pub use context::{ClinicalContext, Fact, FactSource};
pub use evaluate::{CriterionResult, Status};
pub use policy::{PolicyError, PolicyErrors, PolicyFile};

use policy::{Benefit, Code, Rule};

/// Every payer's policy.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    pub payers: Vec<PolicyFile>,
}

/// Whether the ordered service is a covered benefit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CoverageStatus {
    Covered,
    NotCovered,
    /// Covered only if the criteria are met.
    Conditional,
    /// The payer is not known here, so coverage cannot be said.
    Unknown,
}

/// Whether prior authorization is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PriorAuth {
    NotNeeded,
    Needed,
    /// Needed, and the record already satisfies the criteria.
    Satisfied,
    Unknown,
}

/// The answer for one order.
#[derive(Debug, Clone, Serialize)]
pub struct Determination {
    /// `ServiceRequest/1`, … — the order this is about.
    pub order: String,
    /// The order's subject reference, for orders proposed in its place.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub payer: Option<String>,
    pub coverage: CoverageStatus,
    pub prior_auth: PriorAuth,
    /// The billing code the rule matched (or the order's first code).
    pub billing_code: Option<BillingCode>,
    pub rule_id: Option<String>,
    pub rule_title: Option<String>,
    pub policy_url: Option<String>,
    pub criteria: Option<CriterionResult>,
    /// What would make the criteria met.
    pub missing: Vec<String>,
    pub documentation: Vec<String>,
    pub alternatives: Vec<BillingCode>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BillingCode {
    pub system: String,
    pub code: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

impl From<&Code> for BillingCode {
    fn from(c: &Code) -> Self {
        Self {
            system: c.system.clone(),
            code: c.code.clone(),
            display: c.display.clone(),
        }
    }
}

impl PolicySet {
    /// Loads every `*.json` policy in `dir` (not `*.schema.json`). All errors of all files are
    /// reported together.
    pub fn load_dir(dir: &Path) -> Result<Self, PolicyErrors> {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            PolicyErrors(vec![PolicyError {
                file: dir.to_owned(),
                line: 0,
                message: format!("cannot read the policy folder: {e}"),
            }])
        })?;
        let mut paths: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "json")
                    && !p.to_string_lossy().ends_with(".schema.json")
            })
            .collect();
        paths.sort();
        let mut payers = Vec::new();
        let mut errors = Vec::new();
        for path in paths {
            match std::fs::read_to_string(&path) {
                Ok(text) => match policy::parse_policy(&path, &text) {
                    Ok(p) => payers.push(p),
                    Err(e) => errors.extend(e),
                },
                Err(e) => errors.push(PolicyError {
                    file: path.clone(),
                    line: 0,
                    message: e.to_string(),
                }),
            }
        }
        let mut ids = std::collections::BTreeSet::new();
        for p in &payers {
            if !ids.insert(p.payer.id.clone()) {
                errors.push(PolicyError {
                    file: dir.to_owned(),
                    line: 0,
                    message: format!("payer id '{}' is used by two files", p.payer.id),
                });
            }
        }
        if errors.is_empty() {
            Ok(Self { payers })
        } else {
            Err(PolicyErrors(errors))
        }
    }

    /// The payer of `coverage`: its `payor` references' identifiers or display names, or the
    /// Organization they point at among `resources`.
    pub fn payer_for<'a>(
        &'a self,
        coverage: &Value,
        resources: &[&Value],
    ) -> Option<&'a PolicyFile> {
        let mut names: Vec<String> = Vec::new();
        let mut identifiers: Vec<(String, String)> = Vec::new();
        for payor in coverage["payor"].as_array().into_iter().flatten() {
            if let Some(d) = payor["display"].as_str() {
                names.push(d.to_lowercase());
            }
            if let (Some(s), Some(v)) = (
                payor["identifier"]["system"].as_str(),
                payor["identifier"]["value"].as_str(),
            ) {
                identifiers.push((s.to_owned(), v.to_owned()));
            }
            if let Some(reference) = payor["reference"].as_str() {
                let target = crate::fhir::search::normalize_reference(reference);
                for r in resources
                    .iter()
                    .filter(|r| r["resourceType"] == "Organization")
                {
                    if format!("Organization/{}", r["id"].as_str().unwrap_or_default()) == target {
                        if let Some(n) = r["name"].as_str() {
                            names.push(n.to_lowercase());
                        }
                        for alias in r["alias"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(Value::as_str)
                        {
                            names.push(alias.to_lowercase());
                        }
                        for id in r["identifier"].as_array().into_iter().flatten() {
                            if let (Some(s), Some(v)) =
                                (id["system"].as_str(), id["value"].as_str())
                            {
                                identifiers.push((s.to_owned(), v.to_owned()));
                            }
                        }
                    }
                }
            }
        }
        self.payers.iter().find(|p| {
            p.payer.identifiers.iter().any(|i| {
                identifiers
                    .iter()
                    .any(|(s, v)| *s == i.system && *v == i.value)
            }) || std::iter::once(&p.payer.name)
                .chain(&p.payer.aliases)
                .any(|n| names.contains(&n.to_lowercase()))
        })
    }

    /// Decides one order (ServiceRequest, DeviceRequest, MedicationRequest, Appointment, …) for
    /// the patient in `ctx` under `payer` (`None` when the Coverage's payer is not known here).
    pub fn determine(
        &self,
        order: &Value,
        payer: Option<&PolicyFile>,
        ctx: &ClinicalContext,
    ) -> Determination {
        let order_ref = format!(
            "{}/{}",
            order["resourceType"].as_str().unwrap_or("?"),
            order["id"].as_str().unwrap_or("?")
        );
        let codes = order_codes(order);
        let first_code = codes.first().map(|c| BillingCode {
            system: c.0.clone().unwrap_or_default(),
            code: c.1.clone(),
            display: None,
        });
        let mut answer = Determination {
            order: order_ref,
            subject: order["subject"]["reference"]
                .as_str()
                .or_else(|| order["patient"]["reference"].as_str())
                .map(str::to_owned),
            payer: payer.map(|p| p.payer.name.clone()),
            coverage: CoverageStatus::Unknown,
            prior_auth: PriorAuth::Unknown,
            billing_code: first_code,
            rule_id: None,
            rule_title: None,
            policy_url: None,
            criteria: None,
            missing: Vec::new(),
            documentation: Vec::new(),
            alternatives: Vec::new(),
            reason: String::new(),
        };
        if codes.is_empty() {
            answer.reason = "the order carries no code, so coverage cannot be determined".into();
            return answer;
        }
        let Some(payer) = payer else {
            answer.reason = "the patient's payer is not one this server has policies for".into();
            return answer;
        };
        let Some((rule, code)) = find_rule(payer, &codes) else {
            answer.coverage = CoverageStatus::Covered;
            answer.prior_auth = PriorAuth::NotNeeded;
            answer.reason = format!(
                "{} requires no prior authorization for this service",
                payer.payer.name
            );
            return answer;
        };
        answer.billing_code = Some(code.into());
        answer.rule_id = Some(rule.id.clone());
        answer.rule_title = Some(rule.title.clone());
        answer.policy_url = rule.policy_url.clone();
        answer.documentation = rule.documentation.clone();
        answer.alternatives = rule.alternatives.iter().map(BillingCode::from).collect();
        if rule.benefit == Benefit::NotCovered {
            answer.coverage = CoverageStatus::NotCovered;
            answer.prior_auth = PriorAuth::NotNeeded;
            answer.reason = rule
                .reason
                .clone()
                .unwrap_or_else(|| format!("{} is not a covered benefit", rule.title));
            return answer;
        }
        let result = rule
            .criteria
            .as_ref()
            .map(|c| evaluate::evaluate(c, payer, ctx));
        let status = result.as_ref().map(|r| r.status);
        answer.missing = result
            .as_ref()
            .map(CriterionResult::missing)
            .unwrap_or_default();
        answer.criteria = result;
        (answer.coverage, answer.prior_auth, answer.reason) = match (rule.prior_auth, status) {
            (false, _) => (
                CoverageStatus::Covered,
                PriorAuth::NotNeeded,
                format!("{}: covered without prior authorization", rule.title),
            ),
            (true, Some(Status::Met)) => (
                CoverageStatus::Covered,
                PriorAuth::Satisfied,
                format!(
                    "{}: prior authorization needed; the record meets the criteria",
                    rule.title
                ),
            ),
            (true, Some(Status::Unmet)) => (
                CoverageStatus::Conditional,
                PriorAuth::Needed,
                format!(
                    "{}: prior authorization needed; the record does not meet the criteria",
                    rule.title
                ),
            ),
            (true, _) => (
                CoverageStatus::Conditional,
                PriorAuth::Needed,
                format!(
                    "{}: prior authorization needed; more documentation is required",
                    rule.title
                ),
            ),
        };
        answer
    }
}

impl PolicySet {
    /// Decides `order` for the patient whose resources (Patient, Coverage, payor Organization,
    /// problems, results, medications, …) are in `resources`, with `facts` from the notes.
    pub fn determine_with(
        &self,
        order: &Value,
        resources: &[&Value],
        facts: Option<Vec<Fact>>,
        today: time::Date,
    ) -> Determination {
        let mut flat: Vec<&Value> = Vec::new();
        for r in resources {
            flatten(r, &mut flat);
        }
        let mut ctx = ClinicalContext::new(today);
        ctx.add_resources(flat.iter().copied());
        if let Some(facts) = facts {
            ctx.add_facts(facts);
        }
        let payer = flat
            .iter()
            .filter(|r| r["resourceType"] == "Coverage")
            .find_map(|c| self.payer_for(c, &flat));
        self.determine(order, payer, &ctx)
    }
}

fn flatten<'a>(resource: &'a Value, out: &mut Vec<&'a Value>) {
    if resource["resourceType"] == "Bundle" {
        for entry in resource["entry"].as_array().into_iter().flatten() {
            flatten(&entry["resource"], out);
        }
    } else if resource.is_object() {
        out.push(resource);
    }
}

impl Determination {
    /// A readable report: the answer, then the criteria trace.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("order:        {}\n", self.order));
        if let Some(code) = &self.billing_code {
            out.push_str(&format!("billing code: {} {}\n", code.system, code.code));
        }
        out.push_str(&format!(
            "payer:        {}\n",
            self.payer.as_deref().unwrap_or("(unknown)")
        ));
        if let (Some(id), Some(title)) = (&self.rule_id, &self.rule_title) {
            out.push_str(&format!("rule:         {id} ({title})\n"));
        }
        out.push_str(&format!("coverage:     {}\n", serde_plain(&self.coverage)));
        out.push_str(&format!(
            "prior auth:   {}\n",
            serde_plain(&self.prior_auth)
        ));
        out.push_str(&format!("reason:       {}\n", self.reason));
        if let Some(url) = &self.policy_url {
            out.push_str(&format!("policy:       {url}\n"));
        }
        if let Some(criteria) = &self.criteria {
            out.push_str("\ncriteria:\n");
            criteria.render(1, &mut out);
        }
        if !self.missing.is_empty() {
            out.push_str("\nmissing:\n");
            for m in &self.missing {
                out.push_str(&format!("  - {m}\n"));
            }
        }
        if !self.documentation.is_empty() {
            out.push_str("\ndocumentation to attach:\n");
            for d in &self.documentation {
                out.push_str(&format!("  - {d}\n"));
            }
        }
        out
    }
}

fn serde_plain<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn find_rule<'a>(
    payer: &'a PolicyFile,
    codes: &[(Option<String>, String)],
) -> Option<(&'a Rule, &'a Code)> {
    payer.rules.iter().find_map(|rule| {
        rule.codes
            .iter()
            .find(|c| {
                codes
                    .iter()
                    .any(|(s, code)| *code == c.code && s.as_deref() == Some(c.system.as_str()))
            })
            .map(|c| (rule, c))
    })
}

/// The codes an order carries: its code concept, CRD billing options, or the medication.
pub fn order_codes(order: &Value) -> Vec<(Option<String>, String)> {
    let mut out = Vec::new();
    for concept in [
        &order["code"],
        &order["codeCodeableConcept"],
        &order["medicationCodeableConcept"],
        &order["productOrService"],
    ] {
        for c in context::codings(concept) {
            out.push((c.system, c.code));
        }
        for ext in concept["extension"].as_array().into_iter().flatten() {
            if ext["url"]
                .as_str()
                .is_some_and(|u| u.ends_with("ext-billing-options"))
            {
                for c in context::codings(&ext["valueCodeableConcept"]) {
                    out.push((c.system, c.code));
                }
            }
        }
    }
    for service in order["serviceType"].as_array().into_iter().flatten() {
        for c in context::codings(service) {
            out.push((c.system, c.code));
        }
    }
    out
}
