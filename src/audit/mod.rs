//! The audit log: who did what to which resource, when, from where, and how it ended.
//!
//! Records are appended to the store's `audit` stream by one writer task, in batches (one
//! commit for whatever is waiting). Each record carries the SHA-256 of the one before it and its
//! own hash over all its fields, and the newest record's sequence number and hash (the head) are
//! kept beside the log in the same commit, so [`verify_chain`] finds any edited, removed or reordered
//! record, a cut-off end included. Records hold resource types and ids, never content, names or
//! search values.
//!
//! A change is recorded before it runs ([`AuditLog::record_before`]): that commit is not flushed
//! itself, but the change's own (durable) commit comes after it and takes it to disk, so no
//! change is stored without its record, at the cost of no extra flush. Results and reads are
//! recorded without waiting and reach the disk within [`FLUSH_EVERY`]. Records older than the retention period are removed
//! from the start of the log; the last removed record's hash becomes the anchor the chain is
//! verified from.

pub mod events;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::store::{KvOp, Store, StoreError};

/// The store stream that holds the records.
pub const STREAM: &str = "audit";
/// The head and the anchor.
const META: &str = "audit.meta";
const HEAD: &str = "head";
const ANCHOR: &str = "anchor";
/// The `prev` of the first record ever written.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Most records committed at once.
const BATCH: usize = 1024;

/// A handler's word for the audit log about its answer (a replayed webhook, the job it
/// started), put in the response's extensions; the guard adds it to the record's detail.
#[derive(Debug, Clone)]
pub struct AuditNote(pub String);

/// What happened, as the recorder gives it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// RFC 3339 instant.
    pub time: String,
    /// The caller: a token's `sub`, `api-key:{name}`, or `unauthenticated`.
    pub who: String,
    /// How the caller proved itself (`api-key`, `jwt`, `token`, `open`, `cds-jwt`, `none`).
    pub via: String,
    /// What was done: a FHIR interaction (`read`, `vread`, `search-type`, `history-instance`,
    /// `create`, `update`, `delete`, `batch`, `operation`), `export`, `login`, `admin`, `start`.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// The HTTP status answered (or 0 for events without a request).
    pub outcome: u16,
    /// The caller's network address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The route template, search parameter names, or why access was refused — never values
    /// that could identify a patient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Entry {
    /// Adds `more` to the detail, after what is there.
    pub fn add_detail(&mut self, more: &str) {
        self.detail = Some(match self.detail.take() {
            Some(detail) => format!("{detail}; {more}"),
            None => more.to_owned(),
        });
    }

    /// An entry stamped now.
    pub fn now(who: &str, via: &str, action: &str) -> Self {
        Self {
            time: crate::fhir::date::format_instant(crate::fhir::date::now_micros()),
            who: who.to_owned(),
            via: via.to_owned(),
            action: action.to_owned(),
            ..Self::default()
        }
    }
}

/// A record of the log: an entry in its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    #[serde(flatten)]
    pub entry: Entry,
    /// The hash of the record before (or the anchor, or [`GENESIS`]).
    pub prev: String,
    /// SHA-256 (hex) of this record with `hash` empty.
    pub hash: String,
}

impl Record {
    /// The hash this record should carry.
    pub fn compute_hash(&self) -> String {
        RecordView::new(self.seq, &self.entry, &self.prev, "").hash()
    }
}

/// A [`Record`] made of borrowed parts, serialized exactly like it: the writer chains and
/// stores entries without copying them.
#[derive(Serialize)]
struct RecordView<'a> {
    seq: u64,
    #[serde(flatten)]
    entry: &'a Entry,
    prev: &'a str,
    hash: &'a str,
}

impl<'a> RecordView<'a> {
    fn new(seq: u64, entry: &'a Entry, prev: &'a str, hash: &'a str) -> Self {
        Self {
            seq,
            entry,
            prev,
            hash,
        }
    }

    fn json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// SHA-256 (hex) of the record with `hash` empty.
    fn hash(&self) -> String {
        let unhashed = Self { hash: "", ..*self };
        crate::hex(&Sha256::digest(unhashed.json()))
    }
}

/// A position in the chain: a sequence number and the hash of the record there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub seq: u64,
    pub hash: String,
}

