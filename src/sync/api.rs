//! The sync HTTP API: jobs and dead letters under `/sync`, and the three endpoints of the
//! OpenEMR → Azure Functions connector (`/api/sync-patient`, `/api/sync-observation`,
//! `/api/sync-patient-with-observations`) with the request and answer shapes it used, so teams
//! can point their callers here unchanged.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::model::{tier, Job, Scope};
use super::{JobRequest, SyncEngine, SyncError};
use crate::config::SyncConfig;
use crate::fhir::{FhirError, Issue, SchemaValidator};

/// What the sync handlers share.
pub struct SyncApi {
    pub engine: Arc<SyncEngine>,
    pub schema: Arc<SchemaValidator>,
    pub config: SyncConfig,
    /// Remote sources and destinations configured (not the embedded store), for defaults.
    pub sources: Vec<String>,
    pub destinations: Vec<String>,
}

/// The `/sync` and `/api/sync-*` routes.
pub fn router(api: Arc<SyncApi>) -> Router {
    Router::new()
        .route("/sync/jobs", post(create_job).get(list_jobs))
        .route("/sync/jobs/{id}", get(show_job))
        .route("/sync/dead-letters", get(list_dead_letters))
        .route("/sync/dead-letters/{id}/retry", post(retry_dead_letter))
        .route("/api/sync-patient", post(sync_patient))
        .route("/api/sync-observation", post(sync_observation))
        .route(
            "/api/sync-patient-with-observations",
            post(sync_patient_with_observations),
        )
        .with_state(api)
}

impl From<SyncError> for FhirError {
    fn from(e: SyncError) -> Self {
        let (status, code) = match &e {
            SyncError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            SyncError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            SyncError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            SyncError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "transient"),
            SyncError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "exception"),
        };
        FhirError::new(status, Issue::error(code, e.to_string()))
    }
}

fn json_answer(status: StatusCode, value: &Value) -> Response {
    let mut response = Response::new(axum::body::Body::from(
        serde_json::to_vec(value).unwrap_or_default(),
    ));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn with_location(mut response: Response, job: u64) -> Response {
    if let Ok(value) = HeaderValue::from_str(&format!("/sync/jobs/{job}")) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// A job as the API shows it: the record, plus how long it has taken.
fn job_view(job: &Job) -> Value {
    let mut value = serde_json::to_value(job).unwrap_or(Value::Null);
    let started = crate::fhir::date::parse_range(&job.created).map(|r| r.start);
    let ended = job
        .finished
        .as_deref()
        .and_then(crate::fhir::date::parse_range)
        .map(|r| r.start)
        .unwrap_or_else(crate::fhir::date::now_micros);
    if let (Some(started), Some(object)) = (started, value.as_object_mut()) {
        let elapsed_ms = ((ended - started) / 1000).max(0);
        object.insert("elapsedMs".into(), json!(elapsed_ms));
        let settled = job.counts.done + job.counts.skipped + job.counts.failed;
        object.insert("outstanding".into(), json!(job.counts.outstanding()));
        if elapsed_ms > 0 {
            object.insert(
                "resourcesPerSecond".into(),
                json!((settled as f64 * 1000.0 / elapsed_ms as f64).round()),
            );
        }
    }
    value
}

fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, String> {
    let bytes = body.map_err(|r| r.body_text())?;
    serde_json::from_slice(&bytes).map_err(|e| format!("the body is not the expected JSON: {e}"))
}

/// `POST /sync/jobs` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewJob {
    source: Option<String>,
    destination: Option<String>,
    patient: Option<String>,
    resources: Option<Vec<String>>,
    types: Option<TypeList>,
    since: Option<String>,
}

/// `["Patient", "Observation"]` or `"Patient,Observation"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum TypeList {
    List(Vec<String>),
    Text(String),
}

impl TypeList {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::List(list) => list,
            Self::Text(text) => text
                .split(',')
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
                .collect(),
        }
    }
}

/// Checks resource type names and puts them referenced-first.
fn check_types(api: &SyncApi, types: Vec<String>) -> Result<Vec<String>, FhirError> {
    if types.is_empty() {
        return Err(FhirError::bad_request("required", "types is empty").at("types"));
    }
    let mut checked: Vec<String> = Vec::with_capacity(types.len());
    for t in types {
        if !api.schema.is_resource_type(&t) {
            return Err(FhirError::bad_request(
                "value",
                format!("{t:?} is not a FHIR R4 resource type"),
            )
            .at("types"));
        }
        if !checked.contains(&t) {
            checked.push(t);
        }
    }
    checked.sort_by_key(|t| tier(t));
    Ok(checked)
}

