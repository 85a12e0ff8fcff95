//! Validation against the official FHIR R4 (4.0.1) JSON schema in `profiles/`.
//!
//! Two validators share one schema. The whole-schema validator answers "is this valid?" in about
//! a microsecond but, because the schema's root is a `oneOf` over all 146 resource types, its
//! errors only say "matches none". So a failure is explained by a second validator compiled for
//! just that resource type, lazily and cached, whose errors carry the path of the offending
//! element. That path becomes a FHIRPath `issue.expression` (`Patient.name[0].given[1]`).
//! Explainers leave nested resources out (each is explained on its own), which keeps them small,
//! and only a bounded number stay compiled.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use http::StatusCode;
use jsonschema::error::ValidationErrorKind;
use serde_json::Value;

use super::outcome::{FhirError, Issue};

/// The schema shipped with the project, compiled into the binary so a fresh machine needs nothing.
pub const BUNDLED_SCHEMA: &str = include_str!("../../profiles/fhir.schema.json");

/// Most issues reported for one resource; more only repeat the lesson.
const MAX_ISSUES: usize = 20;

/// Most per-type explainers kept compiled at once.
const MAX_EXPLAINERS: usize = 24;

/// Errors while loading the schema itself (startup only).
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("schema is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("schema does not compile: {0}")]
    Compile(String),
    #[error("schema has no resource list (root oneOf)")]
    NoResourceList,
}

/// Validates resources against the R4 schema and knows which resource types exist.
pub struct SchemaValidator {
    /// The schema text; parsed again only to compile a per-type explainer, so the parsed tree
    /// (tens of MB) is not kept for the life of the process.
    source: Cow<'static, str>,
    /// Element names of each resource type.
    elements: HashMap<String, BTreeSet<String>>,
    whole: jsonschema::Validator,
    resource_types: BTreeSet<String>,
    per_type: RwLock<HashMap<String, Arc<jsonschema::Validator>>>,
}

impl std::fmt::Debug for SchemaValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaValidator")
            .field("resource_types", &self.resource_types.len())
            .finish_non_exhaustive()
    }
}

impl SchemaValidator {
    /// The schema compiled into the binary.
    pub fn bundled() -> Result<Self, SchemaError> {
        Self::from_source(Cow::Borrowed(BUNDLED_SCHEMA))
    }

    pub fn from_json(text: &str) -> Result<Self, SchemaError> {
        Self::from_source(Cow::Owned(text.to_owned()))
    }

    fn from_source(source: Cow<'static, str>) -> Result<Self, SchemaError> {
        let schema = prepare(&source)?;
        let resource_types: BTreeSet<String> = schema["oneOf"]
            .as_array()
            .ok_or(SchemaError::NoResourceList)?
            .iter()
            .filter_map(|branch| branch["$ref"].as_str())
            .filter_map(|r| r.strip_prefix("#/definitions/"))
            .map(str::to_owned)
            .collect();
        if resource_types.is_empty() {
            return Err(SchemaError::NoResourceList);
        }
        let whole = jsonschema::draft6::options()
            .build(&schema)
            .map_err(|e| SchemaError::Compile(e.to_string()))?;
        let elements = resource_types
            .iter()
            .map(|rt| {
                let names = schema["definitions"][rt.as_str()]["properties"]
                    .as_object()
                    .map(|p| p.keys().cloned().collect())
                    .unwrap_or_default();
                (rt.clone(), names)
            })
            .collect();
        Ok(Self {
            source,
            elements,
            whole,
            resource_types,
            per_type: RwLock::new(HashMap::new()),
        })
    }

    pub fn is_resource_type(&self, name: &str) -> bool {
        self.resource_types.contains(name)
    }

    pub fn resource_types(&self) -> impl Iterator<Item = &str> {
        self.resource_types.iter().map(String::as_str)
    }

    /// Whether resources of `resource_type` have an element called `element` (e.g. `identifier`).
    pub fn has_element(&self, resource_type: &str, element: &str) -> bool {
        self.elements
            .get(resource_type)
            .is_some_and(|names| names.contains(element))
    }

    /// Checks `resource` against the schema; on failure the error lists every problem found
    /// (up to a limit) with its FHIRPath.
    pub fn validate(&self, resource: &Value) -> Result<(), FhirError> {
        check_resource_type(self, resource)?;
        if self.is_valid(resource) {
            Ok(())
        } else {
            Err(self.explain(resource))
        }
    }

