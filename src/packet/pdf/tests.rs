//! End-to-end checks of rendered packets, read back the way reviewers' tools read them:
//! lopdf for structure, poppler's `pdftotext` and `pdfdetach` for text and attachments.

use std::process::Command;

use super::*;
use crate::packet::sections::HEADINGS;

const GREEK: &str = "Αλεξάνδρα Παπαδοπούλου-Κωνσταντινίδου";
const CHINESE: &str = "欧阳娜娜";

fn bundle() -> Vec<u8> {
    let bundle = serde_json::json!({
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": "p1", "birthDate": "1984-03-07",
                "name": [{"family": "Παπαδοπούλου-Κωνσταντινίδου", "given": ["Αλεξάνδρα"]}]}},
            {"resource": {"resourceType": "Coverage", "id": "c1", "status": "active",
                "subscriberId": "MBR-0042-7781"}},
            {"resource": {"resourceType": "Claim", "id": "claim-1", "use": "preauthorization",
                "item": [{"sequence": 1, "productOrService": {"coding": [
                    {"system": "http://www.ama-assn.org/go/cpt", "code": "72148"}]}}]}}
        ]
    });
    serde_json::to_vec_pretty(&bundle).expect("bundle serializes")
}

/// A packet as the pipeline would produce it for an MRI request.
fn packet(name: &str) -> PacketDocument {
    let criterion = |depth, status, text: &str, evidence: &[&str]| CriterionLine {
        depth,
        status,
        text: text.to_owned(),
        evidence: evidence.iter().map(|e| (*e).to_owned()).collect(),
    };
    PacketDocument {
        title: String::new(),
        reference: "PA-2024-000117".into(),
        generated: "2024-05-02 14:03 UTC".into(),
        patient: PatientSection {
            name: name.into(),
            birth_date: Some("1984-03-07".into()),
            member_id: Some("MBR-0042-7781".into()),
        },
        payer: PayerSection {
            name: "Acme Health Plan".into(),
            plan: Some("Acme Gold PPO".into()),
            member_id: Some("MBR-0042-7781".into()),
            period: Some("2024-01-01 to 2024-12-31".into()),
        },
        services: vec![
            ServiceLine {
                sequence: 1,
                system: "http://www.ama-assn.org/go/cpt".into(),
                code: "72148".into(),
                display: Some("MRI lumbar spine without contrast".into()),
                quantity: Some("1".into()),
            },
            ServiceLine {
                sequence: 2,
                system: "http://hl7.org/fhir/sid/icd-10-cm".into(),
                code: "M54.16".into(),
                display: Some("Radiculopathy, lumbar region".into()),
                quantity: None,
            },
        ],
        determination: DeterminationSection {
            summary: "Conservative therapy and neurological deficit are documented; the \
                      duration of symptoms could not be confirmed."
                .into(),
            decision: "Pended: information needed".into(),
            criteria: vec![
                criterion(
                    0,
                    CriterionStatus::Met,
                    "Low back pain with radiculopathy",
                    &["Condition/c7: Radiculopathy, lumbar region (2024-04-02)"],
                ),
                criterion(
                    1,
                    CriterionStatus::Met,
                    "Six weeks of conservative therapy",
                    &[
                        "Procedure/pt-1: Physical therapy, 8 sessions (2024-02-10 to 2024-03-28)",
                        "MedicationRequest/m3: naproxen 500 mg twice daily",
                    ],
                ),
                criterion(
                    1,
                    CriterionStatus::Unknown,
                    "Symptoms for more than six weeks",
                    &[],
                ),
                criterion(
                    0,
                    CriterionStatus::Unmet,
                    "No imaging of the lumbar spine in the \
                    past twelve months",
                    &["ImagingStudy/is-9: lumbar spine X-ray (2024-03-01)"],
                ),
            ],
            missing: vec!["Date of symptom onset".into()],
        },
        rationale: vec![
            "The patient reports low back pain radiating to the left leg with numbness in \
             the L5 distribution, unchanged after eight sessions of physical therapy."
                .into(),
            "Examination shows a positive straight-leg raise on the left and diminished \
             ankle reflex. MRI is requested to evaluate for disc herniation before referral \
             for epidural steroid injection."
                .into(),
        ],
        provider: ProviderSection {
            name: "Dr. Jane Okafor".into(),
            npi: Some("1234567893".into()),
            organization: Some("Riverside Spine Clinic".into()),
        },
        attestation: "I attest that the information in this request is accurate and \
                      complete to the best of my knowledge and is supported by the \
                      patient's medical record."
            .into(),
        attachment: Some(Attachment {
            file_name: "bundle.json".into(),
            mime: "application/fhir+json".into(),
            data: bundle(),
        }),
    }
}

