//! The model-backed extractor: an OpenAI or Azure OpenAI chat model through `async-openai`.
//!
//! The model sees a note with the patient's names, identifiers, addresses, phone numbers and
//! birth dates masked out (same length, so positions still line up), answers in a strict JSON
//! schema at temperature 0, and must quote the words each fact rests on. A fact whose quote is
//! not in the note is dropped — a model may paraphrase or invent, the packet may not. Calls
//! time out and are retried; when they keep failing, [`super::Extractor`] uses the rules.

use std::sync::LazyLock;
use std::time::Duration;

use async_openai::config::{AzureConfig, OpenAIConfig};
use async_openai::types::chat::{
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage,
    ChatCompletionRequestUserMessage, CreateChatCompletionRequest, ResponseFormat,
    ResponseFormatJsonSchema,
};
use regex::Regex;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Note, NoteFact, KINDS};
use crate::config::{LlmConfig, LlmProvider};

/// Why a model call gave nothing usable.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("the model could not be reached: {0}")]
    Transport(String),
    #[error("the model's answer is not the JSON asked for: {0}")]
    Invalid(String),
}

/// A chat model that answers in JSON.
#[async_trait::async_trait]
pub trait LlmClient: Send + Sync {
    /// The model's JSON answer (as text) to `user`, under `system`, in the shape of `schema`.
    async fn complete(&self, system: &str, user: &str, schema: &Value) -> Result<String, LlmError>;
    /// The longest note text sent in one call, in bytes.
    fn max_note_bytes(&self) -> usize {
        24_000
    }
}

enum Backend {
    OpenAi(async_openai::Client<OpenAIConfig>),
    Azure(async_openai::Client<AzureConfig>),
}

/// [`LlmClient`] over the OpenAI chat completions API (or Azure OpenAI's).
pub struct OpenAiClient {
    backend: Backend,
    model: String,
    retries: u32,
    max_note_bytes: usize,
}

impl OpenAiClient {
    /// The client `config` describes; the key comes from the environment variable it names.
    pub fn new(config: &LlmConfig, http: reqwest::ClientBuilder) -> anyhow::Result<Self> {
        let key = std::env::var(&config.api_key_env).map_err(|_| {
            anyhow::anyhow!(
                "extract.llm is enabled but the environment variable {} (the API key) is not set",
                config.api_key_env
            )
        })?;
        let http = http
            .timeout(Duration::from_secs(config.timeout_secs.max(1)))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let backend = match config.provider {
            LlmProvider::Openai => Backend::OpenAi(
                async_openai::Client::with_config(
                    OpenAIConfig::new()
                        .with_api_base(config.base_url.trim_end_matches('/'))
                        .with_api_key(key),
                )
                .with_http_client(http),
            ),
            LlmProvider::Azure => Backend::Azure(
                async_openai::Client::with_config(
                    AzureConfig::new()
                        .with_api_base(config.base_url.trim_end_matches('/'))
                        .with_deployment_id(&config.model)
                        .with_api_version(&config.api_version)
                        .with_api_key(key),
                )
                .with_http_client(http),
            ),
        };
        Ok(Self {
            backend,
            model: config.model.clone(),
            retries: config.retries,
            max_note_bytes: config.max_note_bytes,
        })
    }

    async fn once(&self, request: CreateChatCompletionRequest) -> Result<String, LlmError> {
        let response = match &self.backend {
            Backend::OpenAi(client) => client.chat().create(request).await,
            Backend::Azure(client) => client.chat().create(request).await,
        };
        let response = response.map_err(|e| match e {
            async_openai::error::OpenAIError::JSONDeserialize(e, _) => {
                LlmError::Invalid(e.to_string())
            }
            other => LlmError::Transport(other.to_string()),
        })?;
        let choice = response
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| LlmError::Invalid("no choices in the answer".into()))?;
        if let Some(refusal) = choice.message.refusal {
            return Err(LlmError::Invalid(format!("the model refused: {refusal}")));
        }
        choice
            .message
            .content
            .ok_or_else(|| LlmError::Invalid("the answer has no content".into()))
    }
}

