//! The embedded store as a sync source and destination, without HTTP in between.

use std::sync::Arc;

use serde_json::Value;

use super::{Delivery, FhirSink, FhirSource, Outgoing, Page, RemoteError, PATIENT_TYPES};
use crate::fhir::{SchemaValidator, SearchRegistry};
use crate::store::{Action, Mutation, Store, StoreError, WriteResult};

/// Reads the embedded store the way a remote source is read: searches page by page.
pub struct EmbeddedSource {
    name: String,
    store: Arc<dyn Store>,
    registry: Arc<SearchRegistry>,
    patient_types: Vec<String>,
}

/// Results per page of an embedded search.
const PAGE: usize = 500;

/// Page links of the embedded source: `embedded:{Type}?{query}` with `_offset`.
const SCHEME: &str = "embedded:";

impl EmbeddedSource {
    pub fn new(name: &str, store: Arc<dyn Store>, registry: Arc<SearchRegistry>) -> Self {
        Self {
            name: name.to_owned(),
            store,
            registry,
            patient_types: PATIENT_TYPES.iter().map(|t| (*t).to_owned()).collect(),
        }
    }

    async fn run(
        &self,
        resource_type: &str,
        params: Vec<(String, String)>,
    ) -> Result<Page, RemoteError> {
        let mut offset = 0usize;
        let mut filters = Vec::new();
        for (name, value) in params {
            match name.as_str() {
                "_offset" => {
                    offset = value
                        .parse()
                        .map_err(|_| RemoteError::Invalid("bad _offset in a page link".into()))?
                }
                "_count" => {}
                _ => filters.push((name, value)),
            }
        }
        let query = self
            .registry
            .parse_query(resource_type, &filters, true)
            .map_err(|e| RemoteError::Invalid(format!("search rejected: {e}")))?;
        let page = self
            .store
            .search(
                resource_type,
                &query,
                crate::store::Page {
                    offset,
                    count: PAGE,
                },
            )
            .await
            .map_err(store_failure)?;
        let mut resources = Vec::with_capacity(page.entries.len());
        for version in &page.entries {
            resources.push(
                serde_json::from_slice(&version.body)
                    .map_err(|e| RemoteError::Invalid(format!("stored body unreadable: {e}")))?,
            );
        }
        let next = (offset + page.entries.len() < page.total).then(|| {
            filters.push(("_offset".into(), (offset + PAGE).to_string()));
            format!(
                "{SCHEME}{resource_type}?{}",
                serde_urlencoded::to_string(&filters).unwrap_or_default()
            )
        });
        Ok(Page { resources, next })
    }
}

fn store_failure(e: StoreError) -> RemoteError {
    RemoteError::Transport(format!("embedded store: {e}"))
}

#[async_trait::async_trait]
impl FhirSource for EmbeddedSource {
    fn name(&self) -> &str {
        &self.name
    }

    async fn search(
        &self,
        resource_type: &str,
        params: &[(String, String)],
    ) -> Result<Page, RemoteError> {
        self.run(resource_type, params.to_vec()).await
    }

    async fn page(&self, url: &str) -> Result<Page, RemoteError> {
        let rest = url
            .strip_prefix(SCHEME)
            .ok_or_else(|| RemoteError::Invalid("not a page link of the embedded store".into()))?;
        let (resource_type, query) = rest.split_once('?').unwrap_or((rest, ""));
        let params: Vec<(String, String)> = serde_urlencoded::from_str(query)
            .map_err(|e| RemoteError::Invalid(format!("bad page link: {e}")))?;
        self.run(resource_type, params).await
    }

    async fn read(&self, resource_type: &str, id: &str) -> Result<Option<Value>, RemoteError> {
        let Some(version) = self
            .store
            .read(resource_type, id)
            .await
            .map_err(store_failure)?
        else {
            return Ok(None);
        };
        if version.is_deleted() {
            return Ok(None);
        }
        serde_json::from_slice(&version.body)
            .map(Some)
            .map_err(|e| RemoteError::Invalid(format!("stored body unreadable: {e}")))
    }

    async fn everything(&self, _patient: &str) -> Result<Option<Page>, RemoteError> {
        Ok(None)
    }

