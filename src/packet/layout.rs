//! Page layout for packets: line breaking with the fonts' own advance widths, rows of wrapped
//! cells, and page breaks, written straight into each page's content stream.
//!
//! The layout is deliberately small: left-aligned text in fixed columns is all a packet needs,
//! and knowing every width exactly (the same numbers go into the fonts' `/W` arrays) keeps lines
//! inside their columns and text extraction free of stray spaces.

use std::io::Write as _;
use std::ops::Range;

use super::font::{FaceId, FontUsage, Glyph, Weight, REPLACEMENT};

/// US Letter, in points.
pub(crate) const PAGE_WIDTH: f32 = 612.0;
pub(crate) const PAGE_HEIGHT: f32 = 792.0;
pub(crate) const MARGIN_LEFT: f32 = 60.0;
pub(crate) const MARGIN_RIGHT: f32 = 60.0;
const MARGIN_TOP: f32 = 60.0;
/// Room below the text block for the footer.
const MARGIN_BOTTOM: f32 = 66.0;
/// Width of the text block.
pub(crate) const CONTENT_WIDTH: f32 = PAGE_WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
const CONTENT_TOP: f32 = PAGE_HEIGHT - MARGIN_TOP;
const CONTENT_HEIGHT: f32 = CONTENT_TOP - MARGIN_BOTTOM;

/// An RGB fill colour, components in 0..=1.
pub(crate) type Rgb = [f32; 3];

/// How a run of text is set.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TextStyle {
    pub weight: Weight,
    pub size: f32,
    pub color: Rgb,
}

impl TextStyle {
    /// Baseline-to-baseline distance.
    pub(crate) fn leading(&self) -> f32 {
        self.size * 1.4
    }
}

/// One column of a row: where it starts (from the left margin), how wide it is, and its text.
pub(crate) struct Cell<'a> {
    pub x: f32,
    pub width: f32,
    pub text: &'a str,
    pub style: TextStyle,
}

/// A character after font lookup. `ch` is what line breaking looks at.
#[derive(Clone, Copy)]
struct Shaped {
    ch: char,
    glyph: Glyph,
}

/// A cell's text after font lookup, and its lines as ranges into it.
struct WrappedCell {
    shaped: Vec<Shaped>,
    lines: Vec<Range<usize>>,
}

/// Lays content out top to bottom over as many pages as it needs.
pub(crate) struct Composer {
    fonts: FontUsage,
    pages: Vec<Vec<u8>>,
    /// Top of the next line, in PDF coordinates (from the page's bottom edge).
    y: f32,
}

impl Composer {
    pub(crate) fn new(fonts: FontUsage) -> Self {
        Self {
            fonts,
            pages: vec![Vec::new()],
            y: CONTENT_TOP,
        }
    }

    pub(crate) fn page_count(&self) -> usize {
        self.pages.len()
    }

    pub(crate) fn new_page(&mut self) {
        self.pages.push(Vec::new());
        self.y = CONTENT_TOP;
    }

    fn at_page_top(&self) -> bool {
        self.y >= CONTENT_TOP
    }

    /// Vertical space; none at the top of a page, where it would only push content down.
    pub(crate) fn space(&mut self, height: f32) {
        if !self.at_page_top() {
            self.y -= height;
        }
    }

    /// Moves down by `height`, even at the top of a page (padding inside a frame).
    pub(crate) fn advance(&mut self, height: f32) {
        self.y -= height;
    }

    /// Whether `height` still fits on the current page.
    pub(crate) fn fits(&self, height: f32) -> bool {
        self.y - height >= MARGIN_BOTTOM
    }

    /// Whether `height` fits on an empty page.
    pub(crate) fn fits_on_a_page(height: f32) -> bool {
        height <= CONTENT_HEIGHT
    }

    /// Starts a new page unless `height` still fits on this one.
    pub(crate) fn keep(&mut self, height: f32) {
        if !self.fits(height) && !self.at_page_top() {
            self.new_page();
        }
    }

    /// The current line top, for drawing frames around content about to be laid out.
    pub(crate) fn cursor(&self) -> f32 {
        self.y
    }