#[async_trait::async_trait]
impl LlmClient for OpenAiClient {
    async fn complete(&self, system: &str, user: &str, schema: &Value) -> Result<String, LlmError> {
        let request = CreateChatCompletionRequest {
            model: self.model.clone(),
            messages: vec![
                ChatCompletionRequestMessage::System(ChatCompletionRequestSystemMessage {
                    content: system.into(),
                    name: None,
                }),
                ChatCompletionRequestMessage::User(ChatCompletionRequestUserMessage {
                    content: user.into(),
                    name: None,
                }),
            ],
            temperature: Some(0.0),
            response_format: Some(ResponseFormat::JsonSchema {
                json_schema: ResponseFormatJsonSchema {
                    description: Some("Facts found in one clinical note".into()),
                    name: "note_facts".into(),
                    schema: schema.clone(),
                    strict: Some(true),
                },
            }),
            ..CreateChatCompletionRequest::default()
        };
        let mut attempt = 0;
        loop {
            match self.once(request.clone()).await {
                Ok(answer) => return Ok(answer),
                Err(e) if attempt < self.retries => {
                    attempt += 1;
                    let wait = 250 * 2u64.pow(attempt.min(6));
                    tracing::warn!(attempt, error = %e, "the model call failed; retrying");
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn max_note_bytes(&self) -> usize {
        self.max_note_bytes
    }
}

/// The JSON schema the model answers in.
pub fn answer_schema() -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["facts"],
        "properties": {"facts": {"type": "array", "items": {
            "type": "object",
            "additionalProperties": false,
            "required": ["kind", "value", "days", "date", "quote"],
            "properties": {
                "kind": {"type": "string", "enum": KINDS},
                "value": {"type": ["string", "null"]},
                "days": {"type": ["integer", "null"]},
                "date": {"type": ["string", "null"]},
                "quote": {"type": "string"}
            }
        }}}
    })
}

const SYSTEM: &str =
    "You read one clinical note and list facts a prior-authorization reviewer needs. \
Kinds: conservative_therapy (therapy the patient actually received, not planned; value one of \
physical_therapy, chiropractic, home_exercise, nsaids, bracing, activity_modification; days = its \
duration), red_flag (present, not denied; value one of cauda_equina, malignancy, fracture, \
progressive_neurological_deficit, infection), intolerance (a medication not tolerated; value the \
lowercase generic name; date YYYY, YYYY-MM or YYYY-MM-DD when stated), treatment_failure (a \
treatment that did not work; value the lowercase generic name, or physical_therapy, nsaids, cpap; \
date as above), symptom_duration (how long the chief complaint has lasted; value null; days), \
homebound (value null). Durations in days: weeks x7, months x30, years x365, ranges take the lower \
bound, 'since <date>' counts to the note's date. Family history, plans and denied findings are not \
facts. quote: the exact words of the note the fact rests on, copied character for character. \
Text shown as asterisks was removed for privacy. Answer only in the JSON schema given.";

#[derive(Deserialize)]
struct Answer {
    facts: Vec<AnswerFact>,
}

#[derive(Deserialize)]
struct AnswerFact {
    kind: String,
    value: Option<String>,
    days: Option<i64>,
    date: Option<String>,
    quote: String,
}

/// Words that identify the patient, masked before a note leaves the process.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub terms: Vec<String>,
}

