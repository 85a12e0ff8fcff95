//! Criterion benchmark of PDF packet rendering: layout, per-document font subsetting,
//! compression and serialization of a typical three-page packet.
//!
//! `cargo bench --bench packet`. Target (2-core machine): median ≤ 5 ms per packet. The fonts
//! are parsed once per process, so the first render is left out of the measurement.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fhirgate::packet::{
    render, Attachment, CriterionLine, CriterionStatus, DeterminationSection, PacketDocument,
    PatientSection, PayerSection, ProviderSection, ServiceLine,
};

/// The allocator the binary uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn criterion(
    depth: usize,
    status: CriterionStatus,
    text: &str,
    evidence: &[&str],
) -> CriterionLine {
    CriterionLine {
        depth,
        status,
        text: text.to_owned(),
        evidence: evidence.iter().map(|e| (*e).to_owned()).collect(),
    }
}

/// An MRI request with a Greek patient name and a Chinese note, about 20 KB of Bundle.
fn typical_packet() -> PacketDocument {
    let entries: Vec<serde_json::Value> = (0..40)
        .map(|i| {
            serde_json::json!({"resource": {
                "resourceType": "Observation", "id": format!("obs-{i}"), "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "72514-3",
                    "display": "Pain severity - 0-10 verbal numeric rating [Score] - Reported"}]},
                "subject": {"reference": "Patient/p1"},
                "effectiveDateTime": "2024-03-01", "valueInteger": i % 10
            }})
        })
        .collect();
    let bundle =
        serde_json::json!({"resourceType": "Bundle", "type": "collection", "entry": entries});
    PacketDocument {
        title: "Prior authorization request".into(),
        reference: "PA-2024-000117".into(),
        generated: "2024-05-02 14:03 UTC".into(),
        patient: PatientSection {
            name: "Αλεξάνδρα Παπαδοπούλου-Κωνσταντινίδου".into(),
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
            summary: "Conservative therapy and neurological deficit are documented; the duration \
                      of symptoms could not be confirmed."
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
                    "No imaging of the lumbar spine in the past twelve months",
                    &["ImagingStudy/is-9: lumbar spine X-ray (2024-03-01)"],
                ),
            ],
            missing: vec!["Date of symptom onset".into()],
        },
        rationale: (0..12)
            .map(|i| {
                format!(
                    "Visit {i}: the patient reports low back pain radiating to the left leg with \
                     numbness in the L5 distribution, unchanged after physical therapy. \
                     Examination shows a positive straight-leg raise on the left and a \
                     diminished ankle reflex."
                )
            })
            .chain(["患者腰痛伴左下肢放射痛六周，物理治疗八次后无明显改善。".to_owned()])
            .collect(),
        provider: ProviderSection {
            name: "Dr. Jane Okafor".into(),
            npi: Some("1234567893".into()),
            organization: Some("Riverside Spine Clinic".into()),
        },
        attestation: "I attest that the information in this request is accurate and complete to \
                      the best of my knowledge and is supported by the patient's medical record."
            .into(),
        attachment: Some(Attachment {
            file_name: "bundle.json".into(),
            mime: "application/fhir+json".into(),
            data: serde_json::to_vec_pretty(&bundle).expect("bundle serializes"),
        }),
    }
}

fn packet(c: &mut Criterion) {
    let doc = typical_packet();
    let first = render(&doc).expect("renders");
    eprintln!("typical packet: {} bytes", first.len());
    let mut group = c.benchmark_group("packet");
    group.throughput(Throughput::Elements(1));
    group.bench_function("render_typical", |b| {
        b.iter(|| render(std::hint::black_box(&doc)).expect("renders"))
    });
    group.finish();
}

criterion_group!(benches, packet);
criterion_main!(benches);
