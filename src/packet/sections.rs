//! What a packet says, page by page: a cover a reviewer can decide from at a glance, then the
//! sections in the order a review works through them (who, which coverage, what is asked for,
//! how the criteria stand, why, who asks, and their attestation), and a footer on every page.
//!
//! Only the minimum necessary about the patient appears: name, birth date and member id.

use super::font::Weight;
use super::layout::{
    Cell, Composer, Rgb, TextStyle, CONTENT_WIDTH, MARGIN_LEFT, MARGIN_RIGHT, PAGE_WIDTH,
};
use super::pdf::{CriterionStatus, PacketDocument, ServiceLine};

const INK: Rgb = [0.10, 0.10, 0.12];
const MUTED: Rgb = [0.38, 0.38, 0.42];
const ACCENT: Rgb = [0.11, 0.27, 0.47];
const RULE: Rgb = [0.70, 0.72, 0.75];

const fn style(weight: Weight, size: f32, color: Rgb) -> TextStyle {
    TextStyle {
        weight,
        size,
        color,
    }
}

const TITLE: TextStyle = style(Weight::Bold, 22.0, INK);
const HEADING: TextStyle = style(Weight::Bold, 14.0, ACCENT);
const SUBHEADING: TextStyle = style(Weight::Bold, 11.0, INK);
const DECISION: TextStyle = style(Weight::Bold, 16.0, INK);
const BODY: TextStyle = style(Weight::Regular, 10.0, INK);
const STRONG: TextStyle = style(Weight::Bold, 10.0, INK);
const TABLE: TextStyle = style(Weight::Regular, 9.5, INK);
const LABEL: TextStyle = style(Weight::Bold, 9.0, MUTED);
const EVIDENCE: TextStyle = style(Weight::Regular, 9.0, [0.25, 0.25, 0.30]);
const SMALL: TextStyle = style(Weight::Regular, 8.5, MUTED);

/// Field labels take this column; values start at `VALUE_X`.
const LABEL_WIDTH: f32 = 128.0;
const VALUE_X: f32 = 136.0;
/// Indentation per level of nested criteria.
const DEPTH_INDENT: f32 = 16.0;

/// Used when the caller leaves the title empty.
const DEFAULT_TITLE: &str = "Prior authorization request";
const NOT_PROVIDED: &str = "Not provided";

/// The headings, in order; tests look for each one.
pub(crate) const HEADINGS: [&str; 7] = [
    "Patient",
    "Payer and coverage",
    "Requested services",
    "Determination",
    "Clinical rationale",
    "Requesting provider",
    "Attestation",
];

pub(crate) fn title(doc: &PacketDocument) -> &str {
    non_empty(&doc.title).unwrap_or(DEFAULT_TITLE)
}

fn non_empty(text: &str) -> Option<&str> {
    Some(text).filter(|t| !t.trim().is_empty())
}

fn or_not_provided(value: &Option<String>) -> &str {
    value.as_deref().and_then(non_empty).unwrap_or(NOT_PROVIDED)
}

/// Lays out the whole packet: cover, sections, footers.
pub(crate) fn compose(c: &mut Composer, doc: &PacketDocument) {
    cover(c, doc);
    c.new_page();
    patient(c, doc);
    payer(c, doc);
    services(c, &doc.services);
    determination(c, doc);
    rationale(c, &doc.rationale);
    provider(c, doc);
    attestation(c, doc);
    footers(c, doc);
}

