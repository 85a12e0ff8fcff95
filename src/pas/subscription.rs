//! PAS notifications through R4 Subscriptions (the Subscriptions R5 Backport, as PAS requires):
//! a provider subscribes to the PAS topic for its organization with a `rest-hook` channel and
//! full-resource payloads; fhirgate checks the endpoint with a handshake (`requested` →
//! `active`, or `error`), and when a pended claim of that organization is decided, sends a
//! `history` Bundle — the SubscriptionStatus Parameters first, the full PAS response Bundle
//! after — through the sync outbox, so it is retried and dead-lettered like any delivery.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{ClaimRecord, PasApi};
use crate::config::{DestinationConfig, DestinationKind};
use crate::fhir::{FhirError, Issue};
use crate::remote::{FhirSink, FhirSource, Page, RemoteError, Remotes, RestHookSink};
use crate::server::{check_content_type, json_response, parse_json, store_error};
use crate::store::{Action, KvOp, Mutation, Store, WriteResult};

/// The PAS subscription topic.
pub const TOPIC: &str = "http://hl7.org/fhir/us/davinci-pas/SubscriptionTopic/PASSubscriptionTopic";
const FILTER_CRITERIA: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria";
const PAYLOAD_CONTENT: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content";
const STATUS_PROFILE: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4";

/// Subscription states by id.
pub const SUBSCRIPTIONS: &str = "pas.subscription";
/// Notification Bundles waiting to be (or being) delivered, by id.
pub const NOTIFICATIONS: &str = "pas.notification";
/// The sync source notifications are read from.
pub const NOTIFICATION_SOURCE: &str = "pas-notifications";

/// Time a subscriber has to answer.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshake attempts before the subscription is in error.
const HANDSHAKE_ATTEMPTS: u32 = 3;

/// What fhirgate keeps about a subscription besides the Subscription resource.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionState {
    pub id: String,
    pub endpoint: String,
    #[serde(default)]
    pub headers: Vec<String>,
    /// `org-identifier` filter: notify only for claims from this organization.
    #[serde(default)]
    pub org_identifier: Option<String>,
    pub status: String,
    /// Events sent since the subscription started.
    pub events: u64,
    #[serde(default)]
    pub error: Option<String>,
}

impl SubscriptionState {
    /// The sync destination of this subscription.
    pub fn destination(&self) -> String {
        destination_name(&self.id)
    }

    fn matches(&self, record: &ClaimRecord) -> bool {
        match &self.org_identifier {
            None => true,
            Some(wanted) => record.provider_keys.iter().any(|key| {
                key == wanted
                    || key
                        .rsplit_once('|')
                        .is_some_and(|(_, value)| value == wanted)
            }),
        }
    }
}

pub fn destination_name(id: &str) -> String {
    format!("subscription-{id}")
}

fn sink_for(
    state: &SubscriptionState,
    outbound: &Arc<crate::remote::outbound::Outbound>,
) -> Result<RestHookSink, String> {
    RestHookSink::new(
        &state.destination(),
        &state.endpoint,
        &state.headers,
        DELIVERY_TIMEOUT,
        outbound,
    )
}

fn destination_config() -> DestinationConfig {
    DestinationConfig {
        batch_size: Some(1),
        concurrency: 1,
        ..DestinationConfig::new(DestinationKind::Fhir, None)
    }
}

/// Adds the notification source and every stored subscription's endpoint to `remotes`, so the
/// sync engine delivers what was queued before a restart.
pub async fn prepare(store: &Arc<dyn Store>, remotes: &mut Remotes) -> anyhow::Result<()> {
    remotes.internal.insert(NOTIFICATION_SOURCE.into());
    remotes.sources.insert(
        NOTIFICATION_SOURCE.into(),
        Arc::new(NotificationSource {
            store: store.clone(),
        }),
    );
    for (_, bytes) in store.kv_scan(SUBSCRIPTIONS, None, usize::MAX).await? {
        let Ok(state) = serde_json::from_slice::<SubscriptionState>(&bytes) else {
            continue;
        };
        match sink_for(&state, &remotes.outbound) {
            Ok(sink) => {
                remotes.internal.insert(state.destination());
                remotes
                    .sinks
                    .insert(state.destination(), Arc::new(sink) as Arc<dyn FhirSink>);
                remotes
                    .destinations
                    .insert(state.destination(), destination_config());
            }
            Err(e) => {
                tracing::warn!(subscription = %state.id, error = %e, "subscription endpoint unusable")
            }
        }
    }
    Ok(())
}

