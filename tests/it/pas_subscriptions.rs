//! PAS subscriptions (R4 backport): handshake, a notification when a pended claim is decided
//! (by an update or by a reviewer), filters, unsupported channels and topics, and subscriber
//! endpoints that are down.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{assert_outcome, fixtures, json, read_json, TestApp};

/// A subscriber: records every POST; answers `status` (200 unless changed).
#[derive(Clone)]
struct Subscriber {
    url: String,
    received: Arc<Mutex<Vec<Value>>>,
    status: Arc<Mutex<u16>>,
}

/// What the subscriber's handler shares: the bodies received and the status to answer.
type Inbox = (Arc<Mutex<Vec<Value>>>, Arc<Mutex<u16>>);

impl Subscriber {
    async fn start() -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(Mutex::new(200u16));
        let state = (received.clone(), status.clone());
        let app = Router::new()
            .route(
                "/notify",
                post(
                    |State((received, status)): State<Inbox>, body: axum::body::Bytes| async move {
                        if let Ok(value) = serde_json::from_slice(&body) {
                            received.lock().expect("lock").push(value);
                        }
                        let code = *status.lock().expect("lock");
                        StatusCode::from_u16(code).expect("status")
                    },
                ),
            )
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/notify", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        Self {
            url,
            received,
            status,
        }
    }

    fn received(&self) -> Vec<Value> {
        self.received.lock().expect("lock").clone()
    }

    fn answer(&self, status: u16) {
        *self.status.lock().expect("lock") = status;
    }

    /// Waits (bounded) until `count` bodies have arrived.
    async fn wait_for(&self, count: usize) -> Vec<Value> {
        for _ in 0..1000 {
            let got = self.received();
            if got.len() >= count {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("expected {count} notifications, got {:?}", self.received());
    }
}

fn subscription(endpoint: &str, org: Option<&str>) -> Value {
    let mut subscription =
        read_json(&fixtures().join("davinci/pas-ig/Subscription-PASSubscriptionExample.json"));
    subscription["channel"]["endpoint"] = json!(endpoint);
    match org {
        Some(org) => {
            subscription["_criteria"]["extension"][0]["valueString"] =
                json!(format!("org-identifier={org}"))
        }
        None => {
            if let Some(o) = subscription.as_object_mut() {
                o.remove("_criteria");
            }
        }
    }
    if let Some(o) = subscription.as_object_mut() {
        o.remove("id");
    }
    subscription
}

async fn subscribe(app: &TestApp, body: &Value) -> String {
    let response = app.post("/Subscription", body).await;
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (status, created) = json(response).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["status"], "requested");
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(location, Some(app.fhir(&format!("/Subscription/{id}"))));
    id
}

/// Waits (bounded) until the Subscription resource has `status`.
async fn status_becomes(app: &TestApp, id: &str, status: &str) -> Value {
    for _ in 0..1000 {
        let (_, subscription) = json(app.get(&format!("/Subscription/{id}")).await).await;
        if subscription["status"] == status {
            return subscription;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("Subscription/{id} never became {status}");
}

/// `name` → value of a SubscriptionStatus Parameters.
fn parameter<'a>(parameters: &'a Value, name: &str) -> &'a Value {
    parameters["parameter"]
        .as_array()
        .expect("parameters")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {parameters}"))
}

fn example(name: &str) -> Value {
    read_json(&fixtures().join("davinci/pas-ig").join(name))
}

fn update_with_diagnosis() -> Value {
    let mut update = example("Bundle-HomecareAuthorizationUpdateBundleExample.json");
    let claim = &mut update["entry"][0]["resource"];
    claim["identifier"][0]["value"] = json!("111099-UPDATE-DX");
    claim["diagnosis"] = json!([{"sequence": 1, "diagnosisCodeableConcept": {"coding": [
        {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "K90.0"}]}}]);
    update
}

