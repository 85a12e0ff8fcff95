//! The outbox: entries waiting per destination ("lanes"), the jobs they belong to, and the one
//! way state changes — [`SyncEngine::transact`], which applies a change in memory and commits
//! the matching key-value records durably, in the order the changes were made.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Notify;

use super::model::{
    is_older, seq_key, tier, DeadKind, DeadLetter, Delivered, Entry, Job, JobState, DEAD,
    DELIVERED, ENTRIES, JOBS, META, META_SEQ,
};
use super::SyncEngine;
use crate::store::{KvOp, StoreError};

/// What the engine holds in memory; the store holds the same, durably.
#[derive(Default)]
pub(super) struct State {
    pub next_seq: u64,
    pub jobs: BTreeMap<u64, JobSlot>,
    pub lanes: HashMap<String, Lane>,
}

pub(super) struct JobSlot {
    pub job: Job,
    /// Entries not yet settled, by tier; the lowest tier present is the one being delivered.
    pub tiers: BTreeMap<u8, u64>,
    /// Per-resource outcomes, for callers that asked for them (the `/api/sync-*` endpoints).
    pub results: Option<Vec<ResourceResult>>,
}

impl JobSlot {
    pub fn new(job: Job, track_results: bool) -> Self {
        Self {
            job,
            tiers: BTreeMap::new(),
            results: track_results.then(Vec::new),
        }
    }

    fn add_tier(&mut self, tier: u8) {
        *self.tiers.entry(tier).or_default() += 1;
    }

    fn settle_tier(&mut self, tier: u8) {
        if let Some(count) = self.tiers.get_mut(&tier) {
            *count -= 1;
            if *count == 0 {
                self.tiers.remove(&tier);
            }
        }
    }

    fn record(&mut self, entry: &Entry, success: bool, error: Option<String>) {
        if let Some(results) = &mut self.results {
            results.push(ResourceResult {
                success,
                resource_type: entry.resource_type.clone(),
                resource_id: entry.id.clone(),
                error,
            });
        }
    }
}

/// The outcome of one resource, in the shape the OpenEMR → Azure connector reported it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceResult {
    pub success: bool,
    pub resource_type: String,
    pub resource_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The entries waiting for one destination.
#[derive(Default)]
pub(super) struct Lane {
    /// By sequence number: oldest first.
    pub entries: BTreeMap<u64, Queued>,
    /// The entries per destination resource (`Type/id`), oldest first. Only the oldest of a
    /// resource may go out, so versions arrive in the order they were queued.
    pub keys: HashMap<String, BTreeSet<u64>>,
    /// Destination resources with a delivery in flight; their next entry waits.
    pub busy: HashSet<String>,
    /// No deliveries before this time (milliseconds since the epoch): the destination asked
    /// for a pause with `Retry-After`.
    pub paused_until: i64,
    pub wake: Arc<Notify>,
    pub room: Arc<Notify>,
}

pub(super) struct Queued {
    pub entry: Entry,
    pub key: String,
    /// The resource as read from the source; `None` after a restart (read again on delivery).
    pub body: Option<Value>,
    pub in_flight: bool,
    /// An earlier attempt may have been applied without us hearing so (a timeout, a crash):
    /// the destination is checked before writing again.
    pub uncertain: bool,
}

/// A resource read from a source, to be queued.
pub(super) struct Candidate {
    pub resource_type: String,
    pub id: String,
    pub version: String,
    pub updated: Option<i64>,
    pub body: Option<Value>,
}

/// What became of one delivery attempt.
pub(super) enum Settled {
    Done {
        version: String,
        updated: Option<i64>,
        /// Found at the destination rather than written now.
        verified: bool,
    },
    /// Gone from the source before it could be delivered.
    Gone,
    Retry {
        reason: String,
        after: Option<Duration>,
        body: Option<Value>,
        uncertain: bool,
    },
    Reject {
        status: u16,
        reason: String,
        outcome: Option<Value>,
    },
}

