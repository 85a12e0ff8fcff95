//! Configuration of the signed-encounter pipeline and of the note extractor's model.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `[extract]`: how facts are read from clinical notes.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExtractConfig {
    pub llm: LlmConfig,
}

/// Which API the model is reached through.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LlmProvider {
    #[default]
    Openai,
    Azure,
}

/// `[extract.llm]`: an OpenAI-compatible chat model (off by default; the rules always work).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlmConfig {
    pub enabled: bool,
    pub provider: LlmProvider,
    /// `https://api.openai.com/v1`, or the Azure OpenAI resource (`https://{name}.openai.azure.com`).
    pub base_url: String,
    /// The model (OpenAI) or the deployment (Azure).
    pub model: String,
    /// Azure OpenAI API version.
    pub api_version: String,
    /// The environment variable holding the API key (never the key itself).
    pub api_key_env: String,
    /// Time one call may take.
    pub timeout_secs: u64,
    /// Further attempts after a failed call.
    pub retries: u32,
    /// The longest note text sent, in bytes.
    pub max_note_bytes: usize,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            provider: LlmProvider::Openai,
            base_url: "https://api.openai.com/v1".into(),
            model: "gpt-4o-mini".into(),
            api_version: "2024-10-21".into(),
            api_key_env: "OPENAI_API_KEY".into(),
            timeout_secs: 20,
            retries: 2,
            max_note_bytes: 24_000,
        }
    }
}

/// `[pipeline]`: signed encounters become prior-authorization packets ready for review.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// Drafts (packet and edits) are deleted this long after they were made.
    pub draft_ttl_secs: u64,
    /// Seconds between SSE heartbeats.
    pub heartbeat_secs: u64,
    /// The review page's SMART registration.
    pub app: ReviewAppConfig,
    /// Polled EHRs, by source name (a configured source).
    pub tenants: BTreeMap<String, TenantConfig>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            draft_ttl_secs: 2 * 3600,
            heartbeat_secs: 15,
            app: ReviewAppConfig::default(),
            tenants: BTreeMap::new(),
        }
    }
}

/// `[pipeline.app]`: the review page as a SMART on FHIR app.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReviewAppConfig {
    /// The client id the EHR registered the review page under.
    pub client_id: String,
    /// Scopes asked for at launch.
    pub scopes: String,
    /// `GET /app/dev?tenant=…&patient=…` opens a session without a SMART launch. Development only.
    pub dev_login: bool,
    /// Hours a review session lasts at most.
    pub session_hours: u64,
    /// Origins allowed to frame the page besides the tenants' `iss` origins (the EHR's UI, when
    /// it is served from another origin than its FHIR API).
    pub frame_ancestors: Vec<String>,
}

impl Default for ReviewAppConfig {
    fn default() -> Self {
        Self {
            client_id: "fhirgate-review".into(),
            scopes: "launch openid fhirUser patient/*.read".into(),
            dev_login: false,
            session_hours: 8,
            frame_ancestors: Vec::new(),
        }
    }
}

/// `[pipeline.tenants.{source}]`: one EHR whose signed encounters are picked up.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantConfig {
    pub enabled: bool,
    /// Seconds between polls (3–5 s keeps a tenant well under one request a second).
    pub poll_interval_secs: u64,
    /// Payers (names as in `policies/`, or payer Organization identifiers) whose patients are
    /// processed; empty: every payer with a policy.
    pub payers: Vec<String>,
    /// The destination the approved DocumentReference is written to (a configured destination).
    pub write_back: Option<String>,
    /// The FHIR base the EHR launches the review page with (`iss`); the source's base if unset.
    pub smart_iss: Option<String>,
    /// On the first poll, encounters finished this many hours back are picked up.
    pub lookback_hours: u64,
}

impl Default for TenantConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            poll_interval_secs: 4,
            payers: Vec::new(),
            write_back: None,
            smart_iss: None,
            lookback_hours: 24,
        }
    }
}
