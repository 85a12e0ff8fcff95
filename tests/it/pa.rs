//! Prior-authorization determination against the sample policies, with patients built from
//! Synthea records plus the findings each case needs: patients who meet, fail and lack data for
//! each criterion, red-flag bypasses and step therapy.

use std::path::{Path, PathBuf};

use fhirgate::pa::{CoverageStatus, Determination, Fact, FactSource, PolicySet, PriorAuth, Status};
use serde_json::{json, Value};
use time::macros::date;
use time::Date;

use crate::helpers::{fixtures, read_json};

const CPT: &str = "http://www.ama-assn.org/go/cpt";
const HCPCS: &str = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets";
const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
const ICD10: &str = "http://hl7.org/fhir/sid/icd-10-cm";
const LOINC: &str = "http://loinc.org";

fn policies() -> PolicySet {
    PolicySet::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"))
        .expect("sample policies load")
}

/// A Synthea patient's record (resources from its bundle, ids taken from the fullUrls).
fn synthea(name_prefix: &str) -> Vec<Value> {
    let dir = fixtures().join("synthea");
    let path: PathBuf = std::fs::read_dir(&dir)
        .expect("synthea")
        .map(|e| e.expect("entry").path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(name_prefix))
        })
        .expect("that patient");
    let bundle = read_json(&path);
    bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            let mut r = e["resource"].clone();
            if r.get("id").is_none() {
                r["id"] = json!(e["fullUrl"]
                    .as_str()
                    .expect("fullUrl")
                    .trim_start_matches("urn:uuid:"));
            }
            r
        })
        .collect()
}

/// A small record: a patient, one problem unrelated to the policies, and nothing else.
fn plain_patient() -> Vec<Value> {
    vec![
        json!({"resourceType":"Patient","id":"p1","gender":"female","birthDate":"1970-03-01"}),
        json!({"resourceType":"Condition","id":"sinusitis","clinicalStatus":{"coding":[{"code":"active"}]},
            "code":{"coding":[{"system":"http://snomed.info/sct","code":"444814009"}]}}),
    ]
}

fn coverage(payer: &str) -> Value {
    json!({"resourceType":"Coverage","id":"cov","status":"active","beneficiary":{"reference":"Patient/p1"},
        "payor":[{"display":payer}]})
}

fn condition(id: &str, code: &str) -> Value {
    json!({"resourceType":"Condition","id":id,"clinicalStatus":{"coding":[{"code":"active"}]},
        "code":{"coding":[{"system":ICD10,"code":code}]},"onsetDateTime":"2024-01-15"})
}

fn therapy(id: &str, start: &str, end: &str) -> Value {
    json!({"resourceType":"Procedure","id":id,"status":"completed",
        "code":{"coding":[{"system":CPT,"code":"97110"}]},"performedPeriod":{"start":start,"end":end}})
}

fn observation(id: &str, loinc: &str, value: f64, unit: &str, day: &str) -> Value {
    json!({"resourceType":"Observation","id":id,"status":"final","code":{"coding":[{"system":LOINC,"code":loinc}]},
        "valueQuantity":{"value":value,"unit":unit},"effectiveDateTime":day})
}

fn medication(id: &str, rxnorm: &str, start: &str, end: &str) -> Value {
    json!({"resourceType":"MedicationStatement","id":id,"status":"completed",
        "medicationCodeableConcept":{"coding":[{"system":RXNORM,"code":rxnorm}]},
        "effectivePeriod":{"start":start,"end":end},"subject":{"reference":"Patient/p1"}})
}

fn service(system: &str, code: &str) -> Value {
    json!({"resourceType":"ServiceRequest","id":"order","status":"draft","intent":"order",
        "code":{"coding":[{"system":system,"code":code}]},"subject":{"reference":"Patient/p1"}})
}

fn device(code: &str) -> Value {
    json!({"resourceType":"DeviceRequest","id":"order","status":"draft","intent":"order",
        "codeCodeableConcept":{"coding":[{"system":HCPCS,"code":code}]},"subject":{"reference":"Patient/p1"}})
}

