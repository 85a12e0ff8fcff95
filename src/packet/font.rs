//! The fonts a packet is set in, and their embedding as subset CID fonts.
//!
//! Reviewers must read names in any script, which the PDF standard fonts (Latin-1 only) cannot
//! show, so packets are set in TrueType faces bundled with the binary (`assets/fonts/`, see
//! `SOURCES.md`). Each character takes the first face of its weight's fallback chain that has a
//! glyph for it; a character no face covers becomes a visible replacement mark, never nothing.
//!
//! A packet embeds each face it used as a Type0 / CIDFontType2 font holding only the glyphs it
//! drew. CIDs are numbered per character, not per glyph, so the `/ToUnicode` map gives text
//! extraction back exactly the characters that were set even where a face draws two characters
//! with one glyph.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::OnceLock;

use lopdf::{dictionary, Document, Object, ObjectId};
use subsetter::GlyphRemapper;
use ttf_parser::{Face, GlyphId};

use super::pdf::{deflate_stream, PdfError};

/// Shown, and extracted, in place of a character no bundled face covers.
pub(crate) const REPLACEMENT: char = '\u{FFFD}';

/// One of the bundled faces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum FaceId {
    /// DejaVu Sans: Latin, Greek, Cyrillic and many symbols.
    Sans,
    /// DejaVu Sans Bold, for headings and labels.
    SansBold,
    /// Droid Sans Fallback: Chinese, Japanese and Korean.
    Fallback,
}

impl FaceId {
    const ALL: [FaceId; 3] = [FaceId::Sans, FaceId::SansBold, FaceId::Fallback];

    fn index(self) -> usize {
        self as usize
    }

    /// The name content streams use for this face in the page resources.
    pub(crate) fn resource_name(self) -> &'static str {
        match self {
            FaceId::Sans => "F1",
            FaceId::SansBold => "F2",
            FaceId::Fallback => "F3",
        }
    }
}

/// The weight text is asked for; each has its own fallback chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Weight {
    Regular,
    Bold,
}

impl Weight {
    fn chain(self) -> &'static [FaceId] {
        match self {
            Weight::Regular => &[FaceId::Sans, FaceId::Fallback],
            // The fallback face has no bold; CJK in headings is set regular.
            Weight::Bold => &[FaceId::SansBold, FaceId::Sans, FaceId::Fallback],
        }
    }
}

/// A bundled font file and the PostScript name it is embedded under.
struct FontFile {
    base_name: &'static str,
    data: &'static [u8],
}

/// In the order of [`FaceId`].
static FONT_FILES: [FontFile; 3] = [
    FontFile {
        base_name: "DejaVuSans",
        data: include_bytes!("../../assets/fonts/DejaVuSans.ttf"),
    },
    FontFile {
        base_name: "DejaVuSans-Bold",
        data: include_bytes!("../../assets/fonts/DejaVuSans-Bold.ttf"),
    },
    FontFile {
        base_name: "DroidSansFallback",
        data: include_bytes!("../../assets/fonts/DroidSansFallbackFull.ttf"),
    },
];

/// A parsed face. Parsing happens once per process; renders share the result.
struct LoadedFace {
    file: &'static FontFile,
    face: Face<'static>,
    units_per_em: f32,
}

impl LoadedFace {
    /// Scales font units to the thousandths of an em that PDF font dictionaries use.
    fn scale(&self, units: i16) -> f32 {
        f32::from(units) * 1000.0 / self.units_per_em
    }

    /// The glyph for `ch`, if this face has a real one (not `.notdef`).
    fn glyph_index(&self, ch: char) -> Option<GlyphId> {
        self.face.glyph_index(ch).filter(|gid| gid.0 != 0)
    }
}

static FACES: OnceLock<Result<Vec<LoadedFace>, String>> = OnceLock::new();

fn loaded_faces() -> Result<&'static [LoadedFace], PdfError> {
    FACES
        .get_or_init(|| {
            FONT_FILES
                .iter()
                .map(|file| {
                    let face = Face::parse(file.data, 0)
                        .map_err(|e| format!("bundled font {}: {e}", file.base_name))?;
                    let units_per_em = f32::from(face.units_per_em().max(1));
                    Ok(LoadedFace {
                        file,
                        face,
                        units_per_em,
                    })
                })
                .collect()
        })
        .as_deref()
        .map_err(|reason| PdfError::Font(reason.clone()))
}

/// A character as it will be drawn: the face, its CID in that face's embedded font, and its
/// advance in thousandths of an em (the unit of the font's `/W` array).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Glyph {
    pub face: FaceId,
    pub cid: u16,
    pub width: f32,
}

/// What one render used of one face.
#[derive(Default)]
struct UsedFace {
    remapper: GlyphRemapper,
    /// Entry `i` describes CID `i + 1` (CID 0 stays `.notdef`).
    cids: Vec<CidEntry>,
    by_char: HashMap<char, u16>,
}

struct CidEntry {
    text: char,
    subset_gid: u16,
    width: f32,
}

