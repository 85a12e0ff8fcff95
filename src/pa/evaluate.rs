//! Evaluating criteria against a [`ClinicalContext`]: met, unmet or unknown, with evidence.
//!
//! Three-valued logic: `all` is unmet if any part is unmet, met if all are met, else unknown;
//! `any` is met if any part is met, unmet if all are unmet, else unknown; `not` swaps met and
//! unmet. A test is unknown when the kind of data it needs was not supplied at all, so the
//! answer can say what is missing instead of denying.

use serde::Serialize;

use super::context::{ClinicalContext, Coding, Item};
use super::policy::{code_matches, Criterion, PolicyFile};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Met,
    Unmet,
    Unknown,
}

/// The result of one criterion, with the evidence behind it and its parts.
#[derive(Debug, Clone, Serialize)]
pub struct CriterionResult {
    pub label: String,
    pub status: Status,
    /// Resource references (`Observation/123`) or fact sources (`note DocumentReference/9 [10..42]`).
    pub evidence: Vec<String>,
    /// What was found or why it fails, for people.
    pub detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<CriterionResult>,
    /// How the parts combine (for reporting what is missing).
    #[serde(skip)]
    any: bool,
}

impl CriterionResult {
    fn leaf(
        label: impl Into<String>,
        status: Status,
        detail: impl Into<String>,
        evidence: Vec<String>,
    ) -> Self {
        Self {
            label: label.into(),
            status,
            evidence,
            detail: detail.into(),
            parts: Vec::new(),
            any: false,
        }
    }

    /// The unmet or unknown tests that stand between this result and "met": what is missing.
    /// For an `any`, that is the alternative closest to being met — the one with the most tests
    /// already met, then the fewest missing — not every alternative: a clinician wants the path
    /// the patient is on, not a list of red flags the patient does not have.
    pub fn missing(&self) -> Vec<String> {
        if self.status == Status::Met {
            return Vec::new();
        }
        if self.parts.is_empty() {
            return vec![format!("{}: {}", self.label, self.detail)];
        }
        let open = self.parts.iter().filter(|p| p.status != Status::Met);
        if self.any {
            open.map(|p| (p.met_tests(), p.missing()))
                .filter(|(_, m)| !m.is_empty())
                .min_by_key(|(met, m)| (std::cmp::Reverse(*met), m.len()))
                .map(|(_, m)| m)
                .unwrap_or_default()
        } else {
            open.flat_map(CriterionResult::missing).collect()
        }
    }

    /// How many single tests under this result are met.
    fn met_tests(&self) -> usize {
        if self.parts.is_empty() {
            usize::from(self.status == Status::Met)
        } else {
            self.parts.iter().map(CriterionResult::met_tests).sum()
        }
    }

    /// A readable, indented trace.
    pub fn render(&self, depth: usize, out: &mut String) {
        let mark = match self.status {
            Status::Met => "MET    ",
            Status::Unmet => "UNMET  ",
            Status::Unknown => "UNKNOWN",
        };
        out.push_str(&format!("{}{mark} {}", "  ".repeat(depth), self.label));
        if !self.detail.is_empty() {
            out.push_str(&format!(" — {}", self.detail));
        }
        if !self.evidence.is_empty() {
            out.push_str(&format!(" [{}]", self.evidence.join(", ")));
        }
        out.push('\n');
        for part in &self.parts {
            part.render(depth + 1, out);
        }
    }
}

