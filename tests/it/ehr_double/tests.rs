//! The double speaks the protocols the sync engine relies on: checked over HTTP with reqwest,
//! the way a client sees it.

use std::collections::BTreeSet;

use reqwest::Client;

use super::*;
use crate::helpers::{cds_jwt, fixtures};

const ANDY: &str = "synthea/Andy_Schaden_d630c6ca-046c-470a-8f3a-4dbc3850e7ae.json";
/// Andy Schaden's Patient id (the uuid of its `urn:uuid:` fullUrl).
const ANDY_ID: &str = "9afe28dc-7ad5-4e90-b6a6-16123eae98c3";

const FORM: &str = "application/x-www-form-urlencoded";

fn form(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(pairs).expect("form")
}

/// `base?name=value&…`, percent-encoded.
fn with_query(base: &str, pairs: &[(&str, &str)]) -> String {
    reqwest::Url::parse_with_params(base, pairs)
        .expect("url")
        .to_string()
}

async fn send(request: reqwest::RequestBuilder) -> (StatusCode, HeaderMap, Value) {
    let response = request.send().await.expect("request");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, body)
}

fn diagnostics(outcome: &Value) -> &str {
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
    outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default()
}

fn patient(id: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": "Test"}]})
}

/// A client assertion for `client_id` at `double`, signed with `key_file` from `certs/`.
fn assertion(
    double: &FhirDouble,
    client_id: &str,
    key_file: &str,
    adjust: impl FnOnce(&mut Value),
) -> String {
    cds_jwt(
        &double.token_url(),
        jsonwebtoken::Algorithm::RS384,
        key_file,
        "test-rs384",
        |claims| {
            claims["iss"] = json!(client_id);
            claims["sub"] = json!(client_id);
            adjust(claims);
        },
    )
}

/// Follows `next` links from `url`; every resource of every page, and the `total`s seen.
async fn collect_pages(
    client: &Client,
    url: String,
    token: Option<&str>,
) -> (Vec<Value>, Vec<u64>) {
    let mut next = Some(url);
    let (mut resources, mut totals) = (Vec::new(), Vec::new());
    while let Some(url) = next.take() {
        let mut request = client.get(&url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let (status, _, page) = send(request).await;
        assert_eq!(status, StatusCode::OK, "{url}: {page}");
        assert_eq!(page["type"], "searchset");
        totals.push(page["total"].as_u64().expect("total"));
        for entry in page["entry"].as_array().expect("entry") {
            assert_eq!(entry["search"]["mode"], "match");
            let resource = &entry["resource"];
            let full_url = entry["fullUrl"].as_str().expect("fullUrl");
            assert!(full_url.ends_with(&format!(
                "/{}/{}",
                resource["resourceType"].as_str().expect("type"),
                resource["id"].as_str().expect("id")
            )));
            resources.push(resource.clone());
        }
        next = page["link"]
            .as_array()
            .expect("link")
            .iter()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str())
            .map(str::to_owned);
    }
    (resources, totals)
}

