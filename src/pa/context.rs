//! The patient's clinical picture as the criteria need it, read once from FHIR resources.
//!
//! Criteria never walk JSON: the resources (a prefetch, a PAS Bundle, a hydrated encounter) are
//! reduced here to coded, dated items with the reference they came from, plus the facts the
//! note extractor found. Whether a kind of data was supplied at all is kept too, because "no
//! BMI on record" (unknown) is not the same as "BMI below the threshold" (unmet).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::Date;

use crate::fhir::date::parse_range;

/// A coded code with its system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Coding {
    pub system: Option<String>,
    pub code: String,
}

/// A coded item with its time span (days since the Unix epoch, inclusive) and source.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub reference: String,
    pub codes: Vec<Coding>,
    pub start: Option<i64>,
    pub end: Option<i64>,
}

/// A numeric measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub reference: String,
    pub codes: Vec<Coding>,
    pub value: f64,
    pub unit: Option<String>,
    pub day: Option<i64>,
}

/// A fact found in clinical notes (filled by the extraction pipeline), with its source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fact {
    /// `conservative_therapy`, `red_flag`, `intolerance`, `treatment_failure`, `symptom_duration`, …
    pub kind: String,
    /// What it is about, e.g. `physical_therapy`, `cauda_equina`, `methotrexate`.
    #[serde(default)]
    pub value: Option<String>,
    /// A duration, where the fact has one.
    #[serde(default)]
    pub days: Option<u32>,
    #[serde(default)]
    pub source: Option<FactSource>,
}

/// Where in which note a fact was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FactSource {
    pub note: String,
    pub start: usize,
    pub end: usize,
}

/// Everything the criteria look at.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClinicalContext {
    /// The day criteria are evaluated on (days since the Unix epoch).
    pub today: i64,
    pub birth_day: Option<i64>,
    pub gender: Option<String>,
    /// Active problems (resolved, inactive and entered-in-error ones are left out).
    pub conditions: Vec<Item>,
    pub procedures: Vec<Item>,
    pub medications: Vec<Item>,
    pub intolerances: Vec<Item>,
    pub observations: Vec<Measurement>,
    pub facts: Vec<Fact>,
    /// Which kinds of data were supplied at all (even if empty of matches).
    pub supplied: Supplied,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Supplied {
    pub conditions: bool,
    pub procedures: bool,
    pub medications: bool,
    pub intolerances: bool,
    pub observations: bool,
    pub facts: bool,
}

const DAY_MICROS: i64 = 86_400_000_000;

/// Days since the Unix epoch of a FHIR date/dateTime (its first day).
pub fn day_of(text: &str) -> Option<i64> {
    parse_range(text).map(|r| r.start.div_euclid(DAY_MICROS))
}

/// Whether a Period (absent, or open at either end) includes `day`.
pub fn period_contains(period: &Value, day: i64) -> bool {
    let start = period["start"].as_str().and_then(day_of);
    let end = period["end"]
        .as_str()
        .and_then(|e| parse_range(e).map(|r| (r.end - 1).div_euclid(DAY_MICROS)));
    start.is_none_or(|s| s <= day) && end.is_none_or(|e| day <= e)
}

/// Days since the Unix epoch of a calendar date.
pub fn day_of_date(date: Date) -> i64 {
    i64::from(date.to_julian_day()) - 2_440_588
}

impl ClinicalContext {
    /// An empty context evaluated on `today`.
    pub fn new(today: Date) -> Self {
        Self {
            today: day_of_date(today),
            ..Self::default()
        }
    }