impl Link {
    fn genesis() -> Self {
        Self {
            seq: 0,
            hash: GENESIS.to_owned(),
        }
    }
}

async fn read_link(store: &dyn Store, key: &str) -> Result<Option<Link>, StoreError> {
    match store
        .kv_get(META, vec![key.to_owned()])
        .await?
        .pop()
        .flatten()
    {
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("audit {key}: {e}"))),
        None => Ok(None),
    }
}

struct Submission {
    entry: Entry,
    committed: Option<oneshot::Sender<()>>,
    /// Whether its commit must reach the disk before it is acknowledged.
    durable: bool,
}

/// What the writer is sent. Nearly every message is an entry, so entries are not boxed.
#[allow(clippy::large_enum_variant)]
enum Message {
    Entry(Submission),
    /// Commit what came before and answer.
    Flush(oneshot::Sender<()>),
}

/// The log's writer.
pub struct AuditLog {
    tx: mpsc::Sender<Message>,
    /// Rung after a message someone waits for, so the writer stops gathering for it.
    urgent: Arc<tokio::sync::Notify>,
    store: Arc<dyn Store>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    pruner: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl AuditLog {
    /// Starts the writer after the newest record; prunes daily when `retention_days` > 0.
    pub async fn start(store: Arc<dyn Store>, retention_days: u32) -> anyhow::Result<Arc<Self>> {
        let head = read_link(store.as_ref(), HEAD)
            .await?
            .unwrap_or_else(Link::genesis);
        let (tx, rx) = mpsc::channel(8192);
        let urgent = Arc::new(tokio::sync::Notify::new());
        let writer = tokio::spawn(write_loop(store.clone(), head, rx, urgent.clone()));
        let pruner = (retention_days > 0).then(|| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut daily = tokio::time::interval(Duration::from_secs(24 * 3600));
                loop {
                    daily.tick().await;
                    let cutoff = crate::fhir::date::now_micros().saturating_sub(
                        i64::from(retention_days.min(100 * 366)) * 24 * 3600 * 1_000_000,
                    );
                    match prune(store.as_ref(), cutoff).await {
                        Ok(0) => {}
                        Ok(removed) => tracing::info!(removed, "old audit records removed"),
                        Err(e) => tracing::error!(error = %e, "pruning the audit log failed"),
                    }
                }
            })
        });
        Ok(Arc::new(Self {
            tx,
            urgent,
            store,
            writer: Mutex::new(Some(writer)),
            pruner: Mutex::new(pruner),
        }))
    }

    /// Records `entry` without waiting; it reaches the disk within a second.
    pub async fn record(&self, entry: Entry) {
        let submission = Submission {
            entry,
            committed: None,
            durable: false,
        };
        if self.tx.send(Message::Entry(submission)).await.is_err() {
            tracing::error!("audit record after the log closed");
        }
    }

    /// Records `entry` and waits until it is on disk.
    pub async fn record_durably(&self, entry: Entry) {
        self.submit_waiting(entry, true).await;
    }

    /// Records `entry` and waits until it is committed, without flushing that commit: the
    /// next durable commit of the store — a write the caller makes next — carries it to disk.
    /// So a write is never on disk without the record made before it.
    pub async fn record_before(&self, entry: Entry) {
        self.submit_waiting(entry, false).await;
    }

    async fn submit_waiting(&self, entry: Entry, durable: bool) {
        let (done, committed) = oneshot::channel();
        let submission = Submission {
            entry,
            committed: Some(done),
            durable,
        };
        let sent = self.tx.send(Message::Entry(submission)).await.is_ok();
        self.urgent.notify_one();
        if !sent || committed.await.is_err() {
            tracing::error!("audit record after the log closed");
        }
    }

    /// Waits until everything recorded so far is on disk.
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).await.is_ok() {
            self.urgent.notify_one();
            let _ = flushed.await;
        }
    }

    /// Records that the server started, with a digest of its configuration and whether that
    /// changed since the last start.
    pub async fn record_start(&self, config: &crate::config::Config) {
        const CONFIG: &str = "config";
        let digest = crate::hex(&Sha256::digest(format!("{config:?}").as_bytes()));
        let previous = self
            .store
            .kv_get(META, vec![CONFIG.to_owned()])
            .await
            .ok()
            .and_then(|mut values| values.pop().flatten());
        let changed = match previous {
            Some(bytes) if bytes == digest.as_bytes() => "unchanged",
            Some(_) => "changed since the last start",
            None => "first start",
        };
        let mut entry = Entry::now("fhirgate", "system", "start");
        entry.detail = Some(format!("configuration sha256 {digest} ({changed})"));
        self.record_durably(entry).await;
        if let Err(e) = self
            .store
            .kv_apply(vec![KvOp::put(META, CONFIG, digest.into_bytes())])
            .await
        {
            tracing::error!(error = %e, "the configuration digest could not be kept");
        }
    }

    /// Verifies the chain in the store.
    pub async fn verify(&self) -> Result<Result<Verified, Tampered>, StoreError> {
        self.flush().await;
        verify_chain(self.store.as_ref()).await
    }

    /// The store the records are kept in.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Commits what is queued (waiting at most `grace`) and stops the writer.
    pub async fn shutdown(&self, grace: Duration) {
        if let Some(pruner) = self.pruner.lock().await.take() {
            pruner.abort();
        }
        if tokio::time::timeout(grace, self.flush()).await.is_err() {
            tracing::error!("audit records were still being written at shutdown");
        }
        if let Some(writer) = self.writer.lock().await.take() {
            writer.abort();
        }
    }
}

