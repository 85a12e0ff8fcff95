//! The payer policy format: one JSON file per payer under `policies/`, described by
//! `policies/policy.schema.json`.
//!
//! A file names the payer (how to recognise it on a Coverage), reusable named criteria, and
//! rules: which billing codes they cover, whether prior authorization is needed, the clinical
//! criteria, the documentation to attach and the policy's URL. Loading checks the file as a
//! policy analyst would want: every problem is reported with the file and line.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One payer's policy file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(rename = "$schema", default)]
    pub schema: Option<String>,
    pub payer: Payer,
    /// Criteria that rules refer to by name (`{"ref": "name"}`).
    #[serde(default)]
    pub criteria: BTreeMap<String, Criterion>,
    pub rules: Vec<Rule>,
}

/// How a payer is recognised on a Coverage: its `payor` Organization's identifiers or name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payer {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub identifiers: Vec<Identifier>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Identifier {
    pub system: String,
    pub value: String,
}

/// A billing code (CPT, HCPCS, RxNorm, …).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub struct Code {
    pub system: String,
    pub code: String,
    #[serde(default)]
    pub display: Option<String>,
}

/// Whether a rule's service is a covered benefit.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Benefit {
    #[default]
    Covered,
    NotCovered,
}

/// The policy for a set of billing codes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub id: String,
    pub title: String,
    pub codes: Vec<Code>,
    #[serde(default)]
    pub benefit: Benefit,
    #[serde(default)]
    pub prior_auth: bool,
    #[serde(default)]
    pub criteria: Option<Criterion>,
    /// Documents the provider should attach.
    #[serde(default)]
    pub documentation: Vec<String>,
    pub policy_url: Option<String>,
    /// Why the service is not covered, or a note for the clinician.
    #[serde(default)]
    pub reason: Option<String>,
    /// Preferred alternatives (e.g. a formulary drug) to propose instead.
    #[serde(default)]
    pub alternatives: Vec<Code>,
}

/// A clinical criterion: a combination or a single test against the patient's record.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Criterion {
    All(Vec<Criterion>),
    Any(Vec<Criterion>),
    Not(Box<Criterion>),
    /// A named criterion of the same file.
    Ref(String),
    Diagnosis(DiagnosisCriterion),
    Therapy(TherapyCriterion),
    Medication(MedicationCriterion),
    Intolerance(IntoleranceCriterion),
    Observation(ObservationCriterion),
    Age(AgeCriterion),
    Sex(SexCriterion),
    Fact(FactCriterion),
}

/// A diagnosis on the problem list (Condition), by code; a trailing `*` matches a prefix.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiagnosisCriterion {
    pub label: String,
    #[serde(default)]
    pub system: Option<String>,
    pub codes: Vec<String>,
}

/// Procedures or therapy (Procedure) lasting at least `min_days` within the last `within_days`;
/// notes may supply it as a fact of kind `fact_kind` (default `conservative_therapy`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TherapyCriterion {
    pub label: String,
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub codes: Vec<String>,
    pub min_days: u32,
    #[serde(default)]
    pub within_days: Option<u32>,
    #[serde(default)]
    pub fact_kind: Option<String>,
}

/// A medication taken for at least `min_days` (step therapy), from MedicationStatement or
/// MedicationRequest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MedicationCriterion {
    pub label: String,
    #[serde(default)]
    pub system: Option<String>,
    pub codes: Vec<String>,
    pub min_days: u32,
    #[serde(default)]
    pub within_days: Option<u32>,
}

/// A documented intolerance or contraindication to a medication (AllergyIntolerance, or a fact
/// of kind `intolerance` from notes).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntoleranceCriterion {
    pub label: String,
    #[serde(default)]
    pub system: Option<String>,
    pub codes: Vec<String>,
}

/// The latest Observation with one of `codes` within `within_days` compared with `value`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservationCriterion {
    pub label: String,
    #[serde(default)]
    pub system: Option<String>,
    pub codes: Vec<String>,
    pub comparator: Comparator,
    pub value: f64,
    #[serde(default)]
    pub unit: Option<String>,
    #[serde(default)]
    pub within_days: Option<u32>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum Comparator {
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "=")]
    Eq,
}