/// Runs again the handshakes a restart cut off (subscriptions still `requested`).
pub async fn resume(api: &Arc<PasApi>) -> anyhow::Result<()> {
    for (_, bytes) in api.store.kv_scan(SUBSCRIPTIONS, None, usize::MAX).await? {
        if let Ok(state) = serde_json::from_slice::<SubscriptionState>(&bytes) {
            if state.status == "requested" {
                let task_api = api.clone();
                tokio::spawn(async move { handshake(task_api, state).await });
            }
        }
    }
    Ok(())
}

/// Notification Bundles kept in the store, read by the sync engine as `Bundle/{id}`.
pub struct NotificationSource {
    store: Arc<dyn Store>,
}

#[async_trait::async_trait]
impl FhirSource for NotificationSource {
    fn name(&self) -> &str {
        NOTIFICATION_SOURCE
    }

    async fn search(&self, _: &str, _: &[(String, String)]) -> Result<Page, RemoteError> {
        Ok(Page::default())
    }

    async fn page(&self, _: &str) -> Result<Page, RemoteError> {
        Ok(Page::default())
    }

    async fn read(&self, resource_type: &str, id: &str) -> Result<Option<Value>, RemoteError> {
        if resource_type != "Bundle" {
            return Ok(None);
        }
        let found = self
            .store
            .kv_get(NOTIFICATIONS, vec![id.to_owned()])
            .await
            .map_err(|e| RemoteError::Transport(format!("store: {e}")))?;
        match found.into_iter().next().flatten() {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| RemoteError::Invalid(format!("notification unreadable: {e}"))),
            None => Ok(None),
        }
    }

    async fn everything(&self, _: &str) -> Result<Option<Page>, RemoteError> {
        Ok(None)
    }

    fn patient_types(&self) -> &[String] {
        &[]
    }
}

fn unprocessable(code: &'static str, message: impl Into<String>, at: &str) -> FhirError {
    FhirError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        Issue::error(code, message).at(at),
    )
}

/// The value of an extension with `url` on `element`.
fn extension<'a>(element: &'a Value, url: &str) -> Option<&'a Value> {
    element["extension"]
        .as_array()?
        .iter()
        .find(|e| e["url"] == url)
}

