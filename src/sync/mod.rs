//! Sync: durable delivery of resources from a source (an EHR, any FHIR server, the embedded
//! store) to a destination (Azure Health Data Services, any FHIR server, the embedded store).
//!
//! A job is expanded by reading its source page by page ([`expand`]); every resource version
//! becomes an outbox entry, committed to the store before the page's cursor and watermark move.
//! One worker per destination ([`deliver`]) claims entries in order, batches them, writes them
//! and settles each: delivered, retried later with exponential backoff and full jitter
//! (honouring `Retry-After`), or parked as a dead letter with the destination's answer. Every
//! state change goes through [`SyncEngine::transact`], so a crash or a kill loses nothing that
//! was accepted: on restart unfinished jobs resume from their cursor and entries are delivered,
//! their bodies read from the source again.

pub mod api;
pub mod cli;
mod deliver;
mod expand;
pub mod model;
mod outbox;
pub mod transform;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use api::router;
pub use model::{Counts, DeadKind, DeadLetter, Job, JobState, Scope};
pub use outbox::ResourceResult;

use crate::config::{DestinationConfig, IdStrategy, SyncConfig};
use crate::remote::{FhirSink, FhirSource, Remotes};
use crate::store::{Store, StoreError};
use model::{seq_key, Entry, DEAD, ENTRIES, JOBS, META, META_SEQ};
use outbox::{now_rfc3339, JobSlot, Queued, State};

/// Why a sync request cannot be carried out.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the sync engine is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A job to start.
#[derive(Debug, Clone)]
pub struct JobRequest {
    pub source: String,
    pub destination: String,
    pub scope: Scope,
    /// Keep each resource's outcome in memory for [`SyncEngine::take_results`].
    pub track_results: bool,
    /// A job of fhirgate's own, which may use internal sources and destinations.
    pub internal: bool,
}

/// The engine: jobs, the outbox and the workers that empty it.
pub struct SyncEngine {
    store: Arc<dyn Store>,
    /// Sources and destinations by name; more can be added while running (a PAS
    /// subscription's endpoint is a destination).
    sources: RwLock<BTreeMap<String, Arc<dyn FhirSource>>>,
    sinks: RwLock<BTreeMap<String, Arc<dyn FhirSink>>>,
    destinations: RwLock<BTreeMap<String, DestinationConfig>>,
    config: SyncConfig,
    state: Mutex<State>,
    /// Held while a change commits, so changes reach the store in the order they were made.
    commit: tokio::sync::Mutex<()>,
    /// Bumped after every committed change; waiters re-check their job.
    changes: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Set when a commit was given up on (the store failed at shutdown): memory is then ahead
    /// of the store, and nothing more may commit.
    broken: std::sync::atomic::AtomicBool,
    /// Names callers' jobs may not use (see [`Remotes::internal`]).
    internal: RwLock<std::collections::BTreeSet<String>>,
    /// The runtime the engine started on: its work runs there even when a request (served
    /// on a connection thread of its own) is what started it.
    runtime: tokio::runtime::Handle,
}