fn cover(c: &mut Composer, doc: &PacketDocument) {
    c.paragraph(title(doc), TITLE, 0.0);
    c.space(6.0);
    c.paragraph("Prior authorization packet for payer review", SMALL, 0.0);
    c.space(10.0);
    rule(c);
    c.space(16.0);

    field(
        c,
        "Request ID",
        non_empty(&doc.reference).unwrap_or(NOT_PROVIDED),
    );
    field(
        c,
        "Patient",
        non_empty(&doc.patient.name).unwrap_or(NOT_PROVIDED),
    );
    let payer = match (
        non_empty(&doc.payer.name),
        doc.payer.plan.as_deref().and_then(non_empty),
    ) {
        (Some(name), Some(plan)) => format!("{name} — {plan}"),
        (Some(name), None) => name.to_owned(),
        (None, _) => NOT_PROVIDED.to_owned(),
    };
    field(c, "Payer", &payer);
    // The cover stays one page: a long list is summarized and given in full in its section.
    const COVER_SERVICES: usize = 6;
    let mut requested: Vec<String> = doc
        .services
        .iter()
        .take(COVER_SERVICES)
        .map(service_summary)
        .collect();
    if doc.services.len() > COVER_SERVICES {
        requested.push(format!(
            "and {} more (see Requested services)",
            doc.services.len() - COVER_SERVICES
        ));
    }
    let requested = if requested.is_empty() {
        "None listed".to_owned()
    } else {
        requested.join("\n")
    };
    field(c, "Requested services", &requested);
    field(
        c,
        "Generated",
        non_empty(&doc.generated).unwrap_or(NOT_PROVIDED),
    );
    c.space(18.0);

    // The determination in a frame, so it is the first thing a reviewer sees.
    const PAD: f32 = 12.0;
    let inner = CONTENT_WIDTH - 2.0 * PAD;
    let decision = non_empty(&doc.determination.decision).unwrap_or(NOT_PROVIDED);
    let summary = doc.determination.summary.trim();
    let height = PAD
        + c.measure_row(&[cell(PAD, inner, "Determination", LABEL)])
        + c.measure_row(&[cell(PAD, inner, decision, DECISION)])
        + 4.0
        + c.measure_row(&[cell(PAD, inner, summary, BODY)])
        + PAD;
    c.keep(height);
    if Composer::fits_on_a_page(height) {
        let page = c.page_count() - 1;
        let top = c.cursor();
        c.frame(page, MARGIN_LEFT, top, CONTENT_WIDTH, height, ACCENT);
    }
    c.advance(PAD);
    c.row(&[cell(PAD, inner, "Determination", LABEL)]);
    c.row(&[cell(PAD, inner, decision, DECISION)]);
    c.advance(4.0);
    c.row(&[cell(PAD, inner, summary, BODY)]);
    c.advance(PAD);
}

fn service_summary(service: &ServiceLine) -> String {
    let mut line = service.code.clone();
    if let Some(display) = service.display.as_deref().and_then(non_empty) {
        line.push_str(" — ");
        line.push_str(display);
    }
    if let Some(quantity) = service.quantity.as_deref().and_then(non_empty) {
        line.push_str(&format!(" (quantity {quantity})"));
    }
    line
}

fn patient(c: &mut Composer, doc: &PacketDocument) {
    heading(c, HEADINGS[0]);
    field(
        c,
        "Name",
        non_empty(&doc.patient.name).unwrap_or(NOT_PROVIDED),
    );
    field(c, "Birth date", or_not_provided(&doc.patient.birth_date));
    field(c, "Member ID", or_not_provided(&doc.patient.member_id));
}

fn payer(c: &mut Composer, doc: &PacketDocument) {
    heading(c, HEADINGS[1]);
    field(
        c,
        "Payer",
        non_empty(&doc.payer.name).unwrap_or(NOT_PROVIDED),
    );
    field(c, "Plan", or_not_provided(&doc.payer.plan));
    field(c, "Member ID", or_not_provided(&doc.payer.member_id));
    field(c, "Coverage period", or_not_provided(&doc.payer.period));
}

/// Column start (from the left margin) and width of the services table.
const SERVICE_COLUMNS: [(&str, f32, f32); 5] = [
    ("#", 0.0, 20.0),
    ("Code system", 26.0, 150.0),
    ("Code", 182.0, 64.0),
    ("Description", 252.0, 196.0),
    ("Qty", 454.0, 38.0),
];

fn services(c: &mut Composer, services: &[ServiceLine]) {
    heading(c, HEADINGS[2]);
    if services.is_empty() {
        c.paragraph("No services were listed.", BODY, 0.0);
        return;
    }
    service_header(c);
    for service in services {
        let sequence = service.sequence.to_string();
        let texts = [
            sequence.as_str(),
            service.system.as_str(),
            service.code.as_str(),
            service.display.as_deref().unwrap_or(""),
            service.quantity.as_deref().unwrap_or(""),
        ];
        let cells: Vec<Cell> = SERVICE_COLUMNS
            .iter()
            .zip(texts)
            .map(|(&(_, x, width), text)| cell(x, width, text, TABLE))
            .collect();
        let height = c.measure_row(&cells);
        if !c.fits(height) && Composer::fits_on_a_page(height) {
            c.new_page();
            service_header(c);
        }
        c.row(&cells);
        c.space(4.0);
    }
}