/// Longest a committed record waits for its commit to reach the disk.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// How long records nobody waits for gather before they are committed.
const GATHER: Duration = Duration::from_millis(5);

async fn write_loop(
    store: Arc<dyn Store>,
    mut head: Link,
    mut rx: mpsc::Receiver<Message>,
    urgent: Arc<tokio::sync::Notify>,
) {
    let mut batch: Vec<Submission> = Vec::with_capacity(BATCH);
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    // Commits made without flushing, and when the disk last had everything.
    let mut dirty = false;
    let mut flushed_at = std::time::Instant::now();
    loop {
        // Unflushed commits reach the disk FLUSH_EVERY after the last flush, however busy.
        let wait = if dirty {
            FLUSH_EVERY.saturating_sub(flushed_at.elapsed())
        } else {
            FLUSH_EVERY
        };
        let first = match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(_) => {
                if dirty && flush_head(store.as_ref(), &head).await {
                    dirty = false;
                }
                // A failed flush is tried again a FLUSH_EVERY later, not at once.
                flushed_at = std::time::Instant::now();
                continue;
            }
        };
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Message::Entry(submission) => batch.push(submission),
                Message::Flush(done) => flushes.push(done),
            }
            if batch.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        // Records nobody waits for (reads, results) gather for a moment, so a busy server
        // makes one commit of many records instead of many commits of a few. The writer
        // sleeps meanwhile rather than wake for each record (the requests that send them run
        // on other threads); a record someone waits for, or a flush, ends the wait early.
        let waited_on = |s: &Submission| s.committed.is_some() || s.durable;
        if flushes.is_empty() && !batch.iter().any(waited_on) {
            tokio::select! {
                () = tokio::time::sleep(GATHER) => {}
                () = urgent.notified() => {}
            }
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(Message::Entry(submission)) => batch.push(submission),
                    Ok(Message::Flush(done)) => flushes.push(done),
                    Err(_) => break,
                }
            }
        }
        let durable = !flushes.is_empty()
            || batch.iter().any(|s| s.durable)
            || flushed_at.elapsed() >= FLUSH_EVERY;
        if !batch.is_empty() {
            match commit(store.as_ref(), &head, &batch, durable).await {
                Some(link) => head = link,
                None => return,
            }
            metrics::counter!("fhirgate_audit_records_total").increment(batch.len() as u64);
            for submission in batch.drain(..) {
                if let Some(done) = submission.committed {
                    let _ = done.send(());
                }
            }
            dirty = !durable;
        } else if durable && dirty && flush_head(store.as_ref(), &head).await {
            dirty = false;
        }
        if durable && !dirty {
            flushed_at = std::time::Instant::now();
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
    if dirty {
        flush_head(store.as_ref(), &head).await;
    }
}

