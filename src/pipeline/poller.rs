//! The encounter poller: one task per tenant asking `Encounter?status=finished&date=gt{since}`.
//!
//! One search every few seconds keeps a tenant far under one request a second. Clinicians sign
//! encounters hours after they end, so each poll looks back over the tenant's lookback window;
//! the cursor (the newest encounter seen, kept in the store) reaches further back only after a
//! stop longer than that. Encounters seen again are recognised by their version and not
//! processed twice.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::{process, Pipeline, Tenant, CURSORS, SEEN};
use crate::remote::RemoteError;
use crate::store::StoreError;

/// How far the cursor trails the newest encounter seen (microseconds).
const OVERLAP_MICROS: i64 = 5 * 60 * 1_000_000;
/// Pages of one poll at most (a backlog is worked through over several polls).
const MAX_PAGES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Polls `tenant` until the store closes; waits longer after failures (and as long as a
/// throttling EHR asks).
pub async fn run(pipeline: Arc<Pipeline>, tenant: Arc<Tenant>) {
    let interval = Duration::from_secs(tenant.config.poll_interval_secs.max(1));
    let mut wait = interval;
    loop {
        match poll_once(&pipeline, &tenant).await {
            Ok(_) => wait = interval,
            Err(PollError::Store(StoreError::Closed)) => return,
            Err(e) => {
                let asked = match &e {
                    PollError::Remote(r) => r.retry_after(),
                    PollError::Store(_) => None,
                };
                wait = (wait * 2).min(Duration::from_secs(300));
                if let Some(asked) = asked {
                    wait = wait.max(asked);
                }
                metrics::counter!("fhirgate_pipeline_poll_failures_total", "tenant" => tenant.name.clone())
                    .increment(1);
                tracing::warn!(tenant = %tenant.name, error = %e, wait_secs = wait.as_secs(), "polling encounters failed");
            }
        }
        tokio::time::sleep(wait).await;
    }
}

/// The encounter's version as the dedup key uses it.
pub fn version_of(encounter: &Value) -> String {
    encounter["meta"]["versionId"]
        .as_str()
        .or_else(|| encounter["meta"]["lastUpdated"].as_str())
        .unwrap_or("1")
        .to_owned()
}

/// When the encounter ended (else began), in microseconds.
fn ended(encounter: &Value) -> Option<i64> {
    let period = &encounter["period"];
    let text = period["end"]
        .as_str()
        .or_else(|| period["start"].as_str())?;
    crate::fhir::date::parse_range(text).map(|r| r.start)
}

/// One poll: every finished encounter after the cursor is taken on once. Returns how many
/// were new.
pub async fn poll_once(pipeline: &Arc<Pipeline>, tenant: &Arc<Tenant>) -> Result<usize, PollError> {
    let stored = pipeline
        .store
        .kv_get(CURSORS, vec![tenant.name.clone()])
        .await?
        .into_iter()
        .next()
        .flatten()
        .and_then(|b| std::str::from_utf8(&b).ok()?.parse::<i64>().ok());
    let lookback = i64::try_from(tenant.config.lookback_hours).unwrap_or(24) * 3_600_000_000;
    let now = super::now_micros();
    let cursor = stored.unwrap_or(now - lookback);
    // Encounters are often signed hours after they end: every poll looks back over the
    // lookback window (or further, to the cursor, after a long stop), and the "seen" marks
    // keep each version to one transaction.
    let since = cursor.min(now - lookback);
    let params = vec![
        ("status".to_owned(), "finished".to_owned()),
        ("date".to_owned(), format!("gt{}", super::instant(since))),
    ];
    let mut page = tenant.source.search("Encounter", &params).await?;
    let mut newest = cursor;
    let mut taken = 0;
    for n in 0.. {
        for encounter in &page.resources {
            if encounter["resourceType"] != "Encounter" {
                continue;
            }
            let Some(id) = encounter["id"].as_str() else {
                continue;
            };
            if let Some(end) = ended(encounter) {
                // An end in the future (a clock or data error) must not carry the cursor along.
                newest = newest.max(end.min(now));
            }
            let key = format!("{}|{id}|{}", tenant.name, version_of(encounter));
            let seen = pipeline.store.kv_get(SEEN, vec![key.clone()]).await?;
            if seen.first().is_some_and(Option::is_some) {
                continue;
            }
            if let Some(transaction) = process::take_on(pipeline, tenant, encounter, key).await? {
                taken += 1;
                pipeline.spawn(process::run(
                    pipeline.clone(),
                    tenant.clone(),
                    transaction,
                    Some(encounter.clone()),
                ));
            }
        }
        match page.next.take() {
            Some(next) if n + 1 < MAX_PAGES => page = tenant.source.page(&next).await?,
            _ => break,
        }
    }
    let next_cursor = (newest - OVERLAP_MICROS).max(cursor);
    if next_cursor != cursor || stored.is_none() {
        pipeline
            .store
            .kv_apply(vec![crate::store::KvOp::put(
                CURSORS,
                tenant.name.clone(),
                next_cursor.to_string().into_bytes(),
            )])
            .await?;
    }
    Ok(taken)
}