impl SyncEngine {
    /// Loads jobs and outbox entries from the store, then starts one worker per destination
    /// and resumes every job that was still reading its source.
    pub async fn start(
        store: Arc<dyn Store>,
        remotes: &Remotes,
        config: SyncConfig,
    ) -> Result<Arc<Self>, StoreError> {
        let engine = Arc::new(Self {
            store,
            sources: RwLock::new(remotes.sources.clone()),
            sinks: RwLock::new(remotes.sinks.clone()),
            destinations: RwLock::new(remotes.destinations.clone()),
            config,
            state: Mutex::new(State::default()),
            commit: tokio::sync::Mutex::new(()),
            changes: watch::channel(0).0,
            shutdown: watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
            broken: std::sync::atomic::AtomicBool::new(false),
            internal: RwLock::new(remotes.internal.clone()),
            runtime: tokio::runtime::Handle::current(),
        });
        let resume = engine.recover().await?;
        let sinks: Vec<(String, Arc<dyn FhirSink>)> = engine
            .sinks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, sink)| (name.clone(), sink.clone()))
            .collect();
        for (name, sink) in sinks {
            engine.spawn_lane(name, sink);
        }
        for job in resume {
            engine.spawn_expansion(job);
        }
        Ok(engine)
    }

    /// Runs `task` on the engine's runtime, where it outlives the request that started it.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.spawn(task)
    }

    /// Reserves a source or destination name for fhirgate's own jobs.
    pub fn mark_internal(&self, name: &str) {
        self.internal
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned());
    }

    fn is_internal(&self, name: &str) -> bool {
        self.internal
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }

    /// Adds (or replaces) a source while running.
    pub fn add_source(&self, name: &str, source: Arc<dyn FhirSource>) {
        self.sources
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), source);
    }

    /// Adds a destination while running and starts its worker. A name already in use is
    /// left as it is.
    pub fn add_destination(
        self: &Arc<Self>,
        name: &str,
        sink: Arc<dyn FhirSink>,
        config: DestinationConfig,
    ) {
        {
            let mut sinks = self.sinks.write().unwrap_or_else(|p| p.into_inner());
            if sinks.contains_key(name) {
                return;
            }
            sinks.insert(name.to_owned(), sink.clone());
        }
        self.destinations
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), config);
        self.spawn_lane(name.to_owned(), sink);
    }

    fn spawn_lane(self: &Arc<Self>, name: String, sink: Arc<dyn FhirSink>) {
        let concurrency = self
            .destination_config(&name)
            .map_or(2, |d| d.concurrency.max(1));
        let handle = self
            .runtime
            .spawn(self.clone().run_lane(name, sink, concurrency));
        self.lock_tasks().push(handle);
    }

    fn source(&self, name: &str) -> Option<Arc<dyn FhirSource>> {
        self.sources
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    fn has_sink(&self, name: &str) -> bool {
        self.sinks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name)
    }

    fn destination_config(&self, name: &str) -> Option<DestinationConfig> {
        self.destinations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_tasks(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rebuilds the in-memory state from the store; returns the jobs to expand again.
    async fn recover(&self) -> Result<Vec<u64>, StoreError> {
        let mut state = State::default();
        if let Some(Some(seq)) = self
            .store
            .kv_get(META, vec![META_SEQ.to_owned()])
            .await?
            .into_iter()
            .next()
        {
            state.next_seq = std::str::from_utf8(&seq)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
        }
        for (key, value) in scan_all(&*self.store, JOBS).await? {
            match serde_json::from_slice::<Job>(&value) {
                Ok(job) => {
                    state.jobs.insert(job.id, JobSlot::new(job, false));
                }
                Err(e) => tracing::error!(key, error = %e, "unreadable sync job skipped"),
            }
        }
        let mut entries = 0usize;
        for (key, value) in scan_all(&*self.store, ENTRIES).await? {
            let entry: Entry = match serde_json::from_slice(&value) {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::error!(key, error = %e, "unreadable outbox entry skipped");
                    continue;
                }
            };
            state.next_seq = state.next_seq.max(entry.seq);
            if let Some(slot) = state.jobs.get_mut(&entry.job) {
                *slot.tiers.entry(entry.tier).or_default() += 1;
            }
            let lane = state.lanes.entry(entry.destination.clone()).or_default();
            let key = entry.key();
            lane.keys.entry(key.clone()).or_default().insert(entry.seq);
            lane.entries.insert(
                entry.seq,
                Queued {
                    entry,
                    key,
                    body: None,
                    in_flight: false,
                    // It may have been in flight when the process stopped.
                    uncertain: true,
                },
            );
            entries += 1;
        }
        let resume: Vec<u64> = state
            .jobs
            .values()
            .filter(|slot| slot.job.state == JobState::Expanding)
            .map(|slot| slot.job.id)
            .collect();
        let delivering: Vec<u64> = state
            .jobs
            .values()
            .filter(|slot| slot.job.state == JobState::Delivering)
            .map(|slot| slot.job.id)
            .collect();
        for lane in state.lanes.values() {
            lane.wake.notify_one();
        }
        if entries > 0 || !resume.is_empty() {
            tracing::info!(entries, expanding = resume.len(), "sync outbox recovered");
        }
        let orphans: Vec<(String, u64)> = state
            .lanes
            .iter()
            .filter(|(destination, _)| !self.has_sink(destination))
            .flat_map(|(destination, lane)| {
                lane.entries
                    .keys()
                    .map(move |seq| (destination.clone(), *seq))
            })
            .collect();
        *self.lock() = state;
        // Jobs whose last entries settled just before a crash finish now; entries for a
        // destination no longer configured cannot be delivered and become dead letters.
        self.transact(|tx| {
            for id in delivering {
                tx.job(id);
            }
            for (destination, seq) in orphans {
                let reason = format!("destination {destination} is no longer configured");
                tx.dead_letter(&destination, seq, 0, reason, None);
            }
        })
        .await?;
        Ok(resume)
    }

    /// Starts a job: checks the request, records the job durably, and starts reading the
    /// source. The job is returned as recorded (state `expanding`).
    pub async fn submit(self: &Arc<Self>, request: JobRequest) -> Result<Job, SyncError> {
        if *self.shutdown.borrow() {
            return Err(SyncError::ShuttingDown);
        }
        let visible = |name: &str| request.internal || !self.is_internal(name);
        if self.source(&request.source).is_none() || !visible(&request.source) {
            let known = self.sources.read().unwrap_or_else(|p| p.into_inner());
            return Err(SyncError::Invalid(format!(
                "unknown source {:?}; configured: {}",
                request.source,
                known
                    .keys()
                    .filter(|k| !self.is_internal(k))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if !self.has_sink(&request.destination) || !visible(&request.destination) {
            let known = self.sinks.read().unwrap_or_else(|p| p.into_inner());
            return Err(SyncError::Invalid(format!(
                "unknown destination {:?}; configured: {}",
                request.destination,
                known
                    .keys()
                    .filter(|k| !self.is_internal(k))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if request.source == request.destination
            && self
                .destination_config(&request.destination)
                .is_some_and(|d| d.kind == crate::config::DestinationKind::Embedded)
            && self
                .id_prefix(&request.source, &request.destination)
                .is_none()
        {
            return Err(SyncError::Invalid(
                "the source and the destination are the same store".into(),
            ));
        }
        let job = self
            .transact(|tx| {
                // Jobs are numbered on their own (1, 2, …); they are never deleted.
                let id = tx.state.jobs.keys().next_back().map_or(1, |last| last + 1);
                let job = Job {
                    id,
                    source: request.source.clone(),
                    destination: request.destination.clone(),
                    scope: request.scope.clone(),
                    state: JobState::Expanding,
                    counts: Counts::default(),
                    types: BTreeMap::new(),
                    created: now_rfc3339(),
                    expanded: None,
                    finished: None,
                    cursor: None,
                    missing: Vec::new(),
                    errors: Vec::new(),
                };
                tx.state
                    .jobs
                    .insert(id, JobSlot::new(job.clone(), request.track_results));
                tx.job(id);
                job
            })
            .await?;
        tracing::info!(
            job = job.id,
            source = %job.source,
            destination = %job.destination,
            "sync job accepted"
        );
        self.spawn_expansion(job.id);
        Ok(job)
    }

    fn spawn_expansion(self: &Arc<Self>, job: u64) {
        let handle = self.runtime.spawn(self.clone().expand(job));
        let mut tasks = self.lock_tasks();
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle);
    }

    /// The job as it is now.
    pub fn job(&self, id: u64) -> Option<Job> {
        self.lock().jobs.get(&id).map(|slot| slot.job.clone())
    }

    /// Jobs newest first, those with ids below `before` when given, at most `limit`.
    pub fn jobs(&self, before: Option<u64>, limit: usize) -> Vec<Job> {
        let state = self.lock();
        state
            .jobs
            .range(..before.unwrap_or(u64::MAX))
            .rev()
            .take(limit)
            .map(|(_, slot)| slot.job.clone())
            .collect()
    }

    /// The per-resource outcomes of a job submitted with `track_results`; they are handed
    /// out once and no longer kept.
    pub fn take_results(&self, id: u64) -> Option<Vec<ResourceResult>> {
        self.lock()
            .jobs
            .get_mut(&id)
            .and_then(|slot| slot.results.take())
    }

    /// Waits until the job has finished, or `timeout` has passed; returns it either way.
    pub async fn wait(&self, id: u64, timeout: Duration) -> Option<Job> {
        let mut changes = self.changes.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let job = self.job(id)?;
            if job.state.is_finished() {
                return Some(job);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.job(id),
            }
        }
    }

    /// Dead letters with ids after `after`, oldest first, at most `limit`.
    pub async fn dead_letters(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, SyncError> {
        let records = self.store.kv_scan(DEAD, after.map(seq_key), limit).await?;
        Ok(records
            .into_iter()
            .filter_map(|(_, value)| serde_json::from_slice(&value).ok())
            .collect())
    }

    /// One dead letter.
    async fn dead_letter(&self, id: u64) -> Result<Option<DeadLetter>, SyncError> {
        Ok(self
            .store
            .kv_get(DEAD, vec![seq_key(id)])
            .await?
            .into_iter()
            .next()
            .flatten()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok()))
    }

    /// Puts a dead letter back to work in its job: a resource is queued again (read afresh
    /// from the source), a page is fetched again and its job resumes reading from there.
    pub async fn retry_dead_letter(self: &Arc<Self>, id: u64) -> Result<Job, SyncError> {
        if *self.shutdown.borrow() {
            return Err(SyncError::ShuttingDown);
        }
        // A page of a patient or resource list is read again with the whole list: the job's
        // other unreadable pages are then retried too, and their letters go.
        let siblings: Vec<(u64, String)> = match self.dead_letter(id).await? {
            Some(letter) if letter.kind == DeadKind::Page && letter.step.is_none() => self
                .dead_letters(None, usize::MAX)
                .await?
                .into_iter()
                .filter(|other| {
                    other.job == letter.job
                        && other.kind == DeadKind::Page
                        && other.step.is_none()
                        && other.id != id
                })
                .map(|other| (other.id, other.reason))
                .collect(),
            _ => Vec::new(),
        };
        // The letter is read in the commit turn that removes it: two retries of one letter
        // cannot both act.
        let retried = self
            .transact_reading(
                Some((DEAD, vec![seq_key(id)])),
                |tx, found| -> Result<(u64, bool), SyncError> {
                    let letter: DeadLetter = found
                        .into_iter()
                        .next()
                        .flatten()
                        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                        .ok_or_else(|| SyncError::NotFound(format!("no dead letter {id}")))?;
                    let mut tx_deletes = Vec::new();
                    let Some(slot) = tx.job(letter.job) else {
                        return Err(SyncError::NotFound(format!(
                            "the job {} of dead letter {id} is gone",
                            letter.job
                        )));
                    };
                    if letter.kind == DeadKind::Page && slot.job.state == JobState::Expanding {
                        return Err(SyncError::Conflict(format!(
                            "job {} is still reading its source; retry when it has finished",
                            letter.job
                        )));
                    }
                    slot.job.finished = None;
                    match letter.kind {
                        DeadKind::Resource => {
                            slot.job.counts.failed = slot.job.counts.failed.saturating_sub(1);
                            if let Some(t) = letter.resource_type.as_deref() {
                                let counts = slot.job.type_counts(t);
                                counts.failed = counts.failed.saturating_sub(1);
                            }
                            slot.job.counts.queued = slot.job.counts.queued.saturating_sub(1);
                            if slot.job.state.is_finished() {
                                slot.job.state = JobState::Delivering;
                            }
                        }
                        DeadKind::Page => {
                            let mut gone = vec![letter.reason.clone()];
                            for (sibling, reason) in &siblings {
                                tx_deletes.push(*sibling);
                                gone.push(reason.clone());
                            }
                            for reason in gone {
                                slot.job.counts.failed_pages =
                                    slot.job.counts.failed_pages.saturating_sub(1);
                                if let Some(at) = slot.job.errors.iter().position(|e| *e == reason)
                                {
                                    slot.job.errors.remove(at);
                                }
                            }
                            slot.job.state = JobState::Expanding;
                            slot.job.cursor = letter.step.map(|step| model::Cursor {
                                step,
                                next: letter.url.clone(),
                                newest: None,
                                ordered: false,
                                single: true,
                            });
                        }
                    }
                    tx.delete(DEAD, seq_key(id));
                    for sibling in tx_deletes {
                        tx.delete(DEAD, seq_key(sibling));
                    }
                    if letter.kind == DeadKind::Resource {
                        let (Some(resource_type), Some(resource_id), Some(version)) = (
                            letter.resource_type.clone(),
                            letter.resource_id.clone(),
                            letter.version.clone(),
                        ) else {
                            return Ok((letter.job, false));
                        };
                        // Queued as new: counted again, delivered at the source's current version.
                        let prefix = letter
                            .target_id
                            .as_deref()
                            .and_then(|t| t.strip_suffix(resource_id.as_str()))
                            .filter(|p| !p.is_empty())
                            .map(str::to_owned);
                        tx.enqueue(
                            letter.job,
                            prefix.as_deref(),
                            vec![outbox::Candidate {
                                resource_type,
                                id: resource_id,
                                version,
                                updated: None,
                                body: None,
                            }],
                            &HashMap::new(),
                        );
                    }
                    Ok((letter.job, letter.kind == DeadKind::Page))
                },
            )
            .await??;
        let (job, expand_again) = retried;
        if expand_again {
            self.spawn_expansion(job);
        }
        tracing::info!(dead_letter = id, job, "dead letter retried");
        self.job(job)
            .ok_or_else(|| SyncError::NotFound(format!("job {job}")))
    }

    /// Stops reading sources and taking new batches, and waits (up to `grace`) for deliveries
    /// in flight to settle. Whatever is left stays in the outbox for the next start.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutdown.send_replace(true);
        {
            let state = self.lock();
            for lane in state.lanes.values() {
                lane.wake.notify_waiters();
                lane.room.notify_waiters();
            }
        }
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *self.lock_tasks());
        let all = async {
            for task in tasks {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("sync work still in flight at shutdown; it resumes on the next start");
        }
    }

    /// The id prefix `destination` puts on what `source` sends it, if any.
    fn id_prefix(&self, source: &str, destination: &str) -> Option<String> {
        let config = self.destination_config(destination)?;
        (config.id_strategy == IdStrategy::Prefix).then(|| {
            config
                .id_prefix
                .clone()
                .unwrap_or_else(|| format!("{source}-"))
        })
    }

    /// Exponential backoff with full jitter: a random wait up to `base · 2^(attempt-1)`,
    /// capped, and never shorter than the destination's `Retry-After`.
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let base = self.config.backoff_base_ms.max(1);
        let cap = self.config.backoff_max_ms.max(base);
        let ceiling = base
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(32))
            .min(cap);
        let jitter = (uuid::Uuid::new_v4().as_u128() as u64) % (ceiling + 1);
        Duration::from_millis(jitter).max(self.cap_wait(retry_after.unwrap_or_default()))
    }

    /// A destination's `Retry-After`, but never longer than ten minutes (or `backoff_max_ms`
    /// when that is longer): a wrong or hostile header must not park a destination for days.
    fn cap_wait(&self, wait: Duration) -> Duration {
        const CEILING_MS: u64 = 600_000;
        wait.min(Duration::from_millis(
            self.config.backoff_max_ms.max(CEILING_MS),
        ))
    }

    fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }
}

/// Every record of a key-value space, in key order.
async fn scan_all(
    store: &dyn Store,
    space: &str,
) -> Result<Vec<(String, bytes::Bytes)>, StoreError> {
    const CHUNK: usize = 10_000;
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let chunk = store.kv_scan(space, after.clone(), CHUNK).await?;
        let full = chunk.len() == CHUNK;
        after = chunk.last().map(|(k, _)| k.clone());
        all.extend(chunk);
        if !full {
            return Ok(all);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use serde_json::json;

    use super::*;
    use crate::config::{Config, DestinationKind};
    use crate::fhir::{SchemaValidator, SearchQuery, SearchRegistry};
    use crate::store::{
        Action, EmbeddedStore, KvOp, Mutation, Page, ResourceVersion, SearchPage, WriteResult,
    };

    /// The embedded store, with key-value commits that fail while `failures` is above zero.
    struct FlakyStore {
        inner: EmbeddedStore,
        failures: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Store for FlakyStore {
        async fn read(&self, t: &str, id: &str) -> Result<Option<ResourceVersion>, StoreError> {
            self.inner.read(t, id).await
        }
        async fn vread(
            &self,
            t: &str,
            id: &str,
            v: u64,
        ) -> Result<Option<ResourceVersion>, StoreError> {
            self.inner.vread(t, id, v).await
        }
        async fn history(
            &self,
            t: &str,
            id: Option<&str>,
            since: Option<i64>,
            page: Page,
        ) -> Result<SearchPage, StoreError> {
            self.inner.history(t, id, since, page).await
        }
        async fn search(
            &self,
            t: &str,
            query: &SearchQuery,
            page: Page,
        ) -> Result<SearchPage, StoreError> {
            self.inner.search(t, query, page).await
        }
        async fn write(
            &self,
            mutations: Vec<Mutation>,
            atomic: bool,
        ) -> Result<WriteResult, StoreError> {
            self.inner.write(mutations, atomic).await
        }
        async fn append(&self, stream: &str, payload: Vec<u8>) -> Result<u64, StoreError> {
            self.inner.append(stream, payload).await
        }
        async fn append_with(
            &self,
            stream: &str,
            payloads: Vec<Vec<u8>>,
            kv: Vec<KvOp>,
            durable: bool,
        ) -> Result<Vec<u64>, StoreError> {
            self.inner.append_with(stream, payloads, kv, durable).await
        }
        async fn trim_records(&self, stream: &str, through: u64) -> Result<u64, StoreError> {
            self.inner.trim_records(stream, through).await
        }
        async fn records(
            &self,
            stream: &str,
            after: u64,
            limit: usize,
        ) -> Result<Vec<(u64, Bytes)>, StoreError> {
            self.inner.records(stream, after, limit).await
        }
        async fn kv_apply(&self, ops: Vec<KvOp>) -> Result<(), StoreError> {
            let failing = self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if failing {
                return Err(StoreError::Backend("the disk hiccuped".into()));
            }
            self.inner.kv_apply(ops).await
        }
        async fn kv_get(
            &self,
            space: &str,
            keys: Vec<String>,
        ) -> Result<Vec<Option<Bytes>>, StoreError> {
            self.inner.kv_get(space, keys).await
        }
        async fn kv_scan(
            &self,
            space: &str,
            after: Option<String>,
            limit: usize,
        ) -> Result<Vec<(String, Bytes)>, StoreError> {
            self.inner.kv_scan(space, after, limit).await
        }
        fn is_ready(&self) -> bool {
            self.inner.is_ready()
        }
        async fn close(&self) {
            self.inner.close().await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_commits_are_retried_and_nothing_is_lost() {
        let dir = tempfile::tempdir().expect("temp dir");
        let schema = Arc::new(SchemaValidator::bundled().expect("schema"));
        let registry = Arc::new(SearchRegistry::new(&schema));
        let inner = EmbeddedStore::open(dir.path(), registry.clone(), Duration::from_secs(30))
            .expect("store");
        let store = Arc::new(FlakyStore {
            inner,
            failures: AtomicUsize::new(0),
        });
        let patients: Vec<Mutation> = (0..30)
            .map(|n| Mutation {
                resource_type: "Patient".into(),
                action: Action::Update {
                    id: format!("p{n}"),
                    resource: json!({"resourceType": "Patient", "id": format!("p{n}"), "gender": "other"}),
                    if_match: None,
                },
                full_url: None,
            })
            .collect();
        store.write(patients, true).await.expect("seed");

        let mut config = Config::default();
        config.destinations.insert(
            "copy".into(),
            DestinationConfig {
                id_strategy: IdStrategy::Prefix,
                id_prefix: Some("copy-".into()),
                ..DestinationConfig::new(DestinationKind::Embedded, None)
            },
        );
        let shared: Arc<dyn Store> = store.clone();
        let remotes = Remotes::build(&config, shared.clone(), schema, registry).expect("remotes");
        let engine = SyncEngine::start(shared, &remotes, config.sync.clone())
            .await
            .expect("engine");
        store.failures.store(4, Ordering::SeqCst);
        let job = engine
            .submit(JobRequest {
                source: "local".into(),
                destination: "copy".into(),
                scope: Scope::Types {
                    types: vec!["Patient".into()],
                    since: None,
                },
                track_results: false,
                internal: false,
            })
            .await
            .expect("submit");
        store.failures.store(3, Ordering::SeqCst);
        let job = engine
            .wait(job.id, Duration::from_secs(120))
            .await
            .expect("job");
        assert_eq!(job.state, JobState::Completed, "{job:?}");
        assert_eq!(job.counts.done, 30);
        assert_eq!(
            store.failures.load(Ordering::SeqCst),
            0,
            "the failures happened"
        );
        for n in 0..30 {
            let copy = store
                .read("Patient", &format!("copy-p{n}"))
                .await
                .expect("read");
            assert!(copy.is_some_and(|v| !v.is_deleted()), "copy-p{n}");
        }
        // What the store holds agrees with memory: nothing left in the outbox, the job done.
        assert!(scan_all(&*store, ENTRIES).await.expect("scan").is_empty());
        engine.shutdown(Duration::from_secs(5)).await;
        let stored: Job = serde_json::from_slice(
            &store
                .kv_get(JOBS, vec![seq_key(job.id)])
                .await
                .expect("get")[0]
                .clone()
                .expect("job record"),
        )
        .expect("job JSON");
        assert_eq!(stored.state, JobState::Completed);
        assert_eq!(stored.counts, job.counts);
    }
}
