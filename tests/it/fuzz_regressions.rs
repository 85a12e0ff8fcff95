//! Replays the fuzzing seeds and every input a fuzz target once failed on (`fuzz/seeds/`,
//! `fuzz/regressions/`) through the same entry points, so a fixed crash stays fixed.

use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 5] = [
    ("fhir_json", fhirgate::fuzzing::fhir_json),
    ("cds_request", fhirgate::fuzzing::cds_request),
    ("pas_bundle", fhirgate::fuzzing::pas_bundle),
    ("policy_file", fhirgate::fuzzing::policy_file),
    ("search_params", fhirgate::fuzzing::search_params),
];

fn inputs(folder: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn seeds_and_past_failures_run_cleanly() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut seeds = 0;
    for (name, target) in TARGETS {
        let seed_files = inputs(&fuzz.join("seeds").join(name));
        assert!(!seed_files.is_empty(), "no seeds for {name}");
        seeds += seed_files.len();
        for file in seed_files
            .into_iter()
            .chain(inputs(&fuzz.join("regressions").join(name)))
        {
            let data = std::fs::read(&file).expect("input");
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name} panicked on {}", file.display());
        }
    }
    assert!(seeds >= 50, "{seeds}");
}
