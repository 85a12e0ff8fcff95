//! The text of a clinical note from a DocumentReference attachment.
//!
//! EHRs send notes as base64 `text/plain` (in any charset, often unlabelled), as `text/html`,
//! or only as a URL to a `Binary`. Everything becomes plain UTF-8 text here; what cannot be
//! read (PDFs, images) is skipped with a reason rather than guessed at.

use base64::Engine;
use serde_json::Value;

/// Text beyond this many bytes of one note is not read (a 5 MB note is read whole).
pub const MAX_NOTE_BYTES: usize = 8 << 20;

/// What an attachment holds.
#[derive(Debug, PartialEq)]
pub enum Body {
    Text(String),
    /// Only a URL: fetch it (a `Binary` of the same server) and decode what comes back.
    Url(String),
    /// Not a text format, or not decodable; the reason.
    Skipped(String),
}

/// The text of an attachment (`contentType`, and `data` or `url`).
pub fn attachment_body(attachment: &Value) -> Body {
    let content_type = attachment["contentType"].as_str().unwrap_or("text/plain");
    if let Some(data) = attachment["data"].as_str() {
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(data.trim()) else {
            return Body::Skipped("the attachment data is not base64".into());
        };
        return match decode(&bytes, content_type) {
            Some(text) => Body::Text(text),
            None => Body::Skipped(format!("{content_type} is not a text format")),
        };
    }
    match attachment["url"].as_str() {
        Some(url) if !url.is_empty() => Body::Url(url.to_owned()),
        _ => Body::Skipped("the attachment has neither data nor url".into()),
    }
}

/// Text from the bytes of a `content_type` body; `None` for formats that are not text.
pub fn decode(bytes: &[u8], content_type: &str) -> Option<String> {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let charset = content_type.split(';').skip(1).find_map(|p| {
        let (name, value) = p.split_once('=')?;
        (name.trim().eq_ignore_ascii_case("charset"))
            .then(|| value.trim().trim_matches('"').to_ascii_lowercase())
    });
    let bytes = &bytes[..bytes.len().min(MAX_NOTE_BYTES)];
    let text = match media.as_str() {
        "text/plain" | "text/markdown" | "text/html" | "application/xhtml+xml" | "text/rtf" => {
            decode_charset(bytes, charset.as_deref())
        }
        _ => return None,
    };
    Some(
        if media == "text/html" || media == "application/xhtml+xml" {
            html_to_text(&text)
        } else {
            text.replace("\r\n", "\n")
        },
    )
}

/// Bytes to text: a BOM wins, then the declared charset, then UTF-8, then Windows-1252 (what
/// unlabelled non-UTF-8 notes almost always are).
fn decode_charset(bytes: &[u8], charset: Option<&str>) -> String {
    if let Some(rest) = bytes.strip_prefix(&[0xEF, 0xBB, 0xBF]) {
        return String::from_utf8_lossy(rest).into_owned();
    }
    if let Some(rest) = bytes.strip_prefix(&[0xFF, 0xFE]) {
        return utf16(rest, u16::from_le_bytes);
    }
    if let Some(rest) = bytes.strip_prefix(&[0xFE, 0xFF]) {
        return utf16(rest, u16::from_be_bytes);
    }
    match charset {
        Some("utf-16le") => return utf16(bytes, u16::from_le_bytes),
        Some("utf-16be" | "utf-16") => return utf16(bytes, u16::from_be_bytes),
        Some("iso-8859-1" | "latin1" | "latin-1" | "windows-1252" | "cp1252") => {
            return windows_1252(bytes)
        }
        _ => {}
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => windows_1252(bytes),
    }
}

fn utf16(bytes: &[u8], unit: fn([u8; 2]) -> u16) -> String {
    let units: Vec<u16> = bytes.chunks_exact(2).map(|c| unit([c[0], c[1]])).collect();
    String::from_utf16_lossy(&units)
}

/// Windows-1252 (a superset of the printable ISO-8859-1) to text.
fn windows_1252(bytes: &[u8]) -> String {
    const HIGH: [char; 32] = [
        '€', '\u{81}', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\u{8d}', 'Ž',
        '\u{8f}', '\u{90}', '‘', '’', '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\u{9d}',
        'ž', 'Ÿ',
    ];
    bytes
        .iter()
        .map(|&b| match b {
            0x80..=0x9F => HIGH[usize::from(b - 0x80)],
            _ => char::from(b),
        })
        .collect()
}