    /// Height the row would take.
    pub(crate) fn measure_row(&mut self, cells: &[Cell]) -> f32 {
        let (wrapped, leading) = self.wrap_cells(cells);
        wrapped.iter().map(|w| w.lines.len()).max().unwrap_or(0) as f32 * leading
    }

    /// Lays out cells side by side, each wrapped to its width. The row moves to the next page
    /// whole if it fits on one; a row taller than a page continues line by line.
    pub(crate) fn row(&mut self, cells: &[Cell]) {
        self.lay_out(cells, usize::MAX);
    }

    /// A paragraph across the full text block, indented by `indent`. Long paragraphs continue
    /// on the next page, but never leave a single line behind at the bottom of one.
    pub(crate) fn paragraph(&mut self, text: &str, style: TextStyle, indent: f32) {
        let cell = Cell {
            x: indent,
            width: CONTENT_WIDTH - indent,
            text,
            style,
        };
        self.lay_out(&[cell], 2);
    }

    /// Lays out a row, first moving to a new page unless its first `keep_lines` lines fit.
    fn lay_out(&mut self, cells: &[Cell], keep_lines: usize) {
        let (wrapped, leading) = self.wrap_cells(cells);
        let line_count = wrapped.iter().map(|w| w.lines.len()).max().unwrap_or(0);
        let kept = line_count.min(keep_lines) as f32 * leading;
        if Self::fits_on_a_page(kept) {
            self.keep(kept);
        }
        for line in 0..line_count {
            self.keep(leading);
            let baseline = self.y - leading * 0.78;
            for (cell, wrapped) in cells.iter().zip(&wrapped) {
                if let Some(range) = wrapped.lines.get(line) {
                    let glyphs: Vec<Glyph> = wrapped.shaped[range.clone()]
                        .iter()
                        .map(|s| s.glyph)
                        .collect();
                    let page = self.pages.len() - 1;
                    self.draw_glyphs(page, MARGIN_LEFT + cell.x, baseline, cell.style, &glyphs);
                }
            }
            self.y -= leading;
        }
    }

    /// Each cell's text broken into lines, and the row's leading (the largest of its cells').
    fn wrap_cells(&mut self, cells: &[Cell]) -> (Vec<WrappedCell>, f32) {
        let mut leading: f32 = 0.0;
        let wrapped = cells
            .iter()
            .map(|cell| {
                let shaped = self.shape(cell.text, cell.style.weight);
                let lines = wrap(&shaped, cell.style.size, cell.width);
                if !lines.is_empty() {
                    leading = leading.max(cell.style.leading());
                }
                WrappedCell { shaped, lines }
            })
            .collect();
        (wrapped, leading)
    }

    /// Width of `text` set on one line.
    pub(crate) fn text_width(&mut self, text: &str, style: TextStyle) -> f32 {
        let shaped = self.shape(text, style.weight);
        shaped.iter().map(|s| s.glyph.width).sum::<f32>() * style.size / 1000.0
    }

    /// Draws `text` on one line at an absolute position on `page`, without wrapping.
    pub(crate) fn text_at(
        &mut self,
        page: usize,
        x: f32,
        baseline: f32,
        text: &str,
        style: TextStyle,
    ) {
        let glyphs: Vec<Glyph> = self
            .shape(text, style.weight)
            .iter()
            .filter(|s| s.ch != '\n')
            .map(|s| s.glyph)
            .collect();
        self.draw_glyphs(page, x, baseline, style, &glyphs);
    }

    /// A horizontal line at height `y` from `x0` to `x1` (absolute coordinates).
    pub(crate) fn hline(&mut self, page: usize, x0: f32, x1: f32, y: f32, width: f32, color: Rgb) {
        if let Some(out) = self.pages.get_mut(page) {
            let _ = writeln!(
                out,
                "{:.3} {:.3} {:.3} RG {width:.2} w {x0:.2} {y:.2} m {x1:.2} {y:.2} l S",
                color[0], color[1], color[2]
            );
        }
    }

