//! Fuzz target: see `fhirgate::fuzzing::search_params`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fhirgate::fuzzing::search_params(data));
