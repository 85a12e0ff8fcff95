//! `fhirgate sync`: one job from the command line, with a progress bar while it runs and a
//! summary table at the end. It runs the engine in this process on the configured store, or,
//! with `--server`, asks a running gateway to do it and follows the job there.

use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use super::model::{DeadLetter, Job};
use crate::config::Config;

/// What to sync, as given on the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct SyncOptions {
    /// Source name (`local` is the embedded store); default `sync.default_source`.
    #[arg(long)]
    pub source: Option<String>,
    /// Destination name (`local` is the embedded store); default `sync.default_destination`.
    #[arg(long)]
    pub destination: Option<String>,
    /// One patient and everything for that patient.
    #[arg(long, conflicts_with = "resources")]
    pub patient: Option<String>,
    /// Resource types, comma-separated (with --patient: only these types).
    #[arg(long)]
    pub types: Option<String>,
    /// Only resources updated since this date or instant (types syncs); the last run's
    /// watermark otherwise.
    #[arg(long)]
    pub since: Option<String>,
    /// Listed resources, comma-separated `Type/id`.
    #[arg(long)]
    pub resources: Option<String>,
    /// Run the job on this running gateway (`http://host:8080`) instead of in this process.
    #[arg(long)]
    pub server: Option<String>,
    /// With --server: the API key or bearer token to present (a sync-operator's).
    #[arg(long, env = "FHIRGATE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

impl SyncOptions {
    /// The `POST /sync/jobs` body.
    fn request(&self) -> Value {
        let mut body = json!({});
        let fields = [
            ("source", &self.source),
            ("destination", &self.destination),
            ("patient", &self.patient),
            ("since", &self.since),
            ("types", &self.types),
        ];
        for (name, value) in fields {
            if let Some(value) = value {
                body[name] = json!(value);
            }
        }
        if let Some(resources) = &self.resources {
            let list: Vec<&str> = resources.split(',').map(str::trim).collect();
            body["resources"] = json!(list);
        }
        body
    }
}

/// Runs the job to its end; the exit code is 0 when everything arrived, 1 when anything was
/// dead-lettered, missing or unreadable.
pub async fn run(config: Config, options: SyncOptions) -> anyhow::Result<i32> {
    let (job, dead) = match &options.server {
        Some(server) => run_remote(server, &config, &options).await?,
        None => run_local(&config, &options).await?,
    };
    print!("{}", summary(&job, &dead));
    Ok(if job.has_problems() { 1 } else { 0 })
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} resources ({per_sec}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn show(bar: &ProgressBar, job: &Job) {
    let counts = &job.counts;
    bar.set_length(counts.queued);
    bar.set_position(counts.done + counts.skipped + counts.failed);
    let state = serde_json::to_value(job.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    bar.set_message(format!(
        "{state}, {} retried, {} failed",
        counts.retried,
        counts.failed + counts.failed_pages
    ));
}

async fn run_local(
    config: &Config,
    options: &SyncOptions,
) -> anyhow::Result<(Job, Vec<DeadLetter>)> {
    let app = crate::App::build(config, &config.public_base_url())
        .await
        .context(
            "opening the store (is a server already running on this data folder? use --server)",
        )?;
    let job_request = super::api::job_request(&app.sync_api, options.request())
        .map_err(|e| anyhow::anyhow!("{}", outcome_text(&e.to_operation_outcome())))?;
    let job = app.sync.submit(job_request).await?;
    let bar = progress_bar();
    let finished = loop {
        let current = app
            .sync
            .wait(job.id, Duration::from_millis(250))
            .await
            .context("the job disappeared")?;
        show(&bar, &current);
        if current.state.is_finished() {
            break current;
        }
        if let Some(signal) = interrupted() {
            bar.abandon_with_message(format!(
                "interrupted ({signal}); the job resumes on the next start"
            ));
            app.sync.shutdown(Duration::from_secs(5)).await;
            app.store.close().await;
            anyhow::bail!("interrupted");
        }
    };
    bar.finish_and_clear();
    let dead = dead_letters_of(&app.sync.dead_letters(None, usize::MAX).await?, finished.id);
    app.sync
        .shutdown(Duration::from_secs(config.server.shutdown_grace_secs))
        .await;
    app.store.close().await;
    Ok((finished, dead))
}

async fn run_remote(
    server: &str,
    config: &Config,
    options: &SyncOptions,
) -> anyhow::Result<(Job, Vec<DeadLetter>)> {
    let server = server.trim_end_matches('/');
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = &options.api_key {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", key.trim()))
            .context("the API key is not a valid header value")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let http = crate::remote::outbound::Outbound::new(&config.outbound)?
        .client()
        .default_headers(headers)
        .build()?;
    let response = http
        .post(format!("{server}/sync/jobs"))
        .json(&options.request())
        .send()
        .await
        .with_context(|| format!("reaching {server}"))?;
    let status = response.status();
    let body: Value = response.json().await.context("reading the answer")?;
    if !status.is_success() {
        anyhow::bail!(
            "{server} refused the job ({status}): {}",
            outcome_text(&body)
        );
    }
    let mut job: Job = serde_json::from_value(body).context("reading the job")?;
    let bar = progress_bar();
    while !job.state.is_finished() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        job = http
            .get(format!("{server}/sync/jobs/{}", job.id))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        show(&bar, &job);
    }
    bar.finish_and_clear();
    let mut dead = Vec::new();
    let mut after = 0u64;
    loop {
        let page: Value = http
            .get(format!(
                "{server}/sync/dead-letters?after={after}&_count=1000"
            ))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let letters: Vec<DeadLetter> =
            serde_json::from_value(page["deadLetters"].clone()).unwrap_or_default();
        let full = letters.len() == 1000;
        after = letters.last().map_or(after, |l| l.id);
        dead.extend(letters);
        if !full {
            break;
        }
    }
    Ok((job.clone(), dead_letters_of(&dead, job.id)))
}

fn dead_letters_of(all: &[DeadLetter], job: u64) -> Vec<DeadLetter> {
    all.iter().filter(|l| l.job == job).cloned().collect()
}

fn outcome_text(body: &Value) -> String {
    body["issue"][0]["diagnostics"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| body.to_string())
}

/// Ctrl-C pressed since the last look.
fn interrupted() -> Option<&'static str> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Once;
    static SEEN: AtomicBool = AtomicBool::new(false);
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        tokio::spawn(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                SEEN.store(true, Ordering::SeqCst);
            }
        });
    });
    SEEN.load(Ordering::SeqCst).then_some("ctrl-c")
}

