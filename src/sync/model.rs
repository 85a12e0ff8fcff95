//! What the sync engine keeps in the store: jobs, outbox entries, dead letters, watermarks and
//! the version last delivered per resource. Only metadata — resource bodies are read from the
//! source again when a delivery has to be retried after a restart.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Key-value spaces of the store used by sync.
pub const JOBS: &str = "sync.job";
pub const ENTRIES: &str = "sync.entry";
pub const DEAD: &str = "sync.dead";
/// `{destination}|{Type}/{id at the destination}` → [`Delivered`].
pub const DELIVERED: &str = "sync.delivered";
/// `{source}|{destination}|{Type}` → `_lastUpdated` of the newest resource queued.
pub const WATERMARKS: &str = "sync.watermark";
pub const META: &str = "sync.meta";
/// The last sequence number handed out (jobs, entries and dead letters share it).
pub const META_SEQ: &str = "seq";

/// Keys sort like the numbers they hold.
pub fn seq_key(seq: u64) -> String {
    format!("{seq:020}")
}

/// What a job syncs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Scope {
    /// A patient and everything for that patient; `types` narrows it (e.g. only Observation).
    Patient {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        types: Option<Vec<String>>,
    },
    /// Listed resources, as `Type/id`.
    Resources { references: Vec<String> },
    /// Every resource of these types changed since `since` (or since the last run).
    Types {
        types: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Reading the source and queueing entries.
    Expanding,
    /// Everything is queued; deliveries are in progress.
    Delivering,
    /// Every entry delivered (or unchanged).
    Completed,
    /// Finished, but something was dead-lettered or could not be read.
    CompletedWithErrors,
}

impl JobState {
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Completed | Self::CompletedWithErrors)
    }
}

/// Progress of a job. `queued` counts every resource the job took on, so
/// `queued = done + skipped + failed + entries still in the outbox`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Resources the job took on (queued in the outbox, or found with nothing to do).
    pub queued: u64,
    pub done: u64,
    /// Already delivered at this version (or queued by another job), superseded by a newer
    /// version, or gone from the source before delivery.
    pub skipped: u64,
    /// Delivery attempts that will be tried again.
    pub retried: u64,
    /// Resources dead-lettered.
    pub failed: u64,
    /// Source pages or reads that could not be fetched (dead letters of kind `page`).
    #[serde(default)]
    pub failed_pages: u64,
    /// Of `done`: found already at the destination after an attempt whose answer was lost
    /// (a timeout, a crash), so not written again.
    #[serde(default)]
    pub verified: u64,
}

impl Counts {
    /// Entries still waiting in the outbox.
    pub fn outstanding(&self) -> u64 {
        self.queued
            .saturating_sub(self.done + self.skipped + self.failed)
    }
}

/// Outcomes of one resource type within a job.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TypeCounts {
    pub done: u64,
    pub skipped: u64,
    pub failed: u64,
}

/// Where expansion resumes after a restart: the step, and the next page of its search.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Cursor {
    pub step: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// Newest `_lastUpdated` seen in this step so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest: Option<String>,
    /// Whether the step's resources came oldest first so far (the watermark may then move
    /// page by page).
    #[serde(default)]
    pub ordered: bool,
    /// Only this step (a retried page), not the ones after it.
    #[serde(default)]
    pub single: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub id: u64,
    pub source: String,
    pub destination: String,
    pub scope: Scope,
    pub state: JobState,
    pub counts: Counts,
    /// Outcomes by resource type.
    #[serde(default)]
    pub types: BTreeMap<String, TypeCounts>,
    /// RFC 3339 instants.
    pub created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expanded: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<Cursor>,
    /// References asked for that the source does not have.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    /// Problems that are not a single resource's (a page that failed, a search the source
    /// refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl Job {
    pub fn type_counts(&mut self, resource_type: &str) -> &mut TypeCounts {
        self.types.entry(resource_type.to_owned()).or_default()
    }

    /// Whether anything went wrong: dead letters, unreadable pages, missing resources.
    pub fn has_problems(&self) -> bool {
        self.counts.failed > 0
            || self.counts.failed_pages > 0
            || !self.errors.is_empty()
            || !self.missing.is_empty()
    }
}