/// Subscriber doubles listen on this machine: the operator allows it explicitly.
fn allow_local_subscribers(config: &mut fhirgate::config::Config) {
    config.outbound.allow_hosts = vec!["127.0.0.1".into()];
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_hears_when_a_pended_claim_is_decided() {
    let app = TestApp::start_with(allow_local_subscribers).await;
    let subscriber = Subscriber::start().await;
    let other = Subscriber::start().await;
    // The requesting organization of the IG's examples has NPI 8189991234.
    let id = subscribe(&app, &subscription(&subscriber.url, Some("8189991234"))).await;
    let other_id = subscribe(&app, &subscription(&other.url, Some("0000000000"))).await;
    status_becomes(&app, &id, "active").await;
    status_becomes(&app, &other_id, "active").await;
    let handshake = &subscriber.wait_for(1).await[0];
    assert_eq!(handshake["type"], "history");
    assert_eq!(
        parameter(&handshake["entry"][0]["resource"], "type")["valueCode"],
        "handshake"
    );

    // Pended: nothing to say yet.
    let (status, pended) = json(
        app.post(
            "/Claim/$submit",
            &example("Bundle-HomecareAuthorizationBundleExample.json"),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{pended}");
    let claim_response_id = pended["entry"][0]["resource"]["id"]
        .as_str()
        .expect("id")
        .to_owned();

    // An update decides two items: one notification, the full response after the status.
    let (status, _) = json(app.post("/Claim/$submit", &update_with_diagnosis()).await).await;
    assert_eq!(status, StatusCode::OK);
    let notification = subscriber.wait_for(2).await[1].clone();
    assert_eq!(notification["type"], "history");
    let status_parameters = &notification["entry"][0]["resource"];
    assert_eq!(status_parameters["resourceType"], "Parameters");
    assert_eq!(
        parameter(status_parameters, "type")["valueCode"],
        "event-notification"
    );
    assert_eq!(
        parameter(status_parameters, "topic")["valueCanonical"],
        "http://hl7.org/fhir/us/davinci-pas/SubscriptionTopic/PASSubscriptionTopic"
    );
    assert_eq!(
        parameter(status_parameters, "events-since-subscription-start")["valueString"],
        "1"
    );
    let event = parameter(status_parameters, "notification-event");
    let parts = event["part"].as_array().expect("parts");
    assert!(parts
        .iter()
        .any(|p| p["name"] == "event-number" && p["valueString"] == "1"));
    // The focus is the response Bundle the notification carries next.
    let focus = parts.iter().find(|p| p["name"] == "focus").expect("focus");
    assert_eq!(
        focus["valueReference"]["reference"],
        notification["entry"][1]["fullUrl"]
    );
    let response = &notification["entry"][1]["resource"];
    assert_eq!(response["resourceType"], "Bundle");
    let claim_response = &response["entry"][0]["resource"];
    assert_eq!(claim_response["resourceType"], "ClaimResponse");
    assert_eq!(claim_response["id"], claim_response_id.as_str());
    fhirgate::fhir::SchemaValidator::bundled()
        .expect("schema")
        .validate(&notification)
        .expect("the notification is valid R4");

    // A reviewer decides the last item: a second event.
    let (status, _) = json(
        app.client
            .post(app.url(&format!("/pas/claims/{claim_response_id}/decision")))
            .json(&json!({"reviewer": "Dr. Ortiz", "items": [{"sequence": 1, "action": "denied", "reason": "not homebound"}]}))
            .send()
            .await
            .expect("decision"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let second = subscriber.wait_for(3).await[2].clone();
    assert_eq!(
        parameter(
            &second["entry"][0]["resource"],
            "events-since-subscription-start"
        )["valueString"],
        "2"
    );

    // $status says so; the other organization heard nothing but its handshake.
    let (status, bundle) = json(app.get(&format!("/Subscription/{id}/$status")).await).await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    let current = &bundle["entry"][0]["resource"];
    assert_eq!(parameter(current, "status")["valueCode"], "active");
    assert_eq!(parameter(current, "type")["valueCode"], "query-status");
    assert_eq!(
        parameter(current, "events-since-subscription-start")["valueString"],
        "2"
    );
    assert_eq!(other.received().len(), 1);

    // Subscriptions are advertised.
    let (_, capability) = json(app.get("/metadata").await).await;
    let resources = capability["rest"][0]["resource"]
        .as_array()
        .expect("resources");
    let subscription = resources
        .iter()
        .find(|r| r["type"] == "Subscription")
        .expect("Subscription");
    assert!(subscription["operation"]
        .as_array()
        .expect("operations")
        .iter()
        .any(|o| o["name"] == "status"));
    let claim = resources
        .iter()
        .find(|r| r["type"] == "Claim")
        .expect("Claim");
    let operations: Vec<&str> = claim["operation"]
        .as_array()
        .expect("operations")
        .iter()
        .filter_map(|o| o["name"].as_str())
        .collect();
    assert_eq!(operations, ["submit", "inquire"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_subscriptions_are_refused_and_dead_endpoints_end_in_error() {
    let app = TestApp::start_with(|config| {
        allow_local_subscribers(config);
        config.sync.max_attempts = 2;
        config.sync.backoff_base_ms = 5;
        config.sync.backoff_max_ms = 20;
    })
    .await;
    let subscriber = Subscriber::start().await;
    let mut websocket = subscription(&subscriber.url, None);
    websocket["channel"]["type"] = json!("websocket");
    let mut other_topic = subscription(&subscriber.url, None);
    other_topic["criteria"] = json!("http://example.org/SubscriptionTopic/other");
    let mut bad_filter = subscription(&subscriber.url, Some("x"));
    bad_filter["_criteria"]["extension"][0]["valueString"] = json!("patient=Patient/1");
    for (body, expression) in [
        (websocket, "Subscription.channel.type"),
        (other_topic, "Subscription.criteria"),
        (bad_filter, "Subscription.criteria"),
    ] {
        let (status, outcome) = json(app.post("/Subscription", &body).await).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{outcome}");
        assert_outcome(&outcome, "not-supported", Some(expression));
    }
    // Endpoints outside the outbound allow-list (the cloud metadata address included) are
    // refused before anything is sent.
    for endpoint in [
        "https://hooks.elsewhere.example/notify",
        "http://169.254.169.254/latest/meta-data",
    ] {
        let (status, outcome) = json(
            app.post("/Subscription", &subscription(endpoint, None))
                .await,
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{outcome}");
        assert_outcome(&outcome, "value", Some("Subscription.channel.endpoint"));
    }

    // Nobody listens at the endpoint: the handshake fails and the subscription is in error.
    let closed = format!("http://127.0.0.1:{}/notify", crate::durability::free_port());
    let id = subscribe(&app, &subscription(&closed, None)).await;
    let errored = status_becomes(&app, &id, "error").await;
    assert!(
        errored["error"]
            .as_str()
            .expect("error")
            .contains("handshake"),
        "{errored}"
    );

    // The endpoint takes the handshake, then fails every notification: after the retries the
    // notification is a dead letter and the subscription is in error.
    let id = subscribe(&app, &subscription(&subscriber.url, None)).await;
    status_becomes(&app, &id, "active").await;
    subscriber.answer(500);
    let (status, _) = json(
        app.post(
            "/Claim/$submit",
            &example("Bundle-HomecareAuthorizationBundleExample.json"),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = json(app.post("/Claim/$submit", &update_with_diagnosis()).await).await;
    assert_eq!(status, StatusCode::OK);
    let mut letters = Vec::new();
    for _ in 0..1000 {
        let (_, body) = json(
            app.client
                .get(app.url("/sync/dead-letters"))
                .send()
                .await
                .expect("get"),
        )
        .await;
        letters = body["deadLetters"].as_array().cloned().unwrap_or_default();
        if !letters.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["destination"], format!("subscription-{id}"));
    assert_eq!(
        subscriber.received().len(),
        3,
        "handshake, then two attempts"
    );
    let (_, bundle) = json(app.get(&format!("/Subscription/{id}/$status")).await).await;
    assert_eq!(
        parameter(&bundle["entry"][0]["resource"], "status")["valueCode"],
        "error"
    );
    status_becomes(&app, &id, "error").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_decisions_get_distinct_event_numbers_and_a_deleted_subscription_hears_nothing()
{
    let app = TestApp::start_with(allow_local_subscribers).await;
    let subscriber = Subscriber::start().await;
    let id = subscribe(&app, &subscription(&subscriber.url, None)).await;
    status_becomes(&app, &id, "active").await;
    // Six pended claims (distinct identifiers), then a reviewer decision on each, all at once.
    let mut claims = Vec::new();
    for n in 0..6 {
        let mut request = example("Bundle-HomecareAuthorizationBundleExample.json");
        request["entry"][0]["resource"]["identifier"][0]["value"] =
            json!(format!("concurrent-{n}"));
        let (status, response) = json(app.post("/Claim/$submit", &request).await).await;
        assert_eq!(status, StatusCode::OK, "{response}");
        claims.push(
            response["entry"][0]["resource"]["id"]
                .as_str()
                .expect("id")
                .to_owned(),
        );
    }
    let decisions = claims.iter().map(|claim| {
        app.client
            .post(app.url(&format!("/pas/claims/{claim}/decision")))
            .json(&json!({"reviewer": "R", "items": [{"sequence": 1, "action": "approved"}]}))
            .send()
    });
    for answer in futures_util::future::join_all(decisions).await {
        assert_eq!(answer.expect("decision").status(), StatusCode::OK);
    }
    let received = subscriber.wait_for(7).await;
    let mut numbers: Vec<u64> = received[1..]
        .iter()
        .map(|n| {
            let event = parameter(&n["entry"][0]["resource"], "notification-event");
            event["part"]
                .as_array()
                .expect("parts")
                .iter()
                .find(|p| p["name"] == "event-number")
                .and_then(|p| p["valueString"].as_str())
                .and_then(|v| v.parse().ok())
                .expect("event number")
        })
        .collect();
    numbers.sort_unstable();
    assert_eq!(numbers, [1, 2, 3, 4, 5, 6]);

    // A Subscription cannot be changed in place; once deleted, it hears nothing more.
    let (status, outcome) = json(
        app.put(
            &format!("/Subscription/{id}"),
            &subscription(&subscriber.url, None),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{outcome}");
    assert_outcome(&outcome, "not-supported", None);
    let deleted = app.delete(&format!("/Subscription/{id}")).await;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let (status, _) = json(
        app.client
            .post(app.url(&format!("/pas/claims/{}/decision", claims[0])))
            .json(&json!({"reviewer": "R", "items": [{"sequence": 2, "action": "denied"}]}))
            .send()
            .await
            .expect("decision"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // Notifying runs before the decision is answered: the subscription was found gone.
    let (_, bundle) = json(app.get(&format!("/Subscription/{id}/$status")).await).await;
    assert_eq!(
        parameter(&bundle["entry"][0]["resource"], "status")["valueCode"],
        "off"
    );
    assert_eq!(subscriber.received().len(), 7, "nothing after the delete");

    // A subscriber's endpoint is not a destination callers can send to.
    let (status, outcome) = json(
        app.client
            .post(app.url("/sync/jobs"))
            .json(&json!({"source": "local", "destination": format!("subscription-{id}"), "resources": ["Patient/x"]}))
            .send()
            .await
            .expect("post"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
    assert_outcome(&outcome, "invalid", None);
}