    /// The fast check: about a microsecond for a typical resource.
    pub fn is_valid(&self, resource: &Value) -> bool {
        self.whole.is_valid(resource)
    }

    /// Explains why `resource` (which failed [`Self::is_valid`]) is invalid. The first failure of
    /// a resource type compiles that type's explainer (tens of milliseconds), so call this off
    /// the async workers.
    pub fn explain(&self, resource: &Value) -> FhirError {
        let resource_type = match check_resource_type(self, resource) {
            Ok(rt) => rt,
            Err(e) => return e,
        };
        let mut issues = Vec::new();
        if let Err(e) = self.explain_into(resource_type, resource, resource_type, &mut issues) {
            return e;
        }
        if issues.is_empty() {
            issues.push(
                Issue::error(
                    "structure",
                    "resource does not conform to the FHIR R4 schema",
                )
                .at(resource_type),
            );
        }
        issues.truncate(MAX_ISSUES);
        // Shape problems (wrong types, unknown or missing elements) make the request malformed;
        // a well-formed resource whose values break the rules is unprocessable.
        let malformed = issues.iter().any(|i| i.code != "value");
        let status = if malformed {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        FhirError::with_issues(status, issues)
    }

    /// Collects the precise errors for `resource` (of `resource_type`), with expressions rooted at
    /// `prefix`. Nested resources (`contained`, Bundle entries, Parameters) are not part of a
    /// type's explainer; each invalid one is explained on its own, with its path.
    fn explain_into(
        &self,
        resource_type: &str,
        resource: &Value,
        prefix: &str,
        issues: &mut Vec<Issue>,
    ) -> Result<(), FhirError> {
        let validator = self.type_validator(resource_type)?;
        for error in validator.iter_errors(resource) {
            if issues.len() >= MAX_ISSUES {
                return Ok(());
            }
            let segments = pointer_segments(error.instance_path().as_str());
            let path = fhirpath(prefix, &segments);
            match error.kind() {
                ValidationErrorKind::AdditionalProperties { unexpected } => {
                    for name in unexpected {
                        issues.push(
                            Issue::error("structure", format!("unknown element '{name}'"))
                                .at(format!("{path}.{name}")),
                        );
                    }
                }
                ValidationErrorKind::Required { property } => {
                    let name = property.as_str().unwrap_or_default();
                    issues.push(
                        Issue::error("required", format!("missing required element '{name}'"))
                            .at(format!("{path}.{name}")),
                    );
                }
                kind => {
                    let code = match kind {
                        ValidationErrorKind::Type { .. }
                        | ValidationErrorKind::MinItems { .. }
                        | ValidationErrorKind::MaxItems { .. }
                        | ValidationErrorKind::FalseSchema => "structure",
                        _ => "value",
                    };
                    issues.push(Issue::error(code, error.masked().to_string()).at(path));
                }
            }
        }
        let mut nested = Vec::new();
        nested_resources(resource, &mut Vec::new(), &mut nested);
        for (segments, inner) in nested {
            if issues.len() >= MAX_ISSUES || self.whole.is_valid(inner) {
                continue;
            }
            let path = fhirpath(prefix, &segments);
            match inner.get("resourceType").and_then(Value::as_str) {
                Some(t) if self.is_resource_type(t) => {
                    self.explain_into(t, inner, &path, issues)?
                }
                Some(t) => issues.push(
                    Issue::error("structure", format!("unknown resource type '{t}'"))
                        .at(format!("{path}.resourceType")),
                ),
                None => {}
            }
        }
        Ok(())
    }

    fn type_validator(&self, resource_type: &str) -> Result<Arc<jsonschema::Validator>, FhirError> {
        if let Some(v) = self
            .per_type
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(resource_type)
        {
            return Ok(v.clone());
        }
        let mut schema = prepare(&self.source)
            .map_err(|e| FhirError::internal(format!("schema for {resource_type}: {e}")))?;
        if let Some(root) = schema.as_object_mut() {
            root.remove("oneOf");
            root.insert(
                "$ref".into(),
                Value::String(format!("#/definitions/{resource_type}")),
            );
        }
        // Nested resources are explained one by one (see `explain_into`); leaving them out keeps
        // each explainer to the definitions its own type reaches, a few MB instead of all 146.
        if let Some(list) = schema.pointer_mut("/definitions/ResourceList") {
            *list = serde_json::json!({"type": "object", "required": ["resourceType"]});
        }
        let compiled = jsonschema::draft6::options()
            .build(&schema)
            .map_err(|e| FhirError::internal(format!("schema for {resource_type}: {e}")))?;
        let compiled = Arc::new(compiled);
        let mut cache = self.per_type.write().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_EXPLAINERS {
            // Invalid input of many types cannot grow memory without bound; any entry will do.
            if let Some(victim) = cache.keys().next().cloned() {
                cache.remove(&victim);
            }
        }
        cache.insert(resource_type.to_owned(), compiled.clone());
        Ok(compiled)
    }
}

/// Elements whose type is `Resource` in R4: `contained`, `Bundle.entry.resource`,
/// `Bundle.entry.response.outcome` and `Parameters.parameter[.part].resource`. (Other elements
/// may be called `resourceType`, e.g. `ExampleScenario.instance.resourceType`, so the key alone
/// does not make an object a resource.)
const RESOURCE_ELEMENTS: [&str; 3] = ["contained", "resource", "outcome"];

/// Resources nested in `value` at resource-typed elements, without descending into them: each
/// explains its own nested ones.
fn nested_resources<'a>(
    value: &'a Value,
    path: &mut Vec<String>,
    out: &mut Vec<(Vec<String>, &'a Value)>,
) {
    let is_resource = |v: &Value| v.get("resourceType").is_some_and(Value::is_string);
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                path.push(key.clone());
                let typed = RESOURCE_ELEMENTS.contains(&key.as_str());
                match child {
                    Value::Array(items) => {
                        for (i, item) in items.iter().enumerate() {
                            path.push(i.to_string());
                            if typed && is_resource(item) {
                                out.push((path.clone(), item));
                            } else {
                                nested_resources(item, path, out);
                            }
                            path.pop();
                        }
                    }
                    _ if typed && is_resource(child) => out.push((path.clone(), child)),
                    _ => nested_resources(child, path, out),
                }
                path.pop();
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(i.to_string());
                nested_resources(item, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

/// Parses the schema and readies it for compiling.
///
/// The official schema gives complex types (`Quantity`, `CodeableConcept`, …) `properties` but no
/// `"type": "object"`, so a string where a Quantity belongs passes it; every definition with
/// properties describes a JSON object, so say so. Descriptions are dropped: they are most of the
/// text and validation never reads them.
fn prepare(text: &str) -> Result<Value, SchemaError> {
    let mut schema: Value = serde_json::from_str(text)?;
    strip_descriptions(&mut schema);
    if let Some(definitions) = schema.get_mut("definitions").and_then(Value::as_object_mut) {
        for definition in definitions.values_mut() {
            if let Some(def) = definition.as_object_mut() {
                if def.contains_key("properties") && !def.contains_key("type") {
                    def.insert("type".into(), Value::String("object".into()));
                }
            }
        }
    }
    Ok(schema)
}

fn strip_descriptions(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if map.get("description").is_some_and(Value::is_string) {
                map.remove("description");
            }
            map.values_mut().for_each(strip_descriptions);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_descriptions),
        _ => {}
    }
}

/// The checks that apply even with schema validation off: an object with a known `resourceType`.
pub fn check_resource_type<'a>(
    validator: &SchemaValidator,
    resource: &'a Value,
) -> Result<&'a str, FhirError> {
    let Some(object) = resource.as_object() else {
        return Err(FhirError::bad_request(
            "structure",
            "a resource must be a JSON object",
        ));
    };
    let Some(rt) = object.get("resourceType") else {
        return Err(FhirError::new(
            StatusCode::BAD_REQUEST,
            Issue::error("required", "missing resourceType").at("resourceType"),
        ));
    };
    let Some(rt) = rt.as_str() else {
        return Err(FhirError::new(
            StatusCode::BAD_REQUEST,
            Issue::error("structure", "resourceType must be a string").at("resourceType"),
        ));
    };
    if !validator.is_resource_type(rt) {
        return Err(FhirError::new(
            StatusCode::BAD_REQUEST,
            Issue::error(
                "not-supported",
                format!("'{rt}' is not a FHIR R4 resource type"),
            )
            .at("resourceType"),
        ));
    }
    Ok(rt)
}