fn poppler(tool: &str, args: &[&str], pdf: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("packet.pdf");
    std::fs::write(&path, pdf).expect("write pdf");
    let path = path.to_str().expect("utf-8 temp path");
    let output = Command::new(tool)
        .args(args)
        .arg(path)
        .args(if tool == "pdftotext" {
            &["-"][..]
        } else {
            &[][..]
        })
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "`{tool}` is required by the packet tests and could not run ({e}); \
                 install poppler-utils (apt-get install -y poppler-utils)"
            )
        });
    // Poppler reports damage it can work around on stderr; a packet should have none.
    assert!(
        output.stderr.is_empty(),
        "{tool} complained: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "{tool} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("poppler prints UTF-8")
}

fn text_of(pdf: &[u8]) -> String {
    poppler("pdftotext", &["-enc", "UTF-8"], pdf)
}

fn page_count(pdf: &[u8]) -> usize {
    Document::load_mem(pdf)
        .expect("PDF parses")
        .get_pages()
        .len()
}

/// The embedded file's name and bytes, found the way readers do: catalog → `/Names` →
/// `/EmbeddedFiles` → filespec → `/EF` → stream.
fn embedded_file(pdf: &[u8]) -> (String, Vec<u8>) {
    let doc = Document::load_mem(pdf).expect("PDF parses");
    let catalog = doc.catalog().expect("catalog");
    let names = catalog
        .get(b"Names")
        .and_then(Object::as_dict)
        .expect("/Names");
    let tree = names
        .get(b"EmbeddedFiles")
        .and_then(Object::as_dict)
        .expect("/EmbeddedFiles");
    let entries = tree
        .get(b"Names")
        .and_then(Object::as_array)
        .expect("name array");
    let name = String::from_utf8(entries[0].as_str().expect("key").to_vec()).expect("name");
    let filespec = doc
        .get_dictionary(entries[1].as_reference().expect("filespec ref"))
        .expect("filespec");
    assert_eq!(
        filespec
            .get(b"AFRelationship")
            .and_then(Object::as_name)
            .ok(),
        Some(&b"Source"[..])
    );
    let ef = filespec.get(b"EF").and_then(Object::as_dict).expect("/EF");
    let file = doc
        .get_object(
            ef.get(b"F")
                .and_then(Object::as_reference)
                .expect("file ref"),
        )
        .and_then(Object::as_stream)
        .expect("embedded file stream");
    assert_eq!(
        file.dict.get(b"Subtype").and_then(Object::as_name).ok(),
        Some(&b"application/fhir+json"[..])
    );
    (name, file.decompressed_content().expect("inflates"))
}

