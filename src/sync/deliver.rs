//! Delivery: one worker per destination claims ready entries in outbox order, sends them in
//! batches (at most `concurrency` batches in flight), and settles each entry with the answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::model::{updated_of, version_of, Entry};
use super::outbox::{now_millis, Settled, State};
use super::transform::IdMap;
use super::SyncEngine;
use crate::remote::{Delivery, FhirSink, Outgoing};

/// A version to deliver: its `versionId` (or stand-in) and `meta.lastUpdated`.
type Version = (String, Option<i64>);

/// An entry taken for delivery.
pub(super) struct Claimed {
    seq: u64,
    entry: Entry,
    body: Option<Value>,
    uncertain: bool,
}

/// Entries claimed by a delivery. If the delivery ends without settling them (a panic, a
/// store that refused the results), they are released to be tried again instead of staying
/// claimed for good.
struct ClaimGuard<'a> {
    engine: &'a SyncEngine,
    destination: &'a str,
    seqs: Vec<u64>,
    armed: bool,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let now = now_millis();
        let mut state = self.engine.lock();
        if let Some(lane) = state.lanes.get_mut(self.destination) {
            for seq in &self.seqs {
                if let Some(queued) = lane.entries.get_mut(seq) {
                    if queued.in_flight {
                        // Counted as an attempt (in memory: nothing was recorded), so a
                        // delivery that keeps failing this way backs off further each time.
                        queued.entry.attempts += 1;
                        let wait = self.engine.backoff(queued.entry.attempts, None);
                        queued.in_flight = false;
                        queued.uncertain = true;
                        queued.entry.not_before =
                            now.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
                        lane.busy.remove(&queued.key);
                    }
                }
            }
            lane.wake.notify_one();
        }
    }
}

enum Take {
    Batch(Vec<Claimed>),
    /// Nothing ready; something may be at this time (milliseconds since the epoch).
    Wait(Option<i64>),
}

fn count_verified(destination: &str) {
    metrics::counter!("fhirgate_sync_verified_total", "destination" => destination.to_owned())
        .increment(1);
}

/// Source reads at once when bodies must be fetched again (after a restart or a retry).
const READ_CONCURRENCY: usize = 8;

/// The longest a worker sleeps without being woken (a safety net, not a schedule).
const IDLE: Duration = Duration::from_secs(30);