fn service_header(c: &mut Composer) {
    let cells: Vec<Cell> = SERVICE_COLUMNS
        .iter()
        .map(|&(title, x, width)| cell(x, width, title, LABEL))
        .collect();
    let height = c.measure_row(&cells) + 3.0 * TABLE.leading();
    c.keep(height);
    c.row(&cells);
    rule(c);
    c.space(4.0);
}

fn determination(c: &mut Composer, doc: &PacketDocument) {
    let determination = &doc.determination;
    heading(c, HEADINGS[3]);
    c.row(&[
        cell(0.0, LABEL_WIDTH, "Decision", LABEL),
        cell(
            VALUE_X,
            CONTENT_WIDTH - VALUE_X,
            non_empty(&determination.decision).unwrap_or(NOT_PROVIDED),
            STRONG,
        ),
    ]);
    if let Some(summary) = non_empty(&determination.summary) {
        c.space(6.0);
        c.paragraph(summary, BODY, 0.0);
    }

    c.space(12.0);
    subheading(c, "Criteria");
    if determination.criteria.is_empty() {
        c.paragraph("No criteria were evaluated.", BODY, 0.0);
    } else {
        c.paragraph(
            "[met] satisfied by the cited evidence   [unmet] not satisfied   \
             [unknown] not enough information to decide",
            SMALL,
            0.0,
        );
        c.space(6.0);
    }
    let mark_width = c.text_width(CriterionStatus::Unknown.mark(), STRONG) + 8.0;
    for criterion in &determination.criteria {
        let indent = criterion.depth.min(8) as f32 * DEPTH_INDENT;
        let text_x = indent + mark_width;
        let mark = TextStyle {
            color: status_color(criterion.status),
            ..STRONG
        };
        c.row(&[
            cell(indent, mark_width, criterion.status.mark(), mark),
            cell(text_x, CONTENT_WIDTH - text_x, &criterion.text, BODY),
        ]);
        for evidence in &criterion.evidence {
            c.row(&[
                cell(text_x, 10.0, "•", EVIDENCE),
                cell(
                    text_x + 10.0,
                    CONTENT_WIDTH - text_x - 10.0,
                    evidence,
                    EVIDENCE,
                ),
            ]);
        }
        c.space(4.0);
    }

    if !determination.missing.is_empty() {
        c.space(10.0);
        subheading(c, "Missing information");
        for item in &determination.missing {
            c.row(&[
                cell(0.0, 12.0, "•", BODY),
                cell(12.0, CONTENT_WIDTH - 12.0, item, BODY),
            ]);
            c.space(2.0);
        }
    }
}

fn status_color(status: CriterionStatus) -> Rgb {
    match status {
        CriterionStatus::Met => [0.05, 0.45, 0.20],
        CriterionStatus::Unmet => [0.72, 0.10, 0.10],
        CriterionStatus::Unknown => [0.58, 0.40, 0.00],
    }
}

fn rationale(c: &mut Composer, paragraphs: &[String]) {
    heading(c, HEADINGS[4]);
    let mut any = false;
    for paragraph in paragraphs.iter().filter_map(|p| non_empty(p)) {
        c.paragraph(paragraph, BODY, 0.0);
        c.space(6.0);
        any = true;
    }
    if !any {
        c.paragraph("No clinical rationale was provided.", BODY, 0.0);
    }
}

fn provider(c: &mut Composer, doc: &PacketDocument) {
    heading(c, HEADINGS[5]);
    field(
        c,
        "Name",
        non_empty(&doc.provider.name).unwrap_or(NOT_PROVIDED),
    );
    field(c, "NPI", or_not_provided(&doc.provider.npi));
    field(
        c,
        "Organization",
        or_not_provided(&doc.provider.organization),
    );
}