/// The readable text of an HTML note: tags dropped (blocks become line breaks), scripts and
/// styles removed, character references decoded.
pub fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len() / 2);
    let mut rest = html;
    while let Some(open) = rest.find('<') {
        push_decoded(&mut out, &rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('>') else {
            rest = "";
            break;
        };
        let tag = after[..close].trim_start_matches('/').to_ascii_lowercase();
        let name: String = tag
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        rest = &after[close + 1..];
        if (name == "script" || name == "style") && !after.starts_with('/') {
            let end = format!("</{name}");
            rest = match rest.to_ascii_lowercase().find(&end) {
                Some(at) => rest[at..].split_once('>').map_or("", |(_, r)| r),
                None => "",
            };
            continue;
        }
        if matches!(
            name.as_str(),
            "br" | "p"
                | "div"
                | "li"
                | "tr"
                | "h1"
                | "h2"
                | "h3"
                | "h4"
                | "h5"
                | "h6"
                | "table"
                | "ul"
                | "ol"
                | "section"
                | "article"
                | "header"
                | "footer"
                | "pre"
                | "hr"
        ) && !out.ends_with('\n')
        {
            out.push('\n');
        } else if matches!(name.as_str(), "td" | "th") {
            out.push(' ');
        }
    }
    push_decoded(&mut out, rest);
    // Collapse the runs of blank lines and spaces markup leaves behind.
    let mut clean = String::with_capacity(out.len());
    for line in out.lines() {
        let line = line.split_whitespace().collect::<Vec<_>>().join(" ");
        if line.is_empty() && (clean.is_empty() || clean.ends_with("\n\n")) {
            continue;
        }
        clean.push_str(&line);
        clean.push('\n');
    }
    clean.trim_end().to_owned()
}

fn push_decoded(out: &mut String, text: &str) {
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        let end = after
            .find(';')
            .filter(|&e| e <= 10 && e > 0)
            .map(|e| (&after[..e], &after[e + 1..]));
        let decoded = end.and_then(|(name, tail)| {
            let c = match name {
                "amp" => '&',
                "lt" => '<',
                "gt" => '>',
                "quot" => '"',
                "apos" => '\'',
                "nbsp" => ' ',
                _ => {
                    let n = if let Some(hex) = name.strip_prefix("#x").or(name.strip_prefix("#X")) {
                        u32::from_str_radix(hex, 16).ok()?
                    } else {
                        name.strip_prefix('#')?.parse().ok()?
                    };
                    char::from_u32(n)?
                }
            };
            Some((c, tail))
        });
        match decoded {
            Some((c, tail)) => {
                out.push(c);
                rest = tail;
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
}

/// The day a DocumentReference's note was written (`date`, else `context.period.start`).
pub fn note_date(document: &Value) -> Option<time::Date> {
    let text = document["date"]
        .as_str()
        .or_else(|| document["context"]["period"]["start"].as_str())?;
    let range = crate::fhir::date::parse_range(text)?;
    let seconds = range.start.div_euclid(1_000_000);
    time::OffsetDateTime::from_unix_timestamp(seconds)
        .ok()
        .map(|t| t.date())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plain_text_in_any_charset_becomes_utf8() {
        assert_eq!(decode(b"caf\xe9", "text/plain").as_deref(), Some("café"));
        assert_eq!(
            decode("café".as_bytes(), "text/plain; charset=utf-8").as_deref(),
            Some("café")
        );
        assert_eq!(
            decode(b"\x93PT\x94", "text/plain; charset=windows-1252").as_deref(),
            Some("“PT”")
        );
        assert_eq!(
            decode(b"\xff\xfeP\0T\0", "text/plain").as_deref(),
            Some("PT")
        );
        assert_eq!(decode(b"%PDF-1.7", "application/pdf"), None);
    }

    #[test]
    fn html_notes_lose_their_markup() {
        let html = "<html><head><style>p{x}</style><script>alert(1)</script></head><body>\
            <h1>HPI</h1><p>Low back pain &amp; sciatica for 3&nbsp;months.</p>\
            <ul><li>PT x 6 wks</li><li>NSAIDs &lt;daily&gt; &#8212; no relief</li></ul></body></html>";
        assert_eq!(
            html_to_text(html),
            "HPI\nLow back pain & sciatica for 3 months.\nPT x 6 wks\nNSAIDs <daily> \u{2014} no relief"
        );
    }

    #[test]
    fn attachments_give_text_a_url_or_a_reason() {
        let data = base64::engine::general_purpose::STANDARD.encode("8 weeks of PT");
        assert_eq!(
            attachment_body(&json!({"contentType": "text/plain", "data": data})),
            Body::Text("8 weeks of PT".into())
        );
        assert_eq!(
            attachment_body(&json!({"contentType": "text/plain", "url": "Binary/7"})),
            Body::Url("Binary/7".into())
        );
        assert!(matches!(
            attachment_body(&json!({"contentType": "text/plain", "data": "**"})),
            Body::Skipped(_)
        ));
    }
}