/// Evaluates `criterion` of `policy` for the patient in `ctx`.
pub fn evaluate(
    criterion: &Criterion,
    policy: &PolicyFile,
    ctx: &ClinicalContext,
) -> CriterionResult {
    match criterion {
        Criterion::All(items) => combine("all of", items, policy, ctx, |s| {
            if s.contains(&Status::Unmet) {
                Status::Unmet
            } else if s.iter().all(|x| *x == Status::Met) {
                Status::Met
            } else {
                Status::Unknown
            }
        }),
        Criterion::Any(items) => {
            let mut result = combine("any of", items, policy, ctx, |s| {
                if s.contains(&Status::Met) {
                    Status::Met
                } else if s.iter().all(|x| *x == Status::Unmet) {
                    Status::Unmet
                } else {
                    Status::Unknown
                }
            });
            result.any = true;
            result
        }
        Criterion::Not(inner) => {
            let part = evaluate(inner, policy, ctx);
            let status = match part.status {
                Status::Met => Status::Unmet,
                Status::Unmet => Status::Met,
                Status::Unknown => Status::Unknown,
            };
            CriterionResult {
                label: format!("not: {}", part.label),
                status,
                evidence: Vec::new(),
                detail: String::new(),
                parts: vec![part],
                any: false,
            }
        }
        Criterion::Ref(name) => match policy.criteria.get(name) {
            Some(inner) => {
                let mut result = evaluate(inner, policy, ctx);
                if result.label.starts_with("all of") || result.label.starts_with("any of") {
                    result.label = format!("{name} ({})", result.label);
                }
                result
            }
            None => {
                CriterionResult::leaf(name, Status::Unknown, "criterion not defined", Vec::new())
            }
        },
        Criterion::Diagnosis(d) => {
            let found = matching(
                &ctx.conditions,
                d.system.as_deref(),
                &d.codes,
                None,
                ctx.today,
            );
            if !found.is_empty() {
                CriterionResult::leaf(&d.label, Status::Met, "on the problem list", refs(&found))
            } else if ctx.supplied.conditions {
                CriterionResult::leaf(
                    &d.label,
                    Status::Unmet,
                    "not on the problem list",
                    Vec::new(),
                )
            } else {
                CriterionResult::leaf(
                    &d.label,
                    Status::Unknown,
                    "no problem list supplied",
                    Vec::new(),
                )
            }
        }
        Criterion::Therapy(t) => {
            let found = matching(
                &ctx.procedures,
                t.system.as_deref(),
                &t.codes,
                t.within_days,
                ctx.today,
            );
            let days = covered_days(
                &found,
                t.within_days.map(|d| ctx.today - i64::from(d)),
                ctx.today,
            );
            let kind = t.fact_kind.as_deref().unwrap_or("conservative_therapy");
            let fact = ctx
                .facts
                .iter()
                .filter(|f| f.kind == kind)
                .max_by_key(|f| f.days.unwrap_or(0));
            let fact_days = fact.and_then(|f| f.days).unwrap_or(0);
            let best = days.max(i64::from(fact_days));
            let mut evidence = refs(&found);
            if let Some(f) = fact.filter(|f| f.days.unwrap_or(0) > 0) {
                evidence.push(fact_evidence(f));
            }
            let need = i64::from(t.min_days);
            if best >= need {
                CriterionResult::leaf(
                    &t.label,
                    Status::Met,
                    format!("{best} days documented (needs {need})"),
                    evidence,
                )
            } else if best > 0 {
                CriterionResult::leaf(
                    &t.label,
                    Status::Unmet,
                    format!("only {best} days documented (needs {need})"),
                    evidence,
                )
            } else if ctx.supplied.procedures || ctx.supplied.facts {
                CriterionResult::leaf(
                    &t.label,
                    Status::Unmet,
                    format!("none documented (needs {need} days)"),
                    evidence,
                )
            } else {
                CriterionResult::leaf(
                    &t.label,
                    Status::Unknown,
                    "no procedures or notes supplied",
                    evidence,
                )
            }
        }
        Criterion::Medication(m) => {
            let found = matching(
                &ctx.medications,
                m.system.as_deref(),
                &m.codes,
                m.within_days,
                ctx.today,
            );
            // Back-to-back prescriptions add up; a refill gap of up to a week does not break a course.
            let dated: Vec<(i64, i64)> = found
                .iter()
                .filter_map(|i| {
                    let s = i.start?;
                    let e = i.end.unwrap_or(ctx.today).min(ctx.today);
                    Some((s, e.max(s + 1)))
                })
                .collect();
            let longest = (!dated.is_empty()).then(|| total_days(dated, 7));
            let need = i64::from(m.min_days);
            match longest {
                Some(days) if days >= need => CriterionResult::leaf(
                    &m.label,
                    Status::Met,
                    format!("{days} days (needs {need})"),
                    refs(&found),
                ),
                Some(days) => CriterionResult::leaf(
                    &m.label,
                    Status::Unmet,
                    format!("only {days} days (needs {need})"),
                    refs(&found),
                ),
                None if !found.is_empty() => CriterionResult::leaf(
                    &m.label,
                    Status::Unknown,
                    "on record without dates",
                    refs(&found),
                ),
                None if ctx.supplied.medications => CriterionResult::leaf(
                    &m.label,
                    Status::Unmet,
                    "not on the medication list",
                    Vec::new(),
                ),
                None => CriterionResult::leaf(
                    &m.label,
                    Status::Unknown,
                    "no medication list supplied",
                    Vec::new(),
                ),
            }
        }
        Criterion::Intolerance(i) => {
            let found = matching(
                &ctx.intolerances,
                i.system.as_deref(),
                &i.codes,
                None,
                ctx.today,
            );
            let facts: Vec<String> = ctx
                .facts
                .iter()
                .filter(|f| f.kind == "intolerance" || f.kind == "treatment_failure")
                .filter(|f| {
                    f.value.as_deref().is_some_and(|v| {
                        let v = v.trim().to_lowercase();
                        !v.is_empty()
                            && (i.codes.iter().any(|c| code_matches(c, &v))
                                || i.label
                                    .to_lowercase()
                                    .split(|c: char| !c.is_alphanumeric())
                                    .any(|word| word == v))
                    })
                })
                .map(fact_evidence)
                .collect();
            if !found.is_empty() || !facts.is_empty() {
                let mut evidence = refs(&found);
                evidence.extend(facts);
                CriterionResult::leaf(&i.label, Status::Met, "documented", evidence)
            } else if ctx.supplied.intolerances || ctx.supplied.facts {
                CriterionResult::leaf(&i.label, Status::Unmet, "not documented", Vec::new())
            } else {
                CriterionResult::leaf(
                    &i.label,
                    Status::Unknown,
                    "no allergy list or notes supplied",
                    Vec::new(),
                )
            }
        }
        Criterion::Observation(o) => {
            let earliest = o.within_days.map(|d| ctx.today - i64::from(d));
            let latest = ctx
                .observations
                .iter()
                .filter(|m| codes_match(&m.codes, o.system.as_deref(), &o.codes))
                .filter(|m| match (earliest, m.day) {
                    (Some(e), Some(day)) => day >= e && day <= ctx.today,
                    (Some(_), None) => false,
                    (None, _) => true,
                })
                .max_by_key(|m| m.day.unwrap_or(i64::MIN));
            let window = o
                .within_days
                .map_or(String::new(), |d| format!(" within {d} days"));
            let comparable = |m: &super::context::Measurement| match (&m.unit, &o.unit) {
                (Some(have), Some(want)) => same_unit(have, want),
                _ => true,
            };
            match latest {
                // A result in another unit (HbA1c in mmol/mol against a % threshold) cannot be
                // compared: unknown, not met or unmet.
                Some(m) if !comparable(m) => CriterionResult::leaf(
                    &o.label,
                    Status::Unknown,
                    format!(
                        "latest result is in {}, the policy's threshold in {}",
                        m.unit.as_deref().unwrap_or(""),
                        o.unit.as_deref().unwrap_or("")
                    ),
                    vec![m.reference.clone()],
                ),
                Some(m) => {
                    let status = if o.comparator.holds(m.value, o.value) {
                        Status::Met
                    } else {
                        Status::Unmet
                    };
                    let unit = m.unit.as_deref().or(o.unit.as_deref()).unwrap_or("");
                    CriterionResult::leaf(
                        &o.label,
                        status,
                        format!(
                            "latest {} {unit} (needs {} {}{window})",
                            m.value,
                            o.comparator.as_str(),
                            o.value
                        )
                        .replace("  ", " "),
                        vec![m.reference.clone()],
                    )
                }
                None => CriterionResult::leaf(
                    &o.label,
                    Status::Unknown,
                    format!("no result{window}"),
                    Vec::new(),
                ),
            }
        }
        Criterion::Age(a) => {
            let label = match (a.min, a.max) {
                (Some(min), Some(max)) => format!("age {min}–{max}"),
                (Some(min), None) => format!("age ≥ {min}"),
                (None, Some(max)) => format!("age ≤ {max}"),
                (None, None) => "age".into(),
            };
            match ctx.age_years() {
                Some(age) => {
                    let ok = a.min.is_none_or(|m| age >= m) && a.max.is_none_or(|m| age <= m);
                    let status = if ok { Status::Met } else { Status::Unmet };
                    CriterionResult::leaf(label, status, format!("{age} years"), Vec::new())
                }
                None => CriterionResult::leaf(
                    label,
                    Status::Unknown,
                    "birth date not supplied",
                    Vec::new(),
                ),
            }
        }
        Criterion::Sex(s) => match ctx.gender.as_deref() {
            Some(g) => {
                let status = if g == s.is {
                    Status::Met
                } else {
                    Status::Unmet
                };
                CriterionResult::leaf(format!("sex {}", s.is), status, g, Vec::new())
            }
            None => CriterionResult::leaf(
                format!("sex {}", s.is),
                Status::Unknown,
                "not supplied",
                Vec::new(),
            ),
        },
        Criterion::Fact(f) => {
            let found: Vec<String> = ctx
                .facts
                .iter()
                .filter(|x| x.kind == f.kind)
                .filter(|x| {
                    f.values.is_empty()
                        || x.value
                            .as_deref()
                            .is_some_and(|v| f.values.iter().any(|w| w == v))
                })
                .filter(|x| f.min_days.is_none_or(|d| x.days.unwrap_or(0) >= d))
                .map(fact_evidence)
                .collect();
            if !found.is_empty() {
                CriterionResult::leaf(&f.label, Status::Met, "found in notes", found)
            } else if ctx.supplied.facts {
                CriterionResult::leaf(&f.label, Status::Unmet, "not found in notes", Vec::new())
            } else {
                CriterionResult::leaf(&f.label, Status::Unknown, "notes not reviewed", Vec::new())
            }
        }
    }
}

