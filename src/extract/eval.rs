//! Scoring an extractor against labelled notes: precision, recall and F1 per kind of fact.
//!
//! The set is a folder of `NNN-name.txt` notes, each with `NNN-name.json` holding the day it
//! was written and the facts a careful reader finds in it (see `tests/fixtures/notes/README.md`).
//! A found fact counts as right when its kind, value, duration and date all equal a labelled
//! one's; each labelled fact can be matched once.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{Note, NoteFact, KINDS};

/// One labelled note.
#[derive(Debug, Clone)]
pub struct LabelledNote {
    pub name: String,
    pub note: Note,
    pub expected: Vec<ExpectedFact>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedFact {
    pub kind: String,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub days: Option<u32>,
    #[serde(default)]
    pub date: Option<String>,
    pub evidence: String,
}

#[derive(Deserialize)]
struct Label {
    date: String,
    facts: Vec<ExpectedFact>,
}

/// Reads every labelled note of `dir`, in name order.
pub fn load(dir: &Path) -> anyhow::Result<Vec<LabelledNote>> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    names.sort();
    let format = time::macros::format_description!("[year]-[month]-[day]");
    names
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let label_path = path.with_extension("json");
            let label: Label = serde_json::from_str(
                &std::fs::read_to_string(&label_path)
                    .with_context(|| format!("reading {}", label_path.display()))?,
            )
            .with_context(|| format!("parsing {}", label_path.display()))?;
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok(LabelledNote {
                note: Note {
                    reference: format!("DocumentReference/{name}"),
                    text,
                    date: Some(
                        time::Date::parse(&label.date, format)
                            .with_context(|| format!("{}: date", label_path.display()))?,
                    ),
                },
                name,
                expected: label.facts,
            })
        })
        .collect()
}

/// Counts for one kind of fact.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Score {
    pub true_positives: usize,
    pub false_positives: usize,
    pub false_negatives: usize,
}

impl Score {
    pub fn precision(&self) -> f64 {
        ratio(
            self.true_positives,
            self.true_positives + self.false_positives,
        )
    }
    pub fn recall(&self) -> f64 {
        ratio(
            self.true_positives,
            self.true_positives + self.false_negatives,
        )
    }
    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

/// The scores, per kind and overall, with every miss for people to read.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub notes: usize,
    pub kinds: BTreeMap<String, Score>,
    pub overall: Score,
    /// `note: kind value days date — found but not labelled` and the reverse.
    pub mistakes: Vec<String>,
}

fn same(found: &NoteFact, expected: &ExpectedFact) -> bool {
    found.kind == expected.kind
        && found.value == expected.value
        && found.days == expected.days
        && found.date == expected.date
}

/// Scores `found` (facts per note, in the order of `set`).
pub fn score(set: &[LabelledNote], found: &[Vec<NoteFact>]) -> Report {
    let mut report = Report {
        notes: set.len(),
        ..Report::default()
    };
    for kind in KINDS {
        report.kinds.insert(kind.to_owned(), Score::default());
    }
    for (labelled, found) in set.iter().zip(found) {
        let mut unmatched: Vec<&ExpectedFact> = labelled.expected.iter().collect();
        for fact in found {
            let score = report.kinds.entry(fact.kind.clone()).or_default();
            match unmatched.iter().position(|e| same(fact, e)) {
                Some(i) => {
                    unmatched.remove(i);
                    score.true_positives += 1;
                }
                None => {
                    score.false_positives += 1;
                    report.mistakes.push(format!(
                        "{}: extra {} {:?} {:?} {:?} — {:?}",
                        labelled.name, fact.kind, fact.value, fact.days, fact.date, fact.text
                    ));
                }
            }
        }
        for missed in unmatched {
            report
                .kinds
                .entry(missed.kind.clone())
                .or_default()
                .false_negatives += 1;
            report.mistakes.push(format!(
                "{}: missed {} {:?} {:?} {:?} — {:?}",
                labelled.name, missed.kind, missed.value, missed.days, missed.date, missed.evidence
            ));
        }
    }
    for score in report.kinds.values() {
        report.overall.true_positives += score.true_positives;
        report.overall.false_positives += score.false_positives;
        report.overall.false_negatives += score.false_negatives;
    }
    report
}

impl Report {
    /// A Markdown table: kind, labelled, found, precision, recall, F1.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} notes\n\n| fact kind | labelled | found | precision | recall | F1 |\n|---|---|---|---|---|---|\n",
            self.notes
        );
        let row = |name: &str, s: &Score| {
            format!(
                "| {name} | {} | {} | {:.3} | {:.3} | {:.3} |\n",
                s.true_positives + s.false_negatives,
                s.true_positives + s.false_positives,
                s.precision(),
                s.recall(),
                s.f1()
            )
        };
        for (kind, s) in &self.kinds {
            out.push_str(&row(kind, s));
        }
        out.push_str(&row("**all**", &self.overall));
        out
    }
}
