//! Fuzz target: see `fhirgate::fuzzing::pas_bundle`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fhirgate::fuzzing::pas_bundle(data));
