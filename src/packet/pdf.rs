//! Rendering a prior-authorization packet as a PDF a payer reviewer can read, print and file.
//!
//! The input is plain data ([`PacketDocument`]); turning FHIR resources into it is the caller's
//! job, so this module stays about pages. The output is a self-contained PDF: fonts embedded as
//! subsets (names in any script extract exactly, see `font.rs`), a page number on every page,
//! and the source FHIR Bundle attached as an embedded file with `/AFRelationship /Source`, so
//! the reviewer's copy carries the data the packet was made from.

use std::io::Write as _;

use lopdf::xref::XrefType;
use lopdf::{dictionary, Dictionary, Document, Object, ObjectId, Stream, StringFormat};

use super::font::FontUsage;
use super::layout::{Composer, PAGE_HEIGHT, PAGE_WIDTH};
use super::sections;

/// Everything a packet shows, already reduced to text. Empty or missing fields print as
/// "Not provided" rather than vanishing, so a reviewer sees what was not supplied.
#[derive(Debug, Clone, Default)]
pub struct PacketDocument {
    /// Cover title; empty means "Prior authorization request".
    pub title: String,
    /// The claim or request identifier the payer files the packet under.
    pub reference: String,
    /// When the packet was generated, as it should be printed.
    pub generated: String,
    pub patient: PatientSection,
    pub payer: PayerSection,
    pub services: Vec<ServiceLine>,
    pub determination: DeterminationSection,
    /// Clinical rationale, one entry per paragraph.
    pub rationale: Vec<String>,
    pub provider: ProviderSection,
    /// The attestation statement the requesting provider signs.
    pub attestation: String,
    /// The source data, embedded as a file attachment (usually the FHIR Bundle).
    pub attachment: Option<Attachment>,
}

/// The minimum necessary about the patient; nothing else is printed.
#[derive(Debug, Clone, Default)]
pub struct PatientSection {
    pub name: String,
    /// As it should be printed, e.g. `1984-03-07`.
    pub birth_date: Option<String>,
    /// The payer's member id.
    pub member_id: Option<String>,
}

/// The payer and the coverage the request is made under.
#[derive(Debug, Clone, Default)]
pub struct PayerSection {
    pub name: String,
    pub plan: Option<String>,
    pub member_id: Option<String>,
    /// Coverage period, as it should be printed.
    pub period: Option<String>,
}

/// One requested service or item.
#[derive(Debug, Clone, Default)]
pub struct ServiceLine {
    /// The claim item's sequence number.
    pub sequence: u32,
    /// Code system, e.g. `http://www.ama-assn.org/go/cpt`.
    pub system: String,
    pub code: String,
    pub display: Option<String>,
    /// As it should be printed, e.g. `1` or `12 visits`.
    pub quantity: Option<String>,
}

/// The overall determination and the criteria behind it.
#[derive(Debug, Clone, Default)]
pub struct DeterminationSection {
    /// One or two sentences explaining the decision.
    pub summary: String,
    /// The decision as it should be printed, e.g. "Approved" or "Pended: information needed".
    pub decision: String,
    /// The policy's criteria in order; nesting is given by [`CriterionLine::depth`].
    pub criteria: Vec<CriterionLine>,
    /// Information the reviewer still needs.
    pub missing: Vec<String>,
}

/// One line of the criteria checklist.
#[derive(Debug, Clone, Default)]
pub struct CriterionLine {
    /// Nesting level: 0 for a top-level criterion, 1 for its sub-criteria, and so on.
    pub depth: usize,
    pub status: CriterionStatus,
    pub text: String,
    /// Citations of the evidence for the status, printed under the criterion.
    pub evidence: Vec<String>,
}

/// How a criterion stands against the evidence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum CriterionStatus {
    Met,
    Unmet,
    /// Not enough information to decide.
    #[default]
    Unknown,
}

impl CriterionStatus {
    /// The mark printed before the criterion: `[met]`, `[unmet]` or `[unknown]`.
    pub fn mark(self) -> &'static str {
        match self {
            CriterionStatus::Met => "[met]",
            CriterionStatus::Unmet => "[unmet]",
            CriterionStatus::Unknown => "[unknown]",
        }
    }
}

/// The provider asking for the authorization.
#[derive(Debug, Clone, Default)]
pub struct ProviderSection {
    pub name: String,
    /// National Provider Identifier.
    pub npi: Option<String>,
    pub organization: Option<String>,
}

/// A file embedded in the PDF.
#[derive(Debug, Clone, Default)]
pub struct Attachment {
    /// Name shown by PDF readers, e.g. `bundle.json`.
    pub file_name: String,
    /// Media type, e.g. `application/fhir+json`.
    pub mime: String,
    pub data: Vec<u8>,
}

/// Why a packet could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum PdfError {
    /// A bundled font could not be read or subset.
    #[error("font: {0}")]
    Font(String),
    /// Compressing or serializing the document failed.
    #[error("writing the PDF: {0}")]
    Write(#[from] std::io::Error),
}

