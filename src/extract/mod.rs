//! Facts from clinical notes: what conservative therapy the patient had and for how long,
//! which treatments failed or were not tolerated, how long the complaint has lasted, red flags,
//! homebound status — each with the note and character span it came from.
//!
//! Payer criteria ask for these, and they are rarely coded; they live in the prose of a
//! progress note. [`rules`] reads them deterministically and is always available; [`llm`]
//! asks an OpenAI-compatible model when one is configured, keeps only facts whose quoted text
//! is really in the note, and falls back to the rules when the model fails. [`notes`] turns
//! DocumentReference attachments (plain text, HTML, other encodings) into the text both read,
//! and [`eval`] scores an extractor against the labelled notes in `tests/fixtures/notes/`.

pub mod eval;
pub mod llm;
pub mod notes;
pub mod rules;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::pa::{Fact, FactSource};

/// The kinds of fact, as the payer policies name them.
pub const KINDS: [&str; 6] = [
    "conservative_therapy",
    "red_flag",
    "intolerance",
    "treatment_failure",
    "symptom_duration",
    "homebound",
];

/// A clinical note's text and where it came from.
#[derive(Debug, Clone)]
pub struct Note {
    /// `DocumentReference/9`.
    pub reference: String,
    pub text: String,
    /// The day the note was written; relative durations ("since 3/2") count to it.
    pub date: Option<time::Date>,
}

/// One fact, with the quoted text and its byte span in the note.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoteFact {
    pub kind: String,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub days: Option<u32>,
    /// When it happened, as written precisely enough: `YYYY`, `YYYY-MM` or `YYYY-MM-DD`.
    #[serde(default)]
    pub date: Option<String>,
    /// The note's words the fact rests on.
    pub text: String,
    /// The note (`DocumentReference/9`).
    pub note: String,
    /// Byte offsets of `text` in the note.
    pub start: usize,
    pub end: usize,
}

impl NoteFact {
    /// The fact as the policy evaluation takes it.
    pub fn to_policy_fact(&self) -> Fact {
        Fact {
            kind: self.kind.clone(),
            value: self.value.clone(),
            days: self.days,
            source: Some(FactSource {
                note: self.note.clone(),
                start: self.start,
                end: self.end,
            }),
        }
    }
}

/// What the extraction found, and how.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Extraction {
    pub facts: Vec<NoteFact>,
    /// `rules`, `llm`, or `rules (the LLM failed: …)`.
    pub extractor: String,
}

/// The extractor the pipeline uses: the model when configured, else (or when it fails) rules.
#[derive(Clone, Default)]
pub struct Extractor {
    pub llm: Option<Arc<dyn llm::LlmClient>>,
}

impl Extractor {
    /// The facts of `notes`; `identity` is masked out of whatever goes to a model.
    pub async fn extract(&self, notes: &[Note], identity: &llm::Identity) -> Extraction {
        let rules = || notes.iter().flat_map(rules::extract).collect::<Vec<_>>();
        let Some(llm) = &self.llm else {
            return Extraction {
                facts: rules(),
                extractor: "rules".into(),
            };
        };
        match llm::extract_all(llm.as_ref(), notes, identity).await {
            Ok(facts) => Extraction {
                facts,
                extractor: "llm".into(),
            },
            Err(e) => {
                tracing::warn!(error = %e, "the LLM extraction failed; using the rules");
                metrics::counter!("fhirgate_extract_llm_failures_total").increment(1);
                Extraction {
                    facts: rules(),
                    extractor: format!("rules (the LLM failed: {e})"),
                }
            }
        }
    }
}

/// Days in `n` of `unit` (`day`, `week`, `month`, `year` and their abbreviations).
pub fn unit_days(n: u32, unit: &str) -> Option<u32> {
    let unit = unit.to_ascii_lowercase();
    let per = if unit.starts_with('d') {
        1
    } else if unit.starts_with('w') {
        7
    } else if unit.starts_with("mo") || unit == "m" {
        30
    } else if unit.starts_with('y') {
        365
    } else {
        return None;
    };
    n.checked_mul(per)
}

/// A readable account of a fact, for rationale text: "physical therapy, 8 weeks".
pub fn describe(fact: &NoteFact) -> String {
    let kind = match fact.kind.as_str() {
        "conservative_therapy" => "Conservative therapy",
        "red_flag" => "Red flag",
        "intolerance" => "Intolerance",
        "treatment_failure" => "Treatment failure",
        "symptom_duration" => "Symptom duration",
        "homebound" => "Homebound",
        other => other,
    };
    let mut out = kind.to_owned();
    if let Some(value) = &fact.value {
        out.push_str(": ");
        out.push_str(&value.replace('_', " "));
    }
    if let Some(days) = fact.days {
        if days % 7 == 0 && days >= 14 {
            out.push_str(&format!(", {} weeks", days / 7));
        } else {
            out.push_str(&format!(", {days} days"));
        }
    }
    if let Some(date) = &fact.date {
        out.push_str(&format!(" ({date})"));
    }
    out.push_str(&format!(" — \"{}\"", fact.text));
    out
}
