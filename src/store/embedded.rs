//! The embedded store on redb: ACID, crash-safe, one file under the data folder.
//!
//! Reads open their own MVCC read transaction and never wait for writers. Writes go to a single
//! writer thread that groups whatever requests are waiting into one redb transaction and one
//! fsync ("group commit"), then answers each request; nothing is acknowledged before its commit
//! is durable. Conditional writes evaluate their search inside that write transaction, so two
//! concurrent conditional creates cannot both create.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::crypt::{self, Cipher};
use super::record;
use super::{
    Action, ChangeKind, KvOp, Mutation, Outcome, Page, ResourceVersion, SearchPage, Store,
    StoreError, WriteResult,
};
use crate::fhir::date::{format_instant, now_micros};
use crate::fhir::search::{ClauseKind, Probe, SearchQuery, Sort};
use crate::fhir::{new_id, rewrite_references, stamp, FhirError, SearchRegistry};

/// `Type/id` → header of the current version (version, time, change). The body lives once, in
/// `HISTORY`, so a write stores each resource's bytes once and type scans stay small.
const CURRENT: TableDefinition<&str, &[u8]> = TableDefinition::new("current");
/// (`Type/id`, version) → version record with its body.
const HISTORY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("history");
/// (`Type`, sequence) → (`id`, version): every change of a type, in order.
const CHANGES: TableDefinition<(&str, u64), (&str, u64)> = TableDefinition::new("changes");
/// `Type␟param␟key␟id` → (): token and reference search index.
const INDEX: TableDefinition<&str, ()> = TableDefinition::new("search_index");
/// `Type/id` → the index keys of its current version, newline-separated.
const INDEX_KEYS: TableDefinition<&str, &str> = TableDefinition::new("index_keys");
/// (stream, sequence) → payload: append-only records such as CDS card feedback.
const RECORDS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("records");
/// Counters that must survive restarts: the change sequence and the last timestamp issued.
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// Small durable records by (space, key): sync outbox, watermarks, job state.
const KV: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("kv");

/// Most write requests folded into one commit.
const MAX_GROUP: usize = 256;

fn backend<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// The embedded redb-backed store.
pub struct EmbeddedStore {
    db: Arc<Database>,
    /// Seals key-value data, records (but the audit log's) and, when configured, resources.
    cipher: Option<Arc<Cipher>>,
    registry: Arc<SearchRegistry>,
    jobs: mpsc::UnboundedSender<Message>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    ready: AtomicBool,
    /// Cleared by the writer thread when it exits for any reason, panics included.
    writer_alive: Arc<AtomicBool>,
    /// How long a write may wait in the queue before it is refused unapplied.
    write_timeout: Duration,
}

enum Message {
    Write(WriteJob),
    Shutdown,
}

struct WriteJob {
    mutations: Vec<Mutation>,
    atomic: bool,
    /// Records to append (stream, payload), for append jobs.
    appends: Vec<(String, Vec<u8>)>,
    /// Key-value changes, for kv jobs.
    kv: Vec<KvOp>,
    /// Whether the commit must reach the disk before the job is answered.
    durable: bool,
    /// A job still queued at this instant is answered [`StoreError::Expired`] and not applied,
    /// so a caller that gave up never has its write land behind its back.
    deadline: Instant,
    reply: oneshot::Sender<Result<JobResult, StoreError>>,
}

/// What the writer answers a job with.
enum JobResult {
    Write(WriteResult),
    Appended(Vec<u64>),
    Kv,
}

/// The page cache when none is configured: redb's own default (1 GiB) would let memory grow
/// far past what a gateway should hold.
pub const DEFAULT_CACHE_BYTES: usize = 32 << 20;

impl EmbeddedStore {
    /// Opens (or creates) `fhirgate.redb` under `data_dir`. After an unclean shutdown redb
    /// repairs the file on open; committed transactions survive. A write that waits in the queue
    /// longer than `write_timeout` is refused without being applied.
    pub fn open(
        data_dir: &Path,
        registry: Arc<SearchRegistry>,
        write_timeout: Duration,
    ) -> Result<Self, StoreError> {
        Self::open_with_cache(data_dir, registry, write_timeout, DEFAULT_CACHE_BYTES)
    }

    /// Like [`EmbeddedStore::open`], with the page cache bounded at `cache_bytes`.
    pub fn open_with_cache(
        data_dir: &Path,
        registry: Arc<SearchRegistry>,
        write_timeout: Duration,
        cache_bytes: usize,
    ) -> Result<Self, StoreError> {
        Self::open_with_options(data_dir, registry, write_timeout, cache_bytes, None)
    }

    /// Like [`EmbeddedStore::open_with_cache`], sealing what it stores with `cipher`.
    pub fn open_with_options(
        data_dir: &Path,
        registry: Arc<SearchRegistry>,
        write_timeout: Duration,
        cache_bytes: usize,
        cipher: Option<Arc<Cipher>>,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(backend)?;
        let db = Arc::new(
            redb::Builder::new()
                .set_cache_size(cache_bytes)
                .create(data_dir.join("fhirgate.redb"))
                .map_err(backend)?,
        );
        {
            // Create every table up front so read transactions never find one missing.
            let txn = db.begin_write().map_err(backend)?;
            txn.open_table(CURRENT).map_err(backend)?;
            txn.open_table(HISTORY).map_err(backend)?;
            txn.open_table(CHANGES).map_err(backend)?;
            txn.open_table(INDEX).map_err(backend)?;
            txn.open_table(INDEX_KEYS).map_err(backend)?;
            txn.open_table(COUNTERS).map_err(backend)?;
            txn.open_table(RECORDS).map_err(backend)?;
            txn.open_table(KV).map_err(backend)?;
            txn.commit().map_err(backend)?;
        }
        let (jobs, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            db: db.clone(),
            cipher: cipher.clone(),
            registry: registry.clone(),
        };
        let writer_alive = Arc::new(AtomicBool::new(true));
        let alive = AliveGuard(writer_alive.clone());
        let handle = std::thread::Builder::new()
            .name("fhirgate-store-writer".into())
            .spawn(move || {
                let _alive = alive;
                writer.run(rx)
            })
            .map_err(backend)?;
        Ok(Self {
            db,
            cipher,
            registry,
            jobs,
            writer: Mutex::new(Some(handle)),
            ready: AtomicBool::new(true),
            writer_alive,
            write_timeout,
        })
    }

