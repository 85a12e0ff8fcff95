//! CDS Hooks 2.0 services answering as Da Vinci CRD: `GET /cds-services`,
//! `POST /cds-services/{id}` and `POST /cds-services/{id}/feedback`.
//!
//! Services are defined by files in `hooks/`. A call is parsed and checked against its hook's
//! context, the patient's record is taken from prefetch, every order is decided by the `pa`
//! module, and the answer carries a coverage-information system action per order plus cards a
//! clinician can act on (see [`crd`]).

pub mod auth;
pub mod crd;
mod handlers;
pub mod prefetch;
pub mod request;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::pa::PolicySet;

/// One service, as defined in `hooks/` and listed by discovery.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceDefinition {
    pub id: String,
    pub hook: String,
    pub title: String,
    pub description: String,
    #[serde(default)]
    pub prefetch: BTreeMap<String, String>,
    #[serde(
        default,
        rename = "usageRequirements",
        skip_serializing_if = "Option::is_none"
    )]
    pub usage_requirements: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension: Option<Value>,
}

/// The store stream card feedback is appended to.
pub const FEEDBACK_STREAM: &str = "cds-feedback";

/// The hooks a service may answer.
pub const HOOKS: [&str; 6] = [
    "order-sign",
    "order-select",
    "order-dispatch",
    "appointment-book",
    "encounter-start",
    "encounter-discharge",
];

/// Loads every `*.json` service definition in `dir`, checking ids are unique and hooks known.
pub fn load_services(dir: &Path) -> anyhow::Result<Vec<ServiceDefinition>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    let mut services: Vec<ServiceDefinition> = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path)?;
        let service: ServiceDefinition = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}:{}: {}", path.display(), e.line(), e))?;
        if !HOOKS.contains(&service.hook.as_str()) {
            anyhow::bail!(
                "{}: hook '{}' is not one this server answers",
                path.display(),
                service.hook
            );
        }
        if services.iter().any(|s| s.id == service.id) {
            anyhow::bail!(
                "{}: service id '{}' is used twice",
                path.display(),
                service.id
            );
        }
        services.push(service);
    }
    Ok(services)
}

/// Settings of the CDS services.
#[derive(Debug, Clone, Default)]
pub struct CdsSettings {
    /// SMART app that reviews a prior-authorization request; a "Launch SMART app" card points at
    /// it when set.
    pub review_app_url: Option<String>,
}

/// What the CDS handlers share.
pub struct CdsApi {
    pub services: Vec<ServiceDefinition>,
    pub policies: Arc<PolicySet>,
    pub settings: CdsSettings,
    pub fetcher: prefetch::PrefetchFetcher,
    pub auth: auth::ClientAuth,
    /// Where card feedback is kept (stream [`FEEDBACK_STREAM`]).
    pub store: Arc<dyn crate::store::Store>,
    /// The base URL clients reach the server at; a JWT's `aud` must be
    /// `{public_base}/cds-services/{id}`.
    pub public_base: String,
}

/// The `/cds-services` routes.
pub fn router(api: Arc<CdsApi>) -> Router {
    Router::new()
        .route("/cds-services", get(handlers::discovery))
        .route("/cds-services/{id}", post(handlers::call))
        .route("/cds-services/{id}/feedback", post(handlers::feedback))
        .with_state(api)
}