    /// Adds every resource in `resources` (Bundles are opened, their entries added).
    pub fn add_resources<'a>(&mut self, resources: impl IntoIterator<Item = &'a Value>) {
        for resource in resources {
            self.add(resource);
        }
    }

    /// Adds facts from the note extractor; supplying facts (even none) says the notes were read.
    pub fn add_facts(&mut self, facts: impl IntoIterator<Item = Fact>) {
        self.supplied.facts = true;
        self.facts.extend(facts);
    }

    pub fn add(&mut self, resource: &Value) {
        let rt = resource["resourceType"].as_str().unwrap_or_default();
        let reference = format!("{rt}/{}", resource["id"].as_str().unwrap_or("?"));
        match rt {
            "Bundle" => {
                for entry in resource["entry"].as_array().into_iter().flatten() {
                    self.add(&entry["resource"]);
                }
            }
            "Patient" => {
                self.birth_day = resource["birthDate"].as_str().and_then(day_of);
                self.gender = resource["gender"].as_str().map(str::to_owned);
            }
            "Condition" => {
                self.supplied.conditions = true;
                let status = first_code(&resource["clinicalStatus"]);
                let verification = first_code(&resource["verificationStatus"]);
                let inactive = matches!(
                    status.as_deref(),
                    Some("inactive" | "resolved" | "remission")
                );
                let refuted = matches!(
                    verification.as_deref(),
                    Some("refuted" | "entered-in-error")
                );
                if !inactive && !refuted {
                    let (start, end) =
                        span(resource, &["onsetDateTime", "onsetPeriod", "recordedDate"]);
                    self.conditions.push(Item {
                        reference,
                        codes: codings(&resource["code"]),
                        start,
                        end,
                    });
                }
            }
            "Claim" => {
                // A claim's diagnoses are the problems the provider submits the request for
                // (PAS): they count as active conditions.
                for (n, diagnosis) in resource["diagnosis"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    let codes = codings(&diagnosis["diagnosisCodeableConcept"]);
                    if codes.is_empty() {
                        continue;
                    }
                    self.supplied.conditions = true;
                    self.conditions.push(Item {
                        reference: format!("{reference}#diagnosis[{n}]"),
                        codes,
                        start: None,
                        end: None,
                    });
                }
            }
            "Procedure" => {
                self.supplied.procedures = true;
                if !matches!(
                    resource["status"].as_str(),
                    Some("entered-in-error" | "not-done")
                ) {
                    let (start, end) = span(resource, &["performedPeriod", "performedDateTime"]);
                    self.procedures.push(Item {
                        reference,
                        codes: codings(&resource["code"]),
                        start,
                        end,
                    });
                }
            }
            "MedicationStatement"
            | "MedicationRequest"
            | "MedicationAdministration"
            | "MedicationDispense" => {
                self.supplied.medications = true;
                if matches!(
                    resource["status"].as_str(),
                    Some("entered-in-error" | "cancelled" | "not-taken")
                ) {
                    return;
                }
                let (start, end) = medication_span(resource);
                self.medications.push(Item {
                    reference,
                    codes: codings(&resource["medicationCodeableConcept"]),
                    start,
                    end,
                });
            }
            "AllergyIntolerance" => {
                self.supplied.intolerances = true;
                let verification = first_code(&resource["verificationStatus"]);
                let status = first_code(&resource["clinicalStatus"]);
                if matches!(
                    verification.as_deref(),
                    Some("refuted" | "entered-in-error")
                ) || matches!(status.as_deref(), Some("resolved" | "inactive"))
                {
                    return;
                }
                let (start, end) = span(resource, &["onsetDateTime", "recordedDate"]);
                self.intolerances.push(Item {
                    reference,
                    codes: codings(&resource["code"]),
                    start,
                    end,
                });
            }
            "Observation" => {
                self.supplied.observations = true;
                if matches!(
                    resource["status"].as_str(),
                    Some("entered-in-error" | "cancelled")
                ) {
                    return;
                }
                let day = resource["effectiveDateTime"]
                    .as_str()
                    .or_else(|| resource["effectivePeriod"]["start"].as_str())
                    .or_else(|| resource["issued"].as_str())
                    .and_then(day_of);
                if let Some(value) = quantity(&resource["valueQuantity"]) {
                    self.observations.push(Measurement {
                        reference: reference.clone(),
                        codes: codings(&resource["code"]),
                        value,
                        unit: resource["valueQuantity"]["unit"]
                            .as_str()
                            .map(str::to_owned),
                        day,
                    });
                }
                // Panels such as blood pressure carry their values in components.
                for component in resource["component"].as_array().into_iter().flatten() {
                    if let Some(value) = quantity(&component["valueQuantity"]) {
                        self.observations.push(Measurement {
                            reference: reference.clone(),
                            codes: codings(&component["code"]),
                            value,
                            unit: component["valueQuantity"]["unit"]
                                .as_str()
                                .map(str::to_owned),
                            day,
                        });
                    }
                }
            }
            _ => {}
        }
    }

    /// Age in whole years today, if the birth date is known.
    pub fn age_years(&self) -> Option<u32> {
        let as_date = |day: i64| {
            time::Date::from_julian_day(i32::try_from(day.checked_add(2_440_588)?).ok()?).ok()
        };
        let (birth, today) = (as_date(self.birth_day?)?, as_date(self.today)?);
        let mut years = today.year() - birth.year();
        if (today.month() as u8, today.day()) < (birth.month() as u8, birth.day()) {
            years -= 1;
        }
        u32::try_from(years).ok()
    }

    /// Records that a kind of data was asked for and supplied, even if the answer was empty
    /// (an empty Condition search means "no problems", not "unknown"). `key` is a prefetch key.
    pub fn mark_supplied(&mut self, key: &str) {
        match key {
            "conditions" => self.supplied.conditions = true,
            "procedures" => self.supplied.procedures = true,
            "medicationStatements" | "medicationRequests" => self.supplied.medications = true,
            "allergies" => self.supplied.intolerances = true,
            "observations" => self.supplied.observations = true,
            _ => {}
        }
    }
}