fn combine(
    label: &str,
    items: &[Criterion],
    policy: &PolicyFile,
    ctx: &ClinicalContext,
    fold: impl Fn(&[Status]) -> Status,
) -> CriterionResult {
    let parts: Vec<CriterionResult> = items.iter().map(|c| evaluate(c, policy, ctx)).collect();
    let statuses: Vec<Status> = parts.iter().map(|p| p.status).collect();
    CriterionResult {
        label: label.to_owned(),
        status: fold(&statuses),
        evidence: Vec::new(),
        detail: String::new(),
        parts,
        any: false,
    }
}

fn codes_match(codes: &[Coding], system: Option<&str>, patterns: &[String]) -> bool {
    codes.iter().any(|c| {
        system.is_none_or(|s| c.system.as_deref() == Some(s))
            && patterns.iter().any(|p| code_matches(p, &c.code))
    })
}

/// Items with a matching code (any code when `patterns` is empty) overlapping the window.
fn matching<'a>(
    items: &'a [Item],
    system: Option<&str>,
    patterns: &[String],
    within_days: Option<u32>,
    today: i64,
) -> Vec<&'a Item> {
    let earliest = within_days.map(|d| today - i64::from(d));
    items
        .iter()
        .filter(|i| patterns.is_empty() || codes_match(&i.codes, system, patterns))
        .filter(|i| match earliest {
            None => true,
            Some(e) => i.end.or(i.start).is_some_and(|end| end >= e),
        })
        .collect()
}

