//! Search parameters: which ones each resource type supports, how a query string is parsed, how
//! a resource is matched, and which index keys a resource produces.
//!
//! The parameters are the ones the embedded store serves (`_id`, `_lastUpdated`, `identifier`,
//! `patient`, `subject`, `code`, `category`, `date`, `status`). Token and reference parameters are
//! indexed by the store, so the common "all Observations of this patient" search reads no JSON;
//! dates and modifiers are checked against the resource itself.

use std::collections::HashMap;

use http::StatusCode;
use serde_json::Value;

use super::date::{now_micros, parse_range, DateRange};
use super::outcome::{FhirError, Issue};
use super::validate::SchemaValidator;

/// How a parameter's values are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Token,
    Reference,
    Date,
}

impl ParamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ParamKind::Token => "token",
            ParamKind::Reference => "reference",
            ParamKind::Date => "date",
        }
    }
}

/// One search parameter of one resource type.
#[derive(Debug, Clone)]
pub struct ParamDef {
    pub name: &'static str,
    pub kind: ParamKind,
    /// Element paths (dotted, arrays flattened). For dates the first path present is used.
    pub paths: Vec<&'static str>,
    /// For references: the only resource type the parameter points at (e.g. `Patient`).
    pub target: Option<&'static str>,
}

/// Types whose `patient` parameter follows `subject`.
const PATIENT_VIA_SUBJECT: &[&str] = &[
    "Account",
    "AdverseEvent",
    "Basic",
    "CarePlan",
    "CareTeam",
    "ClinicalImpression",
    "Communication",
    "CommunicationRequest",
    "Composition",
    "Condition",
    "DeviceRequest",
    "DeviceUseStatement",
    "DiagnosticReport",
    "DocumentManifest",
    "DocumentReference",
    "Encounter",
    "Flag",
    "Goal",
    "ImagingStudy",
    "List",
    "Media",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationRequest",
    "MedicationStatement",
    "Observation",
    "Procedure",
    "QuestionnaireResponse",
    "RequestGroup",
    "RiskAssessment",
    "ServiceRequest",
    "Specimen",
];

/// Types whose `patient` parameter follows an element of its own name or another one.
const PATIENT_OTHER: &[(&str, &str)] = &[
    ("AllergyIntolerance", "patient"),
    ("Appointment", "participant.actor"),
    ("Claim", "patient"),
    ("ClaimResponse", "patient"),
    ("Consent", "patient"),
    ("Coverage", "beneficiary"),
    ("CoverageEligibilityRequest", "patient"),
    ("CoverageEligibilityResponse", "patient"),
    ("DetectedIssue", "patient"),
    ("Device", "patient"),
    ("EpisodeOfCare", "patient"),
    ("ExplanationOfBenefit", "patient"),
    ("FamilyMemberHistory", "patient"),
    ("Immunization", "patient"),
    ("ImmunizationEvaluation", "patient"),
    ("ImmunizationRecommendation", "patient"),
    ("NutritionOrder", "patient"),
    ("SupplyDelivery", "patient"),
    ("Task", "for"),
    ("VisionPrescription", "patient"),
];

const CODE_PATHS: &[(&str, &str)] = &[
    ("AllergyIntolerance", "code"),
    ("Basic", "code"),
    ("ChargeItem", "code"),
    ("ClinicalImpression", "code"),
    ("Condition", "code"),
    ("DetectedIssue", "code"),
    ("DeviceRequest", "codeCodeableConcept"),
    ("DiagnosticReport", "code"),
    ("FamilyMemberHistory", "condition.code"),
    ("Flag", "code"),
    ("Group", "code"),
    ("Immunization", "vaccineCode"),
    ("List", "code"),
    ("Medication", "code"),
    ("MedicationAdministration", "medicationCodeableConcept"),
    ("MedicationDispense", "medicationCodeableConcept"),
    ("MedicationRequest", "medicationCodeableConcept"),
    ("MedicationStatement", "medicationCodeableConcept"),
    ("Observation", "code"),
    ("Procedure", "code"),
    ("RiskAssessment", "code"),
    ("ServiceRequest", "code"),
    ("Task", "code"),
];