fn attestation(c: &mut Composer, doc: &PacketDocument) {
    const SIGNATURE_WIDTH: f32 = 250.0;
    const DATE_X: f32 = 290.0;
    const DATE_WIDTH: f32 = 140.0;
    const LINE_GAP: f32 = 36.0;

    heading(c, HEADINGS[6]);
    let statement = non_empty(&doc.attestation).unwrap_or("No attestation statement was provided.");
    let signer = match non_empty(&doc.provider.name) {
        Some(name) => format!("Signature of {name}"),
        None => "Signature of the requesting provider".to_owned(),
    };
    let labels = [
        cell(0.0, SIGNATURE_WIDTH, &signer, SMALL),
        cell(DATE_X, DATE_WIDTH, "Date", SMALL),
    ];
    // The statement, signature and date stay on one page.
    let height = c.measure_row(&[cell(0.0, CONTENT_WIDTH, statement, BODY)])
        + LINE_GAP
        + 4.0
        + c.measure_row(&labels);
    if Composer::fits_on_a_page(height) {
        c.keep(height);
    }
    c.paragraph(statement, BODY, 0.0);
    let signature_height = LINE_GAP + 4.0 + c.measure_row(&labels);
    c.keep(signature_height);
    c.advance(LINE_GAP);
    let page = c.page_count() - 1;
    let y = c.cursor();
    c.hline(
        page,
        MARGIN_LEFT,
        MARGIN_LEFT + SIGNATURE_WIDTH,
        y,
        0.8,
        INK,
    );
    c.hline(
        page,
        MARGIN_LEFT + DATE_X,
        MARGIN_LEFT + DATE_X + DATE_WIDTH,
        y,
        0.8,
        INK,
    );
    c.advance(4.0);
    c.row(&labels);
}

/// "Page n of N" and the request on every page, drawn once the page count is known.
fn footers(c: &mut Composer, doc: &PacketDocument) {
    const BASELINE: f32 = 38.0;
    let total = c.page_count();
    let mut left = match non_empty(&doc.reference) {
        Some(reference) => format!("{} · {reference}", title(doc)),
        None => title(doc).to_owned(),
    };
    // Leave room for the widest page number; an overlong title is cut short with an ellipsis.
    let room = CONTENT_WIDTH - c.text_width(&format!("Page {total} of {total}"), SMALL) - 24.0;
    if c.text_width(&left, SMALL) > room {
        while c.text_width(&left, SMALL) > room - c.text_width("…", SMALL) && left.pop().is_some()
        {
        }
        left.push('…');
    }
    for page in 0..total {
        let number = format!("Page {} of {total}", page + 1);
        let width = c.text_width(&number, SMALL);
        c.hline(
            page,
            MARGIN_LEFT,
            PAGE_WIDTH - MARGIN_RIGHT,
            52.0,
            0.5,
            RULE,
        );
        c.text_at(page, MARGIN_LEFT, BASELINE, &left, SMALL);
        c.text_at(
            page,
            PAGE_WIDTH - MARGIN_RIGHT - width,
            BASELINE,
            &number,
            SMALL,
        );
    }
}

fn cell<'a>(x: f32, width: f32, text: &'a str, style: TextStyle) -> Cell<'a> {
    Cell {
        x,
        width,
        text,
        style,
    }
}

fn field(c: &mut Composer, label: &str, value: &str) {
    c.row(&[
        cell(0.0, LABEL_WIDTH, label, LABEL),
        cell(VALUE_X, CONTENT_WIDTH - VALUE_X, value, BODY),
    ]);
    c.space(3.0);
}

fn heading(c: &mut Composer, text: &str) {
    c.space(18.0);
    // Keep the heading with the first lines of its section.
    c.keep(HEADING.leading() + 8.0 + 3.0 * BODY.leading());
    c.paragraph(text, HEADING, 0.0);
    c.advance(2.0);
    rule(c);
    c.space(8.0);
}

fn subheading(c: &mut Composer, text: &str) {
    c.keep(SUBHEADING.leading() + 2.0 * BODY.leading());
    c.paragraph(text, SUBHEADING, 0.0);
    c.space(4.0);
}

fn rule(c: &mut Composer) {
    let page = c.page_count() - 1;
    let y = c.cursor();
    c.hline(page, MARGIN_LEFT, MARGIN_LEFT + CONTENT_WIDTH, y, 0.6, RULE);
}