fn check_reference(api: &SyncApi, reference: &str) -> Result<(), FhirError> {
    let ok = reference
        .split_once('/')
        .is_some_and(|(t, id)| api.schema.is_resource_type(t) && crate::fhir::is_valid_id(id));
    if ok {
        Ok(())
    } else {
        Err(FhirError::bad_request(
            "value",
            format!("{reference:?} is not a reference of the form Type/id"),
        )
        .at("resources"))
    }
}

/// The scope of a `POST /sync/jobs` request.
fn scope_of(api: &SyncApi, request: NewJob) -> Result<Scope, FhirError> {
    if let Some(since) = &request.since {
        if crate::fhir::date::parse_range(since).is_none() {
            return Err(FhirError::bad_request(
                "value",
                format!("since {since:?} is not a FHIR date or dateTime"),
            )
            .at("since"));
        }
    }
    let types = request.types.map(TypeList::into_vec);
    match (request.patient, request.resources) {
        (Some(_), Some(_)) => Err(FhirError::bad_request(
            "invalid",
            "give either patient or resources, not both",
        )),
        (Some(patient), None) => {
            if !crate::fhir::is_valid_id(&patient) {
                return Err(
                    FhirError::bad_request("value", "patient is not a valid FHIR id").at("patient"),
                );
            }
            if request.since.is_some() {
                return Err(FhirError::bad_request(
                    "invalid",
                    "since applies to types syncs, not to a patient sync",
                )
                .at("since"));
            }
            let types = types.map(|t| check_types(api, t)).transpose()?;
            Ok(Scope::Patient { id: patient, types })
        }
        (None, Some(references)) => {
            if types.is_some() || request.since.is_some() {
                return Err(FhirError::bad_request(
                    "invalid",
                    "resources cannot be combined with types or since",
                ));
            }
            if references.is_empty() {
                return Err(
                    FhirError::bad_request("required", "resources is empty").at("resources")
                );
            }
            for reference in &references {
                check_reference(api, reference)?;
            }
            Ok(Scope::Resources { references })
        }
        (None, None) => match types {
            Some(types) => Ok(Scope::Types {
                types: check_types(api, types)?,
                since: request.since,
            }),
            None => Err(FhirError::bad_request(
                "required",
                "a job needs patient, resources or types",
            )),
        },
    }
}

/// The source and destination a request names, or the configured defaults.
pub(crate) fn endpoints(
    api: &SyncApi,
    source: Option<String>,
    destination: Option<String>,
) -> Result<(String, String), String> {
    let source = source
        .or_else(|| api.config.default_source.clone())
        .or_else(|| (api.sources.len() == 1).then(|| api.sources[0].clone()))
        .ok_or("no source given, and no default: set sync.default_source")?;
    let destination = destination
        .or_else(|| api.config.default_destination.clone())
        .or_else(|| (api.destinations.len() == 1).then(|| api.destinations[0].clone()))
        .ok_or("no destination given, and no default: set sync.default_destination")?;
    Ok((source, destination))
}

/// Checks a `POST /sync/jobs` body and turns it into a job request.
pub fn job_request(api: &SyncApi, body: Value) -> Result<JobRequest, FhirError> {
    let request: NewJob = serde_json::from_value(body).map_err(|e| {
        FhirError::bad_request("structure", format!("the body is not a sync job: {e}"))
    })?;
    let (source, destination) = endpoints(api, request.source.clone(), request.destination.clone())
        .map_err(|e| FhirError::bad_request("required", e))?;
    let scope = scope_of(api, request)?;
    Ok(JobRequest {
        source,
        destination,
        scope,
        track_results: false,
        internal: false,
    })
}