/// Splits a JSON pointer into its unescaped segments.
fn pointer_segments(pointer: &str) -> Vec<String> {
    if pointer.is_empty() {
        return Vec::new();
    }
    pointer
        .trim_start_matches('/')
        .split('/')
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// `["name","0","given"]` under `Patient` → `Patient.name[0].given`.
fn fhirpath(prefix: &str, segments: &[String]) -> String {
    let mut out = prefix.to_string();
    for segment in segments {
        if segment.bytes().all(|b| b.is_ascii_digit()) && !segment.is_empty() {
            out.push('[');
            out.push_str(segment);
            out.push(']');
        } else {
            out.push('.');
            out.push_str(segment);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::OnceLock;

    fn validator() -> &'static SchemaValidator {
        static V: OnceLock<SchemaValidator> = OnceLock::new();
        V.get_or_init(|| SchemaValidator::bundled().expect("bundled schema compiles"))
    }

    #[test]
    fn knows_all_146_resource_types() {
        assert_eq!(validator().resource_types().count(), 146);
        assert!(validator().is_resource_type("Patient"));
        assert!(!validator().is_resource_type("Patientt"));
        assert!(validator().has_element("Patient", "identifier"));
        assert!(!validator().has_element("Patient", "status"));
    }

    #[test]
    fn valid_patient_passes() {
        let p = json!({"resourceType":"Patient","id":"a","name":[{"family":"Doe","given":["J"]}],
            "extension":[{"url":"http://example.org/x","valueDecimal":1.50}]});
        validator().validate(&p).expect("valid");
    }

    #[test]
    fn errors_point_at_the_element() {
        let p = json!({"resourceType":"Patient","name":[{"given":[5]}],"gender":"robot","foo":1});
        let err = validator().validate(&p).expect_err("invalid");
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        let exprs: Vec<&str> = err
            .issues
            .iter()
            .flat_map(|i| i.expression.iter().map(String::as_str))
            .collect();
        assert!(exprs.contains(&"Patient.name[0].given[0]"), "{exprs:?}");
        assert!(exprs.contains(&"Patient.gender"), "{exprs:?}");
        assert!(exprs.contains(&"Patient.foo"), "{exprs:?}");
    }

    #[test]
    fn value_only_problems_are_unprocessable() {
        let p = json!({"resourceType":"Patient","birthDate":"1990-13-45"});
        let err = validator().validate(&p).expect_err("invalid");
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(err.issues[0].code, "value");
        assert_eq!(err.issues[0].expression, vec!["Patient.birthDate"]);
        // The offending value is not echoed back.
        assert!(!err.issues[0].diagnostics.contains("1990-13-45"));
    }

    #[test]
    fn complex_types_must_be_objects() {
        let o = json!({"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":"heavy"});
        let err = validator()
            .validate(&o)
            .expect_err("a string is not a Quantity");
        assert_eq!(err.issues[0].expression, vec!["Observation.valueQuantity"]);
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn contained_resources_are_explained_with_their_path() {
        let p = json!({"resourceType":"Observation","status":"final","code":{"text":"x"},
            "contained":[{"resourceType":"Patient","id":"p","gender":"robot"}]});
        let err = validator().validate(&p).expect_err("invalid");
        assert_eq!(
            err.issues[0].expression,
            vec!["Observation.contained[0].gender"]
        );
    }

    #[test]
    fn bundle_entries_are_explained_with_their_path() {
        let b = json!({"resourceType":"Bundle","type":"collection","entry":[
            {"resource":{"resourceType":"Patient","id":"ok"}},
            {"resource":{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":"heavy"}}]});
        let err = validator().validate(&b).expect_err("invalid");
        assert_eq!(
            err.issues[0].expression,
            vec!["Bundle.entry[1].resource.valueQuantity"]
        );
    }

    #[test]
    fn explainers_are_bounded() {
        let v = SchemaValidator::bundled().expect("schema");
        for rt in v
            .resource_types()
            .take(MAX_EXPLAINERS + 5)
            .map(str::to_owned)
            .collect::<Vec<_>>()
        {
            let err = v
                .validate(&json!({"resourceType": rt, "bogus": 1}))
                .expect_err("invalid");
            let want = format!("{rt}.bogus");
            assert!(
                err.issues.iter().any(|i| i.expression == [want.clone()]),
                "{want}: {err:?}"
            );
        }
        assert!(v.per_type.read().expect("lock").len() <= MAX_EXPLAINERS);
    }

    #[test]
    fn missing_or_unknown_resource_type() {
        let err = validator()
            .validate(&json!({"id":"x"}))
            .expect_err("no type");
        assert_eq!(err.issues[0].code, "required");
        let err = validator()
            .validate(&json!({"resourceType":"Nope"}))
            .expect_err("unknown");
        assert_eq!(err.issues[0].code, "not-supported");
        let err = validator().validate(&json!([1])).expect_err("array");
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
    }
}
