//! `GET /fhir/metadata`: a CapabilityStatement built from what the server implements.
//!
//! It is generated from the same tables that drive the handlers (resource types from the schema,
//! search parameters from the registry), so it lists exactly what works, no more.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::response::Response;
use http::{HeaderMap, StatusCode};
use serde_json::{json, Value};

use super::response::{check_accept, json_response};
use super::rest::{format_param, query_pairs};
use super::FhirApi;
use crate::fhir::{FhirError, SchemaValidator, SearchRegistry};

pub async fn metadata(
    State(api): State<Arc<FhirApi>>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, FhirError> {
    let pairs = query_pairs(raw.as_deref())?;
    check_accept(&headers, format_param(&pairs))?;
    Ok(json_response(StatusCode::OK, &api.capability))
}

/// Da Vinci PAS's operations on Claim, and Subscriptions (R4 backport) on the PAS topic.
fn add_operations(resource_type: &str, resource: &mut Value) {
    match resource_type {
        "Claim" => {
            resource["operation"] = json!([
                {"name": "submit", "definition": "http://hl7.org/fhir/us/davinci-pas/OperationDefinition/Claim-submit"},
                {"name": "inquire", "definition": "http://hl7.org/fhir/us/davinci-pas/OperationDefinition/Claim-inquiry"},
            ]);
        }
        "Subscription" => {
            resource["extension"] = json!([{
                "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/capabilitystatement-subscriptiontopic-canonical",
                "valueCanonical": crate::pas::subscription::TOPIC,
            }]);
            resource["operation"] = json!([
                {"name": "status", "definition": "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-status"},
            ]);
        }
        _ => {}
    }
}

pub(super) fn capability_statement(
    schema: &SchemaValidator,
    search: &SearchRegistry,
    base_url: &str,
) -> Value {
    let resources: Vec<Value> = schema
        .resource_types()
        .map(|rt| {
            let interactions: Vec<Value> = [
                "read",
                "vread",
                "update",
                "delete",
                "history-instance",
                "history-type",
                "create",
                "search-type",
            ]
            .iter()
            .map(|code| json!({"code": code}))
            .collect();
            let mut params = vec![
                json!({"name": "_id", "type": "token"}),
                json!({"name": "_lastUpdated", "type": "date"}),
            ];
            params.extend(
                search
                    .params(rt)
                    .iter()
                    .map(|p| json!({"name": p.name, "type": p.kind.as_str()})),
            );
            let mut resource = json!({
                "type": rt,
                "interaction": interactions,
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalRead": "not-supported",
                "conditionalUpdate": true,
                "conditionalDelete": "not-supported",
                "searchParam": params,
            });
            add_operations(rt, &mut resource);
            if rt == "AuditEvent" {
                // The audit log (see `audit::events`): read and searched, never written.
                resource = json!({
                    "type": rt,
                    "interaction": [{"code": "read"}, {"code": "search-type"}],
                    "searchParam": [
                        {"name": "date", "type": "date"},
                        {"name": "agent", "type": "reference"},
                        {"name": "entity", "type": "reference"},
                        {"name": "patient", "type": "reference"},
                        {"name": "action", "type": "token"},
                        {"name": "subtype", "type": "token"},
                        {"name": "outcome", "type": "token"},
                        {"name": "address", "type": "string"},
                    ],
                });
            }
            resource
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "instantiates": [
            "http://hl7.org/fhir/uv/subscriptions-backport/CapabilityStatement/backport-subscription-server-r4"
        ],
        "status": "active",
        "date": "2026-11-25",
        "publisher": "fhirgate",
        "kind": "instance",
        "software": {"name": "fhirgate", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "fhirgate embedded FHIR R4 store", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            // SMART on FHIR: where backend clients get tokens (see `auth`).
            "security": {
                "cors": false,
                "service": [{"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "SMART-on-FHIR",
                }]}],
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [{
                        "url": "token",
                        "valueUri": format!("{}/auth/token", base_url.trim_end_matches('/').trim_end_matches("/fhir")),
                    }],
                }],
            },
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
        }],
    })
}
