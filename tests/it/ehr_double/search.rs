//! Reads, searches and `Patient/{id}/$everything`: searchset Bundles with `total`, `fullUrl`,
//! `search.mode` and `self`/`next` links that page with an offset cursor (`_getpagesoffset`, or
//! an opaque `ct` continuation token on Azure, so clients must follow links, not build them).

use base64::Engine as _;
use http::header::ETAG;
use time::format_description::well_known::Rfc3339;

use super::*;

const DEFAULT_COUNT: usize = 50;
const MAX_COUNT: usize = 500;

/// Elements through which a resource belongs to a patient (`patient=` / `subject=`).
const PATIENT_ELEMENTS: [&str; 3] = ["subject", "patient", "beneficiary"];

#[derive(Clone, Copy)]
enum Order {
    Id,
    LastUpdated,
    LastUpdatedDescending,
}

/// `_count` and the page cursor.
struct Paging {
    count: usize,
    offset: usize,
}

impl Shared {
    pub(super) fn read(&self, resource_type: &str, id: &str) -> Answer {
        let state = self.state();
        let stored = state
            .resources
            .get(resource_type)
            .and_then(|by_id| by_id.get(id))
            .ok_or_else(|| {
                Failure::new(
                    404,
                    "not-found",
                    format!("{resource_type}/{id} is not known"),
                )
            })?;
        let mut headers = HeaderMap::new();
        headers.insert(ETAG, etag(stored.version));
        Ok((StatusCode::OK, stored.resource.clone(), headers))
    }

    pub(super) fn search(&self, request: &RecordedRequest, resource_type: &str) -> Answer {
        if let Some(practice) = self.flavor.ah_practice() {
            match request.query_value("ah-practice") {
                Some(sent) if sent == practice => {}
                Some(sent) => {
                    return Err(Failure::new(
                        400,
                        "invalid",
                        format!("ah-practice {sent} is not this practice ({practice})"),
                    ))
                }
                None => {
                    return Err(Failure::new(
                        400,
                        "required",
                        "the ah-practice search parameter is required",
                    ))
                }
            }
        }
        let mut paging = Paging {
            count: DEFAULT_COUNT,
            offset: 0,
        };
        let mut ids: Option<HashSet<&str>> = None;
        let mut patients: Option<Vec<String>> = None;
        let mut bounds = Vec::new();
        let mut dates = Vec::new();
        let mut statuses: Option<Vec<String>> = None;
        let mut order = Order::Id;
        let mut kept = Vec::new();
        for (name, value) in &request.query {
            if self.paging_parameter(name, value, &mut paging)? {
                continue;
            }
            match name.as_str() {
                "_lastUpdated" => bounds.push(last_updated_bound(value)?),
                "_sort" => {
                    order = match value.as_str() {
                        "_id" => Order::Id,
                        "_lastUpdated" => Order::LastUpdated,
                        "-_lastUpdated" => Order::LastUpdatedDescending,
                        other => {
                            return Err(Failure::new(
                                400,
                                "not-supported",
                                format!("_sort={other} is not supported"),
                            ))
                        }
                    }
                }
                "patient" | "subject" => patients
                    .get_or_insert_with(Vec::new)
                    .extend(value.split(',').map(patient_reference)),
                "_id" => ids = Some(value.split(',').collect()),
                "status" => statuses = Some(value.split(',').map(str::to_owned).collect()),
                "date" => dates.push(last_updated_bound(value)?),
                "ah-practice" | "_format" | "_total" => {}
                other => {
                    return Err(Failure::new(
                        400,
                        "not-supported",
                        format!("the search parameter {other} is not supported"),
                    ))
                }
            }
            kept.push((name.clone(), value.clone()));
        }
        let state = self.state();
        let mut matches: Vec<&Stored> = state
            .resources
            .get(resource_type)
            .into_iter()
            .flat_map(|by_id| by_id.iter())
            .filter(|(id, stored)| {
                ids.as_ref().is_none_or(|ids| ids.contains(id.as_str()))
                    && patients
                        .as_ref()
                        .is_none_or(|patients| belongs_to(&stored.resource, patients))
                    && bounds
                        .iter()
                        .all(|(prefix, at)| holds(prefix, stored.last_updated, *at))
                    && statuses.as_ref().is_none_or(|statuses| {
                        stored.resource["status"]
                            .as_str()
                            .is_some_and(|s| statuses.iter().any(|w| w == s))
                    })
                    && dates.iter().all(|(prefix, at)| {
                        clinical_date(&stored.resource).is_some_and(|d| holds(prefix, d, *at))
                    })
            })
            .map(|(_, stored)| stored)
            .collect();
        match order {
            Order::Id => {}
            Order::LastUpdated => matches.sort_by_key(|s| s.last_updated),
            Order::LastUpdatedDescending => {
                matches.sort_by_key(|s| std::cmp::Reverse(s.last_updated))
            }
        }
        let path = format!("/{resource_type}");
        let bundle = self.searchset(&state, &matches, &paging, |offset| {
            self.link(&path, &kept, paging.count, offset)
        });
        Ok((StatusCode::OK, bundle, HeaderMap::new()))
    }

