//! Fuzz target: see `fhirgate::fuzzing::policy_file`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fhirgate::fuzzing::policy_file(data));