/// Writes the head again in a durable commit, which takes every earlier commit to disk.
async fn flush_head(store: &dyn Store, head: &Link) -> bool {
    let value = serde_json::to_vec(head).unwrap_or_default();
    match store
        .append_with(STREAM, Vec::new(), vec![KvOp::put(META, HEAD, value)], true)
        .await
    {
        Ok(_) => true,
        Err(e) => {
            tracing::error!(error = %e, "flushing the audit log failed");
            false
        }
    }
}

/// Chains `batch` after `head` and commits it with the new head; `None` when the store closed.
async fn commit(
    store: &dyn Store,
    head: &Link,
    batch: &[Submission],
    durable: bool,
) -> Option<Link> {
    // The records, chained after `head`, and the new head. The chain is the same each time
    // it is made, so a retry makes it again rather than keep a copy of every payload.
    let chain = || {
        let mut link = head.clone();
        let mut payloads = Vec::with_capacity(batch.len());
        for submission in batch {
            let seq = link.seq + 1;
            let hash = RecordView::new(seq, &submission.entry, &link.hash, "").hash();
            payloads.push(RecordView::new(seq, &submission.entry, &link.hash, &hash).json());
            link = Link { seq, hash };
        }
        (payloads, link)
    };
    let (mut payloads, link) = chain();
    let head_value = serde_json::to_vec(&link).unwrap_or_default();
    // A failed commit changes nothing: the same batch is tried again, so no record is lost
    // and the chain has no gap.
    let mut delay = Duration::from_millis(50);
    loop {
        match store
            .append_with(
                STREAM,
                std::mem::take(&mut payloads),
                vec![KvOp::put(META, HEAD, head_value.clone())],
                durable,
            )
            .await
        {
            Ok(_) => return Some(link),
            Err(StoreError::Closed) => {
                tracing::error!(
                    records = batch.len(),
                    "the store closed before audit records were written"
                );
                return None;
            }
            Err(e) => {
                tracing::error!(error = %e, "writing audit records failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                payloads = chain().0;
            }
        }
    }
}

/// What a successful verification found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verified {
    pub records: u64,
    pub first: Option<u64>,
    pub head: Link,
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tampered {
    /// The sequence number where the break was found.
    pub seq: u64,
    pub problem: String,
}

/// Walks the chain from the anchor to the head; `Ok(Err(…))` names the first break. Records
/// committed after the head was read are left for the next check; a break found while the log
/// was being pruned is checked once more before it is reported.
pub async fn verify_chain(store: &dyn Store) -> Result<Result<Verified, Tampered>, StoreError> {
    match walk_chain(store).await? {
        Ok(verified) => Ok(Ok(verified)),
        Err(_) => walk_chain(store).await,
    }
}

async fn walk_chain(store: &dyn Store) -> Result<Result<Verified, Tampered>, StoreError> {
    let anchor = read_link(store, ANCHOR)
        .await?
        .unwrap_or_else(Link::genesis);
    let head = read_link(store, HEAD).await?.unwrap_or_else(Link::genesis);
    let mut link = anchor.clone();
    let mut count = 0u64;
    let mut first = None;
    let mut after = 0u64;
    loop {
        let page = store.records(STREAM, after, 1000).await?;
        let Some((last, _)) = page.last() else { break };
        after = *last;
        for (position, payload) in page {
            let record: Record = match serde_json::from_slice(&payload) {
                Ok(record) => record,
                Err(e) => {
                    return Ok(Err(Tampered {
                        seq: link.seq + 1,
                        problem: format!("stored record {position} is not a record: {e}"),
                    }))
                }
            };
            // Left over from a prune that stopped between writing the anchor and trimming.
            if record.seq <= anchor.seq && first.is_none() {
                continue;
            }
            // Written after the head was read: the next check covers it.
            if record.seq > head.seq && link.seq >= head.seq {
                break;
            }
            first.get_or_insert(record.seq);
            let problem = if record.seq != link.seq + 1 {
                Some(format!(
                    "expected record {} here, found {} (removed or reordered)",
                    link.seq + 1,
                    record.seq
                ))
            } else if record.prev != link.hash {
                Some("its previous-hash does not match the record before it".to_owned())
            } else if record.compute_hash() != record.hash {
                Some("its content does not match its hash (edited)".to_owned())
            } else {
                None
            };
            if let Some(problem) = problem {
                // A missing or misplaced record is reported where it should have been.
                return Ok(Err(Tampered {
                    seq: record.seq.min(link.seq + 1),
                    problem,
                }));
            }
            link = Link {
                seq: record.seq,
                hash: record.hash,
            };
            count += 1;
        }
    }
    if link != head {
        return Ok(Err(Tampered {
            seq: link.seq + 1,
            problem: format!(
                "the log ends at record {} but its head is record {} (records removed from the end)",
                link.seq, head.seq
            ),
        }));
    }
    Ok(Ok(Verified {
        records: count,
        first,
        head,
    }))
}

/// Removes records recorded before `cutoff_micros` (never the newest); returns how many.
pub async fn prune(store: &dyn Store, cutoff_micros: i64) -> Result<u64, StoreError> {
    let head = read_link(store, HEAD).await?.unwrap_or_else(Link::genesis);
    let mut last_old: Option<(u64, Link)> = None;
    let mut after = 0u64;
    'scan: loop {
        let page = store.records(STREAM, after, 1000).await?;
        let Some((last, _)) = page.last() else { break };
        after = *last;
        for (position, payload) in page {
            let Ok(record) = serde_json::from_slice::<Record>(&payload) else {
                break 'scan;
            };
            let old = crate::fhir::date::parse_range(&record.entry.time)
                .is_some_and(|t| t.start < cutoff_micros);
            if !old || record.seq >= head.seq {
                break 'scan;
            }
            last_old = Some((
                position,
                Link {
                    seq: record.seq,
                    hash: record.hash,
                },
            ));
        }
    }
    let Some((position, anchor)) = last_old else {
        return Ok(0);
    };
    // The anchor first: a crash before the trim leaves records the verifier skips.
    store
        .kv_apply(vec![KvOp::put(
            META,
            ANCHOR,
            serde_json::to_vec(&anchor).unwrap_or_default(),
        )])
        .await?;
    store.trim_records(STREAM, position).await
}