fn drug(code: &str) -> Value {
    json!({"resourceType":"MedicationRequest","id":"order","status":"draft","intent":"order",
        "medicationCodeableConcept":{"coding":[{"system":RXNORM,"code":code}]},"subject":{"reference":"Patient/p1"}})
}

struct Case {
    record: Vec<Value>,
    facts: Option<Vec<Fact>>,
    today: Date,
}

impl Case {
    fn new(payer: &str) -> Self {
        let mut record = plain_patient();
        record.push(coverage(payer));
        Self {
            record,
            facts: None,
            today: date!(2024 - 06 - 01),
        }
    }

    fn synthea(name: &str, payer: &str, today: Date) -> Self {
        let mut record = synthea(name);
        record.push(coverage(payer));
        Self {
            record,
            facts: None,
            today,
        }
    }

    fn with(mut self, resource: Value) -> Self {
        self.record.push(resource);
        self
    }

    /// The notes were read and nothing relevant was found.
    fn notes_reviewed(mut self) -> Self {
        self.facts.get_or_insert_with(Vec::new);
        self
    }

    fn fact(mut self, kind: &str, value: Option<&str>, days: Option<u32>) -> Self {
        self.facts.get_or_insert_with(Vec::new).push(Fact {
            kind: kind.into(),
            value: value.map(str::to_owned),
            days,
            source: Some(FactSource {
                note: "DocumentReference/note-1".into(),
                start: 10,
                end: 42,
            }),
        });
        self
    }

    fn decide(&self, order: &Value) -> Determination {
        let refs: Vec<&Value> = self.record.iter().collect();
        policies().determine_with(order, &refs, self.facts.clone(), self.today)
    }
}

fn assert_pa(d: &Determination, coverage: CoverageStatus, pa: PriorAuth) {
    assert_eq!((d.coverage, d.prior_auth), (coverage, pa), "{}", d.render());
}

#[test]
fn sample_policies_match_their_schema_and_lint_clean() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let schema = read_json(&dir.join("policy.schema.json"));
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if !name.ends_with(".json") || name.ends_with(".schema.json") {
            continue;
        }
        files += 1;
        let policy = read_json(&path);
        let errors: Vec<String> = validator
            .iter_errors(&policy)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{name}: {errors:?}");
    }
    assert_eq!(files, 4);
    let set = policies();
    let names: Vec<&str> = set.payers.iter().map(|p| p.payer.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "Acme Health Plan",
            "Bluestone Insurance",
            "Cedar Mutual",
            "Maryland Capital Insurance Company"
        ]
    );
}