/// Days from the earliest start to the latest end of the items, capped at today.
/// Whether two unit spellings mean the same unit (`kg/m2` = `kg/m^2`, `%` = `percent`).
fn same_unit(a: &str, b: &str) -> bool {
    let norm = |u: &str| {
        let u = u.trim().to_lowercase().replace(['^', ' '], "");
        match u.as_str() {
            "percent" => "%".to_string(),
            "/hr" | "{events}/h" => "/h".to_string(),
            _ => u,
        }
    };
    norm(a) == norm(b)
}

/// Days of therapy inside the window: each item's days (inclusive) clamped to `[earliest,
/// today]`, visits up to two weeks apart counted as one continuing course.
fn covered_days(items: &[&Item], earliest: Option<i64>, today: i64) -> i64 {
    let spans: Vec<(i64, i64)> = items
        .iter()
        .filter_map(|i| {
            let start = i.start.or(i.end)?;
            let end = i.end.unwrap_or(start).min(today);
            let start = earliest.map_or(start, |e| start.max(e));
            (end >= start).then_some((start, end + 1))
        })
        .collect();
    total_days(spans, 14)
}

/// Total length of half-open day spans, merging those separated by at most `max_gap` days.
fn total_days(mut spans: Vec<(i64, i64)>, max_gap: i64) -> i64 {
    spans.sort_unstable();
    let mut total = 0;
    let mut current: Option<(i64, i64)> = None;
    for (s, e) in spans {
        current = match current {
            Some((cs, ce)) if s <= ce.saturating_add(max_gap) => Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                total += ce - cs;
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    if let Some((cs, ce)) = current {
        total += ce - cs;
    }
    total
}

fn refs(items: &[&Item]) -> Vec<String> {
    items.iter().map(|i| i.reference.clone()).collect()
}

fn fact_evidence(fact: &super::context::Fact) -> String {
    let what = match (&fact.value, fact.days) {
        (Some(v), Some(d)) => format!("{} {v} {d} days", fact.kind),
        (Some(v), None) => format!("{} {v}", fact.kind),
        (None, Some(d)) => format!("{} {d} days", fact.kind),
        (None, None) => fact.kind.clone(),
    };
    match &fact.source {
        Some(s) => format!("{what} (note {} [{}..{}])", s.note, s.start, s.end),
        None => what,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pa::policy::parse_policy;
    use time::macros::date;

    fn policy(criteria: &str) -> PolicyFile {
        let text = format!(
            r#"{{"payer": {{"id": "t", "name": "T"}}, "criteria": {criteria},
               "rules": [{{"id": "r", "title": "R", "codes": [{{"system": "s", "code": "1"}}]}}]}}"#
        );
        parse_policy(std::path::Path::new("t.json"), &text).expect("valid")
    }

    #[test]
    fn three_valued_logic() {
        let p = policy(
            r#"{"met": {"sex": {"is": "female"}}, "unmet": {"sex": {"is": "male"}},
                "unknown": {"observation": {"label": "x", "codes": ["1"], "comparator": ">", "value": 1}}}"#,
        );
        let mut ctx = ClinicalContext::new(date!(2024 - 01 - 01));
        ctx.gender = Some("female".into());
        let r = |name: &str| Criterion::Ref(name.into());
        let eval = |c: Criterion| evaluate(&c, &p, &ctx).status;
        assert_eq!(eval(Criterion::All(vec![r("met"), r("met")])), Status::Met);
        assert_eq!(
            eval(Criterion::All(vec![r("met"), r("unknown")])),
            Status::Unknown
        );
        assert_eq!(
            eval(Criterion::All(vec![r("unmet"), r("unknown")])),
            Status::Unmet
        );
        assert_eq!(
            eval(Criterion::Any(vec![r("unmet"), r("unknown")])),
            Status::Unknown
        );
        assert_eq!(
            eval(Criterion::Any(vec![r("met"), r("unknown")])),
            Status::Met
        );
        assert_eq!(
            eval(Criterion::Any(vec![r("unmet"), r("unmet")])),
            Status::Unmet
        );
        assert_eq!(eval(Criterion::Not(Box::new(r("met")))), Status::Unmet);
        assert_eq!(
            eval(Criterion::Not(Box::new(r("unknown")))),
            Status::Unknown
        );
        let result = evaluate(
            &Criterion::All(vec![r("met"), r("unknown"), r("unmet")]),
            &p,
            &ctx,
        );
        assert_eq!(
            result.missing().len(),
            2,
            "only the undecided tests are missing"
        );
        // For `any`, the closest alternative: one test rather than two.
        let result = evaluate(
            &Criterion::Any(vec![
                Criterion::All(vec![r("unmet"), r("unknown")]),
                Criterion::All(vec![r("met"), r("unknown")]),
            ]),
            &p,
            &ctx,
        );
        assert_eq!(result.missing().len(), 1);
    }
}

