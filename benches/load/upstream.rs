//! The upstream FHIR server both proxies forward to: answers every `GET` with one Patient.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use tokio::net::TcpListener;

const PATIENT: &str = r#"{"resourceType":"Patient","id":"p1","meta":{"versionId":"3","lastUpdated":"2026-01-05T10:00:00Z"},"identifier":[{"system":"http://hospital.example/mrn","value":"MRN-000123"}],"active":true,"name":[{"use":"official","family":"Loadtest","given":["Synthetic","Person"]}],"telecom":[{"system":"phone","value":"555-0100","use":"home"}],"gender":"female","birthDate":"1970-01-01","address":[{"line":["1 Example Street"],"city":"Springfield","state":"MA","postalCode":"01000","country":"US"}]}"#;

/// Serves on `listener` until the process ends (one thread of its own runtime).
pub async fn serve(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_request| async {
                let response = http::Response::builder()
                    .header("content-type", "application/fhir+json")
                    .header("etag", "W/\"3\"")
                    .body(Full::new(Bytes::from_static(PATIENT.as_bytes())))
                    .unwrap_or_default();
                Ok::<_, Infallible>(response)
            });
            let _ = http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