#[test]
fn mri_lumbar_meets_fails_lacks_data_and_red_flags() {
    let mri = service(CPT, "72148");
    for payer in ["Acme Health Plan", "Bluestone Insurance", "Cedar Mutual"] {
        // Low back pain and 8 weeks of PT: criteria met.
        let d = Case::new(payer)
            .with(condition("lbp", "M54.50"))
            .with(therapy("pt", "2024-03-01", "2024-04-26"))
            .decide(&mri);
        assert_pa(&d, CoverageStatus::Covered, PriorAuth::Satisfied);
        assert!(d.criteria.as_ref().expect("trace").status == Status::Met);
        assert!(d
            .policy_url
            .as_deref()
            .is_some_and(|u| u.contains("mri-lumbar")));

        // Two weeks of PT is not enough: PA needed, and the answer says what is missing.
        let d = Case::new(payer)
            .with(condition("lbp", "M54.50"))
            .with(therapy("pt", "2024-05-01", "2024-05-15"))
            .notes_reviewed()
            .decide(&mri);
        assert_pa(&d, CoverageStatus::Conditional, PriorAuth::Needed);
        assert_eq!(d.criteria.as_ref().expect("trace").status, Status::Unmet);
        assert!(
            d.missing
                .iter()
                .any(|m| m.contains("6 weeks") && m.contains("only 15 days")),
            "{:?}",
            d.missing
        );

        // Without the notes, a red flag could still be there: unknown rather than unmet.
        let d = Case::new(payer)
            .with(condition("lbp", "M54.50"))
            .with(therapy("pt", "2024-05-01", "2024-05-15"))
            .decide(&mri);
        assert_eq!(d.criteria.as_ref().expect("trace").status, Status::Unknown);
        assert!(d.render().contains("notes not reviewed"), "{}", d.render());
        // What is missing is the path the patient is on: more conservative care.
        assert!(
            d.missing.iter().all(|m| m.contains("6 weeks")),
            "{:?}",
            d.missing
        );

        // PT long ago (outside the 6-month window) does not count.
        let d = Case::new(payer)
            .with(condition("lbp", "M54.50"))
            .with(therapy("pt", "2023-01-01", "2023-03-01"))
            .decide(&mri);
        assert_pa(&d, CoverageStatus::Conditional, PriorAuth::Needed);

        // No record of problems, procedures or notes: unknown, not a denial.
        let mut case = Case::new(payer);
        case.record.retain(|r| r["resourceType"] != "Condition");
        let d = case.decide(&mri);
        assert_eq!(
            d.criteria.as_ref().expect("trace").status,
            Status::Unknown,
            "{}",
            d.render()
        );
        assert_pa(&d, CoverageStatus::Conditional, PriorAuth::Needed);
        assert!(d
            .missing
            .iter()
            .any(|m| m.contains("no problem list supplied")));

        // Red flags bypass conservative care: a cauda equina diagnosis, or a malignancy in notes.
        let d = Case::new(payer)
            .with(condition("ces", "G83.4"))
            .decide(&mri);
        assert_pa(&d, CoverageStatus::Covered, PriorAuth::Satisfied);
        let d = Case::new(payer)
            .fact("red_flag", Some("malignancy"), None)
            .decide(&mri);
        assert_pa(&d, CoverageStatus::Covered, PriorAuth::Satisfied);
        assert!(d
            .criteria
            .as_ref()
            .expect("trace")
            .render_text()
            .contains("note DocumentReference/note-1 [10..42]"));

        // Conservative care documented only in the notes counts too.
        let d = Case::new(payer)
            .with(condition("lbp", "M54.16"))
            .fact("conservative_therapy", Some("physical_therapy"), Some(56))
            .decide(&mri);
        assert_pa(&d, CoverageStatus::Covered, PriorAuth::Satisfied);
    }
}

trait RenderText {
    fn render_text(&self) -> String;
}

impl RenderText for fhirgate::pa::CriterionResult {
    fn render_text(&self) -> String {
        let mut out = String::new();
        self.render(0, &mut out);
        out
    }
}

#[test]
fn mri_knee_is_acme_only() {
    let knee = service(CPT, "73721");
    let d = Case::new("Acme Health Plan")
        .with(condition("tear", "S83.21"))
        .decide(&knee);
    assert_pa(&d, CoverageStatus::Covered, PriorAuth::Satisfied);
    let d = Case::new("Acme Health Plan")
        .with(condition("pain", "M25.561"))
        .with(therapy("pt", "2024-04-01", "2024-05-10"))
        .decide(&knee);
    assert_pa(&d, CoverageStatus::Covered, PriorAuth::Satisfied);
    let d = Case::new("Acme Health Plan")
        .with(condition("pain", "M25.561"))
        .decide(&knee);
    assert_pa(&d, CoverageStatus::Conditional, PriorAuth::Needed);
    for other in ["Bluestone Insurance", "Cedar Mutual"] {
        let d = Case::new(other).decide(&knee);
        assert_pa(&d, CoverageStatus::Covered, PriorAuth::NotNeeded);
    }
}