/// Reads the parts of a Subscription fhirgate supports, or says what it does not.
fn parse_subscription(
    subscription: &Value,
) -> Result<(String, Vec<String>, Option<String>), FhirError> {
    if subscription["criteria"] != TOPIC {
        return Err(unprocessable(
            "not-supported",
            format!("the only topic here is {TOPIC}"),
            "Subscription.criteria",
        ));
    }
    let channel = &subscription["channel"];
    if channel["type"] != "rest-hook" {
        return Err(unprocessable(
            "not-supported",
            format!(
                "channel type {} is not supported; use rest-hook",
                channel["type"].as_str().unwrap_or("(none)")
            ),
            "Subscription.channel.type",
        ));
    }
    let endpoint = channel["endpoint"]
        .as_str()
        .filter(|e| e.starts_with("http://") || e.starts_with("https://"))
        .ok_or_else(|| {
            unprocessable(
                "required",
                "a rest-hook channel needs an http(s) endpoint",
                "Subscription.channel.endpoint",
            )
        })?
        .to_owned();
    if reqwest::Url::parse(&endpoint).is_err() {
        return Err(unprocessable(
            "value",
            "the endpoint is not a URL",
            "Subscription.channel.endpoint",
        ));
    }
    if let Some(payload) = channel["payload"].as_str() {
        if payload != "application/fhir+json" {
            return Err(unprocessable(
                "not-supported",
                "payloads are application/fhir+json",
                "Subscription.channel.payload",
            ));
        }
    }
    let content = extension(&channel["_payload"], PAYLOAD_CONTENT)
        .and_then(|e| e["valueCode"].as_str())
        .unwrap_or("full-resource");
    if content != "full-resource" {
        return Err(unprocessable(
            "not-supported",
            format!("payload content {content} is not supported; use full-resource"),
            "Subscription.channel.payload",
        ));
    }
    let headers: Vec<String> = channel["header"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h.as_str().map(str::to_owned))
        .collect();
    let mut org = None;
    let filters: Vec<&Value> = subscription["_criteria"]["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["url"] == FILTER_CRITERIA)
        .collect();
    if filters.len() > 1 {
        return Err(unprocessable(
            "not-supported",
            "one org-identifier filter at most",
            "Subscription.criteria",
        ));
    }
    if let Some(filter) = filters.first() {
        let text = filter["valueString"].as_str().unwrap_or_default();
        let (name, value) = text.split_once('=').ok_or_else(|| {
            unprocessable("value", "a filter is name=value", "Subscription.criteria")
        })?;
        if !matches!(name, "org-identifier" | "orgIdentifier") || value.is_empty() {
            return Err(unprocessable(
                "not-supported",
                format!("filter {name} is not supported; use org-identifier"),
                "Subscription.criteria",
            ));
        }
        org = Some(value.to_owned());
    }
    Ok((endpoint, headers, org))
}

/// Middleware on the FHIR routes: `POST /fhir/Subscription` is PAS's (handshake, outbox
/// registration); every other Subscription interaction is the FHIR store's.
pub async fn intercept_create(
    State(api): State<Arc<PasApi>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path().trim_end_matches('/');
    let method = request.method().clone();
    if matches!(method, http::Method::PUT | http::Method::PATCH) {
        // A PAS subscription's endpoint and filter are PAS's record of it: changing the
        // resource would not change them, so it is refused. (A DELETE goes through:
        // notifications check that the Subscription still exists. Other Subscriptions are
        // plain resources of the FHIR store.)
        let id = path.strip_prefix("/fhir/Subscription/").unwrap_or_default();
        let pas_subscription = !id.is_empty()
            && !id.contains('/')
            && matches!(load_state(&api, id).await, Ok(Some(_)));
        if pas_subscription {
            return axum::response::IntoResponse::into_response(FhirError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                Issue::error(
                    "not-supported",
                    "a PAS Subscription cannot be changed; delete it and create another",
                ),
            ));
        }
    }
    if method != http::Method::POST || path != "/fhir/Subscription" {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, api.max_body_bytes)
        .await
        .map_err(|_| {
            FhirError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Issue::error("too-costly", "the request body is too large"),
            )
        });
    let answer = match bytes {
        Ok(bytes) => create(api, parts.headers, bytes).await,
        Err(e) => Err(e),
    };
    answer.unwrap_or_else(axum::response::IntoResponse::into_response)
}