/// The glyphs one render draws, collected while laying out, then embedded as font subsets.
pub(crate) struct FontUsage {
    faces: &'static [LoadedFace],
    used: [UsedFace; 3],
    cache: HashMap<(Weight, char), Glyph>,
}

impl FontUsage {
    /// Starts an empty collection; fails only if a bundled font cannot be parsed.
    pub(crate) fn new() -> Result<Self, PdfError> {
        Ok(Self {
            faces: loaded_faces()?,
            used: Default::default(),
            cache: HashMap::new(),
        })
    }

    /// The glyph for `ch` in `weight`: from the first face of the chain that has it, else the
    /// replacement mark.
    pub(crate) fn glyph(&mut self, weight: Weight, ch: char) -> Glyph {
        if let Some(glyph) = self.cache.get(&(weight, ch)) {
            return *glyph;
        }
        let glyph = self
            .lookup(weight, ch)
            .or_else(|| self.lookup(weight, REPLACEMENT))
            .or_else(|| self.lookup(weight, '?'))
            // Unreachable with the bundled faces; `.notdef` still draws a visible box.
            .unwrap_or_else(|| self.assign(FaceId::Sans, REPLACEMENT, GlyphId(0)));
        self.cache.insert((weight, ch), glyph);
        glyph
    }

    fn lookup(&mut self, weight: Weight, ch: char) -> Option<Glyph> {
        weight.chain().iter().find_map(|&face| {
            let gid = self.faces[face.index()].glyph_index(ch)?;
            Some(self.assign(face, ch, gid))
        })
    }

    fn assign(&mut self, face: FaceId, text: char, gid: GlyphId) -> Glyph {
        let loaded = &self.faces[face.index()];
        let used = &mut self.used[face.index()];
        let cid = match used.by_char.get(&text) {
            Some(&cid) => cid,
            None => {
                let Ok(cid) = u16::try_from(used.cids.len() + 1) else {
                    // More distinct characters than CIDs: draw `.notdef` rather than fail.
                    return Glyph {
                        face,
                        cid: 0,
                        width: 0.0,
                    };
                };
                let advance = loaded.face.glyph_hor_advance(gid).unwrap_or(0);
                used.cids.push(CidEntry {
                    text,
                    subset_gid: used.remapper.remap(gid.0),
                    width: f32::from(advance) * 1000.0 / loaded.units_per_em,
                });
                used.by_char.insert(text, cid);
                cid
            }
        };
        let width = used.cids[usize::from(cid) - 1].width;
        Glyph { face, cid, width }
    }

    /// Embeds every face used so far into `doc` and returns the `/Font` resource dictionary
    /// that maps [`FaceId::resource_name`] to them.
    pub(crate) fn embed(&self, doc: &mut Document) -> Result<lopdf::Dictionary, PdfError> {
        let mut resources = lopdf::Dictionary::new();
        for face in FaceId::ALL {
            let used = &self.used[face.index()];
            if used.cids.is_empty() {
                continue;
            }
            let font = embed_face(doc, &self.faces[face.index()], used)?;
            resources.set(face.resource_name(), font);
        }
        Ok(resources)
    }
}

/// Writes the Type0 font for one face: subset font program, descriptor, CID font with widths
/// and CID-to-glyph map, and the `/ToUnicode` CMap.
fn embed_face(
    doc: &mut Document,
    face: &LoadedFace,
    used: &UsedFace,
) -> Result<ObjectId, PdfError> {
    let program = subsetter::subset(face.file.data, 0, &used.remapper)
        .map_err(|e| PdfError::Font(format!("subsetting {}: {e}", face.file.base_name)))?;
    let name = format!(
        "{}+{}",
        subset_tag(face.file.base_name, used),
        face.file.base_name
    );

    let program_len = i64::try_from(program.len()).unwrap_or(i64::MAX);
    let program = deflate_stream(dictionary! { "Length1" => program_len }, &program)?;
    let program_id = doc.add_object(program);

    let metrics = &face.face;
    let bbox = metrics.global_bounding_box();
    let bold = face.file.base_name.ends_with("-Bold");
    let descriptor = dictionary! {
        "Type" => "FontDescriptor",
        "FontName" => Object::Name(name.clone().into_bytes()),
        // Symbolic: glyphs are reached through CIDs, not a standard encoding.
        "Flags" => 4,
        "FontBBox" => vec![
            face.scale(bbox.x_min).into(),
            face.scale(bbox.y_min).into(),
            face.scale(bbox.x_max).into(),
            face.scale(bbox.y_max).into(),
        ],
        "ItalicAngle" => 0,
        "Ascent" => face.scale(metrics.ascender()),
        "Descent" => face.scale(metrics.descender()),
        "CapHeight" => face.scale(metrics.capital_height().unwrap_or(metrics.ascender())),
        "StemV" => if bold { 120 } else { 80 },
        "FontFile2" => program_id,
    };
    let descriptor_id = doc.add_object(descriptor);

    let mut cid_to_gid = Vec::with_capacity(2 * (used.cids.len() + 1));
    cid_to_gid.extend_from_slice(&0u16.to_be_bytes());
    for entry in &used.cids {
        cid_to_gid.extend_from_slice(&entry.subset_gid.to_be_bytes());
    }
    let cid_to_gid_id = doc.add_object(deflate_stream(dictionary! {}, &cid_to_gid)?);

    let widths: Vec<Object> = used.cids.iter().map(|e| e.width.into()).collect();
    let cid_font = dictionary! {
        "Type" => "Font",
        "Subtype" => "CIDFontType2",
        "BaseFont" => Object::Name(name.clone().into_bytes()),
        "CIDSystemInfo" => dictionary! {
            "Registry" => Object::string_literal("Adobe"),
            "Ordering" => Object::string_literal("Identity"),
            "Supplement" => 0,
        },
        "FontDescriptor" => descriptor_id,
        "DW" => 0,
        "W" => vec![1.into(), Object::Array(widths)],
        "CIDToGIDMap" => cid_to_gid_id,
    };
    let cid_font_id = doc.add_object(cid_font);

    let to_unicode = doc.add_object(deflate_stream(
        dictionary! {},
        to_unicode_cmap(used).as_bytes(),
    )?);
    Ok(doc.add_object(dictionary! {
        "Type" => "Font",
        "Subtype" => "Type0",
        "BaseFont" => Object::Name(name.into_bytes()),
        "Encoding" => "Identity-H",
        "DescendantFonts" => vec![cid_font_id.into()],
        "ToUnicode" => to_unicode,
    }))
}