#[test]
fn cpap_by_apnea_hypopnea_index() {
    let cpap = device("E0601");
    let d = Case::new("Cedar Mutual")
        .with(observation("ahi", "69990-0", 18.0, "/h", "2024-05-01"))
        .decide(&cpap);
    assert_pa(&d, CoverageStatus::Covered, PriorAuth::Satisfied);
    // AHI 7 with hypertension (a Synthea patient's own hypertension diagnosis).
    let d = Case::synthea("Margarita_Powlowski", "Cedar Mutual", date!(2024 - 06 - 01))
        .with(observation("ahi", "69990-0", 7.0, "/h", "2024-05-01"))
        .decide(&cpap);
    assert_pa(&d, CoverageStatus::Covered, PriorAuth::Satisfied);
    assert!(d
        .criteria
        .as_ref()
        .expect("trace")
        .render_text()
        .contains("Hypertension"));
    // AHI 7 alone: not met.
    let d = Case::new("Cedar Mutual")
        .with(observation("ahi", "69990-0", 7.0, "/h", "2024-05-01"))
        .decide(&cpap);
    assert_pa(&d, CoverageStatus::Conditional, PriorAuth::Needed);
    assert_eq!(d.criteria.as_ref().expect("trace").status, Status::Unmet);
    // No sleep study: unknown, and the missing list names it.
    let d = Case::new("Cedar Mutual").decide(&cpap);
    assert_eq!(d.criteria.as_ref().expect("trace").status, Status::Unknown);
    assert!(
        d.missing.iter().any(|m| m.contains("Apnea-hypopnea index")),
        "{:?}",
        d.missing
    );
}

#[test]
fn home_oxygen_needs_a_recent_low_saturation_and_lung_disease() {
    let oxygen = device("E1390");
    let copd = condition("copd", "J44.9");
    let d = Case::new("Acme Health Plan")
        .with(copd.clone())
        .with(observation("spo2", "59408-5", 86.0, "%", "2024-05-20"))
        .decide(&oxygen);
    assert_pa(&d, CoverageStatus::Covered, PriorAuth::Satisfied);
    let d = Case::new("Acme Health Plan")
        .with(copd.clone())
        .with(observation("spo2", "2708-6", 93.0, "%", "2024-05-20"))
        .decide(&oxygen);
    assert_pa(&d, CoverageStatus::Conditional, PriorAuth::Needed);
    assert_eq!(d.criteria.as_ref().expect("trace").status, Status::Unmet);
    // Too old to count: the window is 30 days.
    let d = Case::new("Acme Health Plan")
        .with(copd)
        .with(observation("spo2", "2708-6", 85.0, "%", "2024-03-01"))
        .decide(&oxygen);
    assert_eq!(d.criteria.as_ref().expect("trace").status, Status::Unknown);
    // Low saturation without lung disease: not met.
    let d = Case::new("Acme Health Plan")
        .with(observation("spo2", "2708-6", 85.0, "%", "2024-05-25"))
        .decide(&oxygen);
    assert_eq!(d.criteria.as_ref().expect("trace").status, Status::Unmet);
}

#[test]
fn semaglutide_for_weight_management_from_synthea_records() {
    let sema = drug("1991302");
    // Brent Beer's latest BMI is 30.2.
    let d = Case::synthea("Brent_Beer", "Bluestone Insurance", date!(2019 - 08 - 01)).decide(&sema);
    assert_pa(&d, CoverageStatus::Covered, PriorAuth::Satisfied);
    // Gayla Ferry: BMI 27.9 with hypertension.
    let d =
        Case::synthea("Gayla_Ferry", "Bluestone Insurance", date!(2020 - 09 - 01)).decide(&sema);
    assert_pa(&d, CoverageStatus::Covered, PriorAuth::Satisfied);
    // Andy Schaden: BMI 27.8 and no comorbidity, no diabetes.
    let d =
        Case::synthea("Andy_Schaden", "Bluestone Insurance", date!(2021 - 03 - 01)).decide(&sema);
    assert_pa(&d, CoverageStatus::Conditional, PriorAuth::Needed);
    // The same BMI a year and a half later is too old to count: unknown.
    let d = Case::synthea("Brent_Beer", "Bluestone Insurance", date!(2021 - 01 - 01)).decide(&sema);
    assert_pa(&d, CoverageStatus::Conditional, PriorAuth::Needed);
    // Semaglutide needs no PA at Acme (no rule).
    let d = Case::new("Acme Health Plan").decide(&sema);
    assert_pa(&d, CoverageStatus::Covered, PriorAuth::NotNeeded);
}