const DATE_PATHS: &[(&str, &[&str])] = &[
    ("AllergyIntolerance", &["recordedDate"]),
    ("Appointment", &["start"]),
    ("CarePlan", &["period"]),
    ("CareTeam", &["period"]),
    ("ClinicalImpression", &["date"]),
    ("Composition", &["date"]),
    (
        "Condition",
        &["onsetDateTime", "onsetPeriod", "recordedDate"],
    ),
    (
        "DiagnosticReport",
        &["effectiveDateTime", "effectivePeriod"],
    ),
    ("DocumentReference", &["date"]),
    ("Encounter", &["period"]),
    ("EpisodeOfCare", &["period"]),
    ("FamilyMemberHistory", &["date"]),
    ("Flag", &["period"]),
    ("Immunization", &["occurrenceDateTime"]),
    (
        "Observation",
        &["effectiveDateTime", "effectivePeriod", "effectiveInstant"],
    ),
    ("Procedure", &["performedDateTime", "performedPeriod"]),
];

/// The search parameters of every resource type.
#[derive(Debug, Default)]
pub struct SearchRegistry {
    by_type: HashMap<String, Vec<ParamDef>>,
}

impl SearchRegistry {
    /// Builds the table; `identifier`, `status`, `category` and `subject` apply to every type
    /// whose schema has that element.
    pub fn new(schema: &SchemaValidator) -> Self {
        let mut by_type: HashMap<String, Vec<ParamDef>> = HashMap::new();
        for rt in schema.resource_types() {
            let mut defs = Vec::new();
            for (name, kind) in [
                ("identifier", ParamKind::Token),
                ("status", ParamKind::Token),
                ("category", ParamKind::Token),
                ("subject", ParamKind::Reference),
            ] {
                if schema.has_element(rt, name) {
                    defs.push(ParamDef {
                        name,
                        kind,
                        paths: vec![name],
                        target: None,
                    });
                }
            }
            let patient_path = if PATIENT_VIA_SUBJECT.contains(&rt) {
                Some("subject")
            } else {
                PATIENT_OTHER
                    .iter()
                    .find(|(t, _)| *t == rt)
                    .map(|(_, p)| *p)
            };
            if let Some(path) = patient_path {
                defs.push(ParamDef {
                    name: "patient",
                    kind: ParamKind::Reference,
                    paths: vec![path],
                    target: Some("Patient"),
                });
            }
            if let Some((_, path)) = CODE_PATHS.iter().find(|(t, _)| *t == rt) {
                defs.push(ParamDef {
                    name: "code",
                    kind: ParamKind::Token,
                    paths: vec![path],
                    target: None,
                });
            }
            if let Some((_, paths)) = DATE_PATHS.iter().find(|(t, _)| *t == rt) {
                defs.push(ParamDef {
                    name: "date",
                    kind: ParamKind::Date,
                    paths: paths.to_vec(),
                    target: None,
                });
            }
            by_type.insert(rt.to_owned(), defs);
        }
        Self { by_type }
    }

