//! `GET /events`: Server-Sent Events per tenant and practitioner (or patient).
//!
//! One broadcast channel feeds every connection; each connection only filters. An idle
//! connection costs a receiver and its socket — the heartbeat comes from one timer for all,
//! not one per connection — so thousands of open review pages stay cheap. Event ids grow
//! across restarts (they start from the clock), and the last 1,024 events are kept so a page
//! that reconnects with `Last-Event-ID` gets what it missed.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use tokio::sync::broadcast;

use super::{Pipeline, Transaction};

const KEPT: usize = 1024;
/// The notice that ends every stream.
const CLOSING: &str = "closing";

/// One notification.
#[derive(Debug)]
pub struct Notice {
    /// `None` for heartbeats.
    pub id: Option<u64>,
    pub name: &'static str,
    pub tenant: String,
    pub patient_hash: String,
    pub practitioners: Vec<String>,
    pub data: String,
}

/// Who a connection listens for.
#[derive(Debug, Clone)]
pub struct Filter {
    pub tenant: String,
    pub patient_hash: Option<String>,
    pub practitioner: Option<String>,
}

impl Filter {
    fn wants(&self, notice: &Notice) -> bool {
        if notice.id.is_none() {
            return true;
        }
        notice.tenant == self.tenant
            && (self.patient_hash.is_none() && self.practitioner.is_none()
                || self.patient_hash.as_deref() == Some(notice.patient_hash.as_str())
                || self
                    .practitioner
                    .as_ref()
                    .is_some_and(|p| notice.practitioners.contains(p)))
    }
}

/// The fan-out of notifications to connections.
pub struct Hub {
    sender: broadcast::Sender<Arc<Notice>>,
    recent: Mutex<VecDeque<Arc<Notice>>>,
    next_id: AtomicU64,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Self {
        Self {
            sender: broadcast::channel(256).0,
            recent: Mutex::new(VecDeque::with_capacity(KEPT)),
            next_id: AtomicU64::new(u64::try_from(super::now_micros()).unwrap_or(1)),
        }
    }

    /// Sends `name` about `transaction` to every page listening for it.
    pub fn publish(&self, name: &'static str, transaction: &Transaction) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let notice = Arc::new(Notice {
            id: Some(id),
            name,
            tenant: transaction.tenant.clone(),
            patient_hash: transaction.patient_hash.clone(),
            practitioners: transaction.practitioners.clone(),
            data: transaction.summary().to_string(),
        });
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() == KEPT {
                recent.pop_front();
            }
            recent.push_back(notice.clone());
        }
        metrics::counter!("fhirgate_pipeline_events_total", "event" => name).increment(1);
        let _ = self.sender.send(notice);
    }

    fn heartbeat(&self) {
        let _ = self.sender.send(Arc::new(Notice {
            id: None,
            name: "heartbeat",
            tenant: String::new(),
            patient_hash: String::new(),
            practitioners: Vec::new(),
            data: format!("{{\"time\":\"{}\"}}", super::instant(super::now_micros())),
        }));
    }

    /// Events after `last` that `filter` wants, oldest first.
    fn since(&self, last: u64, filter: &Filter) -> Vec<Arc<Notice>> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent
            .iter()
            .filter(|n| n.id.is_some_and(|id| id > last) && filter.wants(n))
            .cloned()
            .collect()
    }

    /// Ends every stream (at shutdown, so open review pages do not hold it for the grace
    /// period; they reconnect to the next process by themselves).
    pub fn close(&self) {
        let _ = self.sender.send(Arc::new(Notice {
            id: None,
            name: CLOSING,
            tenant: String::new(),
            patient_hash: String::new(),
            practitioners: Vec::new(),
            data: String::new(),
        }));
    }

    /// Connections listening now.
    pub fn listeners(&self) -> usize {
        self.sender.receiver_count()
    }
}

pub(super) async fn heartbeat(pipeline: Arc<Pipeline>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        pipeline.events.heartbeat();
        metrics::gauge!("fhirgate_pipeline_sse_connections")
            .set(pipeline.events.listeners() as f64);
    }
}

#[derive(Deserialize)]
pub struct EventsQuery {
    tenant: Option<String>,
    practitioner: Option<String>,
}

fn event_of(notice: &Notice) -> Event {
    let event = Event::default()
        .event(notice.name)
        .data(notice.data.clone());
    match notice.id {
        Some(id) => event.id(id.to_string()),
        None => event,
    }
}

fn stream(
    receiver: broadcast::Receiver<Arc<Notice>>,
    backlog: Vec<Arc<Notice>>,
    filter: Filter,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let hello = Event::default()
        .event("hello")
        .retry(Duration::from_secs(3))
        .data(format!("{{\"tenant\":{:?}}}", filter.tenant));
    let backlog = std::iter::once(Ok(hello)).chain(backlog.into_iter().map(|n| Ok(event_of(&n))));
    let live =
        futures_util::stream::unfold((receiver, filter), |(mut receiver, filter)| async move {
            loop {
                match receiver.recv().await {
                    Ok(notice) if notice.name == CLOSING => return None,
                    Ok(notice) if filter.wants(&notice) => {
                        return Some((Ok(event_of(&notice)), (receiver, filter)))
                    }
                    Ok(_) => {}
                    // Too slow to keep up: say so, the page reloads its list.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let event = Event::default().event("resync").data("{}");
                        return Some((Ok(event), (receiver, filter)));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
    futures_util::StreamExt::chain(futures_util::stream::iter(backlog), live)
}

/// `GET /events`: a review session's events (its tenant, and its patient or practitioner),
/// or — for an authenticated API caller — a tenant's, optionally one practitioner's.
pub async fn events(
    State(pipeline): State<Arc<Pipeline>>,
    headers: HeaderMap,
    Query(query): Query<EventsQuery>,
) -> Response {
    // A page with a session cookie listens as that session or not at all: the guard let it in
    // on the cookie alone, so it never falls through to the API caller's tenant-wide view.
    let session = if super::app::has_session_cookie(&headers) {
        match super::app::session_of(&pipeline, &headers).await {
            Some(session) => Some(session),
            None => {
                return (
                    StatusCode::UNAUTHORIZED,
                    axum::Json(serde_json::json!({"error": "the review session has ended; open the page from the EHR again"})),
                )
                    .into_response()
            }
        }
    } else {
        None
    };
    let filter = match session {
        // A review page sees its own patient's items, whoever else the clinician treats.
        Some(session) => Filter {
            patient_hash: Some(pipeline.patient_hash(&session.tenant, &session.patient)),
            practitioner: None,
            tenant: session.tenant,
        },
        None => match query.tenant {
            Some(tenant) if pipeline.tenants.contains_key(&tenant) => Filter {
                tenant,
                patient_hash: None,
                practitioner: query.practitioner,
            },
            _ => {
                return (
                    StatusCode::BAD_REQUEST,
                    axum::Json(serde_json::json!({"error": "name a configured tenant (?tenant=…), or open the review page"})),
                )
                    .into_response()
            }
        },
    };
    // Subscribe before reading the backlog, so nothing falls between them.
    let receiver = pipeline.events.sender.subscribe();
    let backlog = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|last| pipeline.events.since(last, &filter))
        .unwrap_or_default();
    let mut response = Sse::new(stream(receiver, backlog, filter)).into_response();
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response
        .headers_mut()
        .insert("x-accel-buffering", http::HeaderValue::from_static("no"));
    response
}
