//! Fuzz target: see `fhirgate::fuzzing::cds_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fhirgate::fuzzing::cds_request(data));