#[cfg(test)]
mod duration_tests {
    use super::*;

    fn item(start: i64, end: i64) -> Item {
        Item {
            reference: "Procedure/x".into(),
            codes: Vec::new(),
            start: Some(start),
            end: Some(end),
        }
    }

    #[test]
    fn therapy_days_are_clamped_and_gaps_break_courses() {
        let today = 1000;
        // A long course that ended inside the window counts only its days in the window.
        let long = item(0, 900);
        assert_eq!(covered_days(&[&long], Some(today - 180), today), 81);
        // Two visits 160 days apart are two days, not a 160-day course.
        let (a, b) = (item(830, 830), item(990, 990));
        assert_eq!(covered_days(&[&a, &b], Some(today - 180), today), 2);
        // Weekly visits make one continuing course (inclusive days).
        let weekly: Vec<Item> = (0..7).map(|w| item(900 + w * 7, 900 + w * 7)).collect();
        let refs: Vec<&Item> = weekly.iter().collect();
        assert_eq!(covered_days(&refs, Some(today - 180), today), 43);
    }

    #[test]
    fn back_to_back_prescriptions_add_up() {
        assert_eq!(total_days(vec![(0, 30), (30, 60), (62, 92)], 7), 92);
        assert_eq!(total_days(vec![(0, 30), (100, 130)], 7), 60);
    }

    #[test]
    fn units_must_agree() {
        assert!(same_unit("kg/m2", "kg/m^2"));
        assert!(same_unit("%", "percent"));
        assert!(!same_unit("mmol/mol", "%"));
    }
}