    fn patient_types(&self) -> &[String] {
        &self.patient_types
    }
}

/// Writes into the embedded store: schema-checked like a REST write, many per commit.
pub struct EmbeddedSink {
    name: String,
    store: Arc<dyn Store>,
    schema: Arc<SchemaValidator>,
    validate: bool,
}

impl EmbeddedSink {
    pub fn new(
        name: &str,
        store: Arc<dyn Store>,
        schema: Arc<SchemaValidator>,
        validate: bool,
    ) -> Self {
        Self {
            name: name.to_owned(),
            store,
            schema,
            validate,
        }
    }
}

#[async_trait::async_trait]
impl FhirSink for EmbeddedSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn batch_size(&self) -> usize {
        500
    }

    async fn upsert(&self, batch: Vec<Outgoing>) -> Vec<Delivery> {
        let mut results: Vec<Option<Delivery>> = vec![None; batch.len()];
        let mut mutations = Vec::with_capacity(batch.len());
        let mut positions = Vec::with_capacity(batch.len());
        for (i, item) in batch.into_iter().enumerate() {
            let declared = item.resource.get("resourceType").and_then(Value::as_str);
            let problem = if declared != Some(item.resource_type.as_str()) {
                Some(crate::fhir::FhirError::bad_request(
                    "invalid",
                    format!("the resource is not a {}", item.resource_type),
                ))
            } else if self.validate && !self.schema.is_valid(&item.resource) {
                let schema = self.schema.clone();
                let resource = item.resource.clone();
                Some(
                    tokio::task::spawn_blocking(move || schema.explain(&resource))
                        .await
                        .unwrap_or_else(|_| {
                            crate::fhir::FhirError::internal("validation did not complete")
                        }),
                )
            } else {
                None
            };
            if let Some(error) = problem {
                results[i] = Some(reject(&error));
                continue;
            }
            positions.push(i);
            mutations.push(Mutation {
                resource_type: item.resource_type,
                action: Action::Update {
                    id: item.id,
                    resource: item.resource,
                    if_match: None,
                },
                full_url: None,
            });
        }
        if !mutations.is_empty() {
            match self.store.write(mutations, false).await {
                Ok(WriteResult::Each(each)) => {
                    for (i, result) in positions.into_iter().zip(each) {
                        results[i] = Some(match result {
                            Ok(_) => Delivery::Done,
                            Err(error) => reject(&error),
                        });
                    }
                }
                Ok(_) => {
                    for i in positions {
                        results[i] = Some(Delivery::Retry {
                            reason: "unexpected store answer".into(),
                            after: None,
                            uncertain: true,
                        });
                    }
                }
                Err(e) => {
                    for i in positions {
                        results[i] = Some(Delivery::Retry {
                            reason: format!("embedded store: {e}"),
                            after: None,
                            // A store write is all or nothing; a failed one wrote nothing.
                            uncertain: false,
                        });
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or(Delivery::Retry {
                    reason: "not attempted".into(),
                    after: None,
                    uncertain: false,
                })
            })
            .collect()
    }

    async fn current(
        &self,
        resource_type: &str,
        ids: &[String],
    ) -> Result<Vec<Option<Value>>, RemoteError> {
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            found.push(self.read_current(resource_type, id).await?);
        }
        Ok(found)
    }
}

impl EmbeddedSink {
    async fn read_current(
        &self,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<Value>, RemoteError> {
        match self
            .store
            .read(resource_type, id)
            .await
            .map_err(store_failure)?
        {
            Some(version) if !version.is_deleted() => serde_json::from_slice(&version.body)
                .map(Some)
                .map_err(|e| RemoteError::Invalid(format!("stored body unreadable: {e}"))),
            _ => Ok(None),
        }
    }
}

fn reject(error: &crate::fhir::FhirError) -> Delivery {
    let outcome = error.to_operation_outcome();
    let reason = error
        .issues
        .first()
        .map(|i| i.diagnostics.clone())
        .unwrap_or_else(|| "rejected".into());
    Delivery::Reject {
        status: error.status.as_u16(),
        reason,
        outcome: Some(outcome),
    }
}