    pub fn registry(&self) -> &Arc<SearchRegistry> {
        &self.registry
    }

    fn ensure_open(&self) -> Result<(), StoreError> {
        if self.is_ready() {
            Ok(())
        } else {
            Err(StoreError::Closed)
        }
    }

    /// Hands one job to the writer thread and waits for its durable result.
    async fn submit(
        &self,
        op: &'static str,
        mutations: Vec<Mutation>,
        atomic: bool,
        appends: Vec<(String, Vec<u8>)>,
        kv: Vec<KvOp>,
    ) -> Result<JobResult, StoreError> {
        self.submit_with(op, mutations, atomic, appends, kv, true)
            .await
    }

    /// Like [`EmbeddedStore::submit`]; a job that is not `durable` shares a commit without
    /// flushing it to disk, unless a durable job is in the same group.
    async fn submit_with(
        &self,
        op: &'static str,
        mutations: Vec<Mutation>,
        atomic: bool,
        appends: Vec<(String, Vec<u8>)>,
        kv: Vec<KvOp>,
        durable: bool,
    ) -> Result<JobResult, StoreError> {
        self.ensure_open()?;
        let started = Instant::now();
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Message::Write(WriteJob {
                mutations,
                atomic,
                appends,
                kv,
                durable,
                deadline: started + self.write_timeout,
                reply,
            }))
            .map_err(|_| StoreError::Closed)?;
        let result = answer.await.map_err(|_| StoreError::Closed)?;
        observe(op, started);
        result
    }

    async fn blocking<T, F>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        self.ensure_open()?;
        let db = self.db.clone();
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(backend)?;
        observe(op, started);
        result
    }
}

/// Marks the writer dead when its thread ends, however it ends.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

fn observe(op: &'static str, started: Instant) {
    metrics::counter!("fhirgate_store_operations_total", "op" => op).increment(1);
    metrics::histogram!("fhirgate_store_operation_duration_seconds", "op" => op)
        .record(started.elapsed().as_secs_f64());
}