/// The table printed at the end: resources by type, totals, and the dead letters.
pub fn summary(job: &Job, dead: &[DeadLetter]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let state = serde_json::to_value(job.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "sync job {} {} → {}: {state}",
        job.id, job.source, job.destination
    );
    let _ = writeln!(
        out,
        "{:<28} {:>9} {:>9} {:>9}",
        "resource type", "synced", "unchanged", "failed"
    );
    for (resource_type, counts) in &job.types {
        let _ = writeln!(
            out,
            "{resource_type:<28} {:>9} {:>9} {:>9}",
            counts.done, counts.skipped, counts.failed
        );
    }
    let c = &job.counts;
    let _ = writeln!(
        out,
        "{:<28} {:>9} {:>9} {:>9}",
        "total", c.done, c.skipped, c.failed
    );
    let elapsed = match (
        crate::fhir::date::parse_range(&job.created),
        job.finished
            .as_deref()
            .and_then(crate::fhir::date::parse_range),
    ) {
        (Some(start), Some(end)) => (end.start - start.start) as f64 / 1e6,
        _ => 0.0,
    };
    let settled = (c.done + c.skipped + c.failed) as f64;
    let rate = if elapsed > 0.0 {
        settled / elapsed
    } else {
        0.0
    };
    let _ = writeln!(
        out,
        "{} retries, {} unreadable pages, {elapsed:.1} s, {rate:.0} resources/s",
        c.retried, c.failed_pages
    );
    for missing in &job.missing {
        let _ = writeln!(out, "missing at the source: {missing}");
    }
    for error in &job.errors {
        let _ = writeln!(out, "error: {error}");
    }
    for letter in dead.iter().take(20) {
        let what = match (&letter.resource_type, &letter.resource_id, &letter.url) {
            (Some(t), Some(id), _) => format!("{t}/{id}"),
            (_, _, Some(url)) => url.clone(),
            _ => "page".into(),
        };
        let _ = writeln!(out, "dead letter {}: {what}: {}", letter.id, letter.reason);
    }
    if dead.len() > 20 {
        let _ = writeln!(
            out,
            "… and {} more dead letters (GET /sync/dead-letters)",
            dead.len() - 20
        );
    }
    out
}