    pub fn params(&self, resource_type: &str) -> &[ParamDef] {
        self.by_type
            .get(resource_type)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    pub fn param(&self, resource_type: &str, name: &str) -> Option<&ParamDef> {
        self.params(resource_type).iter().find(|d| d.name == name)
    }

    /// The references (`Type/id`) `resource` holds for the reference parameter `name`.
    pub fn references_of(&self, resource_type: &str, name: &str, resource: &Value) -> Vec<String> {
        match self.param(resource_type, name) {
            Some(def) if def.kind == ParamKind::Reference => references(resource, def),
            _ => Vec::new(),
        }
    }

    /// The index keys `resource` contributes: `{param}\u{1f}{key}` for every token and
    /// reference value. The store pairs them with the type and id. Keys put the most selective
    /// part first (`t:{code}|{system}`, `r:{id}|{Type}`), so one key per value also answers the
    /// "any system" and "any type" forms by prefix.
    pub fn index_keys(&self, resource_type: &str, resource: &Value) -> Vec<String> {
        let mut keys = Vec::new();
        for def in self.params(resource_type) {
            match def.kind {
                ParamKind::Token => {
                    for (system, code) in tokens(resource, def) {
                        keys.push(token_key(
                            def.name,
                            &code,
                            Some(system.as_deref().unwrap_or("")),
                        ));
                    }
                }
                ParamKind::Reference => {
                    for reference in references(resource, def) {
                        keys.push(reference_key(def.name, &reference));
                    }
                }
                ParamKind::Date => {}
            }
        }
        keys.sort();
        keys.dedup();
        keys
    }

    /// Parses a search query (decoded `name=value` pairs) for `resource_type`.
    ///
    /// Unknown parameters are an error when `strict`, otherwise they are skipped and listed in
    /// [`SearchQuery::ignored`]. Malformed values and unsupported modifiers are always errors:
    /// ignoring them would silently widen the search.
    pub fn parse_query(
        &self,
        resource_type: &str,
        pairs: &[(String, String)],
        strict: bool,
    ) -> Result<SearchQuery, FhirError> {
        let mut query = SearchQuery::default();
        for (raw_name, raw_value) in pairs {
            let (name, modifier) = match raw_name.split_once(':') {
                Some((n, m)) => (n, Some(m)),
                None => (raw_name.as_str(), None),
            };
            match name {
                "_count" => query.count = Some(parse_usize(raw_name, raw_value)?),
                "_offset" => query.offset = parse_usize(raw_name, raw_value)?,
                "_sort" => match raw_value.as_str() {
                    "_lastUpdated" => query.sort = Some(Sort::LastUpdated { descending: false }),
                    "-_lastUpdated" => query.sort = Some(Sort::LastUpdated { descending: true }),
                    "_id" => query.sort = Some(Sort::Id { descending: false }),
                    "-_id" => query.sort = Some(Sort::Id { descending: true }),
                    other => unsupported(&mut query, strict, format!("_sort={other}"))?,
                },
                "_summary" => match raw_value.as_str() {
                    "count" => query.summary_count = true,
                    "false" => {}
                    other => unsupported(&mut query, strict, format!("_summary={other}"))?,
                },
                "_total" => match raw_value.as_str() {
                    "none" | "estimate" | "accurate" => {}
                    other => return Err(bad_value(raw_name, &format!("unknown _total '{other}'"))),
                },
                "_format" | "_pretty" => {}
                _ if raw_value.is_empty() => {}
                "_id" => {
                    reject_modifier(raw_name, modifier, &[])?;
                    query.clauses.push(Clause {
                        name: "_id".into(),
                        kind: ClauseKind::Id(split_values(raw_value)),
                    });
                }
                "_lastUpdated" => {
                    reject_modifier(raw_name, modifier, &[])?;
                    let values = split_values(raw_value)
                        .iter()
                        .map(|v| parse_date_value(raw_name, v))
                        .collect::<Result<_, _>>()?;
                    query.clauses.push(Clause {
                        name: "_lastUpdated".into(),
                        kind: ClauseKind::LastUpdated(values),
                    });
                }
                _ => {
                    let Some(def) = self.param(resource_type, name) else {
                        unsupported(&mut query, strict, raw_name.clone())?;
                        continue;
                    };
                    query
                        .clauses
                        .push(parse_clause(def, raw_name, modifier, raw_value)?);
                }
            }
        }
        Ok(query)
    }
}

impl SearchRegistry {
    /// Parses the search that selects the target of a conditional create, update or reference.
    ///
    /// Stricter than a search: unknown parameters, empty values and result parameters (`_count`,
    /// `_sort`, …) are refused, and at least one filter is required, because a condition that
    /// filters nothing would select (and overwrite) whatever happens to be stored.
    pub fn parse_condition(
        &self,
        resource_type: &str,
        pairs: &[(String, String)],
    ) -> Result<SearchQuery, FhirError> {
        let condition_error = |why: String| {
            FhirError::new(
                StatusCode::BAD_REQUEST,
                Issue::error("invalid", format!("condition: {why}")),
            )
        };
        for (name, value) in pairs {
            if name.starts_with('_') && !matches!(name.as_str(), "_id" | "_lastUpdated") {
                return Err(condition_error(format!(
                    "'{name}' cannot be part of a condition"
                )));
            }
            if value.is_empty() {
                return Err(condition_error(format!("'{name}' has no value")));
            }
        }
        let query = self.parse_query(resource_type, pairs, true)?;
        if query.clauses.is_empty() {
            return Err(condition_error(
                "at least one search parameter is required".into(),
            ));
        }
        Ok(query)
    }
}

/// `param␟key`, with control characters blanked so keys stay one line and split cleanly.
fn index_key(param: &str, key: &str) -> String {
    let key = key.replace(|c: char| c.is_control(), " ");
    format!("{param}\u{1f}{key}")
}

/// `t:{code}|{system}`; with `system` `None`, the prefix that matches the code in any system.
/// A `|` or `\` inside a code is escaped so the separator stays unambiguous.
fn token_key(param: &str, code: &str, system: Option<&str>) -> String {
    let code = code.replace('\\', "\\\\").replace('|', "\\|");
    index_key(param, &format!("t:{code}|{}", system.unwrap_or_default()))
}

/// `r:{id}|{Type}` for `Type/id` (other reference forms are kept whole).
fn reference_key(param: &str, reference: &str) -> String {
    match reference.rsplit_once('/') {
        Some((rt, id)) if !rt.contains('/') => index_key(param, &format!("r:{id}|{rt}")),
        _ => index_key(param, &format!("r:{reference}|")),
    }
}

fn parse_usize(name: &str, value: &str) -> Result<usize, FhirError> {
    value
        .parse()
        .map_err(|_| bad_value(name, "expected a non-negative whole number"))
}

fn bad_value(name: &str, why: &str) -> FhirError {
    FhirError::new(
        StatusCode::BAD_REQUEST,
        Issue::error("invalid", format!("search parameter '{name}': {why}")),
    )
}

fn unsupported(query: &mut SearchQuery, strict: bool, what: String) -> Result<(), FhirError> {
    if strict {
        return Err(FhirError::new(
            StatusCode::BAD_REQUEST,
            Issue::error(
                "not-supported",
                format!(
                    "unknown or unsupported search parameter '{what}' (Prefer: handling=strict)"
                ),
            ),
        ));
    }
    query.ignored.push(what);
    Ok(())
}

fn reject_modifier(name: &str, modifier: Option<&str>, allowed: &[&str]) -> Result<(), FhirError> {
    match modifier {
        Some(m) if !allowed.contains(&m) => Err(FhirError::new(
            StatusCode::BAD_REQUEST,
            Issue::error(
                "not-supported",
                format!("modifier ':{m}' is not supported on '{name}'"),
            ),
        )),
        _ => Ok(()),
    }
}

/// Splits on commas that are not escaped with a backslash, and unescapes `\,`, `\|`, `\\`.
fn split_values(raw: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(next @ (',' | '\\' | '$')) => current.push(next),
                Some(next) => {
                    current.push('\\');
                    current.push(next);
                }
                None => current.push('\\'),
            },
            ',' => out.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    out.push(current);
    out.retain(|v| !v.is_empty());
    out
}