/// One change in progress: the state it mutates and the records to commit with it.
pub(super) struct Tx<'a> {
    pub state: &'a mut State,
    ops: Vec<KvOp>,
    touched: BTreeSet<u64>,
    lanes_touched: BTreeSet<String>,
    seq_before: u64,
}

impl Tx<'_> {
    pub fn seq(&mut self) -> u64 {
        self.state.next_seq += 1;
        self.state.next_seq
    }

    pub fn put<T: Serialize>(&mut self, space: &'static str, key: String, value: &T) {
        match serde_json::to_vec(value) {
            Ok(bytes) => self.ops.push(KvOp::put(space, key, bytes)),
            // Our own records always serialize; a failure here is a bug worth a loud log.
            Err(e) => tracing::error!(space, error = %e, "sync record did not serialize"),
        }
    }

    pub fn delete(&mut self, space: &'static str, key: String) {
        self.ops.push(KvOp::delete(space, key));
    }

    /// The job, marked to have its snapshot written with this change.
    pub fn job(&mut self, id: u64) -> Option<&mut JobSlot> {
        self.touched.insert(id);
        self.state.jobs.get_mut(&id)
    }

    pub fn lane(&mut self, destination: &str) -> &mut Lane {
        if !self.lanes_touched.contains(destination) {
            self.lanes_touched.insert(destination.to_owned());
        }
        self.state.lanes.entry(destination.to_owned()).or_default()
    }

    /// Queues `candidates` for `job`. A resource already delivered at the same version, or
    /// already waiting at that version, is skipped; an older version still waiting (and not in
    /// flight) is superseded by the new one. Returns how many entries were queued.
    pub fn enqueue(
        &mut self,
        job_id: u64,
        prefix: Option<&str>,
        candidates: Vec<Candidate>,
        delivered: &HashMap<String, Delivered>,
    ) -> usize {
        let Some(slot) = self.state.jobs.get(&job_id) else {
            return 0;
        };
        let source = slot.job.source.clone();
        let destination = slot.job.destination.clone();
        self.touched.insert(job_id);
        self.lanes_touched.insert(destination.clone());
        let mut queued = 0;
        for candidate in candidates {
            let target_id = match prefix {
                Some(prefix) => format!("{prefix}{}", candidate.id),
                None => candidate.id.clone(),
            };
            let key = format!("{}/{}", candidate.resource_type, target_id);
            let State { lanes, jobs, .. } = &mut *self.state;
            let lane = lanes.entry(destination.clone()).or_default();
            if let Some(&old) = lane.keys.get(&key).and_then(|seqs| seqs.last()) {
                let Some(waiting) = lane.entries.get(&old) else {
                    continue;
                };
                let theirs = waiting.entry.job != job_id;
                if waiting.entry.version == candidate.version && waiting.entry.source == source {
                    if !theirs {
                        continue;
                    }
                    // Another job's entry carries this version: queue behind it, and settle
                    // with its outcome (see `settle`), so this job finishes only once the
                    // version is really there.
                } else if is_older(candidate.updated, waiting.entry.updated) {
                    // A newer version already waits (this one was read earlier).
                    if theirs {
                        skip(jobs, job_id, &candidate.resource_type, &candidate.id);
                    }
                    continue;
                } else if !waiting.in_flight {
                    // Superseded before it went out: the newer version replaces it.
                    if let Some(old_entry) = lane.entries.remove(&old).map(|q| q.entry) {
                        forget(lane, &key, old);
                        if let Some(slot) = jobs.get_mut(&old_entry.job) {
                            slot.settle_tier(old_entry.tier);
                            slot.job.counts.skipped += 1;
                            slot.job.type_counts(&old_entry.resource_type).skipped += 1;
                        }
                        self.touched.insert(old_entry.job);
                        self.ops.push(KvOp::delete(ENTRIES, seq_key(old)));
                    }
                }
            } else if let Some(done) = delivered.get(&key) {
                let same = done.version == candidate.version && done.source == source;
                if same || is_older(candidate.updated, done.updated) {
                    // Delivered already, at this version or a newer one.
                    if done.job != job_id {
                        skip(jobs, job_id, &candidate.resource_type, &candidate.id);
                    }
                    continue;
                }
            }
            self.state.next_seq += 1;
            let seq = self.state.next_seq;
            let entry = Entry {
                seq,
                job: job_id,
                source: source.clone(),
                destination: destination.clone(),
                tier: tier(&candidate.resource_type),
                resource_type: candidate.resource_type,
                id: candidate.id,
                target_id,
                version: candidate.version,
                updated: candidate.updated,
                attempts: 0,
                not_before: 0,
                last_error: None,
            };
            match serde_json::to_vec(&entry) {
                Ok(bytes) => self.ops.push(KvOp::put(ENTRIES, seq_key(seq), bytes)),
                Err(_) => continue,
            }
            let lane = self.state.lanes.entry(destination.clone()).or_default();
            lane.keys.entry(key.clone()).or_default().insert(seq);
            if let Some(slot) = self.state.jobs.get_mut(&job_id) {
                slot.add_tier(entry.tier);
                slot.job.counts.queued += 1;
            }
            lane.entries.insert(
                seq,
                Queued {
                    entry,
                    key,
                    body: candidate.body,
                    in_flight: false,
                    uncertain: false,
                },
            );
            queued += 1;
        }
        queued
    }

    /// Applies the results of one delivery attempt to `destination`'s entries.
    pub fn settle(&mut self, engine: &SyncEngine, destination: &str, results: Vec<(u64, Settled)>) {
        let now = now_millis();
        for (seq, settled) in results {
            let lane = self.lane(destination);
            let Some(this) = lane.entries.get(&seq) else {
                continue;
            };
            let key = this.key.clone();
            // A different version waits behind this one: it replaces a retry.
            let superseded = lane.keys.get(&key).is_some_and(|seqs| {
                seqs.iter().any(|other| {
                    *other != seq
                        && lane.entries.get(other).is_some_and(|q| {
                            q.entry.source != this.entry.source
                                || q.entry.version != this.entry.version
                        })
                })
            });
            lane.busy.remove(&key);
            let Some(queued) = lane.entries.get_mut(&seq) else {
                continue;
            };
            queued.in_flight = false;
            match settled {
                Settled::Done {
                    version,
                    updated,
                    verified,
                } => {
                    let entry = self.remove(destination, seq);
                    let Some(entry) = entry else { continue };
                    self.put(
                        DELIVERED,
                        format!("{destination}|{key}"),
                        &Delivered {
                            source: entry.source.clone(),
                            version: version.clone(),
                            job: entry.job,
                            updated,
                        },
                    );
                    count(destination, &entry.resource_type, "done");
                    if let Some(slot) = self.job(entry.job) {
                        slot.job.counts.done += 1;
                        slot.job.counts.verified += u64::from(verified);
                        slot.job.type_counts(&entry.resource_type).done += 1;
                        slot.record(&entry, true, None);
                    }
                    self.settle_followers(destination, &key, &entry.source, &version, updated);
                }
                Settled::Gone => {
                    if let Some(entry) = self.remove(destination, seq) {
                        self.skipped(destination, &entry, Some("gone from the source"));
                    }
                }
                Settled::Retry {
                    reason,
                    after,
                    body,
                    uncertain,
                } => {
                    if superseded {
                        // A newer version waits behind this one; it replaces the retry.
                        let Some(entry) = self.remove(destination, seq) else {
                            continue;
                        };
                        self.skipped(destination, &entry, Some("superseded by a newer version"));
                        continue;
                    }
                    let attempts = queued.entry.attempts + 1;
                    if attempts >= engine.config.max_attempts.max(1) {
                        let reason = format!("gave up after {attempts} attempts: {reason}");
                        self.dead_letter(destination, seq, 0, reason, None);
                        continue;
                    }
                    let wait = engine.backoff(attempts, after);
                    queued.entry.attempts = attempts;
                    queued.entry.not_before = now.saturating_add(millis(wait));
                    queued.entry.last_error = Some(reason);
                    queued.body = body;
                    queued.uncertain |= uncertain;
                    let entry = queued.entry.clone();
                    if let Some(after) = after {
                        let pause = engine.cap_wait(after);
                        let lane = self.lane(destination);
                        lane.paused_until =
                            lane.paused_until.max(now.saturating_add(millis(pause)));
                    }
                    self.put(ENTRIES, seq_key(seq), &entry);
                    count(destination, &entry.resource_type, "retried");
                    if let Some(slot) = self.job(entry.job) {
                        slot.job.counts.retried += 1;
                    }
                }
                Settled::Reject {
                    status,
                    reason,
                    outcome,
                } => self.dead_letter(destination, seq, status, reason, outcome),
            }
        }
    }

    /// Other entries for a resource just delivered at `version` need not go out: those of the
    /// same version (another job's), and those of an older one (read before the delivery's
    /// own, fresher, read of the source).
    fn settle_followers(
        &mut self,
        destination: &str,
        key: &str,
        source: &str,
        version: &str,
        updated: Option<i64>,
    ) {
        let lane = self.lane(destination);
        let same: Vec<u64> = lane
            .keys
            .get(key)
            .into_iter()
            .flatten()
            .copied()
            .filter(|seq| {
                lane.entries.get(seq).is_some_and(|q| {
                    !q.in_flight
                        && ((q.entry.version == version && q.entry.source == source)
                            || is_older(q.entry.updated, updated))
                })
            })
            .collect();
        for seq in same {
            if let Some(entry) = self.remove(destination, seq) {
                self.skipped(destination, &entry, None);
            }
        }
    }

    /// Counts an entry that needed no delivery of its own.
    fn skipped(&mut self, destination: &str, entry: &Entry, note: Option<&str>) {
        count(destination, &entry.resource_type, "skipped");
        if let Some(slot) = self.job(entry.job) {
            slot.job.counts.skipped += 1;
            slot.job.type_counts(&entry.resource_type).skipped += 1;
            slot.record(entry, true, note.map(str::to_owned));
        }
    }

    /// Takes an entry out of its lane (memory and store), settling its tier.
    fn remove(&mut self, destination: &str, seq: u64) -> Option<Entry> {
        let lane = self.lane(destination);
        let queued = lane.entries.remove(&seq)?;
        forget(lane, &queued.key, seq);
        let entry = queued.entry;
        self.delete(ENTRIES, seq_key(seq));
        if let Some(slot) = self.job(entry.job) {
            slot.settle_tier(entry.tier);
        }
        Some(entry)
    }

    pub fn dead_letter(
        &mut self,
        destination: &str,
        seq: u64,
        status: u16,
        reason: String,
        outcome: Option<Value>,
    ) {
        let Some(entry) = self.remove(destination, seq) else {
            return;
        };
        let id = self.seq();
        tracing::warn!(
            job = entry.job,
            entry = seq,
            dead_letter = id,
            destination,
            resource_type = %entry.resource_type,
            resource_id = %entry.id,
            status,
            "resource dead-lettered"
        );
        count(destination, &entry.resource_type, "failed");
        metrics::counter!("fhirgate_sync_dead_letters_total", "destination" => destination.to_owned(), "kind" => "resource")
            .increment(1);
        let letter = DeadLetter {
            id,
            kind: DeadKind::Resource,
            job: entry.job,
            source: entry.source.clone(),
            destination: destination.to_owned(),
            resource_type: Some(entry.resource_type.clone()),
            resource_id: Some(entry.id.clone()),
            target_id: Some(entry.target_id.clone()),
            version: Some(entry.version.clone()),
            tier: entry.tier,
            step: None,
            url: None,
            status,
            reason: reason.clone(),
            outcome,
            attempts: entry.attempts + 1,
            at: now_rfc3339(),
        };
        self.put(DEAD, seq_key(id), &letter);
        if let Some(slot) = self.job(entry.job) {
            slot.job.counts.failed += 1;
            slot.job.type_counts(&entry.resource_type).failed += 1;
            slot.record(&entry, false, Some(reason));
        }
    }

    /// Records a source page or read that could not be fetched.
    pub fn dead_page(
        &mut self,
        job_id: u64,
        step: Option<usize>,
        url: Option<String>,
        error: &crate::remote::RemoteError,
    ) {
        let id = self.seq();
        let Some(slot) = self.job(job_id) else { return };
        slot.job.counts.failed_pages += 1;
        let reason = error.to_string();
        slot.job.errors.push(reason.clone());
        let letter = DeadLetter {
            id,
            kind: DeadKind::Page,
            job: job_id,
            source: slot.job.source.clone(),
            destination: slot.job.destination.clone(),
            resource_type: None,
            resource_id: None,
            target_id: None,
            version: None,
            tier: 0,
            step,
            url,
            status: error.status().unwrap_or(0),
            reason,
            outcome: error.outcome().cloned(),
            attempts: 0,
            at: now_rfc3339(),
        };
        tracing::warn!(
            job = job_id,
            dead_letter = id,
            status = letter.status,
            "source page dead-lettered"
        );
        metrics::counter!("fhirgate_sync_dead_letters_total", "destination" => letter.destination.clone(), "kind" => "page")
            .increment(1);
        self.put(DEAD, seq_key(id), &letter);
    }

    /// Adds the snapshots of every job changed and the sequence counter, and finishes jobs
    /// that have nothing left to do.
    fn finish(mut self) -> Vec<KvOp> {
        for id in std::mem::take(&mut self.touched) {
            let Some(slot) = self.state.jobs.get_mut(&id) else {
                continue;
            };
            if slot.job.state == JobState::Delivering && slot.tiers.is_empty() {
                slot.job.state = if slot.job.has_problems() {
                    JobState::CompletedWithErrors
                } else {
                    JobState::Completed
                };
                slot.job.finished = Some(now_rfc3339());
                let state = if slot.job.has_problems() {
                    "completed-with-errors"
                } else {
                    "completed"
                };
                metrics::counter!("fhirgate_sync_jobs_total", "state" => state).increment(1);
                tracing::info!(
                    job = id,
                    done = slot.job.counts.done,
                    skipped = slot.job.counts.skipped,
                    failed = slot.job.counts.failed,
                    state,
                    "sync job finished"
                );
            }
            match serde_json::to_vec(&slot.job) {
                Ok(bytes) => self.ops.push(KvOp::put(JOBS, seq_key(id), bytes)),
                Err(e) => tracing::error!(job = id, error = %e, "job did not serialize"),
            }
        }
        for destination in std::mem::take(&mut self.lanes_touched) {
            if let Some(lane) = self.state.lanes.get(&destination) {
                metrics::gauge!("fhirgate_sync_queue_depth", "destination" => destination.clone())
                    .set(lane.entries.len() as f64);
                lane.wake.notify_one();
                lane.room.notify_waiters();
            }
        }
        if self.state.next_seq != self.seq_before {
            self.ops.push(KvOp::put(
                META,
                META_SEQ,
                self.state.next_seq.to_string().into_bytes(),
            ));
        }
        self.ops
    }
}

