//! Prior-authorization packets: the PDF a payer reviewer reads (cover, patient, coverage,
//! requested services, the criteria checklist with evidence, rationale, provider and
//! attestation), carrying the source FHIR Bundle as an embedded file.
//!
//! [`pdf`] renders a [`PacketDocument`] — plain text fields, no FHIR; [`build`] makes one from
//! a request's resources and determinations, and the DocumentReference that carries the PDF.

pub mod build;
mod font;
mod layout;
pub mod pdf;
mod sections;

pub use pdf::{
    render, Attachment, CriterionLine, CriterionStatus, DeterminationSection, PacketDocument,
    PatientSection, PayerSection, PdfError, ProviderSection, ServiceLine,
};
