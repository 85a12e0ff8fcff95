//! FHIR R4 helpers over `serde_json::Value`: ids, `meta`, references, validation, search
//! parameters and `OperationOutcome`.
//!
//! Resources stay JSON values end to end (no typed model), so unknown elements and extensions
//! pass through untouched. `serde_json` is built with `arbitrary_precision`, which keeps each
//! number's lexical form: `1.50` is stored and served as `1.50`, never as the float `1.5`.

pub mod date;
pub mod outcome;
pub mod search;
pub mod validate;

use serde_json::{Map, Value};

pub use outcome::{operation_outcome, FhirError, Issue, Severity};
pub use search::{SearchQuery, SearchRegistry};
pub use validate::SchemaValidator;

/// Whether `id` is a valid FHIR logical id: 1–64 of `A-Z a-z 0-9 - .`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// A fresh server-assigned logical id.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Sets `id`, `meta.versionId` and `meta.lastUpdated`, keeping every other `meta` element
/// (profiles, tags, security labels, source). `id` and `meta` are placed first, as FHIR
/// serializers conventionally do.
pub fn stamp(resource: &mut Value, id: &str, version: u64, last_updated: &str) {
    let Some(object) = resource.as_object_mut() else {
        return;
    };
    let mut meta = match object.remove("meta") {
        Some(Value::Object(meta)) => meta,
        _ => Map::new(),
    };
    meta.insert("versionId".into(), Value::String(version.to_string()));
    meta.insert("lastUpdated".into(), Value::String(last_updated.to_owned()));
    object.remove("id");
    let rest = std::mem::take(object);
    let mut ordered = Map::with_capacity(rest.len() + 2);
    for (key, value) in rest {
        if key == "resourceType" {
            ordered.insert(key, value);
            ordered.insert("id".into(), Value::String(id.to_owned()));
            ordered.insert("meta".into(), Value::Object(std::mem::take(&mut meta)));
        } else {
            ordered.insert(key, value);
        }
    }
    if !ordered.contains_key("id") {
        ordered.insert("id".into(), Value::String(id.to_owned()));
        ordered.insert("meta".into(), Value::Object(meta));
    }
    *object = ordered;
}

/// Visits every `reference` string in `resource` (in `Reference` elements at any depth) and
/// replaces it with what `rewrite` returns, if anything.
pub fn rewrite_references(resource: &mut Value, rewrite: &mut dyn FnMut(&str) -> Option<String>) {
    match resource {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                if key == "reference" {
                    if let Value::String(reference) = value {
                        if let Some(new) = rewrite(reference) {
                            *reference = new;
                        }
                    }
                } else {
                    rewrite_references(value, rewrite);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                rewrite_references(item, rewrite);
            }
        }
        _ => {}
    }
}

/// The resource without `meta` and with `id` removed, for comparing content across versions.
pub fn without_meta(resource: &Value) -> Value {
    let mut copy = resource.clone();
    if let Some(object) = copy.as_object_mut() {
        object.remove("meta");
    }
    copy
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids() {
        assert!(is_valid_id("abc-1.2"));
        assert!(is_valid_id(&"a".repeat(64)));
        assert!(!is_valid_id(&"a".repeat(65)));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("a_b"));
        assert!(!is_valid_id(""));
        assert!(is_valid_id(&new_id()));
    }

    #[test]
    fn stamp_keeps_other_meta_and_puts_id_first() {
        let mut r = json!({"resourceType":"Patient","active":true,"id":"old",
            "meta":{"versionId":"9","profile":["http://x"]}});
        stamp(&mut r, "p1", 3, "2024-01-01T00:00:00.000000Z");
        let keys: Vec<&String> = r.as_object().expect("object").keys().collect();
        assert_eq!(keys, ["resourceType", "id", "meta", "active"]);
        assert_eq!(r["meta"]["versionId"], "3");
        assert_eq!(r["meta"]["profile"][0], "http://x");
    }

    #[test]
    fn decimals_keep_their_lexical_form() {
        let text = r#"{"resourceType":"Observation","valueQuantity":{"value":1.50},"x":100.0,"y":0.000,"z":-0.10}"#;
        let v: Value = serde_json::from_str(text).expect("json");
        assert_eq!(serde_json::to_string(&v).expect("serialize"), text);
        // Exponents keep digits and value; serde_json spells the sign out (1e3 → 1e+3).
        let v: Value = serde_json::from_str("1.50e3").expect("json");
        assert_eq!(v.to_string(), "1.50e+3");
    }

    #[test]
    fn rewrites_nested_references() {
        let mut r = json!({"subject":{"reference":"urn:uuid:1"},"x":[{"actor":{"reference":"urn:uuid:2"}}]});
        rewrite_references(&mut r, &mut |s| {
            s.strip_prefix("urn:uuid:")
                .map(|id| format!("Patient/{id}"))
        });
        assert_eq!(r["subject"]["reference"], "Patient/1");
        assert_eq!(r["x"][0]["actor"]["reference"], "Patient/2");
    }
}