async fn create_job(
    State(api): State<Arc<SyncApi>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, FhirError> {
    let body: Value = parse_body(body).map_err(|e| FhirError::bad_request("structure", e))?;
    let request = job_request(&api, body)?;
    let job = api.engine.submit(request).await?;
    Ok(with_location(
        json_answer(StatusCode::ACCEPTED, &job_view(&job)),
        job.id,
    ))
}

#[derive(Deserialize)]
struct ListQuery {
    before: Option<u64>,
    after: Option<u64>,
    #[serde(rename = "_count")]
    count: Option<usize>,
}

async fn list_jobs(
    State(api): State<Arc<SyncApi>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, FhirError> {
    let Query(query) = query.map_err(|e| FhirError::bad_request("value", e.body_text()))?;
    let limit = query.count.unwrap_or(50).clamp(1, 1000);
    let jobs = api.engine.jobs(query.before, limit);
    let mut answer = json!({"jobs": jobs.iter().map(job_view).collect::<Vec<_>>()});
    if jobs.len() == limit {
        if let Some(last) = jobs.last() {
            answer["next"] = json!(format!("/sync/jobs?before={}&_count={limit}", last.id));
        }
    }
    Ok(json_answer(StatusCode::OK, &answer))
}

fn job_id(raw: &str) -> Result<u64, FhirError> {
    raw.parse()
        .map_err(|_| FhirError::not_found(format!("no sync job {raw:?}")))
}

async fn show_job(
    State(api): State<Arc<SyncApi>>,
    Path(id): Path<String>,
) -> Result<Response, FhirError> {
    let id = job_id(&id)?;
    let job = api
        .engine
        .job(id)
        .ok_or_else(|| FhirError::not_found(format!("no sync job {id}")))?;
    Ok(json_answer(StatusCode::OK, &job_view(&job)))
}

async fn list_dead_letters(
    State(api): State<Arc<SyncApi>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, FhirError> {
    let Query(query) = query.map_err(|e| FhirError::bad_request("value", e.body_text()))?;
    let limit = query.count.unwrap_or(100).clamp(1, 1000);
    let letters = api.engine.dead_letters(query.after, limit).await?;
    let mut answer = json!({"deadLetters": letters});
    if letters.len() == limit {
        if let Some(last) = letters.last() {
            answer["next"] = json!(format!(
                "/sync/dead-letters?after={}&_count={limit}",
                last.id
            ));
        }
    }
    Ok(json_answer(StatusCode::OK, &answer))
}

async fn retry_dead_letter(
    State(api): State<Arc<SyncApi>>,
    Path(id): Path<String>,
) -> Result<Response, FhirError> {
    let id: u64 = id
        .parse()
        .map_err(|_| FhirError::not_found(format!("no dead letter {id:?}")))?;
    let job = api.engine.retry_dead_letter(id).await?;
    Ok(with_location(
        json_answer(StatusCode::ACCEPTED, &job_view(&job)),
        job.id,
    ))
}

/// The connector's request body.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConnectorRequest {
    patient_id: Option<Value>,
    observation_id: Option<Value>,
}

/// An id given as a string or a number (`{"patientId": 1}` worked with the connector too).
fn id_text(value: Option<Value>) -> Option<String> {
    match value? {
        Value::String(s) if !s.is_empty() => Some(s),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn connector_error(status: StatusCode, error: impl Into<String>) -> Response {
    json_answer(status, &json!({"error": error.into()}))
}

/// Starts a connector job and waits for it (up to `sync.api_wait_secs`).
async fn run_connector_job(api: &SyncApi, scope: Scope) -> Result<(Job, bool), Response> {
    let (source, destination) = endpoints(api, None, None)
        .map_err(|e| connector_error(StatusCode::SERVICE_UNAVAILABLE, e))?;
    let job = api
        .engine
        .submit(JobRequest {
            source,
            destination,
            scope,
            track_results: true,
            internal: false,
        })
        .await
        .map_err(|e| match e {
            SyncError::Invalid(m) => connector_error(StatusCode::SERVICE_UNAVAILABLE, m),
            other => connector_error(StatusCode::SERVICE_UNAVAILABLE, other.to_string()),
        })?;
    let waited = api
        .engine
        .wait(job.id, Duration::from_secs(api.config.api_wait_secs))
        .await
        .unwrap_or(job);
    let finished = waited.state.is_finished();
    Ok((waited, finished))
}

fn still_running(api: &SyncApi, job: &Job) -> Response {
    // Nobody will collect per-resource results now; the job record has the counts.
    api.engine.take_results(job.id);
    with_location(
        json_answer(
            StatusCode::ACCEPTED,
            &json!({
                "message": "Sync is still running",
                "jobId": job.id,
                "status": format!("/sync/jobs/{}", job.id),
            }),
        ),
        job.id,
    )
}

/// The connector's 404 when the job did not find `reference` at the source.
fn missing_answer(job: &Job, reference: &str) -> Option<Response> {
    job.missing.iter().any(|m| m == reference).then(|| {
        json_answer(
            StatusCode::NOT_FOUND,
            &json!({
                "error": format!("Failed to sync {reference}"),
                "details": format!("{reference} was not found at the source"),
                "jobId": job.id,
            }),
        )
    })
}

/// Answers a one-resource connector call (`sync-patient`, `sync-observation` by id).
fn single_answer(api: &SyncApi, job: &Job, resource_type: &str, id: &str) -> Response {
    let reference = format!("{resource_type}/{id}");
    if let Some(answer) = missing_answer(job, &reference) {
        return answer;
    }
    let results = api.engine.take_results(job.id).unwrap_or_default();
    let failure = results
        .iter()
        .find(|r| !r.success)
        .and_then(|r| r.error.clone())
        .or_else(|| job.errors.first().cloned());
    match failure {
        None if job.state.is_finished() => json_answer(
            StatusCode::OK,
            &json!({
                "message": format!("Successfully synced {reference}"),
                "result": {"success": true, "resourceType": resource_type, "resourceId": id},
                "jobId": job.id,
            }),
        ),
        None => still_running(api, job),
        Some(details) => json_answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({
                "error": format!("Failed to sync {reference}"),
                "details": details,
                "jobId": job.id,
            }),
        ),
    }
}

/// Answers a many-resource connector call with the connector's summary.
fn summary_answer(api: &SyncApi, job: &Job, patient: &str) -> Response {
    if let Some(answer) = missing_answer(job, &format!("Patient/{patient}")) {
        return answer;
    }
    let results = api.engine.take_results(job.id).unwrap_or_default();
    let succeeded = results.iter().filter(|r| r.success).count();
    let failed = results.len() - succeeded + job.counts.failed_pages as usize;
    json_answer(
        StatusCode::OK,
        &json!({
            "message": format!("Sync completed: {succeeded} succeeded, {failed} failed"),
            "results": results,
            "summary": {"total": succeeded + failed, "succeeded": succeeded, "failed": failed},
            "errors": job.errors,
            "jobId": job.id,
        }),
    )
}

/// How a connector endpoint answers once its job has finished.
enum Answer {
    /// One resource: `{message, result}`.
    Single(&'static str, String),
    /// A patient's resources: `{message, results, summary}`.
    Summary(String),
}

/// Runs a connector job and answers in the connector's shape (202 if it is still running).
async fn connector_job(api: &SyncApi, scope: Scope, answer: Answer) -> Response {
    match run_connector_job(api, scope).await {
        Ok((job, true)) => match answer {
            Answer::Single(resource_type, id) => single_answer(api, &job, resource_type, &id),
            Answer::Summary(patient) => summary_answer(api, &job, &patient),
        },
        Ok((job, false)) => still_running(api, &job),
        Err(response) => response,
    }
}

/// The request body's `patientId`, or why the request is bad.
fn patient_id(request: &ConnectorRequest, missing: &str) -> Result<String, String> {
    id_text(request.patient_id.clone())
        .filter(|id| crate::fhir::is_valid_id(id))
        .ok_or_else(|| missing.to_owned())
}

/// `POST /api/sync-patient` `{"patientId": "1"}`: the patient resource.
async fn sync_patient(
    State(api): State<Arc<SyncApi>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let patient = match parse_body::<ConnectorRequest>(body)
        .and_then(|r| patient_id(&r, "Missing required parameter: patientId"))
    {
        Ok(patient) => patient,
        Err(e) => return connector_error(StatusCode::BAD_REQUEST, e),
    };
    let scope = Scope::Patient {
        id: patient.clone(),
        types: Some(vec!["Patient".into()]),
    };
    connector_job(&api, scope, Answer::Single("Patient", patient)).await
}

/// `POST /api/sync-observation`: `{"observationId": "5"}` syncs that observation (as the
/// connector did); `{"patientId": "1"}` syncs all of that patient's observations.
async fn sync_observation(
    State(api): State<Arc<SyncApi>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request: ConnectorRequest = match parse_body(body) {
        Ok(request) => request,
        Err(e) => return connector_error(StatusCode::BAD_REQUEST, e),
    };
    if let Some(observation) = id_text(request.observation_id.clone()) {
        if !crate::fhir::is_valid_id(&observation) {
            return connector_error(
                StatusCode::BAD_REQUEST,
                "observationId is not a valid FHIR id",
            );
        }
        let scope = Scope::Resources {
            references: vec![format!("Observation/{observation}")],
        };
        return connector_job(&api, scope, Answer::Single("Observation", observation)).await;
    }
    let patient = match patient_id(
        &request,
        "Missing required parameter: observationId (or patientId)",
    ) {
        Ok(patient) => patient,
        Err(e) => return connector_error(StatusCode::BAD_REQUEST, e),
    };
    let scope = Scope::Patient {
        id: patient.clone(),
        types: Some(vec!["Observation".into()]),
    };
    connector_job(&api, scope, Answer::Summary(patient)).await
}

/// `POST /api/sync-patient-with-observations` `{"patientId": "1"}`.
async fn sync_patient_with_observations(
    State(api): State<Arc<SyncApi>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let patient = match parse_body::<ConnectorRequest>(body)
        .and_then(|r| patient_id(&r, "Missing required parameter: patientId"))
    {
        Ok(patient) => patient,
        Err(e) => return connector_error(StatusCode::BAD_REQUEST, e),
    };
    let scope = Scope::Patient {
        id: patient.clone(),
        types: Some(vec!["Patient".into(), "Observation".into()]),
    };
    connector_job(&api, scope, Answer::Summary(patient)).await
}
