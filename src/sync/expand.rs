//! Expansion: reading a job's source and queueing what it finds. Types are read page by page
//! from a watermark on `_lastUpdated`; each page's entries, the job's cursor and (when it is
//! safe) the watermark commit together, so a restart resumes at the next page and a re-run
//! never queues a version twice. A patient is gathered whole — `$everything` or one `patient=`
//! search per type, then the resources they point at — and queued referenced-first.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;
use tokio::task::JoinSet;

use super::model::{
    tier, updated_of, version_of, Cursor, Delivered, Job, JobState, Scope, DELIVERED, WATERMARKS,
};
use super::outbox::{now_rfc3339, Candidate, Tx};
use super::SyncEngine;
use crate::fhir::date::parse_range;
use crate::remote::{FhirSource, Page, RemoteError};
use crate::store::StoreError;

/// Why expansion stopped before the end.
enum Halt {
    ShuttingDown,
    Store(StoreError),
}

impl From<StoreError> for Halt {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// Attempts per source request before it becomes a dead letter.
const READ_ATTEMPTS: u32 = 4;

/// Reads at once when a patient's referenced resources or a list of resources are fetched.
const READ_CONCURRENCY: usize = 8;

/// Resources per commit when a gathered set is queued.
const CHUNK: usize = 500;

/// Referenced resources read for one patient, at most.
const MAX_REFERENCED: usize = 2_000;

struct Reader {
    engine: Arc<SyncEngine>,
    job: u64,
    source: Arc<dyn FhirSource>,
    source_name: String,
    destination: String,
    prefix: Option<String>,
}

impl SyncEngine {
    /// Reads the job's source and queues what it finds; at the end the job moves on to
    /// delivering. Stops early (leaving the job to resume) at shutdown.
    pub(super) async fn expand(self: Arc<Self>, job_id: u64) {
        let Some(job) = self.job(job_id) else { return };
        if job.state != JobState::Expanding {
            return;
        }
        let Some(source) = self.source(&job.source) else {
            let message = format!("source {} is no longer configured", job.source);
            let _ = self.finish_expansion(job_id, Some(message)).await;
            return;
        };
        if !self.has_sink(&job.destination) {
            let message = format!("destination {} is no longer configured", job.destination);
            let _ = self.finish_expansion(job_id, Some(message)).await;
            return;
        }
        let reader = Reader {
            prefix: self.id_prefix(&job.source, &job.destination),
            engine: self.clone(),
            job: job_id,
            source,
            source_name: job.source.clone(),
            destination: job.destination.clone(),
        };
        let result = match &job.scope {
            Scope::Types { types, since } => {
                reader
                    .types(
                        types,
                        since.as_deref(),
                        job.cursor.clone().unwrap_or_default(),
                    )
                    .await
            }
            Scope::Patient { id, types } => reader.patient(id, types.as_deref()).await,
            Scope::Resources { references } => reader.resources(references).await,
        };
        match result {
            Ok(()) => {
                if let Err(e) = self.finish_expansion(job_id, None).await {
                    tracing::error!(job = job_id, error = %e, "could not record the end of expansion");
                }
            }
            Err(Halt::ShuttingDown) => {
                tracing::info!(
                    job = job_id,
                    "expansion paused for shutdown; it resumes on restart"
                )
            }
            Err(Halt::Store(e)) => {
                tracing::error!(job = job_id, error = %e, "expansion stopped: the store failed")
            }
        }
    }

    async fn finish_expansion(&self, job_id: u64, error: Option<String>) -> Result<(), StoreError> {
        self.transact(|tx| {
            if let Some(slot) = tx.job(job_id) {
                slot.job.errors.extend(error);
                slot.job.state = JobState::Delivering;
                slot.job.cursor = None;
                slot.job.expanded = Some(now_rfc3339());
            }
        })
        .await
    }