/// Renders `doc` as a US Letter PDF: a cover page, then the sections, numbered "Page n of N".
pub fn render(doc: &PacketDocument) -> Result<Vec<u8>, PdfError> {
    let mut composer = Composer::new(FontUsage::new()?);
    sections::compose(&mut composer, doc);
    let (fonts, pages) = composer.finish();

    let mut pdf = Document::with_version("1.7");
    // lopdf's cross-reference streams leave out object 0, which poppler then reports as a
    // damaged file for some documents; a classic table always lists it.
    pdf.reference_table.cross_reference_type = XrefType::CrossReferenceTable;
    let pages_id = pdf.new_object_id();
    let fonts = fonts.embed(&mut pdf)?;
    let resources = pdf.add_object(dictionary! { "Font" => fonts });
    let media_box: Vec<Object> = vec![0.into(), 0.into(), PAGE_WIDTH.into(), PAGE_HEIGHT.into()];
    let mut kids = Vec::with_capacity(pages.len());
    for content in &pages {
        let contents = pdf.add_object(deflate_stream(dictionary! {}, content)?);
        let page = pdf.add_object(dictionary! {
            "Type" => "Page",
            "Parent" => pages_id,
            "MediaBox" => media_box.clone(),
            "Resources" => resources,
            "Contents" => contents,
        });
        kids.push(page.into());
    }
    let count = i64::try_from(kids.len()).unwrap_or(i64::MAX);
    pdf.objects.insert(
        pages_id,
        dictionary! { "Type" => "Pages", "Kids" => kids, "Count" => count }.into(),
    );

    let mut catalog = dictionary! {
        "Type" => "Catalog",
        "Pages" => pages_id,
        "Lang" => text_string("en-US"),
    };
    if let Some(attachment) = &doc.attachment {
        let (name, filespec) = embed_attachment(&mut pdf, attachment)?;
        catalog.set(
            "Names",
            dictionary! { "EmbeddedFiles" => dictionary! { "Names" => vec![name, filespec.into()] } },
        );
        catalog.set("AF", vec![filespec.into()]);
    }
    let catalog = pdf.add_object(catalog);
    let title = match doc.reference.trim() {
        "" => sections::title(doc).to_owned(),
        reference => format!("{} {reference}", sections::title(doc)),
    };
    let info = pdf.add_object(dictionary! {
        "Title" => text_string(&title),
        "Subject" => text_string("Prior authorization packet"),
        "Producer" => text_string("fhirgate"),
    });
    pdf.trailer.set("Root", catalog);
    pdf.trailer.set("Info", info);

    let attached = doc.attachment.as_ref().map_or(0, |a| a.data.len());
    let mut out = Vec::with_capacity(64 * 1024 + attached);
    pdf.save_to(&mut out)?;
    Ok(out)
}

/// Writes the attachment as an `/EmbeddedFile` with its `/Filespec`; returns the name-tree key
/// and the filespec.
fn embed_attachment(
    pdf: &mut Document,
    attachment: &Attachment,
) -> Result<(Object, ObjectId), PdfError> {
    let file_name = match attachment.file_name.trim() {
        "" => "bundle.json",
        name => name,
    };
    let mime = match attachment.mime.trim() {
        "" => "application/octet-stream",
        mime => mime,
    };
    let size = i64::try_from(attachment.data.len()).unwrap_or(i64::MAX);
    let file = deflate_stream(
        dictionary! {
            "Type" => "EmbeddedFile",
            "Subtype" => mime,
            "Params" => dictionary! { "Size" => size },
        },
        &attachment.data,
    )?;
    let file = pdf.add_object(file);
    let filespec = pdf.add_object(dictionary! {
        "Type" => "Filespec",
        // `/F` is for readers that predate Unicode file names; `/UF` carries the real one.
        "F" => text_string(&ascii_file_name(file_name)),
        "UF" => text_string(file_name),
        "Desc" => text_string("Source data of this packet"),
        "EF" => dictionary! { "F" => file, "UF" => file },
        "AFRelationship" => "Source",
    });
    Ok((text_string(file_name), filespec))
}

fn ascii_file_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A stream whose data is compressed with `/FlateDecode`.
///
/// The fastest level: compression is most of a render's time, and the default level would
/// double it to save about a fifth of the file size.
pub(crate) fn deflate_stream(mut dict: Dictionary, data: &[u8]) -> Result<Stream, PdfError> {
    let mut encoder = flate2::write::ZlibEncoder::new(
        Vec::with_capacity(data.len() / 2 + 64),
        flate2::Compression::fast(),
    );
    encoder.write_all(data)?;
    let compressed = encoder.finish()?;
    dict.set("Filter", "FlateDecode");
    Ok(Stream::new(dict, compressed))
}

/// A PDF text string: plain when ASCII, otherwise UTF-16BE with a byte order mark.
fn text_string(text: &str) -> Object {
    if text.bytes().all(|b| (0x20..0x7F).contains(&b)) {
        return Object::String(text.as_bytes().to_vec(), StringFormat::Literal);
    }
    let mut bytes = vec![0xFE, 0xFF];
    for unit in text.encode_utf16() {
        bytes.extend_from_slice(&unit.to_be_bytes());
    }
    Object::String(bytes, StringFormat::Hexadecimal)
}

#[cfg(test)]
mod tests;
