//! A subscriber's `rest-hook` endpoint as a sync destination: each "resource" delivered is a
//! notification Bundle, POSTed as it is. Going through the sync outbox gives notifications the
//! same durability, retries and dead letters as any other delivery.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::Method;
use serde_json::Value;

use super::{describe, json_or_error, Delivery, FhirSink, Outgoing, RemoteError};

pub struct RestHookSink {
    name: String,
    http: reqwest::Client,
    endpoint: String,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl RestHookSink {
    /// `headers` are the subscription's `channel.header` lines (`Name: value`); malformed
    /// ones are refused.
    pub fn new(
        name: &str,
        endpoint: &str,
        headers: &[String],
        timeout: Duration,
        outbound: &Arc<super::outbound::Outbound>,
    ) -> Result<Self, String> {
        outbound.check_caller_url(endpoint)?;
        let mut parsed = Vec::new();
        for line in headers {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| format!("header {line:?} is not `Name: value`"))?;
            let name = http::HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| format!("{:?} is not a header name", name.trim()))?;
            let value = http::HeaderValue::from_str(value.trim())
                .map_err(|_| format!("the value of header {name} is not valid"))?;
            parsed.push((name, value));
        }
        // A subscriber's redirect is not followed (the notification goes where it was told),
        // and its name may not lead to a private address unless the operator listed it.
        let http = outbound
            .caller_client(endpoint)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| format!("building the client: {e}"))?;
        Ok(Self {
            name: name.to_owned(),
            http,
            endpoint: endpoint.to_owned(),
            headers: parsed,
        })
    }

    /// POSTs one Bundle to the endpoint.
    pub async fn post(&self, bundle: &Value) -> Result<(), RemoteError> {
        let body = Bytes::from(
            serde_json::to_vec(bundle)
                .map_err(|e| RemoteError::Invalid(format!("encoding the notification: {e}")))?,
        );
        let mut request = self
            .http
            .request(Method::POST, &self.endpoint)
            .header(reqwest::header::CONTENT_TYPE, "application/fhir+json")
            .body(body);
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        let response = request
            .send()
            .await
            .map_err(|e| RemoteError::Transport(describe(&e)))?;
        metrics::counter!("fhirgate_remote_requests_total", "remote" => self.name.clone(), "status" => response.status().as_str().to_owned())
            .increment(1);
        json_or_error(&self.name, response).await.map(|_| ())
    }
}

#[async_trait::async_trait]
impl FhirSink for RestHookSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn batch_size(&self) -> usize {
        1
    }

    async fn upsert(&self, batch: Vec<Outgoing>) -> Vec<Delivery> {
        let mut out = Vec::with_capacity(batch.len());
        for item in &batch {
            out.push(match self.post(&item.resource).await {
                Ok(()) => Delivery::Done,
                // A subscriber that does not answer 2xx with JSON is still a subscriber that
                // got the notification if it answered 2xx at all.
                Err(RemoteError::Invalid(_)) => Delivery::Done,
                Err(e) => Delivery::from_error(&e),
            });
        }
        out
    }

    async fn current(
        &self,
        _resource_type: &str,
        _ids: &[String],
    ) -> Result<Vec<Option<Value>>, RemoteError> {
        Err(RemoteError::Invalid(
            "a subscriber's endpoint cannot be read back".into(),
        ))
    }
}