    pub(super) fn everything(&self, request: &RecordedRequest, id: &str) -> Answer {
        if !self.everything {
            return Err(Failure::new(
                404,
                "not-supported",
                "$everything is not enabled on this server",
            ));
        }
        let mut paging = Paging {
            count: DEFAULT_COUNT,
            offset: 0,
        };
        for (name, value) in &request.query {
            if !self.paging_parameter(name, value, &mut paging)? && name != "_format" {
                return Err(Failure::new(
                    400,
                    "not-supported",
                    format!("$everything does not support {name}"),
                ));
            }
        }
        let state = self.state();
        let patient = state
            .resources
            .get("Patient")
            .and_then(|by_id| by_id.get(id))
            .ok_or_else(|| Failure::new(404, "not-found", format!("Patient/{id} is not known")))?;
        let reference = format!("Patient/{id}");
        let mut matches = vec![patient];
        for (resource_type, by_id) in &state.resources {
            for (other, stored) in by_id {
                let is_the_patient = resource_type == "Patient" && other == id;
                if !is_the_patient && references(&stored.resource, &reference) {
                    matches.push(stored);
                }
            }
        }
        let path = format!("/Patient/{id}/$everything");
        let bundle = self.searchset(&state, &matches, &paging, |offset| {
            self.link(&path, &[], paging.count, offset)
        });
        Ok((StatusCode::OK, bundle, HeaderMap::new()))
    }

    /// Takes `_count` or the page cursor into `paging`; whether `name` was one of them.
    fn paging_parameter(
        &self,
        name: &str,
        value: &str,
        paging: &mut Paging,
    ) -> Result<bool, Failure> {
        if name == "_count" {
            let count: usize = value.parse().map_err(|_| {
                Failure::new(400, "invalid", format!("_count={value} is not a number"))
            })?;
            paging.count = count.min(MAX_COUNT);
            return Ok(true);
        }
        if name != self.cursor_parameter() {
            return Ok(false);
        }
        let offset = match self.flavor {
            Flavor::Azure { .. } => base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(value)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .and_then(|text| text.strip_prefix("offset:")?.parse().ok()),
            _ => value.parse().ok(),
        };
        paging.offset = offset.ok_or_else(|| {
            Failure::new(
                400,
                "invalid",
                format!("{name}={value} is not a valid page cursor"),
            )
        })?;
        Ok(true)
    }