/// `POST /fhir/Subscription`.
async fn create(api: Arc<PasApi>, headers: HeaderMap, bytes: Bytes) -> Result<Response, FhirError> {
    check_content_type(&headers)?;
    let mut subscription = parse_json(&bytes)?;
    if subscription["resourceType"] != "Subscription" {
        return Err(
            FhirError::bad_request("invalid", "the body must be a Subscription").at("resourceType"),
        );
    }
    if !api.schema.is_valid(&subscription) {
        let schema = api.schema.clone();
        let copy = subscription.clone();
        return Err(tokio::task::spawn_blocking(move || schema.explain(&copy))
            .await
            .map_err(|_| FhirError::internal("validation did not complete"))?);
    }
    let (endpoint, channel_headers, org_identifier) = parse_subscription(&subscription)?;
    let id = uuid::Uuid::new_v4().to_string();
    subscription["status"] = json!("requested");
    subscription["id"] = json!(id);
    let state = SubscriptionState {
        id: id.clone(),
        endpoint,
        headers: channel_headers,
        org_identifier,
        status: "requested".into(),
        events: 0,
        error: None,
    };
    api.outbound
        .check_caller_url(&state.endpoint)
        .map_err(|e| unprocessable("value", e, "Subscription.channel.endpoint"))?;
    let sink = sink_for(&state, &api.outbound)
        .map_err(|e| unprocessable("value", e, "Subscription.channel.header"))?;
    let stored = write_subscription(&api, subscription, true).await?;
    save_state(&api, &state, Vec::new()).await?;
    api.engine
        .add_destination(&state.destination(), Arc::new(sink), destination_config());
    api.engine.mark_internal(&state.destination());
    tracing::info!(subscription = %id, "subscription requested; handshake follows");
    let task_api = api.clone();
    api.engine
        .spawn(async move { handshake(task_api, state).await });
    let mut response = json_response(StatusCode::CREATED, &stored);
    if let Ok(location) =
        http::HeaderValue::from_str(&format!("{}/Subscription/{id}", api.base_url))
    {
        response
            .headers_mut()
            .insert(http::header::LOCATION, location);
    }
    Ok(response)
}

/// Stores the Subscription resource (create with its id, or a new version), returning it as
/// stored.
async fn write_subscription(
    api: &PasApi,
    subscription: Value,
    create: bool,
) -> Result<Value, FhirError> {
    let id = subscription["id"].as_str().unwrap_or_default().to_owned();
    let action = if create {
        Action::Create {
            id: Some(id),
            resource: subscription,
            if_none_exist: None,
        }
    } else {
        Action::Update {
            id,
            resource: subscription,
            if_match: None,
        }
    };
    let result = api
        .store
        .write(
            vec![Mutation {
                resource_type: "Subscription".into(),
                action,
                full_url: None,
            }],
            true,
        )
        .await
        .map_err(store_error)?;
    match result {
        WriteResult::Committed(outcomes) => {
            let version = match outcomes.into_iter().next() {
                Some(crate::store::Outcome::Created(v) | crate::store::Outcome::Updated(v)) => v,
                _ => return Err(FhirError::internal("the Subscription was not stored")),
            };
            serde_json::from_slice(&version.body)
                .map_err(|e| FhirError::internal(format!("stored Subscription unreadable: {e}")))
        }
        WriteResult::Aborted { error, .. } => Err(error),
        WriteResult::Each(_) => Err(FhirError::internal("unexpected store answer")),
    }
}

async fn save_state(
    api: &PasApi,
    state: &SubscriptionState,
    mut also: Vec<KvOp>,
) -> Result<(), FhirError> {
    let bytes = serde_json::to_vec(state)
        .map_err(|e| FhirError::internal(format!("subscription state did not serialize: {e}")))?;
    also.push(KvOp::put(SUBSCRIPTIONS, state.id.clone(), bytes));
    api.store.kv_apply(also).await.map_err(store_error)
}

async fn load_state(api: &PasApi, id: &str) -> Result<Option<SubscriptionState>, FhirError> {
    let found = api
        .store
        .kv_get(SUBSCRIPTIONS, vec![id.to_owned()])
        .await
        .map_err(store_error)?;
    Ok(found
        .into_iter()
        .next()
        .flatten()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok()))
}

