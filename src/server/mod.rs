//! The FHIR REST facade over the store: read, vread, create, update, delete, history, search,
//! conditional interactions, and batch/transaction Bundles, under `/fhir`.

mod bundle;
mod capability;
pub mod proxy;
pub mod response;
mod rest;
mod search;
mod transaction;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;

use crate::config::FhirConfig;
use crate::fhir::{FhirError, SchemaValidator, SearchRegistry};
use crate::store::Store;

pub use response::{check_content_type, json_response, parse_json, store_error, FHIR_JSON};

/// What the FHIR handlers share.
pub struct FhirApi {
    pub store: Arc<dyn Store>,
    pub schema: Arc<SchemaValidator>,
    pub search: Arc<SearchRegistry>,
    pub config: FhirConfig,
    /// `{public base}/fhir`, used in `Location`, `fullUrl` and links.
    pub base_url: String,
    capability: Value,
}

impl FhirApi {
    pub fn new(
        store: Arc<dyn Store>,
        schema: Arc<SchemaValidator>,
        search: Arc<SearchRegistry>,
        config: FhirConfig,
        public_base: &str,
    ) -> Self {
        let base_url = format!("{}/fhir", public_base.trim_end_matches('/'));
        let capability = capability::capability_statement(&schema, &search, &base_url);
        Self {
            store,
            schema,
            search,
            config,
            base_url,
            capability,
        }
    }

    /// Checks a resource before it is stored: known type, the one the URL names, and (unless
    /// validation is off) the R4 schema. Explaining a failure may compile a validator, so that
    /// part runs on the blocking pool, not on an async worker.
    pub async fn check_resource(
        &self,
        resource: Value,
        expected_type: &str,
    ) -> Result<Value, FhirError> {
        let actual = crate::fhir::validate::check_resource_type(&self.schema, &resource)?;
        if actual != expected_type {
            return Err(FhirError::bad_request(
                "invalid",
                format!("the body is a {actual} but the URL names {expected_type}"),
            )
            .at("resourceType"));
        }
        if self.config.validate && !self.schema.is_valid(&resource) {
            let schema = self.schema.clone();
            let error = tokio::task::spawn_blocking(move || schema.explain(&resource))
                .await
                .map_err(|_| FhirError::internal("validation did not complete"))?;
            return Err(error);
        }
        Ok(resource)
    }

    /// 404 for a resource type that FHIR R4 does not define.
    pub fn check_type(&self, resource_type: &str) -> Result<(), FhirError> {
        if self.schema.is_resource_type(resource_type) {
            Ok(())
        } else {
            Err(FhirError::new(
                http::StatusCode::NOT_FOUND,
                crate::fhir::Issue::error(
                    "not-supported",
                    format!("'{resource_type}' is not a FHIR R4 resource type"),
                ),
            ))
        }
    }
}

/// The `/fhir` routes.
pub fn router(api: Arc<FhirApi>) -> Router {
    Router::new()
        .route("/fhir", post(transaction::batch_or_transaction))
        .route("/fhir/", post(transaction::batch_or_transaction))
        .route("/fhir/metadata", get(capability::metadata))
        .route(
            "/fhir/{type}",
            get(search::search_type)
                .post(rest::create)
                .put(rest::conditional_update),
        )
        .route("/fhir/{type}/_search", post(search::search_post))
        .route("/fhir/{type}/_history", get(search::type_history))
        .route(
            "/fhir/{type}/{id}",
            get(rest::read).put(rest::update).delete(rest::delete),
        )
        .route("/fhir/{type}/{id}/_history", get(search::instance_history))
        .route("/fhir/{type}/{id}/_history/{vid}", get(rest::vread))
        .with_state(api)
}
