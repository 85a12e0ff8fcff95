//! Fuzz target: see `fhirgate::fuzzing::fhir_json`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fhirgate::fuzzing::fhir_json(data));
