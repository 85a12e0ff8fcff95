//! Entry points for the fuzz targets in `fuzz/` and their regression tests: each takes
//! arbitrary bytes through one intake path the way the server does, and must answer (an error
//! is fine) without panicking, hanging or exhausting memory.
//!
//! The parts they need (schema, search registry, payer policies, hook definitions) are loaded
//! once per process from the files the server itself uses.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use crate::fhir::{SchemaValidator, SearchRegistry};
use crate::pa::PolicySet;

struct Parts {
    schema: Arc<SchemaValidator>,
    search: SearchRegistry,
    policies: PolicySet,
    order_sign: BTreeMap<String, String>,
}

fn parts() -> &'static Parts {
    static PARTS: OnceLock<Parts> = OnceLock::new();
    PARTS.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let schema = Arc::new(SchemaValidator::bundled().expect("the bundled schema loads"));
        let search = SearchRegistry::new(&schema);
        let policies =
            PolicySet::load_dir(&root.join("policies")).expect("the sample policies load");
        let order_sign = crate::cds::load_services(&root.join("hooks"))
            .expect("the sample hooks load")
            .into_iter()
            .find(|s| s.hook == "order-sign")
            .map(|s| s.prefetch)
            .unwrap_or_default();
        Parts {
            schema,
            search,
            policies,
            order_sign,
        }
    })
}

/// A FHIR resource as `PUT`/`POST` receive it: JSON parsing, the fast schema check, and the
/// detailed explanation of what is wrong.
pub fn fhir_json(data: &[u8]) {
    let Ok(value) = crate::server::response::parse_json(data) else {
        return;
    };
    let parts = parts();
    if !parts.schema.is_valid(&value) {
        let _ = parts.schema.explain(&value);
    }
}

/// A CDS Hooks `order-sign` request with the sample service's prefetch templates.
pub fn cds_request(data: &[u8]) {
    let parts = parts();
    if let Ok(request) =
        crate::cds::request::CdsRequest::parse(data, "order-sign", &parts.order_sign)
    {
        let _ = serde_json::to_vec(&request.context);
    }
}

/// A PAS `Claim/$submit` Bundle: parsing, the PAS structural rules, and the determination of
/// every item against the sample payers.
pub fn pas_bundle(data: &[u8]) {
    let Ok(bundle) = crate::server::response::parse_json(data) else {
        return;
    };
    let parts = parts();
    let Ok(request) = crate::pas::check::check_request(&bundle) else {
        return;
    };
    if let Some(payer) = parts
        .policies
        .payer_for(request.coverage, &request.resources())
    {
        let today = time::macros::date!(2026 - 01 - 15);
        let _ = crate::pas::decide::decide_items(
            &request,
            &parts.policies,
            payer,
            "fuzz",
            "2026-01-15T00:00:00Z",
            today,
        );
    }
}

/// A payer policy file.
pub fn policy_file(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::pa::policy::parse_policy(Path::new("fuzz.json"), text);
    }
}

/// A search query string, for a few resource types, lenient and strict, and the same values
/// as conditions.
pub fn search_params(data: &[u8]) {
    let Ok(pairs) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(data) else {
        return;
    };
    let parts = parts();
    for resource_type in ["Patient", "Observation", "Claim"] {
        let _ = parts.search.parse_query(resource_type, &pairs, false);
        let _ = parts.search.parse_query(resource_type, &pairs, true);
        let _ = parts.search.parse_condition(resource_type, &pairs);
    }
    for (_, value) in &pairs {
        let _ = crate::fhir::date::parse_range(value);
    }
}