fn parse_clause(
    def: &ParamDef,
    raw_name: &str,
    modifier: Option<&str>,
    raw_value: &str,
) -> Result<Clause, FhirError> {
    let values = split_values(raw_value);
    if modifier == Some("missing") {
        let missing = match raw_value {
            "true" => true,
            "false" => false,
            _ => return Err(bad_value(raw_name, "':missing' takes true or false")),
        };
        return Ok(Clause {
            name: raw_name.into(),
            kind: ClauseKind::Missing {
                def: def.clone(),
                missing,
            },
        });
    }
    let kind = match def.kind {
        ParamKind::Token => {
            reject_modifier(raw_name, modifier, &["not"])?;
            let tokens = values.iter().map(|v| parse_token(v)).collect();
            ClauseKind::Token {
                def: def.clone(),
                values: tokens,
                negate: modifier == Some("not"),
            }
        }
        ParamKind::Reference => {
            let type_modifier = match modifier {
                None => None,
                Some(m) if m.chars().next().is_some_and(|c| c.is_ascii_uppercase()) => Some(m),
                Some(m) => {
                    return Err(FhirError::new(
                        StatusCode::BAD_REQUEST,
                        Issue::error(
                            "not-supported",
                            format!("modifier ':{m}' is not supported on '{raw_name}'"),
                        ),
                    ))
                }
            };
            let refs = values
                .iter()
                .map(|v| parse_reference_value(v, type_modifier.or(def.target)))
                .collect();
            ClauseKind::Reference {
                def: def.clone(),
                values: refs,
            }
        }
        ParamKind::Date => {
            reject_modifier(raw_name, modifier, &[])?;
            let dates = values
                .iter()
                .map(|v| parse_date_value(raw_name, v))
                .collect::<Result<_, _>>()?;
            ClauseKind::Date {
                def: def.clone(),
                values: dates,
            }
        }
    };
    Ok(Clause {
        name: raw_name.into(),
        kind,
    })
}

fn parse_token(value: &str) -> TokenValue {
    match value.split_once('|') {
        Some((system, code)) => TokenValue {
            system: Some(system.to_owned()),
            code: (!code.is_empty()).then(|| code.to_owned()),
        },
        None => TokenValue {
            system: None,
            code: Some(value.to_owned()),
        },
    }
}