/// The SubscriptionStatus (R4: Parameters) of `state` for a notification `kind`.
fn status_parameters(api: &PasApi, state: &SubscriptionState, kind: &str, status: &str) -> Value {
    let mut parameters = vec![
        json!({"name": "subscription", "valueReference": {"reference": format!("{}/Subscription/{}", api.base_url, state.id)}}),
        json!({"name": "topic", "valueCanonical": TOPIC}),
        json!({"name": "status", "valueCode": status}),
        json!({"name": "type", "valueCode": kind}),
        json!({"name": "events-since-subscription-start", "valueString": state.events.to_string()}),
    ];
    if let Some(error) = &state.error {
        parameters.push(json!({"name": "error", "valueCodeableConcept": {"text": error}}));
    }
    json!({
        "resourceType": "Parameters",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": {"profile": [STATUS_PROFILE]},
        "parameter": parameters,
    })
}

fn now() -> String {
    crate::fhir::date::format_instant(crate::fhir::date::now_micros())
}

/// Checks the endpoint with a handshake; the subscription becomes `active`, or `error`.
async fn handshake(api: Arc<PasApi>, mut state: SubscriptionState) {
    let parameters = status_parameters(&api, &state, "handshake", "requested");
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "history",
        "timestamp": now(),
        "entry": [{
            "fullUrl": format!("urn:uuid:{}", parameters["id"].as_str().unwrap_or_default()),
            "resource": parameters,
            "request": {"method": "GET", "url": format!("{}/Subscription/{}/$status", api.base_url, state.id)},
            "response": {"status": "200"},
        }],
    });
    let outcome = match sink_for(&state, &api.outbound) {
        Ok(sink) => {
            let mut last = Ok(());
            for attempt in 1..=HANDSHAKE_ATTEMPTS {
                last = sink.post(&bundle).await;
                if last.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            last.map_err(|e| e.to_string())
        }
        Err(e) => Err(e),
    };
    let (status, error) = match outcome {
        Ok(()) => ("active", None),
        Err(e) => ("error", Some(format!("the handshake failed: {e}"))),
    };
    let _one_at_a_time = api.subscriptions.lock().await;
    if let Ok(Some(current)) = load_state(&api, &state.id).await {
        state = current;
    }
    state.status = status.into();
    state.error = error.clone();
    if let Err(e) = set_status(&api, &state).await {
        tracing::error!(subscription = %state.id, error = %e, "subscription status not recorded");
    }
    tracing::info!(subscription = %state.id, status, "subscription handshake done");
}

/// Records `state` and puts its status (and error) on the Subscription resource.
async fn set_status(api: &PasApi, state: &SubscriptionState) -> Result<(), FhirError> {
    save_state(api, state, Vec::new()).await?;
    let current = api
        .store
        .read("Subscription", &state.id)
        .await
        .map_err(store_error)?
        .filter(|v| !v.is_deleted());
    if let Some(version) = current {
        let mut subscription: Value = serde_json::from_slice(&version.body)
            .map_err(|e| FhirError::internal(format!("stored Subscription unreadable: {e}")))?;
        subscription["status"] = json!(state.status);
        match &state.error {
            Some(error) => subscription["error"] = json!(error),
            None => {
                if let Some(object) = subscription.as_object_mut() {
                    object.remove("error");
                }
            }
        }
        write_subscription(api, subscription, false).await?;
    }
    Ok(())
}

/// Sends every matching active subscription a notification about `record` (a pended claim
/// that was just decided), through the sync outbox.
pub async fn notify(api: &PasApi, record: &ClaimRecord) {
    // One notification at a time: each takes the next event number of its subscription.
    let _one_at_a_time = api.subscriptions.lock().await;
    let states = match api.store.kv_scan(SUBSCRIPTIONS, None, usize::MAX).await {
        Ok(states) => states,
        Err(e) => {
            tracing::error!(claim = %record.id, error = %e, "subscriptions not read; nobody notified");
            return;
        }
    };
    for (_, bytes) in states {
        let Ok(mut state) = serde_json::from_slice::<SubscriptionState>(&bytes) else {
            continue;
        };
        if state.status != "active" || !state.matches(record) {
            continue;
        }
        // A Subscription deleted (by any route) is over.
        let exists = api
            .store
            .read("Subscription", &state.id)
            .await
            .ok()
            .flatten()
            .is_some_and(|v| !v.is_deleted());
        if !exists {
            state.status = "off".into();
            if let Err(e) = save_state(api, &state, Vec::new()).await {
                tracing::error!(subscription = %state.id, error = %e, "subscription state not recorded");
            }
            continue;
        }
        if let Err(e) = send(api, &mut state, record).await {
            tracing::error!(subscription = %state.id, claim = %record.id, error = %e, "notification not queued");
        }
    }
}