    fn cursor_parameter(&self) -> &'static str {
        match self.flavor {
            Flavor::Azure { .. } => "ct",
            _ => "_getpagesoffset",
        }
    }

    /// `{path}?{kept}&_count=…&{cursor}=…`, relative to the FHIR base.
    fn link(&self, path: &str, kept: &[(String, String)], count: usize, offset: usize) -> String {
        let mut params: Vec<(String, String)> = kept.to_vec();
        params.push(("_count".into(), count.to_string()));
        if offset > 0 {
            let cursor = match self.flavor {
                Flavor::Azure { .. } => base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .encode(format!("offset:{offset}")),
                _ => offset.to_string(),
            };
            params.push((self.cursor_parameter().into(), cursor));
        }
        let query = serde_urlencoded::to_string(&params).unwrap_or_default();
        format!("{path}?{query}")
    }

    /// One page of `matches`; `link` gives the relative URL of the page at an offset.
    fn searchset(
        &self,
        state: &State,
        matches: &[&Stored],
        paging: &Paging,
        link: impl Fn(usize) -> String,
    ) -> Value {
        let base = self.fhir_base();
        let entries: Vec<Value> = matches
            .iter()
            .skip(paging.offset)
            .take(paging.count)
            .map(|stored| {
                let resource = &stored.resource;
                let full_url = format!(
                    "{base}/{}/{}",
                    resource["resourceType"].as_str().unwrap_or_default(),
                    resource["id"].as_str().unwrap_or_default()
                );
                json!({"fullUrl": full_url, "resource": resource, "search": {"mode": "match"}})
            })
            .collect();
        let mut links =
            vec![json!({"relation": "self", "url": format!("{base}{}", link(paging.offset))})];
        let next_offset = paging.offset + paging.count;
        if paging.count > 0 && next_offset < matches.len() {
            let next = link(next_offset);
            let page = paging.offset / paging.count + 1;
            let url = match state.faults.broken_next {
                Some(broken) if broken.page == page => self.broken_link(broken.link, &next),
                _ => format!("{base}{next}"),
            };
            links.push(json!({"relation": "next", "url": url}));
        }
        json!({
            "resourceType": "Bundle",
            "id": uuid::Uuid::new_v4().to_string(),
            "meta": {"lastUpdated": instant(OffsetDateTime::now_utc())},
            "type": "searchset",
            "total": matches.len(),
            "link": links,
            "entry": entries,
        })
    }

    fn broken_link(&self, kind: BrokenLink, next: &str) -> String {
        match kind {
            BrokenLink::NotFound => format!("{}/expired-page{next}", self.fhir_base()),
            BrokenLink::Malformed => format!("http://[not-an-address]{}{next}", self.fhir_path),
            BrokenLink::OtherHost => {
                format!("http://fhir.other-host.invalid{}{next}", self.fhir_path)
            }
        }
    }
}

pub(super) fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("W/\"{version}\""))
        .unwrap_or(HeaderValue::from_static("W/\"0\""))
}

/// `123` → `Patient/123`; `Patient/123` stays.
fn patient_reference(value: &str) -> String {
    if value.contains('/') {
        value.to_owned()
    } else {
        format!("Patient/{value}")
    }
}

fn belongs_to(resource: &Value, patients: &[String]) -> bool {
    PATIENT_ELEMENTS.iter().any(|element| {
        resource[element]["reference"]
            .as_str()
            .is_some_and(|reference| patients.iter().any(|p| reference == p))
    })
}

/// Whether any `reference` anywhere in `value` is `target`.
fn references(value: &Value, target: &str) -> bool {
    match value {
        Value::Object(object) => object.iter().any(|(key, child)| {
            (key == "reference" && child.as_str() == Some(target)) || references(child, target)
        }),
        Value::Array(items) => items.iter().any(|item| references(item, target)),
        _ => false,
    }
}

/// `gt2024-01-01T00:00:00.005Z` → (`gt`, instant). A bare date means its midnight (UTC).
fn last_updated_bound(value: &str) -> Result<(String, OffsetDateTime), Failure> {
    let (prefix, rest) = match value.get(..2) {
        Some(p @ ("gt" | "ge" | "lt" | "le" | "eq")) => (p, &value[2..]),
        _ => ("eq", value),
    };
    // An unencoded `+` in the offset arrives as a space.
    let rest = rest.replace(' ', "+");
    let date = time::macros::format_description!("[year]-[month]-[day]");
    let at = OffsetDateTime::parse(&rest, &Rfc3339)
        .ok()
        .or_else(|| {
            time::Date::parse(&rest, &date)
                .ok()
                .map(|d| d.midnight().assume_utc())
        })
        .ok_or_else(|| {
            Failure::new(
                400,
                "invalid",
                format!("_lastUpdated={value} is not an instant or a date"),
            )
        })?;
    Ok((prefix.to_owned(), at))
}

/// The instant `date=` compares: a period's end (else start), or the resource's date.
fn clinical_date(resource: &Value) -> Option<OffsetDateTime> {
    let text = resource["period"]["end"]
        .as_str()
        .or_else(|| resource["period"]["start"].as_str())
        .or_else(|| resource["effectiveDateTime"].as_str())
        .or_else(|| resource["date"].as_str())?;
    last_updated_bound(text).ok().map(|(_, at)| at)
}

fn holds(prefix: &str, at: OffsetDateTime, bound: OffsetDateTime) -> bool {
    match prefix {
        "gt" => at > bound,
        "ge" => at >= bound,
        "lt" => at < bound,
        "le" => at <= bound,
        _ => at == bound,
    }
}