#[test]
fn semaglutide_for_diabetes_is_step_therapy() {
    let sema = drug("1991302");
    let diabetic = || {
        Case::new("Bluestone Insurance")
            .with(condition("t2d", "E11.9"))
            .with(observation("a1c", "4548-4", 8.1, "%", "2024-05-01"))
            .with(observation("bmi", "39156-5", 24.0, "kg/m2", "2024-05-01"))
    };
    let d = diabetic()
        .with(medication("metformin", "6809", "2023-11-01", "2024-05-01"))
        .decide(&sema);
    assert_pa(&d, CoverageStatus::Covered, PriorAuth::Satisfied);
    let d = diabetic()
        .with(medication("metformin", "6809", "2024-04-01", "2024-05-01"))
        .decide(&sema);
    assert_pa(&d, CoverageStatus::Conditional, PriorAuth::Needed);
    assert!(
        d.missing
            .iter()
            .any(|m| m.contains("Metformin for at least 90 days") && m.contains("only 30 days")),
        "{:?}",
        d.missing
    );
    // Contraindicated: CKD stage 4 replaces the metformin trial.
    let d = diabetic()
        .with(medication("metformin", "6809", "2024-04-01", "2024-05-01"))
        .with(condition("ckd", "N18.4"))
        .decide(&sema);
    assert_pa(&d, CoverageStatus::Covered, PriorAuth::Satisfied);
    // HbA1c below 7%: not met.
    let d = Case::new("Bluestone Insurance")
        .with(condition("t2d", "E11.9"))
        .with(observation("a1c", "4548-4", 6.4, "%", "2024-05-01"))
        .with(observation("bmi", "39156-5", 24.0, "kg/m2", "2024-05-01"))
        .with(medication("metformin", "6809", "2023-11-01", "2024-05-01"))
        .decide(&sema);
    assert_eq!(
        d.criteria.as_ref().expect("trace").status,
        Status::Unmet,
        "{}",
        d.render()
    );
}

#[test]
fn adalimumab_requires_methotrexate_or_intolerance() {
    let humira = drug("327361");
    let ra = || Case::new("Cedar Mutual").with(condition("ra", "M05.79"));
    let d = ra()
        .with(medication("mtx", "6851", "2023-12-01", "2024-05-01"))
        .decide(&humira);
    assert_pa(&d, CoverageStatus::Covered, PriorAuth::Satisfied);
    let d = ra()
        .with(medication("mtx", "6851", "2024-04-01", "2024-05-01"))
        .decide(&humira);
    assert_pa(&d, CoverageStatus::Conditional, PriorAuth::Needed);
    let intolerance = json!({"resourceType":"AllergyIntolerance","id":"mtx-intol","code":{"coding":[{"system":RXNORM,"code":"6851"}]},
        "patient":{"reference":"Patient/p1"}});
    let d = ra().with(intolerance).decide(&humira);
    assert_pa(&d, CoverageStatus::Covered, PriorAuth::Satisfied);
    let d = ra().fact("intolerance", Some("6851"), None).decide(&humira);
    assert_pa(&d, CoverageStatus::Covered, PriorAuth::Satisfied);
    // Without rheumatoid arthritis the criteria fail whatever the methotrexate history.
    let d = Case::new("Cedar Mutual")
        .with(medication("mtx", "6851", "2023-12-01", "2024-05-01"))
        .decide(&humira);
    assert_eq!(d.criteria.as_ref().expect("trace").status, Status::Unmet);
}

#[test]
fn services_without_pa_exclusions_and_unknowns() {
    let d = Case::new("Cedar Mutual").decide(&service(CPT, "99213"));
    assert_pa(&d, CoverageStatus::Covered, PriorAuth::NotNeeded);
    assert_eq!(d.rule_id.as_deref(), Some("cedar-office-visits"));
    let d = Case::new("Acme Health Plan").decide(&service(CPT, "72100"));
    assert_pa(&d, CoverageStatus::Covered, PriorAuth::NotNeeded);
    let d = Case::new("Cedar Mutual").decide(&service(CPT, "97810"));
    assert_pa(&d, CoverageStatus::NotCovered, PriorAuth::NotNeeded);
    assert!(d.reason.contains("not a covered benefit"));
    let d = Case::new("Acme Health Plan").decide(&service(CPT, "97810"));
    assert_pa(&d, CoverageStatus::Covered, PriorAuth::NotNeeded);
    // An unknown payer: coverage unknown, no crash.
    let d = Case::new("Nobody Mutual").decide(&service(CPT, "72148"));
    assert_pa(&d, CoverageStatus::Unknown, PriorAuth::Unknown);
    assert!(d.reason.contains("payer"));
    // An order without codes.
    let d = Case::new("Acme Health Plan").decide(
        &json!({"resourceType":"ServiceRequest","id":"x","status":"draft","intent":"order"}),
    );
    assert_pa(&d, CoverageStatus::Unknown, PriorAuth::Unknown);
    assert!(d.reason.contains("no code"));
}