/// One resource version waiting to be delivered to one destination.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub seq: u64,
    pub job: u64,
    pub source: String,
    pub destination: String,
    pub resource_type: String,
    /// The id at the source.
    pub id: String,
    /// The id at the destination (differs under the `prefix` id strategy).
    pub target_id: String,
    pub version: String,
    /// `meta.lastUpdated` of that version (microseconds), to tell an older version from a
    /// newer one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<i64>,
    /// Delivery order within the job: lower tiers (referenced resources) go first.
    #[serde(default)]
    pub tier: u8,
    #[serde(default)]
    pub attempts: u32,
    /// Not before this time (milliseconds since the epoch).
    #[serde(default)]
    pub not_before: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl Entry {
    /// The resource at the destination, `Type/id`: at most one entry per key is delivered at a
    /// time.
    pub fn key(&self) -> String {
        format!("{}/{}", self.resource_type, self.target_id)
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeadKind {
    /// A resource the destination refused, or that kept failing.
    Resource,
    /// A source page (or read) that could not be fetched; retrying resumes there.
    Page,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub id: u64,
    pub kind: DeadKind,
    pub job: u64,
    pub source: String,
    pub destination: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_type: Option<String>,
    /// The id at the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default)]
    pub tier: u8,
    /// For a page: the job step and the page link to resume from (none: the first page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// HTTP status of the refusal (0 when there was no answer).
    pub status: u16,
    pub reason: String,
    /// The destination's (or source's) OperationOutcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Value>,
    pub attempts: u32,
    pub at: String,
}

/// The version last delivered for a resource at a destination, and by which job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Delivered {
    pub source: String,
    pub version: String,
    #[serde(default)]
    pub job: u64,
    /// `meta.lastUpdated` of the version delivered (microseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<i64>,
}

/// `meta.lastUpdated` of a resource, in microseconds.
pub fn updated_of(resource: &Value) -> Option<i64> {
    let text = resource.get("meta")?.get("lastUpdated")?.as_str()?;
    crate::fhir::date::parse_range(text).map(|range| range.start)
}

/// Whether a version updated at `a` is known to be older than one updated at `b`.
pub fn is_older(a: Option<i64>, b: Option<i64>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a < b)
}

/// Delivery tier of a resource type: resources that others point at go first, so a
/// destination that checks references finds them. Cycles (Encounter.diagnosis → Condition →
/// Encounter) are broken in favour of the more central resource.
pub fn tier(resource_type: &str) -> u8 {
    match resource_type {
        "Organization" | "Practitioner" | "Medication" | "Substance" | "Endpoint" => 0,
        "Location" | "PractitionerRole" | "HealthcareService" => 1,
        "Patient" | "Group" | "Person" => 2,
        "RelatedPerson" | "Coverage" | "Device" | "Account" => 3,
        "Encounter" | "EpisodeOfCare" | "Appointment" => 4,
        "DiagnosticReport"
        | "MedicationAdministration"
        | "MedicationDispense"
        | "Claim"
        | "DocumentReference"
        | "QuestionnaireResponse"
        | "Communication"
        | "Task"
        | "ImagingStudy"
        | "Media" => 6,
        "ClaimResponse"
        | "ExplanationOfBenefit"
        | "Provenance"
        | "Composition"
        | "AuditEvent"
        | "Consent" => 7,
        _ => 5,
    }
}

/// The version of a source resource: `meta.versionId`, else `meta.lastUpdated`, else a hash
/// of its content.
pub fn version_of(resource: &Value) -> String {
    let meta = resource.get("meta");
    if let Some(version) = meta
        .and_then(|m| m.get("versionId"))
        .and_then(Value::as_str)
    {
        return version.to_owned();
    }
    if let Some(updated) = meta
        .and_then(|m| m.get("lastUpdated"))
        .and_then(Value::as_str)
    {
        return format!("lastUpdated:{updated}");
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(serde_json::to_vec(resource).unwrap_or_default());
    format!("sha256:{}", crate::hex(&digest[..12]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn versions_prefer_version_id_then_last_updated_then_content() {
        let a = json!({"resourceType": "Patient", "id": "1", "meta": {"versionId": "3"}});
        assert_eq!(version_of(&a), "3");
        let b = json!({"resourceType": "Patient", "id": "1", "meta": {"lastUpdated": "2024-01-01T00:00:00Z"}});
        assert_eq!(version_of(&b), "lastUpdated:2024-01-01T00:00:00Z");
        let c = json!({"resourceType": "Patient", "id": "1", "gender": "male"});
        let d = json!({"resourceType": "Patient", "id": "1", "gender": "female"});
        assert!(version_of(&c).starts_with("sha256:"));
        assert_eq!(version_of(&c), version_of(&c.clone()));
        assert_ne!(version_of(&c), version_of(&d));
    }

    #[test]
    fn referenced_types_come_first() {
        assert!(tier("Organization") < tier("Patient"));
        assert!(tier("Patient") < tier("Encounter"));
        assert!(tier("Encounter") < tier("Observation"));
        assert!(tier("Observation") < tier("DiagnosticReport"));
        assert!(tier("Claim") < tier("ExplanationOfBenefit"));
    }

    #[test]
    fn outstanding_is_what_is_not_settled() {
        let counts = Counts {
            queued: 10,
            done: 6,
            skipped: 1,
            failed: 1,
            ..Counts::default()
        };
        assert_eq!(counts.outstanding(), 2);
    }
}