fn parse_reference_value(value: &str, default_type: Option<&str>) -> ReferenceValue {
    let normalized = normalize_reference(value);
    if normalized.contains('/') {
        ReferenceValue::Exact(normalized)
    } else {
        match default_type {
            Some(t) => ReferenceValue::Exact(format!("{t}/{normalized}")),
            None => ReferenceValue::AnyType(normalized),
        }
    }
}

fn parse_date_value(name: &str, value: &str) -> Result<DateValue, FhirError> {
    // A '+' in a time zone that was not percent-encoded arrives as a space.
    let value = value.replace(' ', "+");
    let (prefix, rest) =
        if value.len() > 2 && value.as_bytes()[..2].iter().all(u8::is_ascii_alphabetic) {
            let prefix = match &value[..2] {
                "eq" => Prefix::Eq,
                "ne" => Prefix::Ne,
                "gt" => Prefix::Gt,
                "lt" => Prefix::Lt,
                "ge" => Prefix::Ge,
                "le" => Prefix::Le,
                "sa" => Prefix::Sa,
                "eb" => Prefix::Eb,
                "ap" => Prefix::Ap,
                other => {
                    return Err(bad_value(
                        name,
                        &format!(
                        "unknown prefix '{other}' (expected eq, ne, gt, lt, ge, le, sa, eb or ap)"
                    ),
                    ))
                }
            };
            (prefix, &value[2..])
        } else {
            (Prefix::Eq, value.as_str())
        };
    let range = parse_range(rest).ok_or_else(|| {
        bad_value(
            name,
            &format!("'{rest}' is not a FHIR date, dateTime or instant"),
        )
    })?;
    Ok(DateValue { prefix, range })
}

/// `http://x/fhir/Patient/1/_history/2` → `Patient/1`; relative references are kept.
pub fn normalize_reference(reference: &str) -> String {
    let reference = match reference.find("/_history/") {
        Some(pos) => &reference[..pos],
        None => reference,
    };
    if reference.starts_with("http://") || reference.starts_with("https://") {
        let mut parts = reference.rsplitn(3, '/');
        if let (Some(id), Some(rt)) = (parts.next(), parts.next()) {
            return format!("{rt}/{id}");
        }
    }
    reference.to_owned()
}

