//! Writes, for when the double is a sync destination: `PUT Type/id`, the conditional
//! `PUT Type?identifier=…`, and batch or transaction Bundles POSTed to the base, with the write
//! faults of [`Faults`] decided before anything is applied.

use http::header::{ETAG, LOCATION};

use super::search::etag;
use super::*;

/// Which resource a write goes to.
enum Target<'a> {
    Id(&'a str),
    /// `identifier=system|value` (or `value`) of a conditional update.
    Identifier(&'a str),
    /// A POST: a new server-assigned id.
    Create,
}

enum WriteFault {
    Unavailable(Option<u64>),
    Timeout(Duration),
    /// Applied, then answered too late.
    LostAnswer(Duration),
}

impl Shared {
    pub(super) async fn write(&self, request: &RecordedRequest, segments: &[&str]) -> Response {
        let (fault, delay) = {
            let mut state = self.state();
            (state.draw_write_fault(), state.faults.write_delay)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self.held() {
            while self.held() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            return Failure::new(503, "transient", "held, then refused").into_response();
        }
        match fault {
            Some(WriteFault::Unavailable(retry_after)) => {
                let mut response =
                    Failure::new(503, "transient", "the service is unavailable").into_response();
                if let Some(seconds) = retry_after {
                    response
                        .headers_mut()
                        .insert(RETRY_AFTER, HeaderValue::from(seconds));
                }
                return response;
            }
            Some(WriteFault::Timeout(delay)) => {
                tokio::time::sleep(delay).await;
                return Failure::new(504, "timeout", "the write timed out and was not applied")
                    .into_response();
            }
            Some(WriteFault::LostAnswer(_)) | None => {}
        }
        let answer = match segments {
            [] => self.bundle(&request.body),
            [resource_type] if request.method == Method::POST => {
                self.create(resource_type, request)
            }
            [resource_type] => match conditional_target(&request.query) {
                Ok(target) => self.put(resource_type, target, &request.body),
                Err(failure) => Err(failure),
            },
            [resource_type, id] => self.put(resource_type, Target::Id(id), &request.body),
            _ => Err(Failure::new(404, "not-found", "no such write route")),
        };
        if let Some(WriteFault::LostAnswer(delay)) = fault {
            tokio::time::sleep(delay).await;
        }
        respond(answer)
    }

    /// Whether writes are being held (see [`Faults::hold_after`]).
    fn held(&self) -> bool {
        let state = self.state();
        state
            .faults
            .hold_after
            .is_some_and(|limit| state.writes.len() >= limit)
    }

    /// `POST Type`: a new resource with a server id, unless `If-None-Exist`
    /// (`identifier=system|value`) finds one already (then it is answered, unchanged).
    fn create(&self, resource_type: &str, request: &RecordedRequest) -> Answer {
        let condition = request
            .headers
            .get("if-none-exist")
            .and_then(|v| v.to_str().ok())
            .map(|q| serde_urlencoded::from_str::<Vec<(String, String)>>(q).unwrap_or_default());
        if let Some(pairs) = condition {
            let token = pairs
                .iter()
                .find(|(name, _)| name == "identifier")
                .map(|(_, value)| value.clone())
                .ok_or_else(|| {
                    Failure::new(400, "not-supported", "If-None-Exist takes identifier=")
                })?;
            let state = self.state();
            let found = state.with_identifier(resource_type, &token);
            if let Some(id) = found.first() {
                let stored = state.resources[resource_type][id].resource.clone();
                return Ok((StatusCode::OK, stored, HeaderMap::new()));
            }
        }
        self.put(resource_type, Target::Create, &request.body)
    }

    fn put(&self, resource_type: &str, target: Target<'_>, body: &Bytes) -> Answer {
        let resource: Value = serde_json::from_slice(body)
            .map_err(|e| Failure::new(400, "structure", format!("the body is not JSON: {e}")))?;
        let (status, stored) = self.state().upsert(resource_type, target, resource)?;
        let mut headers = HeaderMap::new();
        let version = stored["meta"]["versionId"].as_str().unwrap_or("1");
        if let Ok(location) = HeaderValue::from_str(&format!(
            "{}/{resource_type}/{}/_history/{version}",
            self.fhir_base(),
            stored["id"].as_str().unwrap_or_default()
        )) {
            headers.insert(LOCATION, location);
        }
        headers.insert(ETAG, etag(version.parse().unwrap_or(1)));
        Ok((status, stored, headers))
    }

    /// A batch applies each entry on its own; a transaction applies all or none, and fails
    /// with the status of its first failing entry.
    fn bundle(&self, body: &Bytes) -> Answer {
        let bundle: Value = serde_json::from_slice(body)
            .map_err(|e| Failure::new(400, "structure", format!("the body is not JSON: {e}")))?;
        if bundle["resourceType"] != "Bundle" {
            return Err(Failure::new(
                400,
                "invalid",
                "POST to the base takes a Bundle",
            ));
        }
        let kind = match bundle["type"].as_str() {
            Some(kind @ ("batch" | "transaction")) => kind,
            other => {
                return Err(Failure::new(
                    400,
                    "invalid",
                    format!("a Bundle of type {other:?} is neither a batch nor a transaction"),
                ))
            }
        };
        let entries = bundle["entry"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if entries.len() > self.max_bundle_entries {
            return Err(Failure::new(
                400,
                "too-costly",
                format!(
                    "the Bundle has {} entries; at most {} are accepted",
                    entries.len(),
                    self.max_bundle_entries
                ),
            ));
        }
        let mut state = self.state();
        let before = (kind == "transaction")
            .then(|| (state.resources.clone(), state.clock, state.writes.len()));
        let mut answers = Vec::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            match self.bundle_entry(&mut state, entry) {
                Ok((status, stored)) => {
                    let version = stored["meta"]["versionId"].as_str().unwrap_or("1");
                    answers.push(json!({"response": {
                        "status": status_line(status),
                        "location": format!(
                            "{}/{}/_history/{version}",
                            stored["resourceType"].as_str().unwrap_or_default(),
                            stored["id"].as_str().unwrap_or_default()
                        ),
                        "etag": format!("W/\"{version}\""),
                        "lastModified": stored["meta"]["lastUpdated"],
                    }}));
                }
                Err(failure) => {
                    if let Some((resources, clock, writes)) = before {
                        state.resources = resources;
                        state.clock = clock;
                        state.writes.truncate(writes);
                        return Err(Failure {
                            diagnostics: format!("entry {index}: {}", failure.diagnostics),
                            ..failure
                        });
                    }
                    answers.push(json!({"response": {
                        "status": status_line(failure.status),
                        "outcome": failure.outcome(),
                    }}));
                }
            }
        }
        let response = json!({
            "resourceType": "Bundle",
            "id": uuid::Uuid::new_v4().to_string(),
            "type": format!("{kind}-response"),
            "entry": answers,
        });
        Ok((StatusCode::OK, response, HeaderMap::new()))
    }

    fn bundle_entry(
        &self,
        state: &mut State,
        entry: &Value,
    ) -> Result<(StatusCode, Value), Failure> {
        let method = entry["request"]["method"].as_str().unwrap_or_default();
        let url = entry["request"]["url"]
            .as_str()
            .ok_or_else(|| Failure::new(400, "required", "the entry has no request.url"))?;
        let base = self.fhir_base();
        let relative = url.strip_prefix(base.as_str()).unwrap_or(url);
        let (path, query) = relative.split_once('?').unwrap_or((relative, ""));
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let query: Vec<(String, String)> = serde_urlencoded::from_str(query).unwrap_or_default();
        let (resource_type, target) = match (method, segments.as_slice()) {
            ("PUT", [resource_type, id]) => (*resource_type, Target::Id(id)),
            ("PUT", [resource_type]) => (*resource_type, conditional_target(&query)?),
            ("POST", [resource_type]) => (*resource_type, Target::Create),
            _ => {
                return Err(Failure::new(
                    400,
                    "not-supported",
                    format!("{method} {url} is not supported in a Bundle"),
                ))
            }
        };
        if !is_type(resource_type) {
            return Err(Failure::new(
                400,
                "invalid",
                format!("{resource_type} is not a resource type"),
            ));
        }
        state.upsert(resource_type, target, entry["resource"].clone())
    }
}

impl State {
    fn draw_write_fault(&mut self) -> Option<WriteFault> {
        let draw = self.rng.next_f64();
        if draw < self.faults.unavailable {
            Some(WriteFault::Unavailable(self.faults.unavailable_retry_after))
        } else if draw < self.faults.unavailable + self.faults.timeouts {
            Some(WriteFault::Timeout(self.faults.timeout_delay))
        } else if draw < self.faults.unavailable + self.faults.timeouts + self.faults.lost_answers {
            Some(WriteFault::LostAnswer(self.faults.timeout_delay))
        } else {
            None
        }
    }

    /// Creates or updates one resource and logs the write; 201 when created, 200 when updated.
    fn upsert(
        &mut self,
        resource_type: &str,
        target: Target<'_>,
        resource: Value,
    ) -> Result<(StatusCode, Value), Failure> {
        if resource["resourceType"].as_str() != Some(resource_type) {
            return Err(Failure::new(
                400,
                "invalid",
                format!(
                    "the body is a {}, not a {resource_type}",
                    resource["resourceType"]
                ),
            ));
        }
        let body_id = resource["id"].as_str();
        let id = match target {
            Target::Id(id) => match body_id {
                Some(sent) if sent == id => id.to_owned(),
                Some(sent) => {
                    return Err(Failure::new(
                        400,
                        "invalid",
                        format!("the body's id {sent} differs from the URL's {id}"),
                    ))
                }
                None => {
                    return Err(Failure::new(
                        400,
                        "required",
                        "an update needs the id in the body",
                    ))
                }
            },
            Target::Create => uuid::Uuid::new_v4().to_string(),
            Target::Identifier(token) => {
                match self.with_identifier(resource_type, token).as_slice() {
                    [] => body_id.map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned),
                    [found] if body_id.is_none_or(|sent| sent == found) => found.clone(),
                    [found] => {
                        return Err(Failure::new(
                            400,
                            "invalid",
                            format!(
                                "identifier={token} is {resource_type}/{found}, not the body's id"
                            ),
                        ))
                    }
                    _ => {
                        return Err(Failure::new(
                            412,
                            "multiple-matches",
                            format!("identifier={token} matches several {resource_type} resources"),
                        ))
                    }
                }
            }
        };
        if !is_valid_id(&id) {
            return Err(Failure::new(
                400,
                "invalid",
                format!("{id} is not a valid FHIR id"),
            ));
        }
        let reference = format!("{resource_type}/{id}");
        if self.faults.rejected_ids.contains(&id) || self.faults.rejected_ids.contains(&reference) {
            return Err(Failure::new(
                422,
                "processing",
                format!("{reference} does not conform to this server's profiles"),
            ));
        }
        let mut stored = resource.clone();
        stored["id"] = json!(id);
        let (stored, created) = self.store(resource_type, &id, stored);
        self.writes.push(WriteRecord {
            resource_type: resource_type.to_owned(),
            source_version: resource["meta"]["versionId"].as_str().map(str::to_owned),
            id,
            body: resource,
        });
        let status = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok((status, stored))
    }

    fn with_identifier(&self, resource_type: &str, token: &str) -> Vec<String> {
        let (system, value) = match token.split_once('|') {
            Some((system, value)) => (Some(system), value),
            None => (None, token),
        };
        let Some(by_id) = self.resources.get(resource_type) else {
            return Vec::new();
        };
        by_id
            .iter()
            .filter(|(_, stored)| {
                stored.resource["identifier"]
                    .as_array()
                    .is_some_and(|identifiers| {
                        identifiers.iter().any(|i| {
                            i["value"].as_str() == Some(value)
                                && system.is_none_or(|s| i["system"].as_str() == Some(s))
                        })
                    })
            })
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// A conditional update's only supported criterion is `identifier`.
fn conditional_target(query: &[(String, String)]) -> Result<Target<'_>, Failure> {
    match query {
        [(name, token)] if name == "identifier" => Ok(Target::Identifier(token)),
        _ => Err(Failure::new(
            400,
            "not-supported",
            "a conditional update takes exactly one identifier parameter",
        )),
    }
}

/// `201 Created`, as `Bundle.entry.response.status` spells it.
fn status_line(status: StatusCode) -> String {
    format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or_default()
    )
}