async fn send(
    api: &PasApi,
    state: &mut SubscriptionState,
    record: &ClaimRecord,
) -> Result<(), FhirError> {
    state.events += 1;
    let response = super::respond::response_bundle(record, &api.base_url);
    // The focus is the response Bundle, as the entry after the status carries it.
    let focus = format!(
        "{}/Bundle/{}",
        api.base_url,
        response["id"].as_str().unwrap_or_default()
    );
    let mut parameters = status_parameters(api, state, "event-notification", "active");
    if let Some(list) = parameters["parameter"].as_array_mut() {
        list.push(json!({"name": "notification-event", "part": [
            {"name": "event-number", "valueString": state.events.to_string()},
            {"name": "timestamp", "valueInstant": now()},
            {"name": "focus", "valueReference": {"reference": focus}},
        ]}));
    }
    let id = uuid::Uuid::new_v4().to_string();
    let bundle = json!({
        "resourceType": "Bundle",
        "id": id,
        "type": "history",
        "timestamp": now(),
        "entry": [
            {
                "fullUrl": format!("urn:uuid:{}", parameters["id"].as_str().unwrap_or_default()),
                "resource": parameters,
                "request": {"method": "GET", "url": format!("{}/Subscription/{}/$status", api.base_url, state.id)},
                "response": {"status": "200"},
            },
            {
                "fullUrl": focus,
                "resource": response,
                "request": {"method": "POST", "url": "Claim/$submit"},
                "response": {"status": "200"},
            },
        ],
    });
    let body = serde_json::to_vec(&bundle)
        .map_err(|e| FhirError::internal(format!("notification did not serialize: {e}")))?;
    save_state(api, state, vec![KvOp::put(NOTIFICATIONS, id.clone(), body)]).await?;
    api.engine
        .submit(crate::sync::JobRequest {
            source: NOTIFICATION_SOURCE.into(),
            destination: state.destination(),
            scope: crate::sync::Scope::Resources {
                references: vec![format!("Bundle/{id}")],
            },
            track_results: false,
            internal: true,
        })
        .await
        .map_err(FhirError::from)?;
    tracing::info!(subscription = %state.id, claim = %record.id, event = state.events, "notification queued");
    Ok(())
}

/// `GET /fhir/Subscription/{id}/$status`: the subscription's status, in `error` when a
/// notification could not be delivered.
pub async fn status(
    State(api): State<Arc<PasApi>>,
    Path(id): Path<String>,
) -> Result<Response, FhirError> {
    let _one_at_a_time = api.subscriptions.lock().await;
    let mut state = load_state(&api, &id)
        .await?
        .ok_or_else(|| FhirError::not_found(format!("no Subscription/{id}")))?;
    let destination = state.destination();
    let undelivered = api
        .engine
        .dead_letters(None, usize::MAX)
        .await?
        .into_iter()
        .filter(|letter| letter.destination == destination)
        .map(|letter| letter.reason)
        .next_back();
    if let Some(reason) = undelivered {
        if state.status != "error" {
            state.status = "error".into();
            state.error = Some(format!("a notification could not be delivered: {reason}"));
            set_status(&api, &state).await?;
        }
    }
    let parameters = status_parameters(&api, &state, "query-status", &state.status);
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "timestamp": now(),
        "total": 1,
        "entry": [{
            "fullUrl": format!("urn:uuid:{}", parameters["id"].as_str().unwrap_or_default()),
            "resource": parameters,
            "search": {"mode": "match"},
        }],
    });
    Ok(json_response(StatusCode::OK, &bundle))
}