impl Identity {
    /// Names, identifiers, address parts, phone numbers, e-mail and birth date (in the forms
    /// notes write it) of a Patient resource.
    pub fn of_patient(patient: &Value) -> Self {
        let mut terms = Vec::new();
        let mut add = |v: &Value| {
            if let Some(s) = v.as_str() {
                let s = s.trim();
                if s.chars().count() >= 2 {
                    terms.push(s.to_owned());
                }
            }
        };
        for name in patient["name"].as_array().into_iter().flatten() {
            add(&name["family"]);
            add(&name["text"]);
            for given in name["given"].as_array().into_iter().flatten() {
                add(given);
            }
        }
        for identifier in patient["identifier"].as_array().into_iter().flatten() {
            add(&identifier["value"]);
        }
        for telecom in patient["telecom"].as_array().into_iter().flatten() {
            add(&telecom["value"]);
        }
        for address in patient["address"].as_array().into_iter().flatten() {
            for line in address["line"].as_array().into_iter().flatten() {
                add(line);
            }
            add(&address["city"]);
            add(&address["postalCode"]);
            add(&address["text"]);
        }
        if let Some(birth) = patient["birthDate"].as_str() {
            terms.push(birth.to_owned());
            if let [y, m, d] = birth.split('-').collect::<Vec<_>>()[..] {
                let (mn, dn) = (
                    m.trim_start_matches('0').to_owned(),
                    d.trim_start_matches('0').to_owned(),
                );
                terms.push(format!("{m}/{d}/{y}"));
                terms.push(format!("{mn}/{dn}/{y}"));
                if let Ok(month) = m.parse::<u8>() {
                    if let Ok(month) = time::Month::try_from(month) {
                        terms.push(format!("{month} {dn}, {y}"));
                        terms.push(format!("{month} {dn} {y}"));
                    }
                }
            }
        }
        terms.sort_by_key(|t| std::cmp::Reverse(t.len()));
        terms.dedup();
        Self { terms }
    }
}

static PHI_PATTERNS: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    [
        // Labelled fields: the value up to two spaces, a tab or the end of the line.
        r"(?im)\b(?:patient(?: name)?|name|pt name|dob|d\.o\.b\.|date of birth|birth ?date|mrn|medical record(?: number)?|ssn|social security(?: number)?|phone|tel|telephone|cell|mobile|address|addr|e-?mail|member id|insurance id|subscriber id|account(?: number)?)\s*[:#]\s*([^\n\t]*?)(?:\s{2,}|\t|$)",
        r"\(?\b\d{3}\)?[-. ]\d{3}[-. ]\d{4}\b",
        r"\b\d{3}-\d{2}-\d{4}\b",
        r"[\w.+-]+@[\w-]+\.[\w.-]+",
        r"\b(?:Dr|Doctor|Mr|Mrs|Ms|Miss)\.? [A-Z][a-z]+(?: [A-Z][a-z]+)?",
    ]
    .iter()
    .map(|p| Regex::new(p).unwrap_or_else(|e| panic!("bad built-in pattern {p}: {e}")))
    .collect()
});

/// `text` with identifying words replaced by `*` byte for byte, so offsets are unchanged.
pub fn mask(text: &str, identity: &Identity) -> String {
    let mut masked = text.as_bytes().to_vec();
    let mut hide = |start: usize, end: usize| {
        for b in &mut masked[start..end] {
            *b = b'*';
        }
    };
    for (i, pattern) in PHI_PATTERNS.iter().enumerate() {
        for captures in pattern.captures_iter(text) {
            // For labelled fields only the value goes, the label stays readable.
            let m = if i == 0 {
                captures.get(1)
            } else {
                captures.get(0)
            };
            if let Some(m) = m {
                hide(m.start(), m.end());
            }
        }
    }
    // Matched on the text itself, not on a lowercased copy whose offsets can differ (`İ`),
    // in any case, as whole words.
    for term in &identity.terms {
        let Ok(pattern) = regex::RegexBuilder::new(&regex::escape(term))
            .case_insensitive(true)
            .build()
        else {
            continue;
        };
        for m in pattern.find_iter(text) {
            let before = text[..m.start()].chars().next_back();
            let after = text[m.end()..].chars().next();
            if !before.is_some_and(char::is_alphanumeric)
                && !after.is_some_and(char::is_alphanumeric)
            {
                hide(m.start(), m.end());
            }
        }
    }
    // Masking whole bytes of a multi-byte character leaves only ASCII, so this cannot fail;
    // should it, the note is not sent at all.
    String::from_utf8(masked).unwrap_or_default()
}

/// Where `quote` is in `text`: exactly, else ignoring ASCII case.
fn locate(text: &str, quote: &str) -> Option<(usize, usize)> {
    let quote = quote.trim();
    if quote.is_empty() {
        return None;
    }
    if let Some(at) = text.find(quote) {
        return Some((at, at + quote.len()));
    }
    let at = text
        .to_ascii_lowercase()
        .find(&quote.to_ascii_lowercase())?;
    Some((at, at + quote.len()))
}

