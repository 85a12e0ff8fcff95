//! `OperationOutcome` and the one error type FHIR-facing code returns.
//!
//! Every rejection a FHIR client sees is a [`FhirError`]: an HTTP status plus issues that say
//! what is wrong (`code`) and where (`expression`, a FHIRPath such as `Patient.name[0].given`).
//! The HTTP layer turns it into an `OperationOutcome` body; nothing below it knows about HTTP
//! responses.

use http::StatusCode;
use serde_json::{json, Map, Value};

/// `OperationOutcome.issue.severity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Fatal,
    Error,
    Warning,
    Information,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Fatal => "fatal",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Information => "information",
        }
    }
}

/// One `OperationOutcome.issue`. `code` is a value of the FHIR `IssueType` code system
/// (`invalid`, `structure`, `required`, `value`, `not-found`, `conflict`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub severity: Severity,
    pub code: &'static str,
    pub diagnostics: String,
    pub expression: Vec<String>,
}

impl Issue {
    pub fn error(code: &'static str, diagnostics: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            code,
            diagnostics: diagnostics.into(),
            expression: Vec::new(),
        }
    }

    pub fn warning(code: &'static str, diagnostics: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(code, diagnostics)
        }
    }

    pub fn information(code: &'static str, diagnostics: impl Into<String>) -> Self {
        Self {
            severity: Severity::Information,
            ..Self::error(code, diagnostics)
        }
    }

    pub fn at(mut self, expression: impl Into<String>) -> Self {
        self.expression.push(expression.into());
        self
    }

    fn to_json(&self) -> Value {
        let mut issue = Map::new();
        issue.insert("severity".into(), json!(self.severity.as_str()));
        issue.insert("code".into(), json!(self.code));
        if !self.diagnostics.is_empty() {
            issue.insert("diagnostics".into(), json!(self.diagnostics));
        }
        if !self.expression.is_empty() {
            issue.insert("expression".into(), json!(self.expression));
        }
        Value::Object(issue)
    }
}

/// Builds an `OperationOutcome` resource from issues.
pub fn operation_outcome(issues: &[Issue]) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": issues.iter().map(Issue::to_json).collect::<Vec<_>>(),
    })
}

/// A FHIR-facing failure: the status to answer with and the issues that explain it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}: {}", summary(.issues))]
pub struct FhirError {
    pub status: StatusCode,
    pub issues: Vec<Issue>,
}

fn summary(issues: &[Issue]) -> String {
    issues
        .iter()
        .map(|i| i.diagnostics.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

impl FhirError {
    pub fn new(status: StatusCode, issue: Issue) -> Self {
        Self {
            status,
            issues: vec![issue],
        }
    }

    pub fn with_issues(status: StatusCode, issues: Vec<Issue>) -> Self {
        Self { status, issues }
    }

    /// 400 with one issue.
    pub fn bad_request(code: &'static str, diagnostics: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Issue::error(code, diagnostics))
    }

    pub fn not_found(diagnostics: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            Issue::error("not-found", diagnostics),
        )
    }

    pub fn gone(diagnostics: impl Into<String>) -> Self {
        Self::new(StatusCode::GONE, Issue::error("deleted", diagnostics))
    }

    pub fn precondition_failed(diagnostics: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PRECONDITION_FAILED,
            Issue::error("conflict", diagnostics),
        )
    }

    pub fn conflict(diagnostics: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, Issue::error("conflict", diagnostics))
    }

    pub fn internal(diagnostics: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Issue::error("exception", diagnostics),
        )
    }

    /// Adds `expression` to the first issue that has none, e.g. once the caller knows which
    /// Bundle entry the error came from.
    pub fn at(mut self, expression: impl Into<String>) -> Self {
        let expression = expression.into();
        if let Some(issue) = self.issues.first_mut() {
            issue.expression.insert(0, expression);
        }
        self
    }

    /// Prefixes every expression (and adds one where missing), e.g. `Bundle.entry[3].resource`.
    pub fn within(mut self, prefix: &str, resource_type: Option<&str>) -> Self {
        for issue in &mut self.issues {
            if issue.expression.is_empty() {
                issue.expression.push(prefix.to_string());
                continue;
            }
            for expr in &mut issue.expression {
                let rest = match resource_type {
                    Some(rt) => expr.strip_prefix(rt).unwrap_or(expr.as_str()),
                    None => expr.as_str(),
                };
                let rest = if rest.is_empty() || rest.starts_with('.') || rest.starts_with('[') {
                    rest.to_string()
                } else {
                    format!(".{rest}")
                };
                *expr = format!("{prefix}{rest}");
            }
        }
        self
    }

    pub fn to_operation_outcome(&self) -> Value {
        operation_outcome(&self.issues)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_has_code_expression_and_diagnostics() {
        let err = FhirError::new(
            StatusCode::BAD_REQUEST,
            Issue::error("required", "missing status").at("Observation.status"),
        );
        let oo = err.to_operation_outcome();
        assert_eq!(oo["resourceType"], "OperationOutcome");
        assert_eq!(oo["issue"][0]["code"], "required");
        assert_eq!(oo["issue"][0]["severity"], "error");
        assert_eq!(oo["issue"][0]["expression"][0], "Observation.status");
    }

    #[test]
    fn within_rewrites_expressions_under_a_bundle_entry() {
        let err = FhirError::new(
            StatusCode::BAD_REQUEST,
            Issue::error("value", "bad").at("Patient.name[0].given"),
        )
        .within("Bundle.entry[49].resource", Some("Patient"));
        assert_eq!(
            err.issues[0].expression[0],
            "Bundle.entry[49].resource.name[0].given"
        );
        let err = FhirError::bad_request("invalid", "x").within("Bundle.entry[2]", None);
        assert_eq!(err.issues[0].expression[0], "Bundle.entry[2]");
    }
}