#[tokio::test]
async fn openemr_private_key_jwt_tokens_are_verified_and_expire() {
    let double = FhirDouble::start(
        Flavor::openemr(),
        Options {
            auth: Some(Auth::private_key_jwt("sync-client").expires_in(1)),
            ..Options::default()
        },
    )
    .await;
    assert_eq!(
        double.fhir_base(),
        format!("{}/apis/default/fhir", double.origin())
    );
    assert_eq!(
        double.token_url(),
        format!("{}/oauth2/default/token", double.origin())
    );
    double.put_resource(patient("p1"));
    let client = Client::new();
    let ask = |assertion: String| {
        client
            .post(double.token_url())
            .header(CONTENT_TYPE, FORM)
            .body(form(&[
                ("grant_type", "client_credentials"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", assertion.as_str()),
                ("scope", "system/Patient.read"),
            ]))
    };

    let good = assertion(&double, "sync-client", "test-cds-client-rs384.key", |_| {});
    let (status, _, body) = send(ask(good.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 1);
    assert_eq!(body["scope"], "system/Patient.read");
    let token = body["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned();

    let refused = [
        good,
        assertion(&double, "sync-client", "test-untrusted-rs384.key", |_| {}),
        assertion(&double, "other-client", "test-cds-client-rs384.key", |_| {}),
        assertion(&double, "sync-client", "test-cds-client-rs384.key", |c| {
            c["aud"] = json!("https://elsewhere.test/token")
        }),
        assertion(&double, "sync-client", "test-cds-client-rs384.key", |c| {
            c["exp"] = json!(c["iat"].as_i64().expect("iat") + 3600)
        }),
    ];
    for (i, bad) in refused.into_iter().enumerate() {
        let (status, _, body) = send(ask(bad)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "assertion {i}: {body}");
        assert_eq!(body["error"], "invalid_client");
    }
    assert_eq!(double.token_requests(), 6);

    let read = format!("{}/Patient/p1", double.fhir_base());
    let (status, headers, body) = send(client.get(&read).bearer_auth(&token)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["meta"]["versionId"], "1");
    assert_eq!(headers["etag"], "W/\"1\"");
    assert_eq!(
        double.last_request().expect("recorded").bearer(),
        Some(token.as_str())
    );
    let (status, headers, body) = send(client.get(&read)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(headers.contains_key("www-authenticate"));
    assert_eq!(diagnostics(&body), "no bearer token");
    let (status, _, body) = send(client.get(&read).bearer_auth("made-up")).await;
    assert_eq!(
        (status, diagnostics(&body)),
        (StatusCode::UNAUTHORIZED, "unknown access token")
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _, body) = send(client.get(&read).bearer_auth(&token)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(diagnostics(&body), "the access token has expired");
}

#[tokio::test]
async fn athena_takes_basic_credentials_and_enforces_ah_practice() {
    let double = FhirDouble::start(
        Flavor::athena(),
        Options {
            auth: Some(Auth::basic("athena-client", "s3cr&t")),
            ..Options::default()
        },
    )
    .await;
    assert_eq!(double.fhir_base(), format!("{}/fhir/r4", double.origin()));
    let patient_id = "a-195900.E-60178";
    double.put_resource(patient(patient_id));
    for n in 0..3 {
        double.put_resource(json!({
            "resourceType": "Observation", "id": format!("a-195900.OBS-{n}"), "status": "final",
            "subject": {"reference": format!("Patient/{patient_id}")},
        }));
    }
    double.put_resource(json!({
        "resourceType": "Observation", "id": "a-195900.OBS-other", "status": "final",
        "subject": {"reference": "Patient/someone-else"},
    }));
    let client = Client::new();
    let token_request = |authorization: &str| {
        client
            .post(double.token_url())
            .header("authorization", authorization)
            .header(CONTENT_TYPE, FORM)
            .body(form(&[
                ("grant_type", "client_credentials"),
                ("scope", "system/Observation.read"),
            ]))
    };
    let basic = |id: &str, secret: &str| {
        let pair = format!("{id}:{secret}");
        format!(
            "Basic {}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pair)
        )
    };
    let (status, _, body) = send(token_request(&basic("athena-client", "wrong"))).await;
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::UNAUTHORIZED, &json!("invalid_client"))
    );
    // Form-encoded before Base64 (RFC 6749 §2.3.1) and raw are both accepted.
    let (status, _, _) = send(token_request(&basic("athena-client", "s3cr%26t"))).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = send(token_request(&basic("athena-client", "s3cr&t"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["expires_in"], 3600);
    let token = body["access_token"].as_str().expect("token").to_owned();

    let search = format!("{}/Observation", double.fhir_base());
    let (status, _, body) = send(
        client
            .get(with_query(&search, &[("patient", patient_id)]))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(diagnostics(&body).contains("ah-practice"));
    let (status, _, _) = send(
        client
            .get(with_query(
                &search,
                &[
                    ("patient", patient_id),
                    ("ah-practice", "Organization/a-1.Practice-1"),
                ],
            ))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let practice = Flavor::athena().ah_practice().expect("athena practice");
    assert_eq!(practice, "Organization/a-1.Practice-195900");
    let first = with_query(
        &search,
        &[
            ("patient", patient_id),
            ("ah-practice", practice.as_str()),
            ("_count", "2"),
        ],
    );
    let (found, totals) = collect_pages(&client, first, Some(&token)).await;
    assert_eq!(totals, [3, 3]);
    let ids: BTreeSet<&str> = found.iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(ids.len(), 3);
    assert!(found
        .iter()
        .all(|r| r["extension"][0]["valueReference"]["reference"] == practice.as_str()));
    let searches: Vec<RecordedRequest> = double
        .recorded_requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/Observation") && r.status == StatusCode::OK)
        .collect();
    assert_eq!(searches.len(), 2);
    assert!(searches
        .iter()
        .all(|r| r.query_value("ah-practice") == Some(practice.as_str())));
    let last = double.last_request().expect("recorded");
    assert_eq!(last.query_value("ah-practice"), Some(practice.as_str()));
    assert_eq!(last.query_value("_getpagesoffset"), Some("2"));
    assert_eq!(last.bearer(), Some(token.as_str()));
}

#[tokio::test]
async fn azure_client_secret_post_checks_scope_and_survives_token_faults() {
    let double = FhirDouble::start(
        Flavor::azure(),
        Options {
            auth: Some(Auth::post("app-id", "app-secret")),
            ..Options::default()
        },
    )
    .await;
    assert_eq!(double.fhir_base(), double.origin());
    assert_eq!(
        double.token_url(),
        format!("{}/test-tenant/oauth2/v2.0/token", double.origin())
    );
    double.put_resource(patient("p1"));
    let client = Client::new();
    let scope = format!("{}/.default", double.fhir_base());
    let ask = |secret: &str, scope: &str| {
        client
            .post(double.token_url())
            .header(CONTENT_TYPE, FORM)
            .body(form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "app-id"),
                ("client_secret", secret),
                ("scope", scope),
            ]))
    };
    let (status, _, body) = send(ask(
        "app-secret",
        "https://other.fhir.azurehealthcareapis.com/.default",
    ))
    .await;
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::BAD_REQUEST, &json!("invalid_scope"))
    );
    assert!(body["error_codes"].is_array());
    let (status, _, body) = send(ask("nope", &scope)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error_description"]
        .as_str()
        .expect("description")
        .starts_with("AADSTS7000215"));

    double.fail_token_requests(500, Some(2));
    for _ in 0..2 {
        let (status, _, body) = send(ask("app-secret", &scope)).await;
        assert_eq!(
            (status, &body["error"]),
            (StatusCode::INTERNAL_SERVER_ERROR, &json!("server_error"))
        );
    }
    let (status, _, body) = send(ask("app-secret", &scope)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["expires_in"], 3599);
    assert_eq!(body["ext_expires_in"], 3599);
    assert_eq!(double.token_requests(), 5);
    let token = body["access_token"].as_str().expect("token").to_owned();

    let read = format!("{}/Patient/p1", double.fhir_base());
    assert_eq!(
        send(client.get(&read).bearer_auth(&token)).await.0,
        StatusCode::OK
    );
    double.expire_all_tokens();
    let (status, _, body) = send(client.get(&read).bearer_auth(&token)).await;
    assert_eq!(
        (status, diagnostics(&body)),
        (StatusCode::UNAUTHORIZED, "the access token has expired")
    );

    double.fail_token_requests(401, None);
    for _ in 0..3 {
        assert_eq!(
            send(ask("app-secret", &scope)).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    double.clear_token_fault();
    assert_eq!(send(ask("app-secret", &scope)).await.0, StatusCode::OK);
    assert_eq!(double.requests_with_status(401), 5);
}

#[tokio::test]
async fn paging_returns_every_match_exactly_once() {
    let flavors = [
        (Flavor::Plain, "/fhir"),
        (Flavor::azure(), ""),
        (Flavor::openemr(), ""),
    ];
    for (flavor, prefix) in flavors {
        let double = FhirDouble::start(
            flavor.clone(),
            Options {
                path_prefix: prefix.into(),
                ..Options::default()
            },
        )
        .await;
        let loaded = double.load_synthea(fixtures().join(ANDY));
        assert_eq!(loaded, 277);
        let stored = double.resources();
        assert_eq!(stored.len(), 277);
        let observations: BTreeSet<String> = stored
            .iter()
            .filter(|r| r["resourceType"] == "Observation")
            .map(|r| r["id"].as_str().expect("id").to_owned())
            .collect();
        assert_eq!(observations.len(), 174);
        let encounter = stored
            .iter()
            .find(|r| r["resourceType"] == "Encounter")
            .expect("an Encounter");
        assert_eq!(
            encounter["subject"]["reference"],
            format!("Patient/{ANDY_ID}")
        );

        let client = Client::new();
        let first = format!(
            "{}/Observation?patient={ANDY_ID}&_count=17",
            double.fhir_base()
        );
        let (found, totals) = collect_pages(&client, first, None).await;
        assert_eq!(totals, vec![174; 11], "{flavor:?}");
        let ids: Vec<String> = found
            .iter()
            .map(|r| r["id"].as_str().expect("id").to_owned())
            .collect();
        assert_eq!(ids.len(), 174, "{flavor:?}: no resource twice");
        assert_eq!(ids.iter().cloned().collect::<BTreeSet<_>>(), observations);
        let cursor = double.last_request().expect("recorded");
        match double.flavor() {
            Flavor::Azure { .. } => assert!(cursor.query_value("ct").is_some()),
            _ => assert_eq!(cursor.query_value("_getpagesoffset"), Some("170")),
        }

        // An incremental run: everything changed after a watermark, oldest first.
        let watermark = found[100]["meta"]["lastUpdated"]
            .as_str()
            .expect("lastUpdated")
            .to_owned();
        let since = with_query(
            &format!("{}/Observation", double.fhir_base()),
            &[
                ("_lastUpdated", &format!("gt{watermark}")),
                ("_sort", "_lastUpdated"),
            ],
        );
        let (changed, _) = collect_pages(&client, since, None).await;
        let stamps: Vec<&str> = changed
            .iter()
            .filter_map(|r| r["meta"]["lastUpdated"].as_str())
            .collect();
        assert!(!stamps.is_empty() && stamps.len() < 174);
        assert!(
            stamps.windows(2).all(|w| w[0] < w[1]),
            "strictly increasing"
        );
        assert!(stamps.iter().all(|s| *s > watermark.as_str()));

        let picked = format!("{}/Patient?_id={ANDY_ID},missing", double.fhir_base());
        let (patients, _) = collect_pages(&client, picked, None).await;
        assert_eq!(patients.len(), 1);
        let unknown = format!("{}/Observation?code=1234", double.fhir_base());
        let (status, _, body) = send(client.get(unknown)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(diagnostics(&body).contains("code"));
    }
}

#[tokio::test]
async fn broken_next_links_and_everything() {
    let double = FhirDouble::start(
        Flavor::Plain,
        Options {
            everything: true,
            ..Options::default()
        },
    )
    .await;
    double.load_synthea(fixtures().join(ANDY));
    let client = Client::new();
    let first = format!("{}/Observation?_count=50", double.fhir_base());
    let next_link = |page: &Value| page["link"][1]["url"].as_str().expect("next").to_owned();

    let break_page = |page, link| {
        double.set_faults(Faults {
            broken_next: Some(BrokenNext { page, link }),
            ..Faults::default()
        })
    };
    break_page(2, BrokenLink::NotFound);
    let (_, _, page1) = send(client.get(&first)).await;
    let (status, _, page2) = send(client.get(next_link(&page1))).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = send(client.get(next_link(&page2))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    diagnostics(&body);

    break_page(1, BrokenLink::OtherHost);
    let (_, _, page1) = send(client.get(&first)).await;
    let link = reqwest::Url::parse(&next_link(&page1)).expect("a URL");
    assert_eq!(link.host_str(), Some("fhir.other-host.invalid"));

    break_page(1, BrokenLink::Malformed);
    let (_, _, page1) = send(client.get(&first)).await;
    assert!(reqwest::Url::parse(&next_link(&page1)).is_err());

    double.set_faults(Faults::default());
    let everything = format!(
        "{}/Patient/{ANDY_ID}/$everything?_count=100",
        double.fhir_base()
    );
    let (all, totals) = collect_pages(&client, everything, None).await;
    assert_eq!(all[0]["id"], ANDY_ID);
    assert_eq!(
        totals,
        vec![275; 3],
        "all but the Organization and Practitioner"
    );
    let distinct: BTreeSet<String> = all
        .iter()
        .map(|r| format!("{}/{}", r["resourceType"], r["id"]))
        .collect();
    assert_eq!(distinct.len(), 275);

    assert!(double.remove_resource("Patient", ANDY_ID));
    let removed = format!("{}/Patient/{ANDY_ID}", double.fhir_base());
    assert_eq!(send(client.get(removed)).await.0, StatusCode::NOT_FOUND);
    let missing = format!("{}/Patient/nobody", double.fhir_base());
    let (status, _, body) = send(client.get(missing)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(diagnostics(&body), "Patient/nobody is not known");
}

#[tokio::test]
async fn batch_applies_all_but_rejected_entries_and_transactions_are_atomic() {
    let mut faults = Faults::default();
    faults.rejected_ids.insert("Patient/bad".into());
    let double = FhirDouble::start(
        Flavor::azure(),
        Options {
            max_bundle_entries: 3,
            faults,
            ..Options::default()
        },
    )
    .await;
    let client = Client::new();
    let put = |resource: Value| {
        let url = format!(
            "{}/{}",
            resource["resourceType"].as_str().expect("type"),
            resource["id"].as_str().expect("id")
        );
        json!({"fullUrl": url, "resource": resource, "request": {"method": "PUT", "url": url}})
    };
    let mut sourced = patient("p1");
    sourced["meta"] = json!({"versionId": "7", "lastUpdated": "2020-01-01T00:00:00Z"});
    let observation = json!({"resourceType": "Observation", "id": "o1", "status": "final",
        "subject": {"reference": "Patient/p1"}});
    let batch = json!({"resourceType": "Bundle", "type": "batch",
        "entry": [put(sourced.clone()), put(patient("bad")), put(observation.clone())]});
    let (status, _, body) = send(client.post(double.fhir_base()).json(&batch)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["type"], "batch-response");
    let statuses: Vec<&str> = body["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["response"]["status"].as_str().expect("status"))
        .collect();
    assert_eq!(
        statuses,
        ["201 Created", "422 Unprocessable Entity", "201 Created"]
    );
    assert!(diagnostics(&body["entry"][1]["response"]["outcome"]).contains("Patient/bad"));
    assert_eq!(body["entry"][0]["response"]["etag"], "W/\"1\"");

    let writes = double.writes();
    assert_eq!(writes.len(), 2);
    assert_eq!(
        (writes[0].resource_type.as_str(), writes[0].id.as_str()),
        ("Patient", "p1")
    );
    assert_eq!(writes[0].source_version.as_deref(), Some("7"));
    assert_eq!(writes[0].body, sourced);
    assert_eq!(writes[1].source_version, None);
    let stored = double.resource("Patient", "p1").expect("stored");
    assert_eq!(
        stored["meta"]["versionId"], "1",
        "the server keeps its own versions"
    );
    assert!(double.resource("Patient", "bad").is_none());

    let again = json!({"resourceType": "Bundle", "type": "batch", "entry": [put(sourced.clone())]});
    let (_, _, body) = send(client.post(double.fhir_base()).json(&again)).await;
    assert_eq!(body["entry"][0]["response"]["status"], "200 OK");
    assert_eq!(
        body["entry"][0]["response"]["location"],
        "Patient/p1/_history/2"
    );

    let transaction = json!({"resourceType": "Bundle", "type": "transaction",
        "entry": [put(patient("p2")), put(patient("bad"))]});
    let (status, _, body) = send(client.post(double.fhir_base()).json(&transaction)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(diagnostics(&body).starts_with("entry 1:"));
    assert!(
        double.resource("Patient", "p2").is_none(),
        "nothing of a failed transaction"
    );
    assert_eq!(double.writes().len(), 3);

    let too_big = json!({"resourceType": "Bundle", "type": "batch",
        "entry": (0..4).map(|n| put(patient(&format!("n{n}")))).collect::<Vec<_>>()});
    let (status, _, body) = send(client.post(double.fhir_base()).json(&too_big)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(diagnostics(&body).contains("at most 3"));
    assert_eq!(double.write_requests(), 4);
}

#[tokio::test]
async fn puts_answer_like_a_fhir_server_and_faults_are_deterministic() {
    let double = FhirDouble::start(Flavor::Plain, Options::default()).await;
    let client = Client::new();
    let url = format!("{}/Patient/p1", double.fhir_base());
    let (status, headers, body) = send(client.put(&url).json(&patient("p1"))).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["etag"], "W/\"1\"");
    assert_eq!(headers["location"], format!("{url}/_history/1"));
    assert_eq!(body["meta"]["versionId"], "1");
    let (status, headers, _) = send(client.put(&url).json(&patient("p1"))).await;
    assert_eq!(
        (status, &headers["etag"]),
        (StatusCode::OK, &HeaderValue::from_static("W/\"2\""))
    );
    let (status, _, body) = send(client.put(&url).json(&patient("p2"))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(diagnostics(&body).contains("differs"));

    double.throttle_next(2, 7);
    for _ in 0..2 {
        let (status, headers, _) = send(client.put(&url).json(&patient("p1"))).await;
        assert_eq!(
            (status, &headers["retry-after"]),
            (StatusCode::TOO_MANY_REQUESTS, &HeaderValue::from(7))
        );
    }
    assert_eq!(
        send(client.put(&url).json(&patient("p1"))).await.0,
        StatusCode::OK
    );

    let mut faults = Faults {
        unavailable: 1.0,
        unavailable_retry_after: Some(3),
        ..Faults::default()
    };
    double.set_faults(faults.clone());
    let (status, headers, _) = send(client.put(&url).json(&patient("p1"))).await;
    assert_eq!(
        (status, &headers["retry-after"]),
        (StatusCode::SERVICE_UNAVAILABLE, &HeaderValue::from(3))
    );

    faults = Faults {
        timeouts: 1.0,
        timeout_delay: Duration::from_millis(300),
        ..Faults::default()
    };
    double.set_faults(faults);
    let impatient = Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .expect("client");
    let error = impatient
        .put(&url)
        .json(&patient("p1"))
        .send()
        .await
        .expect_err("times out");
    assert!(error.is_timeout());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(double.requests_with_status(504), 1);
    assert_eq!(
        double.resource("Patient", "p1").expect("stored")["meta"]["versionId"],
        "3"
    );
    assert_eq!(double.writes().len(), 3, "failed writes are not applied");

    assert_eq!(double.requests(), 8);
    assert_eq!(double.write_requests(), 8);

    // The same seed fails the same requests.
    let mut runs = Vec::new();
    for _ in 0..2 {
        let faults = Faults {
            seed: 42,
            unavailable: 0.3,
            ..Faults::default()
        };
        let double = FhirDouble::start(
            Flavor::Plain,
            Options {
                faults,
                ..Options::default()
            },
        )
        .await;
        let mut statuses = Vec::new();
        for n in 0..30 {
            let url = format!("{}/Patient/n{n}", double.fhir_base());
            statuses.push(
                send(client.put(url).json(&patient(&format!("n{n}"))))
                    .await
                    .0
                    .as_u16(),
            );
        }
        runs.push(statuses);
    }
    assert_eq!(runs[0], runs[1]);
    assert!(runs[0].contains(&503) && runs[0].contains(&201));
}