    /// A stroked rectangle; `top` is its upper edge.
    pub(crate) fn frame(
        &mut self,
        page: usize,
        x: f32,
        top: f32,
        width: f32,
        height: f32,
        color: Rgb,
    ) {
        if let Some(out) = self.pages.get_mut(page) {
            let _ = writeln!(
                out,
                "{:.3} {:.3} {:.3} RG 0.8 w {x:.2} {:.2} {width:.2} {height:.2} re S",
                color[0],
                color[1],
                color[2],
                top - height
            );
        }
    }

    /// Hands back the fonts used and each page's content stream.
    pub(crate) fn finish(self) -> (FontUsage, Vec<Vec<u8>>) {
        (self.fonts, self.pages)
    }

    fn shape(&mut self, text: &str, weight: Weight) -> Vec<Shaped> {
        let mut shaped = Vec::with_capacity(text.len());
        for ch in text.chars() {
            let ch = match ch {
                '\r' => continue,
                '\n' => {
                    shaped.push(Shaped {
                        ch,
                        glyph: Glyph {
                            face: FaceId::Sans,
                            cid: 0,
                            width: 0.0,
                        },
                    });
                    continue;
                }
                '\t' => ' ',
                c if c.is_control() => REPLACEMENT,
                c => c,
            };
            shaped.push(Shaped {
                ch,
                glyph: self.fonts.glyph(weight, ch),
            });
        }
        shaped
    }

    fn draw_glyphs(
        &mut self,
        page: usize,
        x: f32,
        baseline: f32,
        style: TextStyle,
        glyphs: &[Glyph],
    ) {
        let Some(out) = self.pages.get_mut(page) else {
            return;
        };
        if glyphs.is_empty() {
            return;
        }
        let [r, g, b] = style.color;
        let _ = write!(out, "BT {r:.3} {g:.3} {b:.3} rg {x:.2} {baseline:.2} Td");
        let mut current: Option<FaceId> = None;
        for glyph in glyphs {
            if current != Some(glyph.face) {
                if current.is_some() {
                    out.extend_from_slice(b"> Tj");
                }
                let _ = write!(
                    out,
                    " /{} {:.2} Tf <",
                    glyph.face.resource_name(),
                    style.size
                );
                current = Some(glyph.face);
            }
            push_hex(out, glyph.cid);
        }
        out.extend_from_slice(b"> Tj ET\n");
    }
}

fn push_hex(out: &mut Vec<u8>, cid: u16) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for shift in [12, 8, 4, 0] {
        out.push(HEX[usize::from((cid >> shift) & 0xF)]);
    }
}

/// Splits shaped text into lines no wider than `max_width` points, at spaces, after hyphens
/// and slashes, and between CJK characters (which need no spaces); a word longer than a line
/// is split anywhere. Returns each line as a range into `shaped`, trailing spaces excluded.
fn wrap(shaped: &[Shaped], size: f32, max_width: f32) -> Vec<Range<usize>> {
    let limit = max_width * 1000.0 / size;
    let mut lines = Vec::new();
    let mut start = skip_spaces(shaped, 0);
    while start < shaped.len() {
        let mut width = 0.0;
        // Where the line could end and the next begin.
        let mut opportunity: Option<(usize, usize)> = None;
        let mut end = shaped.len();
        let mut next = shaped.len();
        let mut i = start;
        while i < shaped.len() {
            let Shaped { ch, glyph } = shaped[i];
            if ch == '\n' {
                (end, next) = (i, i + 1);
                break;
            }
            if is_break_space(ch) {
                opportunity = Some((i, i + 1));
                width += glyph.width;
                i += 1;
                continue;
            }
            if i > start && is_cjk(ch) && !no_break_before(ch) {
                opportunity = Some((i, i));
            }
            if width + glyph.width > limit && i > start {
                (end, next) = opportunity.unwrap_or((i, i));
                break;
            }
            width += glyph.width;
            if i > start && breaks_after(shaped, i) {
                opportunity = Some((i + 1, i + 1));
            }
            i += 1;
        }
        while end > start && is_break_space(shaped[end - 1].ch) {
            end -= 1;
        }
        lines.push(start..end);
        start = if shaped
            .get(next.wrapping_sub(1))
            .is_some_and(|s| s.ch == '\n')
        {
            next
        } else {
            skip_spaces(shaped, next)
        };
    }
    lines
}