    /// Waits until `destination` has room in memory for more entries.
    async fn wait_for_room(&self, destination: &str) -> Result<(), Halt> {
        let limit = self.config.queue_limit.max(1);
        let room = self
            .lock()
            .lanes
            .entry(destination.to_owned())
            .or_default()
            .room
            .clone();
        let mut shutdown = self.shutdown.subscribe();
        loop {
            if self.is_shutting_down() {
                return Err(Halt::ShuttingDown);
            }
            let notified = room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let waiting = self
                .lock()
                .lanes
                .get(destination)
                .map_or(0, |lane| lane.entries.len());
            if waiting < limit {
                return Ok(());
            }
            tokio::select! {
                _ = notified => {}
                _ = shutdown.changed() => return Err(Halt::ShuttingDown),
            }
        }
    }
}

/// Calls the source, retrying what may pass (outages, throttling) with backoff.
async fn fetch<T, F, Fut>(
    engine: &SyncEngine,
    job: u64,
    call: F,
) -> Result<Result<T, RemoteError>, Halt>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, RemoteError>>,
{
    let mut shutdown = engine.shutdown.subscribe();
    let mut attempt = 0;
    loop {
        if engine.is_shutting_down() {
            return Err(Halt::ShuttingDown);
        }
        attempt += 1;
        match call().await {
            Ok(value) => return Ok(Ok(value)),
            Err(e) if e.is_retriable() && attempt < READ_ATTEMPTS => {
                let wait = engine.backoff(attempt, e.retry_after());
                tracing::debug!(job, attempt, error = %e, "source read failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => return Err(Halt::ShuttingDown),
                }
            }
            Err(e) => return Ok(Err(e)),
        }
    }
}

impl Reader {
    async fn fetch<T, F, Fut>(&self, call: F) -> Result<Result<T, RemoteError>, Halt>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, RemoteError>>,
    {
        fetch(&self.engine, self.job, call).await
    }