#[test]
fn payer_is_matched_by_organization_identifier_and_billing_options() {
    let mut case = Case::new("ignored");
    case.record.retain(|r| r["resourceType"] != "Coverage");
    case.record.push(json!({"resourceType":"Coverage","id":"c","status":"active","beneficiary":{"reference":"Patient/p1"},
        "payor":[{"reference":"http://ehr.example/fhir/Organization/payer-org"}]}));
    case.record.push(
        json!({"resourceType":"Organization","id":"payer-org","name":"BSI Regional",
        "identifier":[{"system":"urn:oid:2.16.840.1.113883.6.300","value":"90002"}]}),
    );
    // The order's own code is not a billing code; a CRD billing option is.
    let order = json!({"resourceType":"ServiceRequest","id":"o","status":"draft","intent":"order",
        "code":{"coding":[{"system":"http://snomed.info/sct","code":"241607004"}],
            "extension":[{"url":"http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-billing-options",
                "valueCodeableConcept":{"coding":[{"system":CPT,"code":"72149"}]}}]}});
    let d = case.decide(&order);
    assert_eq!(d.payer.as_deref(), Some("Bluestone Insurance"));
    assert_eq!(d.rule_id.as_deref(), Some("bluestone-mri-lumbar"));
    assert_eq!(
        d.billing_code.as_ref().map(|c| c.code.as_str()),
        Some("72149")
    );
}

#[test]
fn a_policy_with_errors_stops_startup_with_file_and_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("broken.json"),
        "{\n  \"payer\": {\"id\": \"b\", \"name\": \"Broken\"},\n  \"rules\": [\n    {\"id\": \"r\", \"title\": \"R\", \"codes\": [], \"prior_auth\": true}\n  ]\n}\n",
    )
    .expect("write");
    let mut config = fhirgate::config::Config::default();
    config.pa.policies_dir = dir.path().to_path_buf();
    config.store.data_dir = dir.path().join("data");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let built = runtime.block_on(fhirgate::App::build(&config, "http://test"));
    let err = match built {
        Ok(_) => panic!("startup must fail"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("broken.json:4: rule 'r' names no billing codes"),
        "{err}"
    );
    assert!(
        err.contains("broken.json:4: rule 'r' needs prior authorization but states no criteria"),
        "{err}"
    );

    // The CLI lint says the same and fails.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .args(["policy", "check"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("broken.json:4:"));
}

#[test]
fn policy_explain_prints_the_trace() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut record = plain_patient();
    record.push(coverage("Acme Health Plan"));
    record.push(condition("lbp", "M54.50"));
    let bundle = json!({"resourceType":"Bundle","type":"collection",
        "entry": record.iter().map(|r| json!({"resource": r})).collect::<Vec<_>>()});
    std::fs::write(dir.path().join("bundle.json"), bundle.to_string()).expect("write");
    std::fs::write(
        dir.path().join("order.json"),
        service(CPT, "72148").to_string(),
    )
    .expect("write");
    std::fs::write(dir.path().join("facts.json"), "[]").expect("write");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["policy", "explain", "--date", "2024-06-01", "--bundle"])
        .arg(dir.path().join("bundle.json"))
        .arg("--order")
        .arg(dir.path().join("order.json"))
        .arg("--facts")
        .arg(dir.path().join("facts.json"))
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("payer:        Acme Health Plan"), "{text}");
    assert!(text.contains("prior auth:   needed"), "{text}");
    assert!(
        text.contains("MET     Low back pain or lumbar radiculopathy"),
        "{text}"
    );
    assert!(
        text.contains("UNMET   At least 6 weeks of physical therapy"),
        "{text}"
    );
    assert!(text.contains("[Condition/lbp]"), "{text}");
}