fn first_code(concept: &Value) -> Option<String> {
    concept["coding"][0]["code"].as_str().map(str::to_owned)
}

/// The codings of a CodeableConcept (also Coding or plain code).
pub fn codings(concept: &Value) -> Vec<Coding> {
    match concept {
        Value::Object(map) if map.contains_key("coding") => map["coding"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| {
                Some(Coding {
                    system: c["system"].as_str().map(str::to_owned),
                    code: c["code"].as_str()?.to_owned(),
                })
            })
            .collect(),
        Value::Object(map) => map
            .get("code")
            .and_then(Value::as_str)
            .map(|code| {
                vec![Coding {
                    system: map.get("system").and_then(Value::as_str).map(str::to_owned),
                    code: code.to_owned(),
                }]
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn quantity(q: &Value) -> Option<f64> {
    match &q["value"] {
        Value::Number(n) => n.as_f64(),
        _ => None,
    }
}

/// Start and end day from the first present of `elements` (a Period or a date).
fn span(resource: &Value, elements: &[&str]) -> (Option<i64>, Option<i64>) {
    for element in elements {
        match &resource[*element] {
            Value::String(s) => {
                let day = day_of(s);
                return (day, day);
            }
            Value::Object(period) => {
                let start = period.get("start").and_then(Value::as_str).and_then(day_of);
                let end = period.get("end").and_then(Value::as_str).and_then(day_of);
                return (start, end);
            }
            _ => {}
        }
    }
    (None, None)
}

/// When a medication was taken: the statement's effective period, or a request's authored date
/// plus its expected supply or validity period.
fn medication_span(resource: &Value) -> (Option<i64>, Option<i64>) {
    let active = resource["status"].as_str() == Some("active");
    let (start, end) = span(resource, &["effectivePeriod", "effectiveDateTime"]);
    if start.is_some() {
        // An active statement without an end is still being taken.
        return (start, end.or(if active { None } else { start }));
    }
    if resource["resourceType"] == "MedicationDispense" {
        let start = resource["whenHandedOver"].as_str().and_then(day_of);
        let days = duration_days(&resource["daysSupply"]);
        return (start, start.map(|s| s.saturating_add(days.unwrap_or(0))));
    }
    // A request: from authoring (or the start of its validity) for the supply it covers,
    // refills included. Without a supply, an active request runs on; any other lasted a day.
    let dispense = &resource["dispenseRequest"];
    let (valid_from, _) = span(dispense, &["validityPeriod"]);
    let start = resource["authoredOn"]
        .as_str()
        .and_then(day_of)
        .or(valid_from);
    let fills = dispense["numberOfRepeatsAllowed"]
        .as_i64()
        .unwrap_or(0)
        .clamp(0, 100)
        + 1;
    let supply =
        duration_days(&dispense["expectedSupplyDuration"]).map(|d| d.saturating_mul(fills));
    let end = match (start, supply) {
        (Some(s), Some(d)) => Some(s.saturating_add(d)),
        (Some(_), None) if active => None,
        (s, _) => s,
    };
    (start, end)
}

/// A Duration or Quantity in days, from its UCUM code or unit (d, wk, mo, a, h, min).
fn duration_days(quantity: &Value) -> Option<i64> {
    let value = quantity["value"].as_f64()?;
    if !value.is_finite() || value < 0.0 {
        return None;
    }
    let unit = quantity["code"]
        .as_str()
        .or_else(|| quantity["unit"].as_str())
        .unwrap_or("d");
    let days = match unit.trim().to_ascii_lowercase().as_str() {
        "d" | "day" | "days" => value,
        "wk" | "week" | "weeks" => value * 7.0,
        "mo" | "month" | "months" => value * 30.0,
        "a" | "year" | "years" => value * 365.0,
        "h" | "hour" | "hours" => value / 24.0,
        "min" | "minute" | "minutes" => value / 1440.0,
        _ => return None,
    };
    Some(days.min(36_500.0).round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use time::macros::date;

    #[test]
    fn reads_the_clinical_picture() {
        let mut ctx = ClinicalContext::new(date!(2024 - 06 - 01));
        ctx.add(&json!({"resourceType":"Bundle","entry":[
            {"resource":{"resourceType":"Patient","id":"p","birthDate":"1970-06-02","gender":"female"}},
            {"resource":{"resourceType":"Condition","id":"c1","code":{"coding":[{"system":"http://hl7.org/fhir/sid/icd-10-cm","code":"M54.50"}]},
                "clinicalStatus":{"coding":[{"code":"active"}]},"onsetDateTime":"2024-01-01"}},
            {"resource":{"resourceType":"Condition","id":"c2","code":{"coding":[{"code":"J45"}]},"clinicalStatus":{"coding":[{"code":"resolved"}]}}},
            {"resource":{"resourceType":"Observation","id":"o1","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"39156-5"}]},
                "valueQuantity":{"value":31.2,"unit":"kg/m2"},"effectiveDateTime":"2024-05-01"}},
            {"resource":{"resourceType":"MedicationRequest","id":"m1","status":"active","medicationCodeableConcept":{"coding":[{"code":"6809"}]},
                "authoredOn":"2024-01-01","dispenseRequest":{"expectedSupplyDuration":{"value":30},"numberOfRepeatsAllowed":2}}}
        ]}));
        assert_eq!(ctx.age_years(), Some(53));
        let mut birthday = ClinicalContext::new(date!(2024 - 03 - 01));
        birthday.birth_day = Some(day_of_date(date!(2006 - 03 - 01)));
        assert_eq!(birthday.age_years(), Some(18), "18 on the birthday itself");
        assert_eq!(ctx.gender.as_deref(), Some("female"));
        assert_eq!(ctx.conditions.len(), 1, "resolved problems are left out");
        assert!(ctx.supplied.conditions && ctx.supplied.observations && !ctx.supplied.procedures);
        assert_eq!(ctx.observations[0].value, 31.2);
        let m = &ctx.medications[0];
        assert_eq!(m.end.zip(m.start).map(|(e, s)| e - s), Some(90));
    }
}

#[cfg(test)]
mod medication_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn medication_spans() {
        // A stopped request without supply lasted a day, not until today.
        let stopped = json!({"resourceType":"MedicationRequest","status":"stopped","authoredOn":"2022-01-01"});
        let (s, e) = medication_span(&stopped);
        assert_eq!(s, e);
        // Supply units count: 3 months with 1 refill = 180 days.
        let months = json!({"resourceType":"MedicationRequest","status":"completed","authoredOn":"2024-01-01",
            "dispenseRequest":{"expectedSupplyDuration":{"value":3,"unit":"months","code":"mo"},"numberOfRepeatsAllowed":1}});
        let (s, e) = medication_span(&months);
        assert_eq!(e.zip(s).map(|(e, s)| e - s), Some(180));
        let dispense = json!({"resourceType":"MedicationDispense","status":"completed","whenHandedOver":"2024-01-01",
            "daysSupply":{"value":30,"code":"d"}});
        let (s, e) = medication_span(&dispense);
        assert_eq!(e.zip(s).map(|(e, s)| e - s), Some(30));
        let huge = json!({"resourceType":"MedicationRequest","status":"active","authoredOn":"2024-01-01",
            "dispenseRequest":{"expectedSupplyDuration":{"value":1e300,"code":"d"},"numberOfRepeatsAllowed":9223372036854775807i64}});
        let _ = medication_span(&huge);
    }
}