/// The facts of every note, from the model; the first failing call fails the whole.
pub async fn extract_all(
    llm: &dyn LlmClient,
    notes: &[Note],
    identity: &Identity,
) -> Result<Vec<NoteFact>, LlmError> {
    let schema = answer_schema();
    let mut facts = Vec::new();
    for note in notes {
        let mut limit = note.text.len().min(llm.max_note_bytes());
        while !note.text.is_char_boundary(limit) {
            limit -= 1;
        }
        let shown = &note.text[..limit];
        let masked = mask(shown, identity);
        if masked.is_empty() && !shown.is_empty() {
            return Err(LlmError::Invalid("the note could not be masked".into()));
        }
        let written = note
            .date
            .map_or_else(|| "unknown".to_owned(), |d| d.to_string());
        let user = format!("Note written on {written}:\n\n{masked}");
        let answer = llm.complete(SYSTEM, &user, &schema).await?;
        let answer: Answer =
            serde_json::from_str(&answer).map_err(|e| LlmError::Invalid(e.to_string()))?;
        for found in answer.facts {
            if !KINDS.contains(&found.kind.as_str()) {
                metrics::counter!("fhirgate_extract_llm_dropped_facts_total").increment(1);
                continue;
            }
            let Some((start, end)) = locate(&masked, &found.quote) else {
                metrics::counter!("fhirgate_extract_llm_dropped_facts_total").increment(1);
                tracing::info!(note = %note.reference, kind = %found.kind, "a fact quoting text not in the note was dropped");
                continue;
            };
            // A quote ending inside a masked character does not fall on the note's characters.
            let Some(quoted) = note.text.get(start..end) else {
                metrics::counter!("fhirgate_extract_llm_dropped_facts_total").increment(1);
                continue;
            };
            facts.push(NoteFact {
                kind: found.kind,
                value: found
                    .value
                    .map(|v| v.trim().to_lowercase().replace([' ', '-'], "_"))
                    .filter(|v| !v.is_empty()),
                days: found.days.and_then(|d| u32::try_from(d).ok()),
                date: found.date.filter(|d| !d.trim().is_empty()),
                text: quoted.to_owned(),
                note: note.reference.clone(),
                start,
                end,
            });
        }
    }
    Ok(facts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_keeps_positions_and_hides_the_patient() {
        let patient = json!({"resourceType": "Patient", "name": [{"family": "Quintero", "given": ["Marisol"]}],
            "birthDate": "1961-04-12", "identifier": [{"value": "4481-220"}],
            "address": [{"line": ["18 Alder Way"], "city": "Springfield"}]});
        let identity = Identity::of_patient(&patient);
        let text = "Patient: Marisol Quintero  DOB: 04/12/1961\nMs. Quintero (MRN 4481-220) of 18 Alder Way, \
            Springfield, call (555) 014-2231. Completed 8 weeks of PT.";
        let masked = mask(text, &identity);
        assert_eq!(masked.len(), text.len());
        for secret in [
            "Marisol",
            "Quintero",
            "04/12/1961",
            "4481-220",
            "Alder",
            "Springfield",
            "014-2231",
        ] {
            assert!(!masked.contains(secret), "{secret} in {masked}");
        }
        assert!(masked.contains("Completed 8 weeks of PT."));
        assert_eq!(
            locate(&masked, "completed 8 weeks of pt"),
            text.find("Completed").map(|s| (s, s + 23))
        );
        assert_eq!(locate(&masked, "twelve weeks of PT"), None);
        // Letters whose lowercase is longer or shorter (İ) keep the masking exact.
        let turkish =
            Identity::of_patient(&json!({"name": [{"family": "Şahin", "given": ["İlknur"]}]}));
        let note = "İlknur ŞAHIN, seen today. Completed 8 weeks of PT.";
        let hidden = mask(note, &turkish);
        assert_eq!(hidden.len(), note.len());
        assert!(
            !hidden.contains("lknur") && !hidden.contains("AHIN"),
            "{hidden}"
        );
    }
}