/// The six-letter tag PDF asks subset font names to carry, derived from the subset so equal
/// subsets get equal names and the output stays deterministic.
fn subset_tag(base_name: &str, used: &UsedFace) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |byte: u8| {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    };
    base_name.bytes().for_each(&mut feed);
    for entry in &used.cids {
        u32::from(entry.text)
            .to_be_bytes()
            .into_iter()
            .for_each(&mut feed);
    }
    (0..6)
        .map(|i| char::from(b'A' + ((hash >> (i * 8)) % 26) as u8))
        .collect()
}

/// The `/ToUnicode` CMap: each CID to the character it was assigned for.
fn to_unicode_cmap(used: &UsedFace) -> String {
    let mut cmap = String::with_capacity(300 + used.cids.len() * 20);
    cmap.push_str(
        "/CIDInit /ProcSet findresource begin\n12 dict begin\nbegincmap\n\
         /CIDSystemInfo << /Registry (Adobe) /Ordering (UCS) /Supplement 0 >> def\n\
         /CMapName /Adobe-Identity-UCS def\n/CMapType 2 def\n\
         1 begincodespacerange\n<0000> <FFFF>\nendcodespacerange\n",
    );
    // A CMap section may hold at most 100 entries.
    for (chunk_index, chunk) in used.cids.chunks(100).enumerate() {
        let _ = writeln!(cmap, "{} beginbfchar", chunk.len());
        for (i, entry) in chunk.iter().enumerate() {
            let cid = chunk_index * 100 + i + 1;
            let _ = write!(cmap, "<{cid:04X}> <");
            let mut units = [0u16; 2];
            for unit in entry.text.encode_utf16(&mut units) {
                let _ = write!(cmap, "{unit:04X}");
            }
            cmap.push_str(">\n");
        }
        cmap.push_str("endbfchar\n");
    }
    cmap.push_str("endcmap\nCMapName currentdict /CMap defineresource pop\nend\nend\n");
    cmap
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_back_per_character_and_replaces_what_no_face_has() {
        let mut fonts = FontUsage::new().expect("bundled fonts parse");
        assert_eq!(fonts.glyph(Weight::Regular, 'A').face, FaceId::Sans);
        assert_eq!(fonts.glyph(Weight::Bold, 'Ω').face, FaceId::SansBold);
        assert_eq!(fonts.glyph(Weight::Regular, '娜').face, FaceId::Fallback);
        assert_eq!(fonts.glyph(Weight::Bold, '娜').face, FaceId::Fallback);

        let replacement = fonts.glyph(Weight::Regular, REPLACEMENT);
        let private_use = fonts.glyph(Weight::Regular, '\u{E000}');
        assert_eq!(private_use, replacement);
        assert!(
            private_use.width > 0.0,
            "the replacement mark must be visible"
        );
    }

    #[test]
    fn each_character_gets_its_own_cid_and_unicode_entry() {
        let mut fonts = FontUsage::new().expect("bundled fonts parse");
        let a = fonts.glyph(Weight::Regular, 'a');
        let b = fonts.glyph(Weight::Regular, 'b');
        assert_eq!(fonts.glyph(Weight::Regular, 'a'), a);
        assert_eq!((a.cid, b.cid), (1, 2));
        fonts.glyph(Weight::Regular, '\u{E000}');
        let cmap = to_unicode_cmap(&fonts.used[FaceId::Sans.index()]);
        assert!(cmap.contains("<0001> <0061>"), "{cmap}");
        assert!(cmap.contains("<0003> <FFFD>"), "{cmap}");
    }
}