impl Comparator {
    pub fn holds(self, actual: f64, limit: f64) -> bool {
        match self {
            Comparator::Ge => actual >= limit,
            Comparator::Gt => actual > limit,
            Comparator::Le => actual <= limit,
            Comparator::Lt => actual < limit,
            Comparator::Eq => (actual - limit).abs() < f64::EPSILON,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Comparator::Ge => "≥",
            Comparator::Gt => ">",
            Comparator::Le => "≤",
            Comparator::Lt => "<",
            Comparator::Eq => "=",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgeCriterion {
    #[serde(default)]
    pub min: Option<u32>,
    #[serde(default)]
    pub max: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SexCriterion {
    /// Administrative gender: `male`, `female`, `other`, `unknown`.
    pub is: String,
}

/// A fact extracted from clinical notes (see [`super::Fact`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FactCriterion {
    pub label: String,
    pub kind: String,
    /// One of these values (any value when empty).
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub min_days: Option<u32>,
}

/// A problem found while loading policies, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

/// Every error found in a policy folder, reported together.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct PolicyErrors(pub Vec<PolicyError>);

/// Parses and checks one policy file's text.
pub fn parse_policy(file: &Path, text: &str) -> Result<PolicyFile, Vec<PolicyError>> {
    let error = |line: usize, message: String| PolicyError {
        file: file.to_owned(),
        line,
        message,
    };
    let policy: PolicyFile = serde_json::from_str(text).map_err(|e| {
        // serde_json says "… at line L column C"; the line goes in front, the rest stays.
        let message = e.to_string();
        let message = message
            .rsplit_once(" at line ")
            .map_or(message.as_str(), |(m, _)| m)
            .to_owned();
        vec![error(e.line(), message)]
    })?;

    let mut errors = Vec::new();
    if policy.rules.is_empty() {
        errors.push(error(
            line_of(text, "\"rules\""),
            "the payer has no rules".into(),
        ));
    }
    let mut rule_ids = BTreeSet::new();
    let mut codes_seen: BTreeMap<(&str, &str), &str> = BTreeMap::new();
    for rule in &policy.rules {
        let at = line_of(text, &format!("\"{}\"", rule.id));
        if !rule_ids.insert(rule.id.as_str()) {
            errors.push(error(at, format!("rule id '{}' is used twice", rule.id)));
        }
        if rule.codes.is_empty() {
            errors.push(error(
                at,
                format!("rule '{}' names no billing codes", rule.id),
            ));
        }
        for code in &rule.codes {
            if let Some(other) = codes_seen.insert((&code.system, &code.code), &rule.id) {
                errors.push(error(
                    line_of(text, &format!("\"{}\"", code.code)),
                    format!("code {} is in rules '{other}' and '{}'", code.code, rule.id),
                ));
            }
        }
        if rule.prior_auth && rule.criteria.is_none() {
            errors.push(error(
                at,
                format!(
                    "rule '{}' needs prior authorization but states no criteria",
                    rule.id
                ),
            ));
        }
        if rule.benefit == Benefit::NotCovered && rule.prior_auth {
            errors.push(error(
                at,
                format!(
                    "rule '{}' is not covered, so it cannot need prior authorization",
                    rule.id
                ),
            ));
        }
        if let Some(criterion) = &rule.criteria {
            check_criterion(
                criterion,
                &policy.criteria,
                text,
                &mut Vec::new(),
                &mut |l, m| errors.push(error(l, m)),
            );
        }
    }
    for (name, criterion) in &policy.criteria {
        check_criterion(
            criterion,
            &policy.criteria,
            text,
            &mut vec![name.clone()],
            &mut |l, m| errors.push(error(l, m)),
        );
    }
    if errors.is_empty() {
        Ok(policy)
    } else {
        errors.sort_by_key(|e| e.line);
        errors.dedup();
        Err(errors)
    }
}

fn check_criterion(
    criterion: &Criterion,
    named: &BTreeMap<String, Criterion>,
    text: &str,
    path: &mut Vec<String>,
    report: &mut dyn FnMut(usize, String),
) {
    match criterion {
        Criterion::All(items) | Criterion::Any(items) => {
            if items.is_empty() {
                report(line_of(text, "[]"), "an all/any list is empty".into());
            }
            for item in items {
                check_criterion(item, named, text, path, report);
            }
        }
        Criterion::Not(inner) => check_criterion(inner, named, text, path, report),
        Criterion::Ref(name) => {
            let at = line_of(text, &format!("\"ref\": \"{name}\""));
            match named.get(name) {
                None => report(at, format!("no criterion named '{name}'")),
                Some(_) if path.contains(name) => {
                    report(at, format!("criterion '{name}' refers to itself"))
                }
                Some(inner) => {
                    path.push(name.clone());
                    check_criterion(inner, named, text, path, report);
                    path.pop();
                }
            }
        }
        Criterion::Diagnosis(d) => check_codes(&d.label, &d.codes, text, report),
        Criterion::Medication(m) => check_codes(&m.label, &m.codes, text, report),
        Criterion::Intolerance(i) => check_codes(&i.label, &i.codes, text, report),
        Criterion::Observation(o) => check_codes(&o.label, &o.codes, text, report),
        Criterion::Therapy(t) => {
            check_codes(&t.label, &t.codes, text, report);
            if t.within_days == Some(0) {
                report(
                    line_of(text, &t.label),
                    format!("'{}': within_days must be positive", t.label),
                );
            }
            if t.min_days == 0 {
                report(
                    line_of(text, &t.label),
                    format!("'{}': min_days must be positive", t.label),
                );
            }
        }
        Criterion::Age(a) => {
            if a.min.is_none() && a.max.is_none() {
                report(
                    line_of(text, "\"age\""),
                    "an age criterion needs min or max".into(),
                );
            }
        }
        Criterion::Sex(s) => {
            if !matches!(s.is.as_str(), "male" | "female" | "other" | "unknown") {
                report(
                    line_of(text, &s.is),
                    format!("'{}' is not an administrative gender", s.is),
                );
            }
        }
        Criterion::Fact(_) => {}
    }
}

fn check_codes(label: &str, codes: &[String], text: &str, report: &mut dyn FnMut(usize, String)) {
    if codes.is_empty() {
        report(line_of(text, label), format!("'{label}' lists no codes"));
    }
    for code in codes {
        if code.is_empty() || code == "*" || code.strip_suffix('*').unwrap_or(code).contains('*') {
            report(
                line_of(text, code),
                format!("'{code}' in '{label}': a code may only end with one '*'"),
            );
        }
    }
}

/// The 1-based line of the first occurrence of `needle` (line 1 when absent).
fn line_of(text: &str, needle: &str) -> usize {
    text.find(needle).map_or(1, |pos| {
        text[..pos].bytes().filter(|b| *b == b'\n').count() + 1
    })
}

/// Whether `code` matches `pattern` (exact, or a prefix when the pattern ends with `*`).
pub fn code_matches(pattern: &str, code: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => code.starts_with(prefix),
        None => pattern == code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PolicyFile, Vec<PolicyError>> {
        parse_policy(Path::new("p.json"), text)
    }

    #[test]
    fn syntax_errors_say_file_and_line() {
        let errs = parse("{\n  \"payer\": {\"id\": \"x\", \"name\": \"X\"},\n  \"rules\": [\n    {\"id\": 5}\n  ]\n}")
            .expect_err("bad id type");
        assert_eq!(errs[0].line, 4);
        assert!(errs[0].to_string().starts_with("p.json:4: "), "{}", errs[0]);
    }

    #[test]
    fn semantic_errors_are_found_with_lines() {
        let text = r#"{
  "payer": {"id": "x", "name": "X"},
  "rules": [
    {"id": "a", "title": "A", "codes": [{"system": "s", "code": "1"}], "prior_auth": true},
    {"id": "b", "title": "B", "codes": [{"system": "s", "code": "2"}], "prior_auth": true,
     "criteria": {"ref": "missing"}},
    {"id": "a", "title": "A again", "codes": [{"system": "s", "code": "1"}]}
  ]
}"#;
        let errs = parse(text).expect_err("errors");
        let messages: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert!(
            messages
                .iter()
                .any(|m| m.contains("needs prior authorization but states no criteria")),
            "{messages:?}"
        );
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("p.json:6: ") && m.contains("no criterion named 'missing'")),
            "{messages:?}"
        );
        assert!(
            messages.iter().any(|m| m.contains("used twice")),
            "{messages:?}"
        );
        assert!(
            messages.iter().any(|m| m.contains("code 1 is in rules")),
            "{messages:?}"
        );
    }

    #[test]
    fn cycles_and_bad_wildcards_are_reported() {
        let text = r#"{"payer": {"id": "x", "name": "X"},
 "criteria": {"loop": {"any": [{"ref": "loop"}]},
              "dx": {"diagnosis": {"label": "bad", "codes": ["M5*4"]}}},
 "rules": [{"id": "r", "title": "R", "codes": [{"system": "s", "code": "1"}]}]}"#;
        let errs = parse(text).expect_err("errors");
        let all = errs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        assert!(all.contains("refers to itself"), "{all}");
        assert!(all.contains("may only end with one '*'"), "{all}");
    }

    #[test]
    fn wildcards() {
        assert!(code_matches("M54.5*", "M54.50"));
        assert!(code_matches("M54.5", "M54.5"));
        assert!(!code_matches("M54.5", "M54.50"));
        assert!(!code_matches("M54.5*", "M54.4"));
    }
}