/// `fhirgate audit verify`: opens the store of `config`, checks the chain and prints what it
/// found; the exit code is 0 when the chain is intact, 1 when it is broken.
pub async fn verify_offline(config: &crate::config::Config) -> anyhow::Result<i32> {
    use anyhow::Context;
    let schema = crate::fhir::SchemaValidator::bundled()?;
    let search = Arc::new(crate::fhir::SearchRegistry::new(&schema));
    let data_dir = &config.store.data_dir;
    let cipher = crate::store::crypt::Cipher::from_config(&config.store.encryption, data_dir)?;
    let store = crate::store::EmbeddedStore::open_with_options(
        data_dir,
        search,
        config.server.request_timeout(),
        16 << 20,
        Some(Arc::new(cipher)),
    )
    .with_context(|| {
        format!(
            "opening the store in {} (is the server running? it answers GET /audit/verify)",
            data_dir.display()
        )
    })?;
    let answer = verify_chain(&store).await;
    store.close().await;
    Ok(match answer? {
        Ok(verified) => {
            match verified.first {
                Some(first) => println!(
                    "audit log intact: {} records, {first} to {}",
                    verified.records, verified.head.seq
                ),
                None => println!("audit log intact: no records"),
            }
            0
        }
        Err(tampered) => {
            println!(
                "audit log BROKEN at record {}: {}",
                tampered.seq, tampered.problem
            );
            1
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::{SchemaValidator, SearchRegistry};
    use crate::store::EmbeddedStore;

    #[test]
    fn the_writer_serializes_and_hashes_records_exactly_as_they_are_read_back() {
        let mut entry = Entry::now("key:ops", "api-key", "read");
        entry.resource_type = Some("Patient".into());
        entry.resource_id = Some("p1".into());
        entry.detail = Some("source upstream; params \"name\"".into());
        entry.outcome = 200;
        let mut record = Record {
            seq: 7,
            entry: entry.clone(),
            prev: "ab".repeat(32),
            hash: String::new(),
        };
        // The hash over the record with `hash` empty, as records written before had it.
        let unhashed = serde_json::to_vec(&record).expect("json");
        let expected = crate::hex(&Sha256::digest(&unhashed));
        record.hash = record.compute_hash();
        assert_eq!(record.hash, expected);
        let view = RecordView::new(7, &entry, &record.prev, &record.hash);
        assert_eq!(view.hash(), expected);
        assert_eq!(view.json(), serde_json::to_vec(&record).expect("json"));
        let back: Record = serde_json::from_slice(&view.json()).expect("a record");
        assert_eq!(back, record);
    }

    fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let registry = Arc::new(SearchRegistry::new(
            &SchemaValidator::bundled().expect("schema"),
        ));
        let store =
            EmbeddedStore::open(dir.path(), registry, Duration::from_secs(5)).expect("open");
        (dir, Arc::new(store))
    }

    fn entry_at(time: &str, action: &str) -> Entry {
        Entry {
            time: time.into(),
            who: "api-key:test".into(),
            via: "api-key".into(),
            action: action.into(),
            resource_type: Some("Patient".into()),
            resource_id: Some("p-1".into()),
            outcome: 200,
            ..Entry::default()
        }
    }

    #[tokio::test]
    async fn records_chain_across_restarts_and_verify() {
        let (_dir, store) = store();
        let log = AuditLog::start(store.clone(), 0).await.expect("start");
        for _ in 0..3 {
            log.record(entry_at("2026-01-01T00:00:00Z", "read")).await;
        }
        log.record_durably(entry_at("2026-01-01T00:00:01Z", "update"))
            .await;
        log.shutdown(Duration::from_secs(5)).await;
        // A second writer continues the same chain.
        let log = AuditLog::start(store.clone(), 0).await.expect("restart");
        log.record(entry_at("2026-01-02T00:00:00Z", "read")).await;
        let verified = log.verify().await.expect("store").expect("intact");
        assert_eq!(verified.records, 5);
        assert_eq!(verified.first, Some(1));
        assert_eq!(verified.head.seq, 5);
        let page = store.records(STREAM, 0, 10).await.expect("records");
        let records: Vec<Record> = page
            .iter()
            .map(|(_, p)| serde_json::from_slice(p).expect("record"))
            .collect();
        assert_eq!(records[0].prev, GENESIS);
        for pair in records.windows(2) {
            assert_eq!(pair[1].prev, pair[0].hash);
            assert_eq!(pair[1].seq, pair[0].seq + 1);
        }
    }

    #[tokio::test]
    async fn pruning_keeps_the_rest_verifiable() {
        let (_dir, store) = store();
        let log = AuditLog::start(store.clone(), 0).await.expect("start");
        for day in 1..=4 {
            log.record(entry_at(&format!("2020-01-0{day}T00:00:00Z"), "read"))
                .await;
        }
        log.record_durably(entry_at("2026-11-01T00:00:00Z", "read"))
            .await;
        let cutoff = crate::fhir::date::parse_range("2020-01-03")
            .expect("date")
            .start;
        assert_eq!(prune(store.as_ref(), cutoff).await.expect("prune"), 2);
        let verified = log.verify().await.expect("store").expect("intact");
        assert_eq!((verified.records, verified.first), (3, Some(3)));
        // Everything old: the newest record always stays.
        assert_eq!(prune(store.as_ref(), i64::MAX).await.expect("prune"), 2);
        let verified = log.verify().await.expect("store").expect("intact");
        assert_eq!((verified.records, verified.first), (1, Some(5)));
        log.shutdown(Duration::from_secs(5)).await;
    }

    #[test]
    fn audit_events_are_valid_r4() {
        let schema = SchemaValidator::bundled().expect("schema");
        let mut read = entry_at("2026-01-01T00:00:00Z", "read");
        read.source = Some("127.0.0.1".into());
        read.request_id = Some("8c1f".into());
        let mut refused = Entry::now("unauthenticated", "none", "login");
        refused.outcome = 401;
        refused.detail = Some("refused: unknown API key".into());
        let mut start = Entry::now("fhirgate", "system", "start");
        start.detail = Some("configuration sha256 00 (first start)".into());
        let mut intent = entry_at("2026-01-01T00:00:00Z", "update");
        intent.outcome = 0;
        for (seq, entry) in [read, refused, start, intent].into_iter().enumerate() {
            let record = Record {
                seq: seq as u64 + 1,
                entry,
                prev: GENESIS.into(),
                hash: GENESIS.into(),
            };
            let event = events::audit_event(&record);
            schema
                .validate(&event)
                .unwrap_or_else(|e| panic!("{event:#}: {:?}", e.to_operation_outcome()));
        }
    }
}