/// A resource already delivered (or waiting) at the version this job found: nothing to do,
/// which for the caller is a success.
/// Drops `seq` from the entries of `key`.
pub(super) fn forget(lane: &mut Lane, key: &str, seq: u64) {
    if let Some(seqs) = lane.keys.get_mut(key) {
        seqs.remove(&seq);
        if seqs.is_empty() {
            lane.keys.remove(key);
        }
    }
}

fn skip(jobs: &mut BTreeMap<u64, JobSlot>, job: u64, resource_type: &str, id: &str) {
    if let Some(slot) = jobs.get_mut(&job) {
        slot.job.counts.queued += 1;
        slot.job.counts.skipped += 1;
        slot.job.type_counts(resource_type).skipped += 1;
        if let Some(results) = &mut slot.results {
            results.push(ResourceResult {
                success: true,
                resource_type: resource_type.to_owned(),
                resource_id: id.to_owned(),
                error: None,
            });
        }
    }
}

fn count(destination: &str, resource_type: &str, outcome: &'static str) {
    metrics::counter!(
        "fhirgate_sync_resources_total",
        "destination" => destination.to_owned(),
        "type" => resource_type.to_owned(),
        "outcome" => outcome
    )
    .increment(1);
}

impl SyncEngine {
    /// Applies `change` to the in-memory state and commits the records it produced, in one
    /// durable write. Changes commit one at a time, in the order they were made, so job
    /// snapshots never go backwards.
    pub(super) async fn transact<R>(
        &self,
        change: impl FnOnce(&mut Tx<'_>) -> R,
    ) -> Result<R, StoreError> {
        self.transact_reading(None, |tx, _| change(tx)).await
    }

    /// Like [`SyncEngine::transact`], but first reads `keys` of a key-value space while
    /// holding the commit turn, so nothing it read changes before `change` commits.
    pub(super) async fn transact_reading<R>(
        &self,
        read: Option<(&'static str, Vec<String>)>,
        change: impl FnOnce(&mut Tx<'_>, Vec<Option<Bytes>>) -> R,
    ) -> Result<R, StoreError> {
        let _one_at_a_time = self.commit.lock().await;
        if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            // A commit was given up on: later changes must not reach the store without it.
            return Err(StoreError::Closed);
        }
        let found = match read {
            Some((space, keys)) => self.read_durably(space, keys).await?,
            None => Vec::new(),
        };
        let (result, ops) = {
            let mut state = self.lock();
            let seq_before = state.next_seq;
            let mut tx = Tx {
                state: &mut state,
                ops: Vec::new(),
                touched: BTreeSet::new(),
                lanes_touched: BTreeSet::new(),
                seq_before,
            };
            let result = change(&mut tx, found);
            (result, tx.finish())
        };
        if !ops.is_empty() {
            self.commit_durably(ops).await?;
        }
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        Ok(result)
    }

    /// Memory already holds the change, so the store must get it too: a failed commit is
    /// retried, in order (the records are idempotent puts and deletes). Only a closed store,
    /// or a store still failing at shutdown, ends the attempts; then no later change commits
    /// either, and the next start reloads what was committed.
    async fn commit_durably(&self, ops: Vec<KvOp>) -> Result<(), StoreError> {
        let result = self
            .with_store_retries("sync state not committed", || {
                self.store.kv_apply(ops.clone())
            })
            .await;
        if result.is_err() {
            self.broken.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        result
    }

    /// Reads sync records, retrying a failing store like [`SyncEngine::commit_durably`].
    async fn read_durably(
        &self,
        space: &'static str,
        keys: Vec<String>,
    ) -> Result<Vec<Option<Bytes>>, StoreError> {
        self.with_store_retries("sync state not read", || {
            self.store.kv_get(space, keys.clone())
        })
        .await
    }

    async fn with_store_retries<T, F, Fut>(&self, what: &str, call: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut wait = Duration::from_millis(10);
        let mut failures = 0u32;
        loop {
            match call().await {
                Ok(value) => return Ok(value),
                Err(StoreError::Closed) => return Err(StoreError::Closed),
                Err(e) => {
                    failures += 1;
                    tracing::error!(error = %e, failures, "{what}; retrying");
                    if self.is_shutting_down() && failures >= 3 {
                        return Err(e);
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Milliseconds since the Unix epoch.
pub(super) fn now_millis() -> i64 {
    crate::fhir::date::now_micros() / 1000
}

pub(super) fn now_rfc3339() -> String {
    crate::fhir::date::format_instant(crate::fhir::date::now_micros())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::model::{Counts, Scope};

    fn state_with_jobs(ids: &[u64]) -> State {
        let mut state = State::default();
        for &id in ids {
            let job = Job {
                id,
                source: "ehr".into(),
                destination: "store".into(),
                scope: Scope::Types {
                    types: vec!["Patient".into()],
                    since: None,
                },
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
            state.jobs.insert(id, JobSlot::new(job, false));
        }
        state
    }

    fn tx(state: &mut State) -> Tx<'_> {
        let seq_before = state.next_seq;
        Tx {
            state,
            ops: Vec::new(),
            touched: BTreeSet::new(),
            lanes_touched: BTreeSet::new(),
            seq_before,
        }
    }

    fn patient(version: &str, updated: i64) -> Candidate {
        Candidate {
            resource_type: "Patient".into(),
            id: "p".into(),
            version: version.into(),
            updated: Some(updated),
            body: None,
        }
    }

    fn waiting_versions(state: &State) -> Vec<String> {
        state.lanes["store"]
            .entries
            .values()
            .map(|q| q.entry.version.clone())
            .collect()
    }

    #[test]
    fn an_older_version_read_later_does_not_replace_a_newer_one() {
        let mut state = state_with_jobs(&[1, 2]);
        let mut change = tx(&mut state);
        assert_eq!(
            change.enqueue(1, None, vec![patient("2", 200)], &HashMap::new()),
            1
        );
        assert_eq!(
            change.enqueue(2, None, vec![patient("1", 100)], &HashMap::new()),
            0
        );
        drop(change);
        assert_eq!(waiting_versions(&state), ["2"]);
        let late = &state.jobs[&2].job.counts;
        assert_eq!((late.queued, late.skipped), (1, 1));
        assert_eq!(late.outstanding(), 0);
    }

    #[test]
    fn a_newer_version_replaces_a_waiting_one_and_the_same_version_queues_behind() {
        let mut state = state_with_jobs(&[1, 2, 3]);
        let mut change = tx(&mut state);
        change.enqueue(1, None, vec![patient("1", 100)], &HashMap::new());
        change.enqueue(2, None, vec![patient("2", 200)], &HashMap::new());
        change.enqueue(3, None, vec![patient("2", 200)], &HashMap::new());
        drop(change);
        assert_eq!(waiting_versions(&state), ["2", "2"]);
        let first = &state.jobs[&1].job.counts;
        assert_eq!(
            (first.queued, first.skipped, first.outstanding()),
            (1, 1, 0)
        );
        assert!(state.jobs[&1].tiers.is_empty(), "job 1 has nothing left");
        assert_eq!(
            state.jobs[&3].job.counts.outstanding(),
            1,
            "job 3 waits behind job 2"
        );
    }

    #[test]
    fn what_was_delivered_at_this_version_or_later_is_not_queued_again() {
        let mut state = state_with_jobs(&[1]);
        let delivered = HashMap::from([(
            "Patient/p".to_owned(),
            Delivered {
                source: "ehr".into(),
                version: "2".into(),
                job: 7,
                updated: Some(200),
            },
        )]);
        let mut change = tx(&mut state);
        assert_eq!(
            change.enqueue(1, None, vec![patient("2", 200)], &delivered),
            0
        );
        assert_eq!(
            change.enqueue(1, None, vec![patient("1", 100)], &delivered),
            0
        );
        assert_eq!(
            change.enqueue(1, None, vec![patient("3", 300)], &delivered),
            1
        );
        drop(change);
        let counts = &state.jobs[&1].job.counts;
        assert_eq!((counts.queued, counts.skipped), (3, 2));
    }
}