fn resource_key(resource_type: &str, id: &str) -> String {
    format!("{resource_type}/{id}")
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn read(
        &self,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<ResourceVersion>, StoreError> {
        self.ensure_open()?;
        let started = Instant::now();
        let txn = self.db.begin_read().map_err(backend)?;
        let current = txn.open_table(CURRENT).map_err(backend)?;
        let history = txn.open_table(HISTORY).map_err(backend)?;
        let found = load_current(
            &current,
            &history,
            resource_type,
            id,
            self.cipher.as_deref(),
        );
        observe("read", started);
        found
    }

    async fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version: u64,
    ) -> Result<Option<ResourceVersion>, StoreError> {
        self.ensure_open()?;
        let started = Instant::now();
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(HISTORY).map_err(backend)?;
        let key = resource_key(resource_type, id);
        let found = table
            .get((key.as_str(), version))
            .map_err(backend)?
            .map(|guard| record::decode(resource_type, id, guard.value(), self.cipher.as_deref()))
            .transpose();
        observe("vread", started);
        found
    }

    async fn history(
        &self,
        resource_type: &str,
        id: Option<&str>,
        since: Option<i64>,
        page: Page,
    ) -> Result<SearchPage, StoreError> {
        let resource_type = resource_type.to_owned();
        let id = id.map(str::to_owned);
        let cipher = self.cipher.clone();
        self.blocking("history", move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let history = txn.open_table(HISTORY).map_err(backend)?;
            // (id, version) pairs, newest first.
            let mut versions: Vec<(String, u64)> = Vec::new();
            match &id {
                Some(id) => {
                    let key = resource_key(&resource_type, id);
                    for item in history
                        .range((key.as_str(), 0)..=(key.as_str(), u64::MAX))
                        .map_err(backend)?
                        .rev()
                    {
                        let (k, _) = item.map_err(backend)?;
                        versions.push((id.clone(), k.value().1));
                    }
                }
                None => {
                    let changes = txn.open_table(CHANGES).map_err(backend)?;
                    for item in changes
                        .range((resource_type.as_str(), 0)..=(resource_type.as_str(), u64::MAX))
                        .map_err(backend)?
                        .rev()
                    {
                        let (_, v) = item.map_err(backend)?;
                        let (id, version) = v.value();
                        versions.push((id.to_owned(), version));
                    }
                }
            }
            let mut entries = Vec::new();
            let mut total = 0;
            for (id, version) in versions {
                let key = resource_key(&resource_type, &id);
                let Some(guard) = history.get((key.as_str(), version)).map_err(backend)? else {
                    continue;
                };
                let bytes = guard.value();
                if let Some(since) = since {
                    if record::header(bytes)?.last_updated < since {
                        continue;
                    }
                }
                if total >= page.offset && entries.len() < page.count {
                    entries.push(record::decode(
                        &resource_type,
                        &id,
                        bytes,
                        cipher.as_deref(),
                    )?);
                }
                total += 1;
            }
            Ok(SearchPage { total, entries })
        })
        .await
    }

    async fn search(
        &self,
        resource_type: &str,
        query: &SearchQuery,
        page: Page,
    ) -> Result<SearchPage, StoreError> {
        let resource_type = resource_type.to_owned();
        let query = query.clone();
        let cipher = self.cipher.clone();
        self.blocking("search", move |db| {
            let cipher = cipher.as_deref();
            let txn = db.begin_read().map_err(backend)?;
            let current = txn.open_table(CURRENT).map_err(backend)?;
            let history = txn.open_table(HISTORY).map_err(backend)?;
            let index = txn.open_table(INDEX).map_err(backend)?;
            let mut matches =
                find_matches(&current, &history, &index, &resource_type, &query, cipher)?;
            sort_matches(&mut matches, query.sort);
            let total = matches.len();
            let mut entries = Vec::new();
            for m in matches.iter().skip(page.offset).take(page.count) {
                if let Some(rv) = load_current(&current, &history, &resource_type, &m.id, cipher)? {
                    entries.push(rv);
                }
            }
            Ok(SearchPage { total, entries })
        })
        .await
    }

    async fn write(
        &self,
        mutations: Vec<Mutation>,
        atomic: bool,
    ) -> Result<WriteResult, StoreError> {
        match self
            .submit("write", mutations, atomic, Vec::new(), Vec::new())
            .await?
        {
            JobResult::Write(result) => Ok(result),
            _ => Err(StoreError::Corrupt("unexpected writer answer".into())),
        }
    }

    async fn append(&self, stream: &str, payload: Vec<u8>) -> Result<u64, StoreError> {
        let appends = vec![(stream.to_owned(), payload)];
        match self
            .submit("append", Vec::new(), true, appends, Vec::new())
            .await?
        {
            JobResult::Appended(mut seqs) => {
                seqs.pop().ok_or(StoreError::Corrupt("no sequence".into()))
            }
            _ => Err(StoreError::Corrupt("unexpected writer answer".into())),
        }
    }

    async fn append_with(
        &self,
        stream: &str,
        payloads: Vec<Vec<u8>>,
        kv: Vec<KvOp>,
        durable: bool,
    ) -> Result<Vec<u64>, StoreError> {
        if payloads.is_empty() {
            self.kv_apply(kv).await?;
            return Ok(Vec::new());
        }
        let appends = payloads
            .into_iter()
            .map(|p| (stream.to_owned(), p))
            .collect();
        match self
            .submit_with("append", Vec::new(), true, appends, kv, durable)
            .await?
        {
            JobResult::Appended(seqs) => Ok(seqs),
            _ => Err(StoreError::Corrupt("unexpected writer answer".into())),
        }
    }

    async fn trim_records(&self, stream: &str, through: u64) -> Result<u64, StoreError> {
        let stream = stream.to_owned();
        // A write transaction of its own: redb runs write transactions one at a time, so this
        // waits for the writer thread's current commit rather than racing it.
        self.blocking("trim_records", move |db| {
            let txn = db.begin_write().map_err(backend)?;
            let removed = {
                let mut table = txn.open_table(RECORDS).map_err(backend)?;
                let keys: Vec<u64> = table
                    .range((stream.as_str(), 0)..=(stream.as_str(), through))
                    .map_err(backend)?
                    .map(|item| item.map(|(k, _)| k.value().1))
                    .collect::<Result<_, _>>()
                    .map_err(backend)?;
                for seq in &keys {
                    table.remove((stream.as_str(), *seq)).map_err(backend)?;
                }
                keys.len() as u64
            };
            txn.commit().map_err(backend)?;
            Ok(removed)
        })
        .await
    }

    async fn kv_apply(&self, ops: Vec<KvOp>) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        match self
            .submit("kv_apply", Vec::new(), true, Vec::new(), ops)
            .await?
        {
            JobResult::Kv => Ok(()),
            _ => Err(StoreError::Corrupt("unexpected writer answer".into())),
        }
    }

    async fn kv_get(
        &self,
        space: &str,
        keys: Vec<String>,
    ) -> Result<Vec<Option<Bytes>>, StoreError> {
        let space = space.to_owned();
        let cipher = self.cipher.clone();
        self.blocking("kv_get", move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(KV).map_err(backend)?;
            keys.iter()
                .map(|key| {
                    table
                        .get((space.as_str(), key.as_str()))
                        .map_err(backend)?
                        .map(|v| open_kv(cipher.as_deref(), &space, key, v.value()))
                        .transpose()
                })
                .collect()
        })
        .await
    }

    async fn kv_scan(
        &self,
        space: &str,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<(String, Bytes)>, StoreError> {
        let space = space.to_owned();
        let cipher = self.cipher.clone();
        self.blocking("kv_scan", move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(KV).map_err(backend)?;
            let start = after.as_deref().unwrap_or("");
            let mut out = Vec::new();
            for item in table.range((space.as_str(), start)..).map_err(backend)? {
                let (k, v) = item.map_err(backend)?;
                let (item_space, key) = k.value();
                if item_space != space {
                    break;
                }
                if after.is_some() && key == start {
                    continue;
                }
                out.push((
                    key.to_owned(),
                    open_kv(cipher.as_deref(), &space, key, v.value())?,
                ));
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    async fn records(
        &self,
        stream: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Bytes)>, StoreError> {
        let stream = stream.to_owned();
        let cipher = self.cipher.clone();
        self.blocking("records", move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(RECORDS).map_err(backend)?;
            let mut out = Vec::new();
            for item in table
                .range((stream.as_str(), after.saturating_add(1))..=(stream.as_str(), u64::MAX))
                .map_err(backend)?
                .take(limit)
            {
                let (k, v) = item.map_err(backend)?;
                let seq = k.value().1;
                let payload = match cipher.as_deref() {
                    Some(c) if sealed_stream(&stream) => {
                        Bytes::from(c.open_sealed(&crypt::record_aad(&stream, seq), v.value())?)
                    }
                    _ => Bytes::copy_from_slice(v.value()),
                };
                out.push((seq, payload));
            }
            Ok(out)
        })
        .await
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.writer_alive.load(Ordering::Acquire)
    }

    async fn close(&self) {
        if !self.ready.swap(false, Ordering::AcqRel) {
            return;
        }
        // The writer finishes every job queued before this message, then exits.
        let _ = self.jobs.send(Message::Shutdown);
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        let _ = self.jobs.send(Message::Shutdown);
        if let Some(handle) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = handle.join();
        }
    }
}

/// Whether `stream`'s records are sealed: all but the audit log's, which holds no resource
/// content or search values and whose chain is protected by its sealed head.
fn sealed_stream(stream: &str) -> bool {
    stream != crate::audit::STREAM
}

fn open_kv(
    cipher: Option<&Cipher>,
    space: &str,
    key: &str,
    stored: &[u8],
) -> Result<Bytes, StoreError> {
    Ok(match cipher {
        Some(c) => Bytes::from(c.open_sealed(&crypt::kv_aad(space, key), stored)?),
        None => Bytes::copy_from_slice(stored),
    })
}

/// The current version of `Type/id`, with its body from `HISTORY`.
fn load_current<C, H>(
    current: &C,
    history: &H,
    resource_type: &str,
    id: &str,
    cipher: Option<&Cipher>,
) -> Result<Option<ResourceVersion>, StoreError>
where
    C: ReadableTable<&'static str, &'static [u8]>,
    H: ReadableTable<(&'static str, u64), &'static [u8]>,
{
    let key = resource_key(resource_type, id);
    let Some(head) = current.get(key.as_str()).map_err(backend)? else {
        return Ok(None);
    };
    let header = record::header(head.value())?;
    let guard = history
        .get((key.as_str(), header.version))
        .map_err(backend)?
        .ok_or_else(|| StoreError::Corrupt(format!("{key} lost version {}", header.version)))?;
    record::decode(resource_type, id, guard.value(), cipher).map(Some)
}

/// A search hit before paging.
struct Match {
    id: String,
    last_updated: i64,
}

/// Finds the current, non-deleted resources of `resource_type` matching `query`, using the
/// index where a clause allows and checking the rest against each candidate. Works on read and
/// write transactions alike.
fn find_matches<C, H, I>(
    current: &C,
    history: &H,
    index: &I,
    resource_type: &str,
    query: &SearchQuery,
    cipher: Option<&Cipher>,
) -> Result<Vec<Match>, StoreError>
where
    C: ReadableTable<&'static str, &'static [u8]>,
    H: ReadableTable<(&'static str, u64), &'static [u8]>,
    I: ReadableTable<&'static str, ()>,
{
    let mut candidates: Option<BTreeSet<String>> = None;
    let mut residual = Vec::new();
    for clause in &query.clauses {
        let ids: BTreeSet<String> = match (&clause.kind, clause.probes()) {
            (ClauseKind::Id(ids), _) => ids.iter().cloned().collect(),
            (_, Some(probes)) => {
                let mut ids = BTreeSet::new();
                for probe in probes {
                    probe_index(index, resource_type, &probe, &mut ids)?;
                }
                ids
            }
            (_, None) => {
                residual.push(clause);
                continue;
            }
        };
        candidates = Some(match candidates {
            None => ids,
            Some(previous) => previous.intersection(&ids).cloned().collect(),
        });
    }
    let needs_body = residual.iter().any(|c| c.needs_body());
    let mut matches = Vec::new();
    let mut consider = |id: &str, bytes: &[u8]| -> Result<(), StoreError> {
        let header = record::header(bytes)?;
        if header.change == ChangeKind::Delete {
            return Ok(());
        }
        let body: Option<Value> = if needs_body {
            let key = resource_key(resource_type, id);
            let guard = history
                .get((key.as_str(), header.version))
                .map_err(backend)?
                .ok_or_else(|| StoreError::Corrupt(format!("{key} lost its current version")))?;
            Some(
                serde_json::from_slice(&record::open_body(
                    cipher,
                    resource_type,
                    id,
                    header.version,
                    record::body(guard.value()),
                )?)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            )
        } else {
            None
        };
        if residual
            .iter()
            .all(|c| c.matches(body.as_ref(), id, header.last_updated))
        {
            matches.push(Match {
                id: id.to_owned(),
                last_updated: header.last_updated,
            });
        }
        Ok(())
    };
    match candidates {
        Some(ids) => {
            for id in ids {
                let key = resource_key(resource_type, &id);
                if let Some(guard) = current.get(key.as_str()).map_err(backend)? {
                    consider(&id, guard.value())?;
                }
            }
        }
        None => {
            let start = format!("{resource_type}/");
            let end = format!("{resource_type}0");
            for item in current
                .range(start.as_str()..end.as_str())
                .map_err(backend)?
            {
                let (k, v) = item.map_err(backend)?;
                let id = &k.value()[start.len()..];
                consider(id, v.value())?;
            }
        }
    }
    Ok(matches)
}

fn probe_index<I>(
    index: &I,
    resource_type: &str,
    probe: &Probe,
    ids: &mut BTreeSet<String>,
) -> Result<(), StoreError>
where
    I: ReadableTable<&'static str, ()>,
{
    let prefix = match probe {
        Probe::Exact(key) => format!("{resource_type}\u{1f}{key}\u{1f}"),
        Probe::Prefix(key) => format!("{resource_type}\u{1f}{key}"),
    };
    let mut end = prefix.clone();
    end.push('\u{10FFFF}');
    for item in index
        .range(prefix.as_str()..end.as_str())
        .map_err(backend)?
    {
        let (k, _) = item.map_err(backend)?;
        if let Some((_, id)) = k.value().rsplit_once('\u{1f}') {
            ids.insert(id.to_owned());
        }
    }
    Ok(())
}

fn sort_matches(matches: &mut [Match], sort: Option<Sort>) {
    match sort {
        None | Some(Sort::Id { descending: false }) => {}
        Some(Sort::Id { descending: true }) => matches.reverse(),
        Some(Sort::LastUpdated { descending }) => {
            matches.sort_by(|a, b| {
                a.last_updated
                    .cmp(&b.last_updated)
                    .then_with(|| a.id.cmp(&b.id))
            });
            if descending {
                matches.reverse();
            }
        }
    }
}

/// The writer thread's state.
struct Writer {
    db: Arc<Database>,
    cipher: Option<Arc<Cipher>>,
    registry: Arc<SearchRegistry>,
}

/// The tables of one write transaction.
struct Tables<'txn> {
    current: redb::Table<'txn, &'static str, &'static [u8]>,
    history: redb::Table<'txn, (&'static str, u64), &'static [u8]>,
    changes: redb::Table<'txn, (&'static str, u64), (&'static str, u64)>,
    index: redb::Table<'txn, &'static str, ()>,
    index_keys: redb::Table<'txn, &'static str, &'static str>,
}

/// Monotonic clock and change sequence, persisted with each commit.
struct Counters {
    seq: u64,
    clock: i64,
}

impl Counters {
    /// A timestamp strictly after every one issued before, even if the wall clock steps back.
    fn tick(&mut self) -> i64 {
        self.clock = now_micros().max(self.clock + 1);
        self.clock
    }
}

/// A mutation after its preconditions were checked, before anything is written.
enum Planned {
    Write {
        resource_type: String,
        id: String,
        resource: Value,
        previous: u64,
        change: ChangeKind,
        existing: bool,
    },
    Delete {
        resource_type: String,
        id: String,
        previous: u64,
    },
    Existing(ResourceVersion),
    /// The same resource as the earlier entry at this index of the transaction.
    SameAs(usize),
    NothingToDelete,
}

impl Writer {
    fn run(self, mut rx: mpsc::UnboundedReceiver<Message>) {
        while let Some(message) = rx.blocking_recv() {
            let Message::Write(first) = message else {
                break;
            };
            let mut jobs = vec![first];
            let mut stop = false;
            while jobs.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(Message::Write(job)) => jobs.push(job),
                    Ok(Message::Shutdown) => {
                        stop = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            let (mut jobs, expired): (Vec<WriteJob>, Vec<WriteJob>) =
                jobs.into_iter().partition(|job| job.deadline > now);
            for job in expired {
                metrics::counter!("fhirgate_store_writes_expired_total").increment(1);
                let _ = job.reply.send(Err(StoreError::Expired));
            }
            if jobs.is_empty() {
                if stop {
                    break;
                }
                continue;
            }
            let results = self.commit_group(&mut jobs);
            metrics::histogram!("fhirgate_store_group_commit_size").record(jobs.len() as f64);
            match results {
                Ok(results) => {
                    for (job, result) in jobs.into_iter().zip(results) {
                        let _ = job.reply.send(Ok(result));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "store commit failed; no write of the group was acknowledged");
                    for job in jobs {
                        let _ = job.reply.send(Err(StoreError::Backend(e.to_string())));
                    }
                }
            }
            if stop {
                break;
            }
        }
    }

    /// Runs every job in one write transaction and commits it, durably unless no job needs
    /// that.
    fn commit_group(&self, jobs: &mut [WriteJob]) -> Result<Vec<JobResult>, StoreError> {
        let mut txn = self.db.begin_write().map_err(backend)?;
        if !jobs.iter().any(|job| job.durable) {
            txn.set_durability(redb::Durability::None)
                .map_err(backend)?;
        }
        let results = {
            let mut counters_table = txn.open_table(COUNTERS).map_err(backend)?;
            let mut counters = Counters {
                seq: counters_table
                    .get("seq")
                    .map_err(backend)?
                    .map_or(0, |g| g.value()),
                clock: counters_table
                    .get("clock")
                    .map_err(backend)?
                    .map_or(0, |g| g.value() as i64),
            };
            let mut tables = Tables {
                current: txn.open_table(CURRENT).map_err(backend)?,
                history: txn.open_table(HISTORY).map_err(backend)?,
                changes: txn.open_table(CHANGES).map_err(backend)?,
                index: txn.open_table(INDEX).map_err(backend)?,
                index_keys: txn.open_table(INDEX_KEYS).map_err(backend)?,
            };
            let mut records = txn.open_table(RECORDS).map_err(backend)?;
            let mut kv = txn.open_table(KV).map_err(backend)?;
            let mut results = Vec::with_capacity(jobs.len());
            for job in jobs.iter_mut() {
                if !job.kv.is_empty() {
                    for op in std::mem::take(&mut job.kv) {
                        match op.value {
                            Some(value) => {
                                let value = match &self.cipher {
                                    Some(c) => c.seal(&crypt::kv_aad(op.space, &op.key), &value),
                                    None => value,
                                };
                                kv.insert((op.space, op.key.as_str()), value.as_slice())
                                    .map_err(backend)?;
                            }
                            None => {
                                kv.remove((op.space, op.key.as_str())).map_err(backend)?;
                            }
                        }
                    }
                    if job.appends.is_empty() {
                        results.push(JobResult::Kv);
                        continue;
                    }
                }
                if !job.appends.is_empty() {
                    let mut seqs = Vec::new();
                    for (stream, payload) in std::mem::take(&mut job.appends) {
                        let last = records
                            .range((stream.as_str(), 0)..=(stream.as_str(), u64::MAX))
                            .map_err(backend)?
                            .next_back()
                            .transpose()
                            .map_err(backend)?
                            .map_or(0, |(k, _)| k.value().1);
                        let payload = match &self.cipher {
                            Some(c) if sealed_stream(&stream) => {
                                c.seal(&crypt::record_aad(&stream, last + 1), &payload)
                            }
                            _ => payload,
                        };
                        records
                            .insert((stream.as_str(), last + 1), payload.as_slice())
                            .map_err(backend)?;
                        seqs.push(last + 1);
                    }
                    results.push(JobResult::Appended(seqs));
                    continue;
                }
                let mutations = std::mem::take(&mut job.mutations);
                let result = if job.atomic {
                    self.apply_atomic(&mut tables, &mut counters, mutations)?
                } else {
                    let mut each = Vec::with_capacity(mutations.len());
                    for mutation in mutations {
                        each.push(
                            match self.apply_atomic(&mut tables, &mut counters, vec![mutation])? {
                                WriteResult::Committed(mut outcomes) => {
                                    outcomes.pop().ok_or_else(|| {
                                        FhirError::internal("write produced no outcome")
                                    })
                                }
                                WriteResult::Aborted { error, .. } => Err(error),
                                WriteResult::Each(_) => {
                                    Err(FhirError::internal("unexpected write result"))
                                }
                            },
                        );
                    }
                    WriteResult::Each(each)
                };
                results.push(JobResult::Write(result));
            }
            counters_table
                .insert("seq", counters.seq)
                .map_err(backend)?;
            counters_table
                .insert("clock", counters.clock as u64)
                .map_err(backend)?;
            results
        };
        txn.commit().map_err(backend)?;
        Ok(results)
    }

    /// Plans, resolves references and applies `mutations` all-or-nothing. `Err` only for
    /// storage failures; FHIR rule violations come back as [`WriteResult::Aborted`].
    fn apply_atomic(
        &self,
        tables: &mut Tables<'_>,
        counters: &mut Counters,
        mutations: Vec<Mutation>,
    ) -> Result<WriteResult, StoreError> {
        let mut planned = Vec::with_capacity(mutations.len());
        let mut aliases: HashMap<String, String> = HashMap::new();
        let mut targets: HashSet<String> = HashSet::new();
        for (index, mutation) in mutations.into_iter().enumerate() {
            let full_url = mutation.full_url.clone();
            let condition = match &mutation.action {
                Action::Create {
                    if_none_exist: Some(query),
                    ..
                } => Some(query.clone()),
                _ => None,
            };
            let mut plan = match self.plan(tables, mutation)? {
                Ok(plan) => plan,
                Err(error) => return Ok(WriteResult::Aborted { index, error }),
            };
            // A conditional create that matches nothing stored may match a resource an earlier
            // entry of this transaction creates; then it is that resource, not a second one.
            if let (Some(query), Planned::Write { resource_type, .. }) = (&condition, &plan) {
                let earlier = planned.iter().position(|p| match p {
                    Planned::Write {
                        resource_type: rt,
                        id,
                        resource,
                        ..
                    } => {
                        rt == resource_type
                            && query
                                .clauses
                                .iter()
                                .all(|c| c.matches(Some(resource), id, 0))
                    }
                    _ => false,
                });
                if let Some(earlier) = earlier {
                    plan = Planned::SameAs(earlier);
                }
            }
            let target = match &plan {
                Planned::Write {
                    resource_type, id, ..
                }
                | Planned::Delete {
                    resource_type, id, ..
                } => Some(resource_key(resource_type, id)),
                Planned::Existing(rv) => Some(resource_key(&rv.resource_type, &rv.id)),
                Planned::SameAs(earlier) => match &planned[*earlier] {
                    Planned::Write {
                        resource_type, id, ..
                    } => Some(resource_key(resource_type, id)),
                    _ => None,
                },
                Planned::NothingToDelete => None,
            };
            if let Some(target) = &target {
                let writes = !matches!(plan, Planned::Existing(_) | Planned::SameAs(_));
                if writes && !targets.insert(target.clone()) {
                    return Ok(WriteResult::Aborted {
                        index,
                        error: FhirError::bad_request(
                            "duplicate",
                            format!(
                                "{target} is changed by more than one entry of the transaction"
                            ),
                        ),
                    });
                }
                if let Some(url) = full_url {
                    aliases.insert(url, target.clone());
                }
            }
            planned.push(plan);
        }

        // Point references at the final ids: fullUrl aliases, then conditional references.
        for (index, plan) in planned.iter_mut().enumerate() {
            let Planned::Write { resource, .. } = plan else {
                continue;
            };
            let mut failure = None;
            rewrite_references(resource, &mut |reference| {
                if let Some(target) = aliases.get(reference) {
                    return Some(target.clone());
                }
                if failure.is_some() || !is_conditional_reference(reference) {
                    return None;
                }
                match self.resolve_conditional_reference(tables, reference) {
                    Ok(Ok(target)) => Some(target),
                    Ok(Err(e)) => {
                        failure = Some(Ok(e));
                        None
                    }
                    Err(e) => {
                        failure = Some(Err(e));
                        None
                    }
                }
            });
            match failure {
                Some(Ok(error)) => return Ok(WriteResult::Aborted { index, error }),
                Some(Err(storage)) => return Err(storage),
                None => {}
            }
        }

        let at = counters.tick();
        let mut outcomes = Vec::with_capacity(planned.len());
        for plan in planned {
            outcomes.push(match plan {
                Planned::Existing(rv) => Outcome::Existing(rv),
                Planned::SameAs(earlier) => match outcomes.get(earlier) {
                    Some(Outcome::Created(rv) | Outcome::Updated(rv)) => {
                        Outcome::Existing(rv.clone())
                    }
                    _ => {
                        return Err(StoreError::Corrupt(
                            "conditional create lost its match".into(),
                        ))
                    }
                },
                Planned::NothingToDelete => Outcome::Deleted(None),
                Planned::Write {
                    resource_type,
                    id,
                    mut resource,
                    previous,
                    change,
                    existing,
                } => {
                    let version = previous + 1;
                    stamp(&mut resource, &id, version, &format_instant(at));
                    let body = serde_json::to_vec(&resource).map_err(backend)?;
                    let keys = self.registry.index_keys(&resource_type, &resource);
                    let rv = self.put_version(
                        tables,
                        counters,
                        &resource_type,
                        &id,
                        version,
                        at,
                        change,
                        body,
                        &keys,
                    )?;
                    if existing {
                        Outcome::Updated(rv)
                    } else {
                        Outcome::Created(rv)
                    }
                }
                Planned::Delete {
                    resource_type,
                    id,
                    previous,
                } => {
                    let rv = self.put_version(
                        tables,
                        counters,
                        &resource_type,
                        &id,
                        previous + 1,
                        at,
                        ChangeKind::Delete,
                        Vec::new(),
                        &[],
                    )?;
                    Outcome::Deleted(Some(rv))
                }
            });
        }
        Ok(WriteResult::Committed(outcomes))
    }

    /// Checks one mutation's preconditions against the current state.
    fn plan(
        &self,
        tables: &Tables<'_>,
        mutation: Mutation,
    ) -> Result<Result<Planned, FhirError>, StoreError> {
        let Mutation {
            resource_type,
            action,
            ..
        } = mutation;
        let cipher = self.cipher.as_deref();
        let current =
            |id: &str| load_current(&tables.current, &tables.history, &resource_type, id, cipher);
        let live = |rv: &Option<ResourceVersion>| rv.as_ref().is_some_and(|r| !r.is_deleted());
        Ok(match action {
            Action::Create {
                id,
                resource,
                if_none_exist,
            } => {
                if let Some(query) = if_none_exist {
                    let found = find_matches(
                        &tables.current,
                        &tables.history,
                        &tables.index,
                        &resource_type,
                        &query,
                        self.cipher.as_deref(),
                    )?;
                    match found.as_slice() {
                        [] => {}
                        [one] => {
                            return Ok(match current(&one.id)? {
                                Some(rv) => Ok(Planned::Existing(rv)),
                                None => {
                                    Err(FhirError::internal("index points at a missing resource"))
                                }
                            })
                        }
                        many => {
                            return Ok(Err(FhirError::precondition_failed(format!(
                                "If-None-Exist matched {} {resource_type} resources",
                                many.len()
                            ))))
                        }
                    }
                }
                let id = id.unwrap_or_else(new_id);
                let existing = current(&id)?;
                if live(&existing) {
                    return Ok(Err(FhirError::conflict(format!(
                        "{resource_type}/{id} already exists"
                    ))));
                }
                Ok(Planned::Write {
                    previous: existing.map_or(0, |r| r.version),
                    resource_type,
                    id,
                    resource,
                    change: ChangeKind::Create,
                    existing: false,
                })
            }
            Action::Update {
                id,
                resource,
                if_match,
            } => {
                let existing = current(&id)?;
                if let Err(e) = check_version(&resource_type, &id, existing.as_ref(), if_match) {
                    return Ok(Err(e));
                }
                Ok(upsert(resource_type, id, resource, existing))
            }
            Action::ConditionalUpdate {
                query,
                resource,
                if_match,
            } => {
                let found = find_matches(
                    &tables.current,
                    &tables.history,
                    &tables.index,
                    &resource_type,
                    &query,
                    self.cipher.as_deref(),
                )?;
                let body_id = resource
                    .get("id")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                let id = match found.as_slice() {
                    [] => match body_id {
                        // Nothing matches, so the body's id must not name a resource that exists:
                        // the condition said this is not that resource.
                        Some(id) if live(&current(&id)?) => {
                            return Ok(Err(FhirError::conflict(format!(
                                "no {resource_type} matches the condition, but {resource_type}/{id} exists"
                            ))
                            .at(format!("{resource_type}.id"))))
                        }
                        Some(id) => id,
                        None => new_id(),
                    },
                    [one] => {
                        if body_id.as_deref().is_some_and(|b| b != one.id) {
                            return Ok(Err(FhirError::bad_request(
                                "invalid",
                                format!(
                                    "the resource id does not match the {resource_type} the condition selects"
                                ),
                            )
                            .at(format!("{resource_type}.id"))));
                        }
                        one.id.clone()
                    }
                    many => {
                        return Ok(Err(FhirError::precondition_failed(format!(
                            "the condition matched {} {resource_type} resources",
                            many.len()
                        ))))
                    }
                };
                let existing = current(&id)?;
                if let Err(e) = check_version(&resource_type, &id, existing.as_ref(), if_match) {
                    return Ok(Err(e));
                }
                Ok(upsert(resource_type, id, resource, existing))
            }
            Action::Delete { id, if_match } => {
                let existing = current(&id)?;
                if let Err(e) = check_version(&resource_type, &id, existing.as_ref(), if_match) {
                    return Ok(Err(e));
                }
                match existing {
                    Some(rv) if !rv.is_deleted() => Ok(Planned::Delete {
                        resource_type,
                        id,
                        previous: rv.version,
                    }),
                    _ => Ok(Planned::NothingToDelete),
                }
            }
        })
    }

    /// `Patient?identifier=sys|val` → `Patient/{id}` of the single match.
    fn resolve_conditional_reference(
        &self,
        tables: &Tables<'_>,
        reference: &str,
    ) -> Result<Result<String, FhirError>, StoreError> {
        let Some((resource_type, query_string)) = reference.split_once('?') else {
            return Ok(Err(FhirError::bad_request(
                "invalid",
                "not a conditional reference",
            )));
        };
        let pairs: Vec<(String, String)> = match serde_urlencoded::from_str(query_string) {
            Ok(pairs) => pairs,
            Err(e) => {
                return Ok(Err(FhirError::bad_request(
                    "invalid",
                    format!("conditional reference '{reference}': {e}"),
                )))
            }
        };
        let query = match self.registry.parse_condition(resource_type, &pairs) {
            Ok(q) => q,
            Err(e) => return Ok(Err(e)),
        };
        let found = find_matches(
            &tables.current,
            &tables.history,
            &tables.index,
            resource_type,
            &query,
            self.cipher.as_deref(),
        )?;
        Ok(match found.as_slice() {
            [one] => Ok(resource_key(resource_type, &one.id)),
            found => Err(FhirError::precondition_failed(format!(
                "conditional reference '{reference}' matched {} resources; exactly one is required",
                found.len()
            ))),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn put_version(
        &self,
        tables: &mut Tables<'_>,
        counters: &mut Counters,
        resource_type: &str,
        id: &str,
        version: u64,
        at: i64,
        change: ChangeKind,
        body: Vec<u8>,
        keys: &[String],
    ) -> Result<ResourceVersion, StoreError> {
        let key = resource_key(resource_type, id);
        let body = record::seal_body(self.cipher.as_deref(), resource_type, id, version, body);
        let bytes = record::encode(change, version, at, &body);
        let header = record::encode(change, version, at, &[]);
        tables
            .current
            .insert(key.as_str(), header.as_slice())
            .map_err(backend)?;
        tables
            .history
            .insert((key.as_str(), version), bytes.as_slice())
            .map_err(backend)?;
        counters.seq += 1;
        tables
            .changes
            .insert((resource_type, counters.seq), (id, version))
            .map_err(backend)?;

        let old_keys = tables
            .index_keys
            .remove(key.as_str())
            .map_err(backend)?
            .map(|g| g.value().to_owned());
        if let Some(old) = old_keys {
            for k in old.lines() {
                let full = format!("{resource_type}\u{1f}{k}\u{1f}{id}");
                tables.index.remove(full.as_str()).map_err(backend)?;
            }
        }
        if !keys.is_empty() {
            for k in keys {
                let full = format!("{resource_type}\u{1f}{k}\u{1f}{id}");
                tables.index.insert(full.as_str(), ()).map_err(backend)?;
            }
            let joined = keys.join("\n");
            tables
                .index_keys
                .insert(key.as_str(), joined.as_str())
                .map_err(backend)?;
        }
        Ok(ResourceVersion {
            resource_type: resource_type.to_owned(),
            id: id.to_owned(),
            version,
            last_updated: at,
            change,
            body: body.into(),
        })
    }
}

fn is_conditional_reference(reference: &str) -> bool {
    reference.contains('?')
        && !reference.starts_with("http://")
        && !reference.starts_with("https://")
        && !reference.starts_with("urn:")
}

/// `If-Match` against the current version (a deleted or missing resource has none).
fn check_version(
    resource_type: &str,
    id: &str,
    existing: Option<&ResourceVersion>,
    if_match: Option<u64>,
) -> Result<(), FhirError> {
    let Some(expected) = if_match else {
        return Ok(());
    };
    let actual = existing.filter(|r| !r.is_deleted()).map(|r| r.version);
    if actual == Some(expected) {
        Ok(())
    } else {
        Err(version_mismatch(resource_type, id, expected, actual))
    }
}

/// A write at a client-chosen id: an update of a live resource, else a create there.
fn upsert(
    resource_type: String,
    id: String,
    resource: Value,
    existing: Option<ResourceVersion>,
) -> Planned {
    let is_live = existing.as_ref().is_some_and(|r| !r.is_deleted());
    Planned::Write {
        previous: existing.map_or(0, |r| r.version),
        resource_type,
        id,
        resource,
        change: if is_live {
            ChangeKind::Update
        } else {
            ChangeKind::CreateAtId
        },
        existing: is_live,
    }
}

fn version_mismatch(
    resource_type: &str,
    id: &str,
    expected: u64,
    actual: Option<u64>,
) -> FhirError {
    let actual = actual.map_or("none (the resource does not exist)".to_string(), |v| {
        v.to_string()
    });
    FhirError::precondition_failed(format!(
        "If-Match expected version {expected} of {resource_type}/{id}, current version is {actual}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::SchemaValidator;
    use serde_json::json;

    fn store(write_timeout: Duration) -> (tempfile::TempDir, EmbeddedStore) {
        let dir = tempfile::tempdir().expect("temp dir");
        let registry = Arc::new(SearchRegistry::new(
            &SchemaValidator::bundled().expect("schema"),
        ));
        let store = EmbeddedStore::open(dir.path(), registry, write_timeout).expect("open");
        (dir, store)
    }

    fn put(id: &str) -> Mutation {
        Mutation {
            resource_type: "Patient".into(),
            action: Action::Update {
                id: id.into(),
                resource: json!({"resourceType": "Patient", "id": id}),
                if_match: None,
            },
            full_url: None,
        }
    }

    #[tokio::test]
    async fn a_write_that_missed_its_deadline_is_not_applied() {
        let (_dir, store) = store(Duration::ZERO);
        let result = store.write(vec![put("late")], true).await;
        assert!(matches!(result, Err(StoreError::Expired)), "{result:?}");
        assert!(store.read("Patient", "late").await.expect("read").is_none());
    }

    #[tokio::test]
    async fn appended_records_come_back_in_order_and_per_stream() {
        let (_dir, store) = store(Duration::from_secs(5));
        assert_eq!(store.append("a", b"one".to_vec()).await.expect("append"), 1);
        assert_eq!(
            store.append("b", b"other".to_vec()).await.expect("append"),
            1
        );
        assert_eq!(store.append("a", b"two".to_vec()).await.expect("append"), 2);
        let a = store.records("a", 0, 10).await.expect("records");
        assert_eq!(
            a.iter().map(|(s, b)| (*s, b.to_vec())).collect::<Vec<_>>(),
            vec![(1, b"one".to_vec()), (2, b"two".to_vec())]
        );
        assert_eq!(store.records("a", 1, 10).await.expect("records").len(), 1);
        assert_eq!(store.records("b", 0, 10).await.expect("records").len(), 1);
    }

    #[tokio::test]
    async fn closed_store_refuses_and_reports_not_ready() {
        let (_dir, store) = store(Duration::from_secs(5));
        store.write(vec![put("a")], true).await.expect("write");
        assert!(store.is_ready());
        store.close().await;
        assert!(!store.is_ready());
        assert!(matches!(
            store.write(vec![put("b")], true).await,
            Err(StoreError::Closed)
        ));
        assert!(matches!(
            store.read("Patient", "a").await,
            Err(StoreError::Closed)
        ));
    }

    #[tokio::test]
    async fn batch_entries_fail_alone_in_one_commit() {
        let (_dir, store) = store(Duration::from_secs(5));
        let mut stale = put("b");
        if let Action::Update { if_match, .. } = &mut stale.action {
            *if_match = Some(4);
        }
        let WriteResult::Each(results) = store
            .write(vec![put("a"), stale, put("c")], false)
            .await
            .expect("write")
        else {
            panic!("per-entry results");
        };
        assert!(results[0].is_ok() && results[1].is_err() && results[2].is_ok());
        assert!(store.read("Patient", "b").await.expect("read").is_none());
        assert!(store.read("Patient", "c").await.expect("read").is_some());
    }
}
