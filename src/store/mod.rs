//! The [`Store`] trait: everything fhirgate must not forget goes through it.
//!
//! The embedded backend ([`embedded::EmbeddedStore`], on redb) is the default; the trait keeps
//! room for a shared PostgreSQL backend when several replicas run. A write is acknowledged only
//! after it is durable on disk, so a crash or a kill never loses an acknowledged write.

pub mod crypt;
pub mod embedded;
mod record;

use bytes::Bytes;
use serde_json::Value;

use crate::fhir::{FhirError, SearchQuery};

pub use embedded::EmbeddedStore;

/// A failure of the storage itself (I/O, corruption, closed store), as opposed to a request
/// that breaks a FHIR rule, which is a [`FhirError`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Backend(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("the store is closed")]
    Closed,
    /// The write waited too long in the queue and was not applied; retrying is safe.
    #[error("the write was not applied in time")]
    Expired,
}

/// How a version came to be; history entries report it as `request.method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Created with a server-assigned id (`POST`).
    Create,
    /// Created at the client's id (`PUT` of a resource that did not exist).
    CreateAtId,
    Update,
    Delete,
}

/// One stored version of a resource. `body` is the serialized resource with `id` and `meta`
/// already set, so reads serve it without re-encoding; it is empty for a deletion.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceVersion {
    pub resource_type: String,
    pub id: String,
    pub version: u64,
    /// Microseconds since the Unix epoch.
    pub last_updated: i64,
    pub change: ChangeKind,
    pub body: Bytes,
}

impl ResourceVersion {
    pub fn is_deleted(&self) -> bool {
        self.change == ChangeKind::Delete
    }
}

/// What a write does to one resource.
#[derive(Debug, Clone)]
pub enum Action {
    /// Create with `id`, or a server-assigned id when `None`. With `if_none_exist`, nothing is
    /// written when exactly one resource already matches (it is returned instead).
    Create {
        id: Option<String>,
        resource: Value,
        if_none_exist: Option<SearchQuery>,
    },
    /// Update (or create) `id`; with `if_match`, only if the current version is that one.
    Update {
        id: String,
        resource: Value,
        if_match: Option<u64>,
    },
    /// Update the one resource matching `query`, or create when none does; with `if_match`,
    /// only if the matched resource is at that version.
    ConditionalUpdate {
        query: SearchQuery,
        resource: Value,
        if_match: Option<u64>,
    },
    /// Delete `id`; with `if_match`, only if the current version is that one.
    Delete { id: String, if_match: Option<u64> },
}

/// One write, as part of a single request or a Bundle.
#[derive(Debug, Clone)]
pub struct Mutation {
    pub resource_type: String,
    pub action: Action,
    /// The entry's `fullUrl` in a transaction Bundle; references to it are rewritten to the
    /// resource's final `Type/id`.
    pub full_url: Option<String>,
}

/// The result of one mutation.
#[derive(Debug, Clone)]
pub enum Outcome {
    Created(ResourceVersion),
    Updated(ResourceVersion),
    /// A conditional create found exactly one match; nothing was written.
    Existing(ResourceVersion),
    /// Deleted (the tombstone version), or `None` when there was nothing to delete.
    Deleted(Option<ResourceVersion>),
}

/// A page of search results.
#[derive(Debug, Clone, Default)]
pub struct SearchPage {
    pub total: usize,
    pub entries: Vec<ResourceVersion>,
}

/// Paging of history and search results.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub offset: usize,
    pub count: usize,
}

/// Storage for FHIR resources and their history.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// The current version of `Type/id`, including a deletion tombstone.
    async fn read(
        &self,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<ResourceVersion>, StoreError>;

    /// One specific version.
    async fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version: u64,
    ) -> Result<Option<ResourceVersion>, StoreError>;

    /// Versions newest first: of one resource when `id` is given, else of the whole type.
    /// `since` (microseconds) keeps only versions updated at or after it.
    async fn history(
        &self,
        resource_type: &str,
        id: Option<&str>,
        since: Option<i64>,
        page: Page,
    ) -> Result<SearchPage, StoreError>;

    /// Current, non-deleted resources of `resource_type` matching `query`.
    async fn search(
        &self,
        resource_type: &str,
        query: &SearchQuery,
        page: Page,
    ) -> Result<SearchPage, StoreError>;

    /// Applies `mutations` durably. When `atomic`, all succeed or none is written and the error
    /// names the failing entry's index; otherwise each succeeds or fails on its own.
    async fn write(
        &self,
        mutations: Vec<Mutation>,
        atomic: bool,
    ) -> Result<WriteResult, StoreError>;

    /// Appends `payload` to the named stream (e.g. CDS card feedback), durably; returns its
    /// sequence number in the stream.
    async fn append(&self, stream: &str, payload: Vec<u8>) -> Result<u64, StoreError>;

    /// Appends `payloads` to `stream` in order and applies `kv` in the same commit; returns
    /// the payloads' sequence numbers. With `durable` false the commit is visible at once but
    /// reaches the disk with the next durable commit (of any writer), which saves a flush.
    async fn append_with(
        &self,
        stream: &str,
        payloads: Vec<Vec<u8>>,
        kv: Vec<KvOp>,
        durable: bool,
    ) -> Result<Vec<u64>, StoreError>;

    /// Removes the records of `stream` up to and including sequence `through`; returns how
    /// many were removed.
    async fn trim_records(&self, stream: &str, through: u64) -> Result<u64, StoreError>;

    /// Records of `stream` after sequence `after`, oldest first, at most `limit`.
    async fn records(
        &self,
        stream: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Bytes)>, StoreError>;

    /// Applies `ops` to the key-value spaces (sync state, watermarks, …) in one durable,
    /// all-or-nothing commit.
    async fn kv_apply(&self, ops: Vec<KvOp>) -> Result<(), StoreError>;

    /// The values of `keys` in `space`, in the same order (`None` where absent).
    async fn kv_get(
        &self,
        space: &str,
        keys: Vec<String>,
    ) -> Result<Vec<Option<Bytes>>, StoreError>;

    /// Entries of `space` with keys after `after` (from the start when `None`), in key order,
    /// at most `limit`.
    async fn kv_scan(
        &self,
        space: &str,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<(String, Bytes)>, StoreError>;

    /// Whether the store is open and serving.
    fn is_ready(&self) -> bool;

    /// Finishes pending writes and closes the store; later calls fail with [`StoreError::Closed`].
    async fn close(&self);
}

/// One change to a key-value space: set `key` to `value`, or delete it when `value` is `None`.
#[derive(Debug, Clone)]
pub struct KvOp {
    pub space: &'static str,
    pub key: String,
    pub value: Option<Vec<u8>>,
}

impl KvOp {
    pub fn put(space: &'static str, key: impl Into<String>, value: Vec<u8>) -> Self {
        Self {
            space,
            key: key.into(),
            value: Some(value),
        }
    }

    pub fn delete(space: &'static str, key: impl Into<String>) -> Self {
        Self {
            space,
            key: key.into(),
            value: None,
        }
    }
}

/// The answer to [`Store::write`].
#[derive(Debug)]
pub enum WriteResult {
    /// All mutations of an atomic write succeeded, in order.
    Committed(Vec<Outcome>),
    /// An atomic write failed at entry `index`; nothing was written.
    Aborted { index: usize, error: FhirError },
    /// Per-mutation results of a non-atomic write.
    Each(Vec<Result<Outcome, FhirError>>),
}