fn skip_spaces(shaped: &[Shaped], mut i: usize) -> usize {
    while i < shaped.len() && is_break_space(shaped[i].ch) {
        i += 1;
    }
    i
}

fn is_break_space(ch: char) -> bool {
    ch != '\n' && ch.is_whitespace() && !matches!(ch, '\u{A0}' | '\u{2007}' | '\u{202F}')
}

/// A line may end after a hyphen or slash inside a word, or after a CJK character.
fn breaks_after(shaped: &[Shaped], i: usize) -> bool {
    let Some(next) = shaped.get(i + 1) else {
        return false;
    };
    if is_break_space(next.ch) || no_break_before(next.ch) {
        return false;
    }
    match shaped[i].ch {
        '-' | '/' => shaped[i - 1].ch.is_alphanumeric() && next.ch != '/',
        ch => is_cjk(ch),
    }
}

fn is_cjk(ch: char) -> bool {
    matches!(ch,
        '\u{2E80}'..='\u{9FFF}'
        | '\u{AC00}'..='\u{D7AF}'
        | '\u{F900}'..='\u{FAFF}'
        | '\u{FF00}'..='\u{FFEF}'
        | '\u{20000}'..='\u{3FFFF}')
}

/// Closing punctuation that must not start a line.
fn no_break_before(ch: char) -> bool {
    matches!(
        ch,
        '、' | '。'
            | '，'
            | '．'
            | '：'
            | '；'
            | '！'
            | '？'
            | '）'
            | '」'
            | '』'
            | '】'
            | '〉'
            | '》'
            | '”'
            | '’'
            | ','
            | '.'
            | ')'
            | ':'
            | ';'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str, size: f32, width: f32) -> Vec<String> {
        let mut composer = Composer::new(FontUsage::new().expect("fonts"));
        let shaped = composer.shape(text, Weight::Regular);
        wrap(&shaped, size, width)
            .into_iter()
            .map(|r| shaped[r].iter().map(|s| s.ch).collect())
            .collect()
    }

    #[test]
    fn wraps_at_spaces_within_the_measured_width() {
        let mut composer = Composer::new(FontUsage::new().expect("fonts"));
        let style = TextStyle {
            weight: Weight::Regular,
            size: 10.0,
            color: [0.0; 3],
        };
        let text = "the quick brown fox jumps over the lazy dog ".repeat(20);
        let shaped = composer.shape(&text, Weight::Regular);
        let ranges = wrap(&shaped, 10.0, 200.0);
        assert!(ranges.len() > 5);
        for range in &ranges {
            let line: String = shaped[range.clone()].iter().map(|s| s.ch).collect();
            assert!(composer.text_width(&line, style) <= 200.0, "{line}");
            assert!(!line.starts_with(' ') && !line.ends_with(' '), "{line:?}");
        }
        let rejoined: Vec<String> = ranges
            .iter()
            .map(|r| shaped[r.clone()].iter().map(|s| s.ch).collect())
            .collect();
        assert_eq!(rejoined.join(" "), text.trim_end());
    }

    #[test]
    fn breaks_cjk_between_characters_and_long_words_anywhere() {
        let cjk = lines(&"欧阳娜娜".repeat(10), 10.0, 100.0);
        assert!(cjk.len() > 3);
        assert_eq!(cjk.concat(), "欧阳娜娜".repeat(10));

        let url = lines(
            "http://www.ama-assn.org/go/cpt/and/a/very/long/path",
            10.0,
            60.0,
        );
        assert!(url.len() > 2, "{url:?}");
        assert_eq!(
            url.concat(),
            "http://www.ama-assn.org/go/cpt/and/a/very/long/path"
        );
        // Breaks prefer the hyphen and slashes over splitting a word.
        assert!(url.contains(&"ama-".to_owned()), "{url:?}");
        assert!(
            url[2..url.len() - 1].iter().all(|l| l.ends_with('/')),
            "{url:?}"
        );
    }

    #[test]
    fn keeps_explicit_line_breaks() {
        assert_eq!(
            lines("one\ntwo\r\n\nthree", 10.0, 300.0),
            ["one", "two", "", "three"]
        );
    }
}
