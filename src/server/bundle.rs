//! Writes Bundle JSON around stored resource bodies without parsing them again.
//!
//! Stored bodies are already serialized resources; a search page of 50 Observations is answered
//! by splicing their bytes into the Bundle text instead of parsing and re-encoding each one.

use bytes::Bytes;
use serde_json::{Map, Value};

use super::response::instant;
use crate::fhir::date::now_micros;
use crate::fhir::new_id;

pub struct BundleWriter {
    out: Vec<u8>,
    entries: usize,
}

impl BundleWriter {
    /// Starts a Bundle of `bundle_type` with an optional `total` and `link`s (relation, url).
    pub fn new(bundle_type: &str, total: Option<usize>, links: &[(&str, String)]) -> Self {
        let mut head = Map::new();
        head.insert("resourceType".into(), "Bundle".into());
        head.insert("id".into(), Value::String(new_id()));
        head.insert(
            "meta".into(),
            serde_json::json!({ "lastUpdated": instant(now_micros()) }),
        );
        head.insert("type".into(), bundle_type.into());
        if let Some(total) = total {
            head.insert("total".into(), total.into());
        }
        if !links.is_empty() {
            head.insert(
                "link".into(),
                Value::Array(
                    links
                        .iter()
                        .map(
                            |(relation, url)| serde_json::json!({"relation": relation, "url": url}),
                        )
                        .collect(),
                ),
            );
        }
        let mut out = serde_json::to_vec(&Value::Object(head)).unwrap_or_default();
        out.pop(); // the closing brace; entries follow
        Self { out, entries: 0 }
    }

    /// Adds an entry: `before` fields, then `resource` (raw JSON) if any, then `after` fields.
    pub fn entry(
        &mut self,
        before: &[(&str, Value)],
        resource: Option<&[u8]>,
        after: &[(&str, Value)],
    ) {
        self.out.extend_from_slice(if self.entries == 0 {
            b",\"entry\":[{"
        } else {
            b",{"
        });
        self.entries += 1;
        let mut first = true;
        let mut field = |out: &mut Vec<u8>, name: &str, raw: &[u8]| {
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(&serde_json::to_vec(name).unwrap_or_default());
            out.push(b':');
            out.extend_from_slice(raw);
        };
        for (name, value) in before {
            field(
                &mut self.out,
                name,
                &serde_json::to_vec(value).unwrap_or_default(),
            );
        }
        if let Some(resource) = resource {
            field(&mut self.out, "resource", resource);
        }
        for (name, value) in after {
            field(
                &mut self.out,
                name,
                &serde_json::to_vec(value).unwrap_or_default(),
            );
        }
        self.out.push(b'}');
    }

    pub fn finish(mut self) -> Bytes {
        if self.entries > 0 {
            self.out.push(b']');
        }
        self.out.push(b'}');
        self.out.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn writes_valid_bundle_json() {
        let mut w = BundleWriter::new(
            "searchset",
            Some(2),
            &[("self", "http://x/fhir/Patient".into())],
        );
        w.entry(
            &[("fullUrl", json!("http://x/fhir/Patient/1"))],
            Some(br#"{"resourceType":"Patient","id":"1"}"#),
            &[("search", json!({"mode":"match"}))],
        );
        w.entry(&[], None, &[("response", json!({"status":"200 OK"}))]);
        let v: Value = serde_json::from_slice(&w.finish()).expect("json");
        assert_eq!(v["total"], 2);
        assert_eq!(v["entry"][0]["resource"]["id"], "1");
        assert_eq!(v["entry"][1]["response"]["status"], "200 OK");
        let empty: Value =
            serde_json::from_slice(&BundleWriter::new("searchset", Some(0), &[]).finish())
                .expect("json");
        assert!(empty.get("entry").is_none());
    }
}