    /// Queues `resources` (after waiting for room) and applies `also` in the same commit.
    async fn queue(
        &self,
        resources: Vec<Value>,
        also: impl FnOnce(&mut Tx<'_>),
    ) -> Result<(), Halt> {
        self.engine.wait_for_room(&self.destination).await?;
        let mut candidates = Vec::with_capacity(resources.len());
        let mut without_id = 0;
        for resource in resources {
            let resource_type = resource.get("resourceType").and_then(Value::as_str);
            let id = resource.get("id").and_then(Value::as_str);
            let (Some(resource_type), Some(id)) = (resource_type, id) else {
                without_id += 1;
                continue;
            };
            candidates.push(Candidate {
                resource_type: resource_type.to_owned(),
                id: id.to_owned(),
                version: version_of(&resource),
                updated: updated_of(&resource),
                body: Some(resource),
            });
        }
        let target = |c: &Candidate| match &self.prefix {
            Some(prefix) => format!("{}/{prefix}{}", c.resource_type, c.id),
            None => format!("{}/{}", c.resource_type, c.id),
        };
        let targets: Vec<String> = candidates.iter().map(target).collect();
        let keys: Vec<String> = targets
            .iter()
            .map(|t| format!("{}|{t}", self.destination))
            .collect();
        let job = self.job;
        let prefix = self.prefix.clone();
        // What was delivered is read in the same commit turn as the queueing, so a delivery
        // settling in between cannot be missed (and its version queued again).
        self.engine
            .transact_reading(Some((DELIVERED, keys)), move |tx, found| {
                let mut delivered = HashMap::new();
                for (target, value) in targets.into_iter().zip(found) {
                    if let Some(record) =
                        value.and_then(|v| serde_json::from_slice::<Delivered>(&v).ok())
                    {
                        delivered.insert(target, record);
                    }
                }
                tx.enqueue(job, prefix.as_deref(), candidates, &delivered);
                if without_id > 0 {
                    if let Some(slot) = tx.job(job) {
                        slot.job.errors.push(format!(
                            "{without_id} resources without a type or id were skipped"
                        ));
                    }
                }
                also(tx);
            })
            .await?;
        Ok(())
    }

    async fn dead_page(
        &self,
        step: Option<usize>,
        url: Option<String>,
        error: &RemoteError,
        also: impl FnOnce(&mut Job),
    ) -> Result<(), Halt> {
        let job = self.job;
        self.engine
            .transact(|tx| {
                tx.dead_page(job, step, url, error);
                if let Some(slot) = tx.job(job) {
                    also(&mut slot.job);
                }
            })
            .await?;
        Ok(())
    }

    async fn note_missing(&self, reference: String) -> Result<(), Halt> {
        let job = self.job;
        self.engine
            .transact(|tx| {
                if let Some(slot) = tx.job(job) {
                    slot.job.missing.push(reference);
                }
            })
            .await?;
        Ok(())
    }

    /// Every resource of `types` updated since `since` (else since the watermark), page by
    /// page from `cursor`.
    async fn types(
        &self,
        types: &[String],
        since: Option<&str>,
        cursor: Cursor,
    ) -> Result<(), Halt> {
        for (step, resource_type) in types.iter().enumerate().skip(cursor.step) {
            let watermark_key =
                format!("{}|{}|{resource_type}", self.source_name, self.destination);
            let stored: Option<String> = self
                .engine
                .store
                .kv_get(WATERMARKS, vec![watermark_key.clone()])
                .await?
                .into_iter()
                .next()
                .flatten()
                .and_then(|v| serde_json::from_slice(&v).ok());
            let resume = if step == cursor.step {
                cursor.clone()
            } else {
                Cursor {
                    step,
                    ordered: true,
                    ..Cursor::default()
                }
            };
            let fresh = resume.next.is_none() && resume.newest.is_none();
            let mut ordered = resume.ordered || fresh;
            let mut newest = resume.newest.clone();
            let mut newest_at = newest.as_deref().and_then(instant);
            let mut next = resume.next.clone();
            // An explicit `since` later than the watermark leaves a gap behind it: the
            // watermark then stays where it is.
            let may_move = match (since.and_then(instant), stored.as_deref().and_then(instant)) {
                (Some(from), Some(mark)) => from <= mark,
                _ => true,
            };
            let mut params = vec![("_sort".to_owned(), "_lastUpdated".to_owned())];
            if let Some(since) = since.map(str::to_owned).or_else(|| stored.clone()) {
                params.push(("_lastUpdated".to_owned(), format!("ge{since}")));
            }
            loop {
                let page = match &next {
                    Some(url) => self.fetch(|| self.source.page(url)).await?,
                    None => {
                        self.fetch(|| self.source.search(resource_type, &params))
                            .await?
                    }
                };
                let page: Page = match page {
                    Ok(page) => page,
                    Err(e) => {
                        let url = next.clone();
                        let skip_to = Cursor {
                            step: step + 1,
                            ..Cursor::default()
                        };
                        self.dead_page(Some(step), url, &e, |job| job.cursor = Some(skip_to))
                            .await?;
                        break;
                    }
                };
                for resource in &page.resources {
                    if resource.get("resourceType").and_then(Value::as_str) != Some(resource_type) {
                        continue;
                    }
                    let updated = resource
                        .get("meta")
                        .and_then(|m| m.get("lastUpdated"))
                        .and_then(Value::as_str);
                    let Some((text, at)) = updated.and_then(|u| instant(u).map(|at| (u, at)))
                    else {
                        continue;
                    };
                    if newest_at.is_some_and(|n| at < n) {
                        ordered = false;
                    } else {
                        newest_at = Some(at);
                        newest = Some(text.to_owned());
                    }
                }
                let last_page = page.next.is_none();
                let next_cursor = if last_page {
                    Cursor {
                        step: step + 1,
                        ..Cursor::default()
                    }
                } else {
                    Cursor {
                        step,
                        next: page.next.clone(),
                        newest: newest.clone(),
                        ordered,
                        single: cursor.single,
                    }
                };
                // The watermark moves past this page only when every page so far came oldest
                // first (or the step is complete), and never backwards.
                let watermark = newest
                    .clone()
                    .filter(|_| may_move && (last_page || ordered))
                    .filter(|w| match stored.as_deref().and_then(instant) {
                        Some(old) => instant(w).is_some_and(|new| new > old),
                        None => true,
                    });
                let job = self.job;
                let key = watermark_key.clone();
                self.queue(page.resources, move |tx| {
                    if let Some(slot) = tx.job(job) {
                        slot.job.cursor = Some(next_cursor);
                    }
                    if let Some(watermark) = watermark {
                        tx.put(WATERMARKS, key, &watermark);
                    }
                })
                .await?;
                if last_page {
                    break;
                }
                next = page.next;
            }
            if cursor.single {
                break;
            }
        }
        Ok(())
    }

    /// A patient and everything for that patient; `types` narrows it.
    async fn patient(&self, id: &str, types: Option<&[String]>) -> Result<(), Halt> {
        let wants = |t: &str| types.is_none_or(|ts| ts.iter().any(|x| x == t));
        let mut gathered: Vec<Value> = Vec::new();
        match self.fetch(|| self.source.read("Patient", id)).await? {
            Ok(Some(patient)) => {
                if wants("Patient") {
                    gathered.push(patient);
                }
            }
            Ok(None) => return self.note_missing(format!("Patient/{id}")).await,
            Err(e) => {
                return self
                    .dead_page(None, Some(format!("Patient/{id}")), &e, |_| {})
                    .await
            }
        }
        let everything = if types.is_none() {
            match self.fetch(|| self.source.everything(id)).await? {
                Ok(page) => page,
                Err(e) => {
                    tracing::info!(job = self.job, error = %e, "$everything failed; searching type by type");
                    None
                }
            }
        } else {
            None
        };
        match everything {
            Some(first) => {
                self.collect_pages(first, format!("Patient/{id}/$everything"), &mut gathered)
                    .await?;
                // $everything repeats the patient.
                let mut seen = HashSet::new();
                gathered.retain(|r| seen.insert(reference_of(r)));
            }
            None => {
                let searches: Vec<String> = self
                    .source
                    .patient_types()
                    .iter()
                    .filter(|t| t.as_str() != "Patient" && wants(t))
                    .cloned()
                    .collect();
                let params = vec![("patient".to_owned(), id.to_owned())];
                for resource_type in searches {
                    match self
                        .fetch(|| self.source.search(&resource_type, &params))
                        .await?
                    {
                        Ok(first) => {
                            let what = format!("{resource_type}?patient={id}");
                            self.collect_pages(first, what, &mut gathered).await?;
                        }
                        Err(e) => {
                            let what = format!("{resource_type}?patient={id}");
                            self.dead_page(None, Some(what), &e, |_| {}).await?;
                        }
                    }
                }
            }
        }
        if types.is_none() {
            let have: HashSet<String> = gathered.iter().map(reference_of).collect();
            let mut wanted: Vec<String> = Vec::new();
            let mut seen = HashSet::new();
            for resource in &gathered {
                for reference in relative_references(resource) {
                    if !have.contains(&reference) && seen.insert(reference.clone()) {
                        wanted.push(reference);
                    }
                }
            }
            wanted.truncate(MAX_REFERENCED);
            gathered.extend(self.read_all(wanted).await?);
        }
        self.queue_in_tiers(gathered).await
    }

    /// Listed resources (`Type/id`).
    async fn resources(&self, references: &[String]) -> Result<(), Halt> {
        let found = self.read_all(references.to_vec()).await?;
        self.queue_in_tiers(found).await
    }

    /// Follows `next` links from `first`, adding every page's resources to `into`.
    async fn collect_pages(
        &self,
        first: Page,
        what: String,
        into: &mut Vec<Value>,
    ) -> Result<(), Halt> {
        let mut page = first;
        loop {
            into.extend(page.resources);
            let Some(url) = page.next else {
                return Ok(());
            };
            match self.fetch(|| self.source.page(&url)).await? {
                Ok(next) => page = next,
                Err(e) => {
                    let url = Some(url.clone()).filter(|_| !what.is_empty());
                    return self.dead_page(None, url, &e, |_| {}).await;
                }
            }
        }
    }

    /// Reads `Type/id` references a few at a time; what the source lacks is noted as missing,
    /// what fails is dead-lettered.
    async fn read_all(&self, references: Vec<String>) -> Result<Vec<Value>, Halt> {
        let mut found = Vec::new();
        let mut reads = JoinSet::new();
        let mut todo = references.into_iter();
        loop {
            while reads.len() < READ_CONCURRENCY {
                let Some(reference) = todo.next() else { break };
                let Some((resource_type, id)) = reference.split_once('/') else {
                    continue;
                };
                let (resource_type, id) = (resource_type.to_owned(), id.to_owned());
                let source = self.source.clone();
                let engine = self.engine.clone();
                let job = self.job;
                reads.spawn(async move {
                    let result = fetch(&engine, job, || source.read(&resource_type, &id)).await;
                    (format!("{resource_type}/{id}"), result)
                });
            }
            let Some(joined) = reads.join_next().await else {
                break;
            };
            let Ok((reference, result)) = joined else {
                continue;
            };
            match result? {
                Ok(Some(resource)) => found.push(resource),
                Ok(None) => self.note_missing(reference).await?,
                Err(e) => self.dead_page(None, Some(reference), &e, |_| {}).await?,
            }
        }
        Ok(found)
    }

    /// Queues `resources` referenced-first, in chunks.
    async fn queue_in_tiers(&self, mut resources: Vec<Value>) -> Result<(), Halt> {
        resources
            .sort_by_key(|r| tier(r.get("resourceType").and_then(Value::as_str).unwrap_or("")));
        let mut resources = resources.into_iter().peekable();
        while resources.peek().is_some() {
            let chunk: Vec<Value> = resources.by_ref().take(CHUNK).collect();
            self.queue(chunk, |_| {}).await?;
        }
        Ok(())
    }
}

/// `Type/id` of a resource.
fn reference_of(resource: &Value) -> String {
    format!(
        "{}/{}",
        resource
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or(""),
        resource.get("id").and_then(Value::as_str).unwrap_or("")
    )
}

/// The relative references (`Type/id`, version dropped) a resource makes to others.
fn relative_references(resource: &Value) -> Vec<String> {
    fn walk(value: &Value, found: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("reference", Value::String(reference)) => {
                            if let Some(relative) = relative(reference) {
                                found.push(relative);
                            }
                        }
                        _ => walk(value, found),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|item| walk(item, found)),
            _ => {}
        }
    }
    fn relative(reference: &str) -> Option<String> {
        if reference.contains('?') {
            return None;
        }
        let mut parts = reference.split('/');
        let (resource_type, id) = (parts.next()?, parts.next()?);
        let is_type = resource_type.starts_with(|c: char| c.is_ascii_uppercase())
            && resource_type.bytes().all(|b| b.is_ascii_alphabetic());
        (is_type && crate::fhir::is_valid_id(id)).then(|| format!("{resource_type}/{id}"))
    }
    let mut found = Vec::new();
    walk(resource, &mut found);
    found
}

/// Microseconds of an instant or dateTime (its start), for ordering.
fn instant(text: &str) -> Option<i64> {
    parse_range(text).map(|r| r.start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_are_relative_type_and_id_only() {
        let observation = json!({
            "resourceType": "Observation",
            "subject": {"reference": "Patient/1"},
            "encounter": {"reference": "Encounter/9/_history/2"},
            "performer": [
                {"reference": "#p1"},
                {"reference": "urn:uuid:0b1e"},
                {"reference": "https://other.example.org/fhir/Practitioner/5"},
                {"reference": "Organization?identifier=x|y"}
            ]
        });
        assert_eq!(
            relative_references(&observation),
            vec!["Patient/1".to_owned(), "Encounter/9".to_owned()]
        );
    }
}