impl SyncEngine {
    /// The worker of one destination; returns at shutdown once its deliveries have settled.
    pub(super) async fn run_lane(
        self: Arc<Self>,
        destination: String,
        sink: Arc<dyn FhirSink>,
        concurrency: usize,
    ) {
        let permits = Arc::new(Semaphore::new(concurrency));
        let wake = self
            .lock()
            .lanes
            .entry(destination.clone())
            .or_default()
            .wake
            .clone();
        let mut shutdown = self.shutdown.subscribe();
        loop {
            if self.is_shutting_down() {
                break;
            }
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => permit,
                _ = shutdown.changed() => break,
            };
            let Ok(permit) = permit else { break };
            match self.take_batch(&destination, sink.batch_size().max(1)) {
                Take::Batch(batch) => {
                    let engine = self.clone();
                    let sink = sink.clone();
                    let destination = destination.clone();
                    tokio::spawn(async move {
                        engine.deliver(&destination, &*sink, batch).await;
                        drop(permit);
                    });
                }
                Take::Wait(until) => {
                    drop(permit);
                    let sleep = until.map_or(IDLE, |at| {
                        Duration::from_millis(
                            (at - now_millis()).clamp(1, IDLE.as_millis() as i64) as u64
                        )
                    });
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = tokio::time::sleep(sleep) => {}
                        _ = shutdown.changed() => break,
                    }
                }
            }
        }
        // Let the batches in flight settle before the store closes.
        let _ = permits.acquire_many(concurrency as u32).await;
    }

    /// Claims up to `max` ready entries: not waiting for a retry, of the lowest tier still open
    /// in their job, and not behind a delivery of the same resource already in flight.
    fn take_batch(&self, destination: &str, max: usize) -> Take {
        let now = now_millis();
        let mut state = self.lock();
        let State { lanes, jobs, .. } = &mut *state;
        let Some(lane) = lanes.get_mut(destination) else {
            return Take::Wait(None);
        };
        if lane.paused_until > now {
            return Take::Wait(Some(lane.paused_until));
        }
        let mut batch = Vec::new();
        let mut earliest: Option<i64> = None;
        for (seq, queued) in lane.entries.iter_mut() {
            if batch.len() >= max {
                break;
            }
            if queued.in_flight {
                continue;
            }
            if queued.entry.not_before > now {
                let at = queued.entry.not_before;
                earliest = Some(earliest.map_or(at, |e| e.min(at)));
                continue;
            }
            let lowest = jobs
                .get(&queued.entry.job)
                .and_then(|slot| slot.tiers.keys().next().copied());
            if lowest.is_some_and(|lowest| queued.entry.tier > lowest) {
                continue;
            }
            // One delivery per resource at a time, oldest entry first.
            let oldest = lane.keys.get(&queued.key).and_then(|seqs| seqs.first());
            if lane.busy.contains(&queued.key) || oldest != Some(seq) {
                continue;
            }
            lane.busy.insert(queued.key.clone());
            queued.in_flight = true;
            batch.push(Claimed {
                seq: *seq,
                entry: queued.entry.clone(),
                body: queued.body.take(),
                uncertain: queued.uncertain,
            });
        }
        if batch.is_empty() {
            Take::Wait(earliest)
        } else {
            Take::Batch(batch)
        }
    }

    /// Sends one batch and settles every entry in it.
    async fn deliver(&self, destination: &str, sink: &dyn FhirSink, batch: Vec<Claimed>) {
        let started = Instant::now();
        let size = batch.len();
        let mut claims = ClaimGuard {
            engine: self,
            destination,
            seqs: batch.iter().map(|c| c.seq).collect(),
            armed: true,
        };
        let mut settled: Vec<(u64, Settled)> = Vec::with_capacity(size);
        let ready = self.read_missing(batch, &mut settled).await;

        let mut outgoing = Vec::with_capacity(ready.len());
        let mut pending = Vec::with_capacity(ready.len());
        // Positions in `outgoing` of resources an earlier attempt may already have written.
        let mut unsure = Vec::new();
        for (claimed, body, version) in ready {
            let prefix = self.id_prefix(&claimed.entry.source, destination);
            let resource = match prefix {
                Some(prefix) => {
                    let mut copy = body.clone();
                    if let Err(reason) = (IdMap {
                        prefix: Some(prefix),
                    })
                    .apply(&mut copy)
                    {
                        settled.push((
                            claimed.seq,
                            Settled::Reject {
                                status: 0,
                                reason,
                                outcome: None,
                            },
                        ));
                        continue;
                    }
                    copy
                }
                None => body.clone(),
            };
            if claimed.uncertain {
                unsure.push(outgoing.len());
            }
            outgoing.push(Outgoing {
                resource_type: claimed.entry.resource_type.clone(),
                id: claimed.entry.target_id.clone(),
                resource,
            });
            pending.push((claimed.seq, body, version));
        }
        if !unsure.is_empty() {
            let (outgoing_left, pending_left) = self
                .already_there(destination, sink, outgoing, pending, &unsure, &mut settled)
                .await;
            outgoing = outgoing_left;
            pending = pending_left;
        }
        if !outgoing.is_empty() {
            let answers = sink.upsert(outgoing).await;
            let mut answers = answers.into_iter();
            for (seq, body, version) in pending {
                let answer = answers.next().unwrap_or(Delivery::Retry {
                    reason: "the destination gave no answer for this resource".into(),
                    after: None,
                    uncertain: true,
                });
                settled.push((
                    seq,
                    match answer {
                        Delivery::Done => Settled::Done {
                            version: version.0,
                            updated: version.1,
                            verified: false,
                        },
                        Delivery::Retry {
                            reason,
                            after,
                            uncertain,
                        } => Settled::Retry {
                            reason,
                            after,
                            body: Some(body),
                            uncertain,
                        },
                        Delivery::Reject {
                            status,
                            reason,
                            outcome,
                        } => Settled::Reject {
                            status,
                            reason,
                            outcome,
                        },
                    },
                ));
            }
        }
        metrics::histogram!("fhirgate_sync_batch_duration_seconds", "destination" => destination.to_owned())
            .record(started.elapsed().as_secs_f64());
        tracing::debug!(
            destination,
            size,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "batch delivered"
        );
        // Anything without an answer (a source read that did not finish) goes round again.
        let answered: std::collections::HashSet<u64> =
            settled.iter().map(|(seq, _)| *seq).collect();
        for seq in claims.seqs.iter().filter(|seq| !answered.contains(seq)) {
            settled.push((
                *seq,
                Settled::Retry {
                    reason: "the delivery attempt did not complete".into(),
                    after: None,
                    body: None,
                    uncertain: true,
                },
            ));
        }
        match self
            .transact(|tx| tx.settle(self, destination, settled))
            .await
        {
            Ok(()) => claims.armed = false,
            Err(e) => {
                tracing::error!(destination, error = %e, "delivery results could not be recorded; they are delivered again after a restart")
            }
        }
    }

    /// Checks the destination for the resources at `unsure` positions: one already there with
    /// the same content (an earlier attempt went through) is settled as delivered without
    /// writing it again. Returns what still has to be sent. If the check itself fails, every
    /// resource is sent (delivery stays at least once).
    async fn already_there(
        &self,
        destination: &str,
        sink: &dyn FhirSink,
        outgoing: Vec<Outgoing>,
        pending: Vec<(u64, Value, Version)>,
        unsure: &[usize],
        settled: &mut Vec<(u64, Settled)>,
    ) -> (Vec<Outgoing>, Vec<(u64, Value, Version)>) {
        let mut by_type: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
        for &i in unsure {
            by_type
                .entry(outgoing[i].resource_type.as_str())
                .or_default()
                .push(i);
        }
        let mut present = vec![false; outgoing.len()];
        for (resource_type, positions) in by_type {
            let ids: Vec<String> = positions.iter().map(|&i| outgoing[i].id.clone()).collect();
            match sink.current(resource_type, &ids).await {
                Ok(found) => {
                    for (&i, current) in positions.iter().zip(found) {
                        present[i] = current.is_some_and(|current| {
                            crate::fhir::without_meta(&current)
                                == crate::fhir::without_meta(&outgoing[i].resource)
                        });
                    }
                }
                Err(e) => {
                    tracing::debug!(destination, error = %e, "could not check the destination; writing again");
                }
            }
        }
        let mut send = Vec::with_capacity(outgoing.len());
        let mut still = Vec::with_capacity(pending.len());
        for ((item, (seq, body, version)), there) in outgoing.into_iter().zip(pending).zip(present)
        {
            if there {
                count_verified(destination);
                settled.push((
                    seq,
                    Settled::Done {
                        version: version.0,
                        updated: version.1,
                        verified: true,
                    },
                ));
            } else {
                send.push(item);
                still.push((seq, body, version));
            }
        }
        (send, still)
    }

    /// Reads from the source the bodies of entries that have none in memory. Returns the
    /// entries ready to send with their body and version; the others are settled.
    async fn read_missing(
        &self,
        batch: Vec<Claimed>,
        settled: &mut Vec<(u64, Settled)>,
    ) -> Vec<(Claimed, Value, Version)> {
        let mut ready = Vec::with_capacity(batch.len());
        let mut missing = Vec::new();
        for mut claimed in batch {
            match claimed.body.take() {
                Some(body) => {
                    let version = (claimed.entry.version.clone(), claimed.entry.updated);
                    ready.push((claimed, body, version));
                }
                None => missing.push(claimed),
            }
        }
        let mut reads = JoinSet::new();
        let mut missing = missing.into_iter();
        loop {
            while reads.len() < READ_CONCURRENCY {
                let Some(claimed) = missing.next() else { break };
                let Some(source) = self.source(&claimed.entry.source) else {
                    settled.push((
                        claimed.seq,
                        Settled::Reject {
                            status: 0,
                            reason: format!(
                                "source {} is no longer configured",
                                claimed.entry.source
                            ),
                            outcome: None,
                        },
                    ));
                    continue;
                };
                reads.spawn(async move {
                    let read = source
                        .read(&claimed.entry.resource_type, &claimed.entry.id)
                        .await;
                    (claimed, read)
                });
            }
            let Some(joined) = reads.join_next().await else {
                break;
            };
            let Ok((claimed, read)) = joined else {
                continue;
            };
            match read {
                Ok(Some(body)) => {
                    let version = (version_of(&body), updated_of(&body));
                    ready.push((claimed, body, version));
                }
                Ok(None) => settled.push((claimed.seq, Settled::Gone)),
                Err(e) if e.is_retriable() => settled.push((
                    claimed.seq,
                    Settled::Retry {
                        reason: format!("reading the source: {e}"),
                        after: e.retry_after(),
                        body: None,
                        uncertain: claimed.uncertain,
                    },
                )),
                Err(e) => settled.push((
                    claimed.seq,
                    Settled::Reject {
                        status: e.status().unwrap_or(0),
                        reason: format!("reading the source: {e}"),
                        outcome: e.outcome().cloned(),
                    },
                )),
            }
        }
        ready
    }
}