/// A parsed search.
#[derive(Debug, Clone, Default)]
pub struct SearchQuery {
    /// Filters; all must match (each is an OR over its values).
    pub clauses: Vec<Clause>,
    pub count: Option<usize>,
    pub offset: usize,
    pub sort: Option<Sort>,
    pub summary_count: bool,
    /// Parameters skipped under lenient handling, reported back to the client.
    pub ignored: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sort {
    LastUpdated { descending: bool },
    Id { descending: bool },
}

#[derive(Debug, Clone)]
pub struct Clause {
    /// The parameter as written (with modifier), for self links.
    pub name: String,
    pub kind: ClauseKind,
}

#[derive(Debug, Clone)]
pub enum ClauseKind {
    Id(Vec<String>),
    LastUpdated(Vec<DateValue>),
    Token {
        def: ParamDef,
        values: Vec<TokenValue>,
        negate: bool,
    },
    Reference {
        def: ParamDef,
        values: Vec<ReferenceValue>,
    },
    Date {
        def: ParamDef,
        values: Vec<DateValue>,
    },
    Missing {
        def: ParamDef,
        missing: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenValue {
    /// `Some("")` means "no system" (`|code`).
    pub system: Option<String>,
    pub code: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReferenceValue {
    Exact(String),
    AnyType(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateValue {
    pub prefix: Prefix,
    pub range: DateRange,
}

/// How the store can find the candidates of one clause from its index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Every id stored under exactly this key.
    Exact(String),
    /// Every id stored under a key starting with this.
    Prefix(String),
}

impl Clause {
    /// Index lookups that find exactly the resources this clause matches, if it has them.
    pub fn probes(&self) -> Option<Vec<Probe>> {
        match &self.kind {
            ClauseKind::Token {
                def,
                values,
                negate: false,
            } => values
                .iter()
                .map(|t| match (&t.system, &t.code) {
                    (None, Some(code)) => Some(Probe::Prefix(token_key(def.name, code, None))),
                    (Some(s), Some(code)) => Some(Probe::Exact(token_key(def.name, code, Some(s)))),
                    // "Any code in this system" is not in the key order; check each resource.
                    (_, None) => None,
                })
                .collect(),
            ClauseKind::Reference { def, values } => Some(
                values
                    .iter()
                    .map(|r| match r {
                        ReferenceValue::Exact(r) => Probe::Exact(reference_key(def.name, r)),
                        ReferenceValue::AnyType(id) => {
                            Probe::Prefix(index_key(def.name, &format!("r:{id}|")))
                        }
                    })
                    .collect(),
            ),
            _ => None,
        }
    }

    /// Whether checking this clause needs the resource body (not just id and lastUpdated).
    pub fn needs_body(&self) -> bool {
        !matches!(self.kind, ClauseKind::Id(_) | ClauseKind::LastUpdated(_))
    }

    /// Whether the resource matches this clause.
    pub fn matches(&self, resource: Option<&Value>, id: &str, last_updated: i64) -> bool {
        match &self.kind {
            ClauseKind::Id(ids) => ids.iter().any(|v| v == id),
            ClauseKind::LastUpdated(values) => {
                let target = [DateRange::instant(last_updated)];
                values.iter().any(|v| date_matches(v, &target))
            }
            _ => {
                let Some(resource) = resource else {
                    return false;
                };
                self.matches_body(resource)
            }
        }
    }

    fn matches_body(&self, resource: &Value) -> bool {
        match &self.kind {
            ClauseKind::Token {
                def,
                values,
                negate,
            } => {
                let found = tokens(resource, def);
                let any = values.iter().any(|want| {
                    found.iter().any(|(system, code)| {
                        let system_ok = match want.system.as_deref() {
                            None => true,
                            Some("") => system.is_none(),
                            Some(s) => system.as_deref() == Some(s),
                        };
                        let code_ok = want.code.as_deref().is_none_or(|c| c == code);
                        system_ok && code_ok
                    })
                });
                any != *negate
            }
            ClauseKind::Reference { def, values } => {
                let found = references(resource, def);
                values.iter().any(|want| {
                    found.iter().any(|r| match want {
                        ReferenceValue::Exact(w) => r == w,
                        ReferenceValue::AnyType(id) => {
                            r.rsplit_once('/').is_some_and(|(_, i)| i == id)
                        }
                    })
                })
            }
            ClauseKind::Date { def, values } => {
                let found = dates(resource, def);
                values.iter().any(|v| date_matches(v, &found))
            }
            ClauseKind::Missing { def, missing } => {
                let present = def.paths.iter().any(|p| !collect(resource, p).is_empty());
                present != *missing
            }
            ClauseKind::Id(_) | ClauseKind::LastUpdated(_) => false,
        }
    }
}

impl SearchQuery {
    pub fn needs_body(&self) -> bool {
        self.clauses.iter().any(Clause::needs_body)
    }

    /// Rebuilds the query string of the filters (for `self` and `next` links).
    pub fn filter_pairs(&self, original: &[(String, String)]) -> Vec<(String, String)> {
        original
            .iter()
            .filter(|(name, value)| {
                name != "_offset"
                    && !self
                        .ignored
                        .iter()
                        .any(|i| i == name || *i == format!("{name}={value}"))
            })
            .cloned()
            .collect()
    }
}

fn date_matches(value: &DateValue, targets: &[DateRange]) -> bool {
    let p = value.range;
    let eq = |r: &DateRange| r.start >= p.start && r.end <= p.end;
    let gt = |r: &DateRange| r.end > p.end;
    let lt = |r: &DateRange| r.start < p.start;
    if targets.is_empty() {
        return false;
    }
    targets.iter().any(|r| match value.prefix {
        Prefix::Eq => eq(r),
        Prefix::Ne => !eq(r),
        Prefix::Gt => gt(r),
        Prefix::Lt => lt(r),
        Prefix::Ge => gt(r) || eq(r),
        Prefix::Le => lt(r) || eq(r),
        Prefix::Sa => r.start >= p.end,
        Prefix::Eb => r.end <= p.start,
        Prefix::Ap => {
            // Approximately: within 10% of the distance between the value and now.
            let now = now_micros();
            let slack_start = (now.saturating_sub(p.start)).unsigned_abs() / 10;
            let slack_end = (now.saturating_sub(p.end)).unsigned_abs() / 10;
            let lo = p
                .start
                .saturating_sub(i64::try_from(slack_start).unwrap_or(i64::MAX));
            let hi = p
                .end
                .saturating_add(i64::try_from(slack_end).unwrap_or(i64::MAX));
            r.start < hi && r.end > lo
        }
    })
}

/// All values at a dotted path, arrays flattened.
fn collect<'a>(value: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut current = vec![value];
    for step in path.split('.') {
        let mut next = Vec::new();
        for v in current {
            match v.get(step) {
                Some(Value::Array(items)) => next.extend(items.iter()),
                Some(found) => next.push(found),
                None => {}
            }
        }
        current = next;
    }
    current
}

/// `(system, code)` pairs of a token parameter: from CodeableConcept, Coding, Identifier, code,
/// string or boolean elements.
fn tokens(resource: &Value, def: &ParamDef) -> Vec<(Option<String>, String)> {
    let mut out = Vec::new();
    for path in &def.paths {
        for v in collect(resource, path) {
            push_tokens(v, &mut out);
        }
    }
    out
}

fn push_tokens(v: &Value, out: &mut Vec<(Option<String>, String)>) {
    match v {
        Value::String(s) => out.push((None, s.clone())),
        Value::Bool(b) => out.push((None, b.to_string())),
        Value::Object(map) => {
            if let Some(Value::Array(codings)) = map.get("coding") {
                for coding in codings {
                    push_tokens(coding, out);
                }
                return;
            }
            let system = map.get("system").and_then(Value::as_str).map(str::to_owned);
            let code = map
                .get("code")
                .or_else(|| map.get("value"))
                .and_then(Value::as_str);
            if let Some(code) = code {
                out.push((system, code.to_owned()));
            }
        }
        _ => {}
    }
}

/// Normalized references of a reference parameter (`Type/id`), skipping contained (`#x`) ones.
fn references(resource: &Value, def: &ParamDef) -> Vec<String> {
    let mut out = Vec::new();
    for path in &def.paths {
        for v in collect(resource, path) {
            let Some(reference) = v.get("reference").and_then(Value::as_str) else {
                continue;
            };
            if reference.starts_with('#') {
                continue;
            }
            let normalized = normalize_reference(reference);
            if let Some(target) = def.target {
                if !normalized.starts_with(&format!("{target}/")) {
                    continue;
                }
            }
            out.push(normalized);
        }
    }
    out
}

/// Date ranges of a date parameter, from the first of its paths that is present.
fn dates(resource: &Value, def: &ParamDef) -> Vec<DateRange> {
    for path in &def.paths {
        let values = collect(resource, path);
        if values.is_empty() {
            continue;
        }
        return values
            .into_iter()
            .filter_map(|v| match v {
                Value::String(s) => parse_range(s),
                Value::Object(period) => {
                    let start = period
                        .get("start")
                        .and_then(Value::as_str)
                        .and_then(parse_range);
                    let end = period
                        .get("end")
                        .and_then(Value::as_str)
                        .and_then(parse_range);
                    (start.is_some() || end.is_some()).then(|| DateRange {
                        start: start.map_or(i64::MIN, |r| r.start),
                        end: end.map_or(i64::MAX, |r| r.end),
                    })
                }
                _ => None,
            })
            .collect();
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::OnceLock;

    fn registry() -> &'static SearchRegistry {
        static R: OnceLock<SearchRegistry> = OnceLock::new();
        R.get_or_init(|| {
            SearchRegistry::new(&SchemaValidator::bundled().expect("bundled schema compiles"))
        })
    }

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn obs() -> Value {
        json!({"resourceType":"Observation","id":"o1","status":"final",
            "category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}]}],
            "code":{"coding":[{"system":"http://loinc.org","code":"39156-5"}]},
            "subject":{"reference":"Patient/p1"},
            "effectiveDateTime":"2021-03-04T10:00:00Z"})
    }

    fn matches(q: &[(&str, &str)]) -> bool {
        let query = registry()
            .parse_query("Observation", &pairs(q), true)
            .expect("valid query");
        query
            .clauses
            .iter()
            .all(|c| c.matches(Some(&obs()), "o1", 0))
    }

    #[test]
    fn tokens_references_and_dates_match() {
        assert!(matches(&[("code", "http://loinc.org|39156-5")]));
        assert!(matches(&[("code", "39156-5")]));
        assert!(!matches(&[("code", "|39156-5")]));
        assert!(matches(&[("code", "http://loinc.org|")]));
        assert!(!matches(&[("code", "http://snomed.info/sct|39156-5")]));
        assert!(matches(&[("code:not", "1234-5")]));
        assert!(matches(&[("patient", "p1"), ("subject", "Patient/p1")]));
        assert!(matches(&[("subject", "p1")]));
        assert!(matches(&[(
            "patient",
            "http://example.org/fhir/Patient/p1"
        )]));
        assert!(!matches(&[("patient", "p2")]));
        assert!(matches(&[("status", "final,amended")]));
        assert!(matches(&[
            ("date", "2021"),
            ("date", "ge2021-03-04"),
            ("date", "lt2021-03-05")
        ]));
        assert!(!matches(&[("date", "gt2021-03-04")]));
        assert!(matches(&[("date", "sa2021-03-03"), ("date", "eb2022")]));
        assert!(matches(&[("date", "ne2020")]));
        assert!(matches(&[
            ("category", "vital-signs"),
            ("code:missing", "false")
        ]));
    }

    #[test]
    fn periods_compare_as_ranges() {
        let enc = json!({"resourceType":"Encounter","period":{"start":"2020-01-01T10:00:00Z","end":"2020-01-03T10:00:00Z"}});
        let q = |v: &str| {
            registry()
                .parse_query("Encounter", &pairs(&[("date", v)]), true)
                .expect("valid")
                .clauses[0]
                .matches(Some(&enc), "e", 0)
        };
        assert!(q("eq2020-01"));
        assert!(!q("eq2020-01-02"));
        assert!(q("gt2020-01-02"));
        assert!(q("lt2020-01-02"));
        assert!(!q("lt2020-01-01"));
        assert!(q("ap2020-01-02"));
    }

    #[test]
    fn strict_rejects_unknown_and_lenient_reports_it() {
        let err = registry()
            .parse_query("Patient", &pairs(&[("foo", "1")]), true)
            .expect_err("strict");
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        let q = registry()
            .parse_query(
                "Patient",
                &pairs(&[("foo", "1"), ("identifier", "a|b")]),
                false,
            )
            .expect("lenient");
        assert_eq!(q.ignored, vec!["foo"]);
        assert_eq!(q.clauses.len(), 1);
        // `date` is not a Patient parameter.
        assert!(registry()
            .parse_query("Patient", &pairs(&[("date", "2020")]), true)
            .is_err());
    }

    #[test]
    fn bad_values_are_always_errors() {
        for (name, value) in [
            ("date", "xx2020"),
            ("date", "2020-13"),
            ("_count", "-1"),
            ("code:text", "x"),
            ("_lastUpdated", "gt20"),
        ] {
            let err = registry()
                .parse_query("Observation", &pairs(&[(name, value)]), false)
                .expect_err(name);
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{name}={value}");
        }
    }

    #[test]
    fn index_keys_line_up_with_probes() {
        let keys = registry().index_keys("Observation", &obs());
        let query = registry()
            .parse_query(
                "Observation",
                &pairs(&[
                    ("code", "http://loinc.org|39156-5"),
                    ("code", "39156-5"),
                    ("patient", "p1"),
                    ("subject", "p1"),
                    ("subject", "Patient/p1"),
                ]),
                true,
            )
            .expect("valid");
        for clause in &query.clauses {
            for probe in clause.probes().expect("indexed") {
                let found = match &probe {
                    Probe::Exact(key) => keys.contains(key),
                    Probe::Prefix(prefix) => keys.iter().any(|k| k.starts_with(prefix.as_str())),
                };
                assert!(found, "{probe:?} not in {keys:?}");
            }
        }
        // Conditions must filter something.
        for bad in [&[("identifier", "")][..], &[("_count", "1")], &[]] {
            assert!(
                registry().parse_condition("Patient", &pairs(bad)).is_err(),
                "{bad:?}"
            );
        }
        assert!(registry()
            .parse_condition("Patient", &pairs(&[("identifier", "a|b")]))
            .is_ok());
        // A code that is a prefix of another does not match it.
        let other = registry()
            .parse_query("Observation", &pairs(&[("code", "39156")]), true)
            .expect("valid");
        let Some(Probe::Prefix(prefix)) =
            other.clauses[0].probes().and_then(|p| p.into_iter().next())
        else {
            panic!("prefix probe");
        };
        assert!(!keys.iter().any(|k| k.starts_with(prefix.as_str())));
        // System-only tokens are checked per resource.
        let system_only = registry()
            .parse_query(
                "Observation",
                &pairs(&[("code", "http://loinc.org|")]),
                true,
            )
            .expect("valid");
        assert!(system_only.clauses[0].probes().is_none());
    }

    #[test]
    fn escaped_commas_stay_in_values() {
        assert_eq!(split_values(r"a\,b,c"), vec!["a,b", "c"]);
        assert_eq!(
            normalize_reference("https://h/fhir/Patient/1/_history/3"),
            "Patient/1"
        );
    }
}