#[test]
fn greek_packet_is_complete_extractable_and_carries_the_bundle() {
    let doc = packet(GREEK);
    let pdf = render(&doc).expect("renders");
    let pages = page_count(&pdf);
    assert!((2..=5).contains(&pages), "{pages} pages");

    let (name, data) = embedded_file(&pdf);
    assert_eq!(name, "bundle.json");
    assert_eq!(data, bundle());
    assert!(poppler("pdfdetach", &["-list"], &pdf).contains("bundle.json"));

    let text = text_of(&pdf);
    for expected in [
        GREEK,
        "MBR-0042-7781",
        "72148",
        "M54.16",
        "Pended: information needed",
        "PA-2024-000117",
        "Prior authorization request",
        "[met]",
        "[unmet]",
        "[unknown]",
        "Procedure/pt-1: Physical therapy",
        "1234567893",
        "Page 1 of",
        &format!("Page {pages} of {pages}"),
    ]
    .into_iter()
    .chain(HEADINGS)
    {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
}

#[test]
fn chinese_name_extracts_exactly_and_the_packet_stays_small() {
    let mut doc = packet(CHINESE);
    doc.rationale
        .push("患者腰痛伴左下肢放射痛六周，物理治疗八次后无明显改善。".into());
    let pdf = render(&doc).expect("renders");
    let text = text_of(&pdf);
    assert!(text.contains(CHINESE), "{text}");
    assert!(text.contains("物理治疗八次后无明显改善"), "{text}");
    assert!(pdf.len() <= 200 * 1024, "{} bytes", pdf.len());
}

#[test]
fn long_rationale_continues_over_numbered_pages_without_losing_text() {
    let mut doc = packet("Maria Lopez");
    doc.rationale = (0..200)
        .map(|i| {
            format!(
                "Note {i:03}: the patient was seen for follow-up; pain persists despite \
                 therapy, with no red-flag symptoms reported at this visit. End of note {i:03}."
            )
        })
        .collect();
    let pdf = render(&doc).expect("renders");
    let pages = page_count(&pdf);
    assert!(pages > 8, "{pages} pages");
    let text = text_of(&pdf);
    for page in 1..=pages {
        assert!(
            text.contains(&format!("Page {page} of {pages}")),
            "page {page} unnumbered"
        );
    }
    for i in [0, 57, 123, 197, 198, 199] {
        assert!(
            text.contains(&format!("End of note {i:03}.")),
            "note {i} lost"
        );
    }
    assert!(
        text.contains("I attest that the information"),
        "attestation lost"
    );
}

#[test]
fn characters_no_font_has_are_replaced_visibly() {
    let mut doc = packet("Test\u{E000}Person");
    doc.rationale = vec!["Reported mood: \u{1F642} (patient's words).".into()];
    let pdf = render(&doc).expect("renders");
    let text = text_of(&pdf);
    assert!(text.contains("Test\u{FFFD}Person"), "{text}");
    assert!(!text.contains('\u{E000}'));
    assert!(text.contains("Reported mood: \u{FFFD} (patient"), "{text}");
}

#[test]
fn many_services_and_deep_criteria_paginate_cleanly() {
    let mut doc = packet(CHINESE);
    doc.reference = "urn:uuid:6f1c2d9e-8a7b-4c3d-9e8f-0a1b2c3d4e5f/with/a/reference/far/too/\
                     long/for/the/footer/line"
        .into();
    doc.services = (1..=39)
        .map(|i| ServiceLine {
            sequence: i,
            system: "http://www.ama-assn.org/go/cpt".into(),
            code: format!("7{i:04}"),
            display: Some("A service with a description long enough to wrap".into()),
            quantity: Some("1".into()),
        })
        .collect();
    doc.determination
        .criteria
        .extend((0..12).map(|depth| CriterionLine {
            depth,
            status: CriterionStatus::Unknown,
            text: format!("Criterion nested {depth} deep, long enough to wrap in its column"),
            evidence: vec![format!("Observation/o{depth}: 物理治疗 {depth}")],
        }));
    let pdf = render(&doc).expect("renders");
    let pages = page_count(&pdf);
    let text = text_of(&pdf);

    let cover = text.split('\u{c}').next().expect("first page");
    assert!(
        cover.contains("and 33 more (see Requested services)"),
        "{cover}"
    );
    assert!(cover.contains("Page 1 of"), "cover spills over:\n{cover}");
    assert!(
        text.matches("Code system").count() >= 2,
        "table header not repeated"
    );
    for i in 1..=39 {
        assert!(text.contains(&format!("7{i:04}")), "service {i} lost");
    }
    for depth in 0..12 {
        assert!(text.contains(&format!("Observation/o{depth}: 物理治疗 {depth}")));
    }
    for page in 1..=pages {
        assert!(
            text.contains(&format!("Page {page} of {pages}")),
            "page {page}"
        );
    }
    assert!(text.contains('…'), "overlong footer is not shortened");
}

#[test]
fn renders_without_attachment_or_optional_fields() {
    let pdf = render(&PacketDocument::default()).expect("renders");
    assert_eq!(
        pdf,
        render(&PacketDocument::default()).expect("renders"),
        "deterministic"
    );
    assert_eq!(page_count(&pdf), 2);
    let free_object_zero = b"0000000000 65535 f";
    assert!(pdf
        .windows(free_object_zero.len())
        .any(|w| w == free_object_zero));
    let doc = Document::load_mem(&pdf).expect("parses");
    assert!(doc.catalog().expect("catalog").get(b"Names").is_err());
    let text = text_of(&pdf);
    assert!(text.contains("Prior authorization request") && text.contains("Not provided"));
}
