//! Ids at the destination: kept, or prefixed with every reference rewritten to match.

use serde_json::Value;

use crate::fhir::{is_valid_id, rewrite_references};

/// How one destination names what one source sends it.
#[derive(Debug, Clone)]
pub struct IdMap {
    /// `None` keeps the source's ids.
    pub prefix: Option<String>,
}

impl IdMap {
    pub fn destination_id(&self, id: &str) -> String {
        match &self.prefix {
            Some(prefix) => format!("{prefix}{id}"),
            None => id.to_owned(),
        }
    }

    /// Rewrites `resource` for the destination: its id, and every relative reference
    /// (`Type/id`, `Type/id/_history/n`) to another resource. Contained (`#…`), `urn:` and
    /// absolute references stay as they are. Fails when a prefixed id is no longer a valid id.
    pub fn apply(&self, resource: &mut Value) -> Result<String, String> {
        let id = resource
            .get("id")
            .and_then(Value::as_str)
            .ok_or("the resource has no id")?
            .to_owned();
        let Some(prefix) = &self.prefix else {
            return Ok(id);
        };
        let new_id = format!("{prefix}{id}");
        if !is_valid_id(&new_id) {
            return Err(format!(
                "the prefixed id is not a valid FHIR id (over 64 characters or bad characters): {} characters",
                new_id.len()
            ));
        }
        if let Some(object) = resource.as_object_mut() {
            object.insert("id".into(), Value::String(new_id.clone()));
        }
        rewrite_references(resource, &mut |reference| {
            let mut parts = reference.splitn(3, '/');
            let resource_type = parts.next()?;
            let target = parts.next()?;
            let rest = parts.next();
            if !resource_type.starts_with(|c: char| c.is_ascii_uppercase())
                || resource_type.contains(':')
                || target.is_empty()
            {
                return None;
            }
            Some(match rest {
                Some(rest) => format!("{resource_type}/{prefix}{target}/{rest}"),
                None => format!("{resource_type}/{prefix}{target}"),
            })
        });
        Ok(new_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prefix_rewrites_the_id_and_relative_references_only() {
        let map = IdMap {
            prefix: Some("openemr-".into()),
        };
        let mut observation = json!({
            "resourceType": "Observation",
            "id": "12",
            "subject": {"reference": "Patient/1"},
            "encounter": {"reference": "Encounter/9/_history/2"},
            "performer": [
                {"reference": "#p1"},
                {"reference": "urn:uuid:0b1e"},
                {"reference": "https://other.example.org/fhir/Practitioner/5"}
            ]
        });
        assert_eq!(map.apply(&mut observation), Ok("openemr-12".into()));
        assert_eq!(observation["subject"]["reference"], "Patient/openemr-1");
        assert_eq!(
            observation["encounter"]["reference"],
            "Encounter/openemr-9/_history/2"
        );
        assert_eq!(observation["performer"][0]["reference"], "#p1");
        assert_eq!(observation["performer"][1]["reference"], "urn:uuid:0b1e");
        assert_eq!(
            observation["performer"][2]["reference"],
            "https://other.example.org/fhir/Practitioner/5"
        );
    }

    #[test]
    fn an_id_too_long_with_its_prefix_is_refused() {
        let map = IdMap {
            prefix: Some("athena-".into()),
        };
        let mut patient = json!({"resourceType": "Patient", "id": "a".repeat(60)});
        assert!(map.apply(&mut patient).is_err());
        let keep = IdMap { prefix: None };
        assert_eq!(keep.apply(&mut patient), Ok("a".repeat(60)));
    }
}
