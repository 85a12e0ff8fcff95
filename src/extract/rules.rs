//! The deterministic extractor: lexicons and patterns over the note, sentence by sentence.
//!
//! It reads what clinicians write in prior-authorization notes — "completed 8 weeks of PT",
//! "PT twice weekly since 3/2", "could not tolerate metformin (GI upset) in 2024", "denies
//! saddle anesthesia" — and keeps a fact only when it was done (not planned), present (not
//! denied) and about the patient (not the family). Every fact carries its span, so a reviewer
//! can see the words it came from. The evaluation set in `tests/fixtures/notes/` is the
//! measure of these rules (`fhirgate extract eval`).

mod lexicon;

use std::borrow::Cow;

use regex::Regex;

use super::{unit_days, Note, NoteFact};
use lexicon::{
    ADVERSE, CHECKBOX, CONDITIONAL, CUE_LINK, CUE_NEGATION, DATE, DOSE_AFTER, DRUGS, DURATION,
    FAILABLE, FAILURE, FAMILY, FREQUENCY_BEFORE, HOMEBOUND, HOMEBOUND_NEGATION, INTOLERANCE,
    LIST_ITEM, LIST_JOIN, LIST_NEGATION, NEGATION, NOT_ADVERSE_REASON, NOT_A_DURATION_AFTER,
    NOT_A_DURATION_BEFORE, NOT_THERAPY_AFTER, ONSET_AGO, PLANNED, POST_NEGATION, RECEIVED,
    RED_FLAGS, SCOPE_END, SINCE, STOPPED_FOR, SYMPTOM, THERAPIES, THERAPY_NEGATION,
};

/// A sentence-like piece of the note: `[start, end)` byte offsets.
type Span = (usize, usize);

/// Words whose period never ends a sentence ("Dr. Amsel", "e.g. ibuprofen").
const TITLES: [&str; 10] = ["dr", "mr", "mrs", "ms", "st", "vs", "approx", "e", "i", "g"];
/// Words whose period ends a sentence only before a capital ("b.i.d. with food").
const ABBREVIATIONS: [&str; 14] = [
    "etc", "no", "pt", "wk", "wks", "mo", "mos", "yr", "yrs", "hx", "p", "t", "b", "d",
];

/// How many bytes apart a duration and its therapy or symptom can be.
const REACH: usize = 60;

/// Bytes after which a segment ends at the next comma or space.
const MAX_SEGMENT: usize = 1000;

/// Sentences and list lines of `text`.
fn segments(text: &str) -> Vec<Span> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let end_here = match b {
            b'\n' | b';' | b'?' | b'!' => true,
            b'.' => {
                let next = bytes.get(i + 1).copied();
                let prev_word: String = text[start..i]
                    .rsplit(|c: char| !c.is_ascii_alphabetic())
                    .next()
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                let title = TITLES.contains(&prev_word.as_str());
                // "x 6 wks. Modified activity …": an abbreviation ends the sentence when a
                // capital follows it.
                let abbreviation = ABBREVIATIONS.contains(&prev_word.as_str())
                    && !text[i + 1..]
                        .trim_start()
                        .starts_with(|c: char| c.is_ascii_uppercase());
                next.is_none_or(|n| n.is_ascii_whitespace()) && !title && !abbreviation
            }
            // Work within a segment grows with its square; no real sentence is this long.
            b',' | b' ' | b'\t' => i - start >= MAX_SEGMENT,
            _ => false,
        };
        if end_here {
            if i > start {
                out.push((start, i));
            }
            start = i + 1;
        }
        i += 1;
    }
    if start < bytes.len() {
        out.push((start, bytes.len()));
    }
    out
}

/// The number `word` stands for, in tenths: "1.5 months" is 45 days.
fn tenths(word: &str) -> Option<u32> {
    const WORDS: &str = concat!(
        "one two three four five six seven eight nine ten eleven twelve ",
        "thirteen fourteen fifteen sixteen seventeen eighteen nineteen"
    );
    const TENS: &str = "twenty thirty forty fifty sixty";
    let word = word.to_ascii_lowercase();
    if word.contains("couple") {
        return Some(20);
    }
    if let Some(whole) = word.strip_suffix("1/2").or_else(|| word.strip_suffix('½')) {
        return tenths(whole.trim_end())?.checked_add(5);
    }
    // "the past week": the last word is the number.
    let last = word.split_whitespace().last().unwrap_or_default();
    let whole = if matches!(last, "a" | "an" | "past" | "last" | "previous") {
        Some(1)
    } else if let Some(p) = WORDS.split(' ').position(|w| w == last) {
        Some(p + 1)
    } else {
        TENS.split(' ').position(|w| w == last).map(|p| 20 + 10 * p)
    };
    if let Some(n) = whole {
        return u32::try_from(n).ok().map(|n| n * 10);
    }
    let (int, frac) = last.split_once('.').unwrap_or((last, "0"));
    let int: u32 = int.parse().ok()?;
    let frac: u32 = frac.get(..1)?.parse().ok()?;
    int.checked_mul(10)?.checked_add(frac)
}

fn month_number(name: &str) -> Option<u8> {
    let name = name.to_ascii_lowercase();
    let months = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    months
        .iter()
        .position(|m| name.starts_with(m))
        .and_then(|p| u8::try_from(p + 1).ok())
}

/// A duration in a segment: its span and days.
#[derive(Debug, Clone, Copy)]
struct Duration {
    start: usize,
    end: usize,
    days: u32,
    /// "3 months ago": the time since onset.
    ago: bool,
}

fn durations(text: &str, (from, to): Span, note_date: Option<time::Date>) -> Vec<Duration> {
    let piece = &text[from..to];
    let mut out = Vec::new();
    for m in DURATION.captures_iter(piece) {
        let whole = m.get(0).map_or(0..0, |g| g.range());
        let before = &piece[..whole.start];
        let after = &piece[whole.end..];
        if NOT_A_DURATION_BEFORE.is_match(before) || NOT_A_DURATION_AFTER.is_match(after) {
            continue;
        }
        // "2x/week", "3 times a week": frequencies, not durations ("x 6 wks" is one).
        if before.trim_end().ends_with('/') {
            continue;
        }
        let n_word = m.name("n").map_or("", |g| g.as_str());
        if (n_word.eq_ignore_ascii_case("a") || n_word.eq_ignore_ascii_case("an"))
            && FREQUENCY_BEFORE.is_match(before)
        {
            continue;
        }
        let Some(n) = tenths(n_word) else { continue };
        // A range counts its lower bound.
        let n = m
            .name("n2")
            .and_then(|g| tenths(g.as_str()))
            .map_or(n, |n2| n.min(n2));
        let unit = m.name("unit").map_or("", |g| g.as_str());
        let Some(days) = unit_days(n, unit).map(|tenth_days| tenth_days / 10) else {
            continue;
        };
        out.push(Duration {
            start: from + whole.start,
            end: from + whole.end,
            days,
            ago: ONSET_AGO.is_match(after),
        });
    }
    if let Some(today) = note_date {
        for m in SINCE.captures_iter(piece) {
            let whole = m.get(0).map_or(0..0, |g| g.range());
            let (month, day, year) = if let Some(month) = m.name("m") {
                (
                    month.as_str().parse::<u8>().ok(),
                    m.name("d").and_then(|d| d.as_str().parse::<u8>().ok()),
                    m.name("y").and_then(|y| y.as_str().parse::<i32>().ok()),
                )
            } else {
                (
                    m.name("month").and_then(|g| month_number(g.as_str())),
                    m.name("day").and_then(|d| d.as_str().parse::<u8>().ok()),
                    m.name("year").and_then(|y| y.as_str().parse::<i32>().ok()),
                )
            };
            let (Some(month), Some(day)) = (month, day) else {
                continue;
            };
            let year = year.map(|y| if y < 100 { 2000 + y } else { y });
            let Ok(month) = time::Month::try_from(month) else {
                continue;
            };
            let mut date = time::Date::from_calendar_date(year.unwrap_or(today.year()), month, day);
            if year.is_none() && date.is_ok_and(|d| d > today) {
                date = time::Date::from_calendar_date(today.year() - 1, month, day);
            }
            let Ok(date) = date else { continue };
            let days = (today - date).whole_days();
            if let Ok(days) = u32::try_from(days) {
                out.push(Duration {
                    start: from + whole.start,
                    end: from + whole.end,
                    days,
                    ago: false,
                });
            }
        }
    }
    out.sort_by_key(|d| d.start);
    out
}

/// The date in `span` nearest to `near`, normalised to `YYYY`, `YYYY-MM` or `YYYY-MM-DD`.
fn nearest_date(
    text: &str,
    (from, to): Span,
    near: Span,
    note_year: Option<i32>,
) -> Option<String> {
    let piece = &text[from..to];
    DATE.captures_iter(piece)
        .filter_map(|m| {
            let whole = m.get(0)?.range();
            let group = |name| m.name(name).map(|g| g.as_str());
            let number = |name| group(name).and_then(|g| g.parse::<u8>().ok());
            let (year, month, day) = if let Some(y) = group("range_end").or(group("year_only")) {
                (y.to_owned(), None, None)
            } else if let Some(y) = group("ry") {
                (y.to_owned(), number("rm"), number("rd"))
            } else if let Some(y) = group("iy") {
                (y.to_owned(), number("im"), number("id"))
            } else if let Some(y) = group("y") {
                (y.to_owned(), number("m"), number("d"))
            } else if let Some(y) = group("year") {
                (y.to_owned(), month_number(group("month")?), number("day"))
            } else {
                (
                    note_year?.to_string(),
                    month_number(group("bare_month")?),
                    None,
                )
            };
            let value = match (month, day) {
                (Some(month), Some(day)) => format!("{year}-{month:02}-{day:02}"),
                (Some(month), None) => format!("{year}-{month:02}"),
                _ => year,
            };
            let (s, e) = (from + whole.start, from + whole.end);
            // "metformin 2000 mg" is a dose, not a year.
            if DOSE_AFTER.is_match(&text[e..to]) {
                return None;
            }
            Some((gap((s, e), near), value))
        })
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, value)| value)
}

/// Bytes between two spans; 0 when they overlap.
fn gap(a: Span, b: Span) -> usize {
    a.0.saturating_sub(b.1).max(b.0.saturating_sub(a.1))
}

/// Whether the words just before `at` in the segment negate what is at `at`.
fn negated_before(text: &str, (from, _): Span, at: usize) -> bool {
    let before = &text[from..at];
    // The negation's reach ends at a clause break ("but", "however", …).
    let scope_start = SCOPE_END.find_iter(before).last().map_or(0, |m| m.end());
    NEGATION.is_match(&before[scope_start..])
}

fn negated_after(text: &str, end: usize, to: usize) -> bool {
    let mut stop = to.min(end + 20);
    while !text.is_char_boundary(stop) {
        stop -= 1;
    }
    POST_NEGATION.is_match(&text[end..stop])
}

/// Up to `bytes` of the text before `at`, not before `from`, on a character boundary.
fn window_before(text: &str, from: usize, at: usize, bytes: usize) -> &str {
    let mut start = from.max(at.saturating_sub(bytes));
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..at]
}

fn fact(
    note: &Note,
    kind: &str,
    value: Option<&str>,
    days: Option<u32>,
    date: Option<String>,
    start: usize,
    end: usize,
) -> NoteFact {
    NoteFact {
        kind: kind.into(),
        value: value.map(str::to_owned),
        days,
        date,
        text: note.text[start..end].to_owned(),
        note: note.reference.clone(),
        start,
        end,
    }
}

/// A treatment whose failure or intolerance the policies ask about, named in the note.
#[derive(Debug, Clone, Copy)]
struct Treatment {
    value: &'static str,
    start: usize,
    end: usize,
    /// One of [`DRUGS`], rather than a [`FAILABLE`] treatment.
    drug: bool,
}

fn treatments(text: &str, (from, to): Span) -> Vec<Treatment> {
    let piece = &text[from..to];
    let named = DRUGS
        .iter()
        .map(|d| (d, true))
        .chain(FAILABLE.iter().map(|f| (f, false)));
    let mut out: Vec<Treatment> = named
        .flat_map(|((value, pattern), drug)| {
            pattern.find_iter(piece).map(move |m| Treatment {
                value,
                start: from + m.start(),
                end: from + m.end(),
                drug,
            })
        })
        .collect();
    out.sort_by_key(|t| t.start);
    out
}

/// How far a cue is from a treatment it may be about, or `None` when it cannot be about it.
fn cue_distance(text: &str, cue: Span, t: &Treatment, forward_only: bool) -> Option<usize> {
    if t.end <= cue.0 {
        (!forward_only).then_some(cue.0 - t.end)
    } else if t.start >= cue.1 {
        let between = &text[cue.1..t.start];
        // "GI upset, now on ibuprofen": punctuation ends what a cue reaches forwards to.
        if between.contains([',', ';', ':', '(', ')']) {
            return None;
        }
        // A cue usually follows its treatment ("PT with no improvement"); it reaches as far
        // forwards only through a preposition ("intolerant of metformin") or "despite".
        Some(if forward_only || CUE_LINK.is_match(between) {
            between.len()
        } else {
            2 * between.len()
        })
    } else {
        Some(0)
    }
}

/// `chosen` and the treatments listed with it: "refractory to PT and NSAIDs".
fn listed_with(text: &str, all: &[Treatment], chosen: Treatment) -> Vec<Treatment> {
    let Some(i) = all.iter().position(|t| t.start == chosen.start) else {
        return vec![chosen];
    };
    let joined = |a: &Treatment, b: &Treatment| {
        a.end <= b.start && LIST_JOIN.is_match(&text[a.end..b.start])
    };
    let mut lo = i;
    while lo > 0 && joined(&all[lo - 1], &all[lo]) {
        lo -= 1;
    }
    let mut hi = i;
    while hi + 1 < all.len() && joined(&all[hi], &all[hi + 1]) {
        hi += 1;
    }
    all[lo..=hi].to_vec()
}

/// Whether the reason after "stopped because" is a reaction to the drug, not the kidneys, the
/// cost or how well it worked; a side effect named first ("nausea, which improved") is one.
fn adverse_reason(reason: &str) -> bool {
    NOT_ADVERSE_REASON.find(reason).is_none_or(|other| {
        ADVERSE
            .find(reason)
            .is_some_and(|adverse| adverse.end() <= other.end())
    })
}

/// Intolerances and failures in one clause. Each cue belongs to the treatment nearest it, so
/// "lisinopril caused angioedema, on metformin" does not make metformin an intolerance. A
/// clause with a cue and no treatment continues the clause before it (`previous`, when only a
/// semicolon separates them): "Took ibuprofen for 2 weeks; stopped because of heartburn".
/// `text` is the note as read, with unticked boxes blanked.
fn treatment_facts(
    note: &Note,
    text: &str,
    span: Span,
    previous: Option<Span>,
    out: &mut Vec<(NoteFact, u8)>,
) {
    let (from, to) = span;
    let piece = &text[from..to];
    let year = note.date.map(|d| d.year());
    // (kind, cue, whether a reason follows it, strength: a statement beats a side effect)
    let cues: [(&str, &Regex, bool, u8); 4] = [
        ("intolerance", &INTOLERANCE, false, 2),
        ("intolerance", &STOPPED_FOR, true, 2),
        ("intolerance", &ADVERSE, false, 1),
        ("treatment_failure", &FAILURE, false, 0),
    ];
    let mut here: Option<Vec<Treatment>> = None;
    for (kind, pattern, has_reason, strength) in cues {
        for cue in pattern.find_iter(piece) {
            let (cs, ce) = (from + cue.start(), from + cue.end());
            if CUE_NEGATION.is_match(window_before(text, from, cs, 25))
                || (has_reason && !adverse_reason(&text[ce..to]))
            {
                continue;
            }
            let here = here.get_or_insert_with(|| treatments(text, span));
            // Only drugs, and CPAP, are tolerated or not; "NSAIDs (intolerance)" names a class.
            let eligible =
                |t: &Treatment| kind == "treatment_failure" || t.drug || t.value == "cpap";
            let forward_only = cue.as_str().eq_ignore_ascii_case("despite");
            let nearest = here
                .iter()
                .filter(|t| eligible(t))
                .filter_map(|t| Some((cue_distance(text, (cs, ce), t, forward_only)?, *t)))
                .min_by_key(|(distance, _)| *distance);
            let (chosen, listed, t_span) = match (nearest, previous) {
                (Some((_, t)), _) => (t, listed_with(text, here, t), span),
                (None, Some(p)) if !forward_only => {
                    let before = treatments(text, p);
                    let Some(t) = before.iter().rev().find(|t| eligible(t)).copied() else {
                        continue;
                    };
                    (t, listed_with(text, &before, t), p)
                }
                _ => continue,
            };
            // The date nearest the cue in its clause, else the one nearest the treatment.
            let date = nearest_date(text, span, (cs, ce), year).or_else(|| {
                (t_span != span)
                    .then(|| nearest_date(text, t_span, (chosen.start, chosen.end), year))
                    .flatten()
            });
            for t in listed.into_iter().filter(eligible) {
                // CPAP that is not tolerated has failed, as the policies count it.
                let kind = if t.drug { kind } else { "treatment_failure" };
                let f = fact(
                    note,
                    kind,
                    Some(t.value),
                    None,
                    date.clone(),
                    t.start.min(cs),
                    t.end.max(ce),
                );
                out.push((f, strength));
            }
        }
    }
}

/// The note with the item of every unticked box ("[ ] Fever", "☐ PT") blanked byte for byte,
/// so that nothing in it counts and every offset still points into the note.
fn without_unticked(text: &str) -> Cow<'_, str> {
    let boxes: Vec<(usize, usize, bool)> = CHECKBOX
        .captures_iter(text)
        .filter_map(|m| {
            let whole = m.get(0)?;
            Some((whole.start(), whole.end(), m.name("unticked").is_some()))
        })
        .collect();
    if !boxes.iter().any(|b| b.2) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut kept = 0;
    for (i, &(start, end, unticked)) in boxes.iter().enumerate() {
        if !unticked {
            continue;
        }
        // The item runs to the next box or the end of the line, whichever comes first.
        let next_box = boxes.get(i + 1).map_or(text.len(), |b| b.0);
        let item_end = text[end..next_box].find('\n').map_or(next_box, |p| end + p);
        out.push_str(&text[kept..start]);
        out.extend(std::iter::repeat_n(' ', item_end - start));
        kept = item_end;
    }
    out.push_str(&text[kept..]);
    Cow::Owned(out)
}

/// "Denies the following:", "Red flags - none of:": a header whose list below it is denied.
fn negates_list(piece: &str) -> bool {
    let piece = piece.trim_end();
    let scope = SCOPE_END.find_iter(piece).last().map_or(0, |m| m.end());
    piece.ends_with(':') && LIST_NEGATION.is_match(&piece[scope..])
}

/// All the facts of one note.
pub fn extract(note: &Note) -> Vec<NoteFact> {
    let read = without_unticked(&note.text);
    let text = read.as_ref();
    // Each fact with how strongly it is stated, to choose among repeats.
    let mut facts: Vec<(NoteFact, u8)> = Vec::new();
    let mut symptom: Option<NoteFact> = None;
    let mut previous: Option<Span> = None;
    // Under "Denies:" each list item is denied, up to the first line that is not an item.
    let mut denied_list = false;
    for span in segments(text) {
        let (from, to) = span;
        let piece = &text[from..to];
        let after_semicolon = from > 0 && text.as_bytes()[from - 1] == b';';
        let clause_before = previous.filter(|_| after_semicolon);
        previous = Some(span);
        if piece.trim().is_empty() {
            continue;
        }
        let line_start = from == 0 || text.as_bytes()[from - 1] == b'\n';
        if line_start && !LIST_ITEM.is_match(piece) {
            denied_list = false;
        }
        let denied = denied_list;
        denied_list |= negates_list(piece);
        let family = FAMILY.is_match(piece);
        let durations = durations(text, span, note.date);
        // Therapy mentions in this segment.
        let mut mentions: Vec<(&str, usize, usize)> = Vec::new();
        for (value, pattern) in THERAPIES.iter() {
            for m in pattern.find_iter(piece) {
                let (s, e) = (from + m.start(), from + m.end());
                if !NOT_THERAPY_AFTER.is_match(&text[e..to]) {
                    mentions.push((value, s, e));
                }
            }
        }
        mentions.sort_by_key(|m| m.1);
        // Each duration belongs to the closest therapy or symptom; "8 weeks of PT" binds
        // forwards, "PT x 8 weeks" backwards.
        let symptom_anchors: Vec<(usize, usize)> = SYMPTOM
            .find_iter(piece)
            .map(|m| (from + m.start(), from + m.end()))
            .collect();
        let mut therapy_days: Vec<Option<(u32, usize, usize)>> = vec![None; mentions.len()];
        // The symptom duration of this segment: the one closest to its symptom.
        let mut segment_symptom: Option<(usize, NoteFact)> = None;
        for d in &durations {
            // A duration binds across no other duration: "over 6 weeks and 4 weeks of chiro".
            // The durations are in order, so only those from `lo` on need a look.
            let crosses = |lo: usize, hi: usize| {
                let first = durations.partition_point(|o| o.start < lo);
                durations[first..]
                    .iter()
                    .take_while(|o| o.start <= hi)
                    .any(|o| o.end <= hi && o.start != d.start)
            };
            let distance = |s: usize, e: usize| {
                if e <= d.start {
                    if crosses(e, d.start) {
                        usize::MAX
                    } else {
                        d.start - e
                    }
                } else if s >= d.end {
                    if crosses(d.end, s) {
                        usize::MAX
                    } else {
                        // "8 weeks of PT": a short forward link is the usual way to write it.
                        (s - d.end).saturating_sub(2)
                    }
                } else {
                    0
                }
            };
            // "PT for 6 weeks, HEP daily": a therapy after a comma is not what lasted 6 weeks.
            let therapy_distance = |s: usize, e: usize| {
                let distance = distance(s, e);
                // Only a therapy within reach is looked at, so a long sentence costs no more.
                let punctuated = distance < REACH
                    && s >= d.end
                    && text[d.end..s].contains([',', ';', ':', '(', ')']);
                if punctuated {
                    usize::MAX
                } else {
                    distance
                }
            };
            let best_therapy = mentions
                .iter()
                .enumerate()
                .map(|(i, m)| (therapy_distance(m.1, m.2), i))
                .min();
            let best_symptom = symptom_anchors
                .iter()
                .map(|a| (distance(a.0, a.1), *a))
                .min();
            match (best_therapy, best_symptom) {
                (Some((dt, i)), ds) if !d.ago && ds.is_none_or(|ds| dt <= ds.0) && dt < REACH => {
                    let (_, s, e) = mentions[i];
                    let start = s.min(d.start);
                    let end = e.max(d.end);
                    if therapy_days[i].is_none_or(|(days, _, _)| d.days > days) {
                        therapy_days[i] = Some((d.days, start, end));
                    }
                }
                (_, Some((ds, anchor)))
                    if ds < REACH
                        && !family
                        && segment_symptom.as_ref().is_none_or(|(best, _)| ds < *best) =>
                {
                    let start = anchor.0.min(d.start);
                    let end = anchor.1.max(d.end);
                    let f = fact(
                        note,
                        "symptom_duration",
                        None,
                        Some(d.days),
                        None,
                        start,
                        end,
                    );
                    segment_symptom = Some((ds, f));
                }
                _ => {}
            }
        }
        if symptom.is_none() {
            symptom = segment_symptom.map(|(_, f)| f);
        }
        let received = !mentions.is_empty() && RECEIVED.is_match(piece);
        for (i, (value, s, e)) in mentions.iter().enumerate() {
            let before = window_before(text, from, *s, 40);
            let negated = THERAPY_NEGATION.find_iter(before).last().is_some_and(|m| {
                let between = &before[m.end()..];
                !between.to_ascii_lowercase().contains("improv")
                    && !between.contains("relief")
                    && !between.contains("benefit")
            });
            // "If no improvement after 6 weeks of PT, …" is a hypothetical.
            if negated || denied || CONDITIONAL.is_match(before) {
                continue;
            }
            let planned_before = PLANNED.is_match(before);
            let with_days = therapy_days[i];
            let counts = match (planned_before, received) {
                (true, false) => false,
                (true, true) => {
                    // Both a plan and a history in one sentence: the cue nearest the mention wins.
                    let plan_at = PLANNED.find_iter(before).last().map_or(0, |m| m.end());
                    let received_at = RECEIVED
                        .find_iter(&text[from..*e])
                        .last()
                        .map_or(0, |m| m.end());
                    received_at > plan_at || with_days.is_some_and(|_| received_at > 0)
                }
                (false, true) => true,
                (false, false) => with_days.is_some(),
            };
            if !counts {
                continue;
            }
            let (days, start, end) = match with_days {
                Some((days, start, end)) => (Some(days), start, end),
                None => (None, *s, *e),
            };
            let f = fact(
                note,
                "conservative_therapy",
                Some(value),
                days,
                None,
                start,
                end,
            );
            facts.push((f, 0));
        }
        if !family {
            for (value, pattern) in RED_FLAGS.iter() {
                for m in pattern.find_iter(piece) {
                    let (s, e) = (from + m.start(), from + m.end());
                    if denied || negated_before(text, span, s) || negated_after(text, e, to) {
                        continue;
                    }
                    facts.push((fact(note, "red_flag", Some(value), None, None, s, e), 0));
                }
            }
            treatment_facts(note, text, span, clause_before, &mut facts);
        }
        for m in HOMEBOUND.find_iter(piece) {
            let (s, e) = (from + m.start(), from + m.end());
            if HOMEBOUND_NEGATION.is_match(&text[from..s]) {
                continue;
            }
            facts.push((fact(note, "homebound", None, None, None, s, e), 0));
        }
    }
    facts.extend(symptom.map(|f| (f, 0)));
    dedupe(facts)
}

/// One fact per kind and value: the longest duration, then a dated one over an undated one,
/// then the most explicit statement, the first otherwise.
fn dedupe(facts: Vec<(NoteFact, u8)>) -> Vec<NoteFact> {
    let rank = |(f, strength): &(NoteFact, u8)| (f.days.unwrap_or(0), f.date.is_some(), *strength);
    let mut out: Vec<(NoteFact, u8)> = Vec::new();
    for found in facts {
        let same =
            |(f, _): &&mut (NoteFact, u8)| f.kind == found.0.kind && f.value == found.0.value;
        match out.iter_mut().find(same) {
            Some(kept) if rank(&found) > rank(kept) => *kept = found,
            Some(_) => {}
            None => out.push(found),
        }
    }
    out.into_iter().map(|(f, _)| f).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kind, value, days and date of a fact.
    type Summary = (String, Option<String>, Option<u32>, Option<String>);

    fn run(text: &str) -> Vec<Summary> {
        let note = Note {
            reference: "DocumentReference/1".into(),
            text: text.into(),
            date: time::Date::from_calendar_date(2026, time::Month::May, 4).ok(),
        };
        let facts = extract(&note);
        for f in &facts {
            assert_eq!(&text[f.start..f.end], f.text, "spans point at the text");
        }
        facts
            .into_iter()
            .map(|f| (f.kind, f.value, f.days, f.date))
            .collect()
    }

    fn has(facts: &[Summary], kind: &str, value: Option<&str>, days: Option<u32>) -> bool {
        facts
            .iter()
            .any(|f| f.0 == kind && f.1.as_deref() == value && f.2 == days)
    }

    #[test]
    fn therapy_and_its_duration() {
        let facts = run("Low back pain for 3 months. Completed 8 weeks of PT with minimal relief.");
        assert!(
            has(
                &facts,
                "conservative_therapy",
                Some("physical_therapy"),
                Some(56)
            ),
            "{facts:?}"
        );
        assert!(has(&facts, "symptom_duration", None, Some(90)), "{facts:?}");
        let facts = run("PT twice weekly since 3/2.");
        assert!(
            has(
                &facts,
                "conservative_therapy",
                Some("physical_therapy"),
                Some(63)
            ),
            "{facts:?}"
        );
    }

    #[test]
    fn plans_and_denials_are_not_facts() {
        let facts = run("Will start PT next week. Denies saddle anesthesia, bowel or bladder incontinence. No history of cancer.");
        assert!(facts.is_empty(), "{facts:?}");
        let facts = run("Family history: mother with breast cancer.");
        assert!(facts.is_empty(), "{facts:?}");
    }

    #[test]
    fn intolerance_with_its_date() {
        let facts = run("Metformin stopped due to diarrhea in 03/2025.");
        assert!(
            facts.iter().any(|f| f.0 == "intolerance"
                && f.1.as_deref() == Some("metformin")
                && f.3.as_deref() == Some("2025-03")),
            "{facts:?}"
        );
    }

    /// The facts of `text`, sorted, as `kind:value 42d @2025-03`.
    fn summary(text: &str) -> Vec<String> {
        let mut out: Vec<String> = run(text)
            .into_iter()
            .map(|(kind, value, days, date)| {
                let mut s = kind;
                if let Some(value) = value {
                    s.push(':');
                    s.push_str(&value);
                }
                if let Some(days) = days {
                    s.push_str(&format!(" {days}d"));
                }
                if let Some(date) = date {
                    s.push_str(&format!(" @{date}"));
                }
                s
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn durations_bind_to_their_own_therapy() {
        assert_eq!(
            summary("PT 2x/week for 6 weeks, HEP daily x 3 months."),
            [
                "conservative_therapy:home_exercise 90d",
                "conservative_therapy:physical_therapy 42d"
            ]
        );
        assert_eq!(
            summary("Completed 10 PT visits over 4 weeks and 3 weeks of chiropractic care."),
            [
                "conservative_therapy:chiropractic 21d",
                "conservative_therapy:physical_therapy 28d"
            ]
        );
        // The period after "wks" ends the sentence, so 3 weeks stays with the brace.
        assert_eq!(
            summary("Wore a wrist splint x 3 wks. Modified duty since 4/20."),
            [
                "conservative_therapy:activity_modification 14d",
                "conservative_therapy:bracing 21d"
            ]
        );
        assert_eq!(
            summary("Has been on naproxen for the past week. Did 6 weeks of PT last year."),
            [
                "conservative_therapy:nsaids 7d",
                "conservative_therapy:physical_therapy 42d"
            ]
        );
    }

    #[test]
    fn current_use_counts_and_handouts_and_hypotheticals_do_not() {
        assert_eq!(
            summary("Takes celecoxib 200 mg daily. Limiting activity at work."),
            [
                "conservative_therapy:activity_modification",
                "conservative_therapy:nsaids"
            ]
        );
        assert!(summary("Gave her a PT handout.").is_empty());
        assert!(summary("If no improvement after 6 weeks of PT, will image.").is_empty());
    }

    #[test]
    fn each_cue_belongs_to_the_nearest_drug() {
        assert_eq!(
            summary("HTN (lisinopril gave him a cough in 2022), also on metformin."),
            ["intolerance:lisinopril @2022"]
        );
        assert_eq!(
            summary("Intolerant of metformin and gabapentin."),
            ["intolerance:gabapentin", "intolerance:metformin"]
        );
        // "despite" looks forward, so folic acid did not fail; methotrexate was not tolerated.
        assert_eq!(
            summary("Methotrexate stopped in 2024 due to nausea despite folic acid."),
            ["intolerance:methotrexate @2024"]
        );
    }

    #[test]
    fn intolerance_needs_a_side_effect_reason() {
        assert_eq!(
            summary("Took naproxen for 3 weeks; stopped due to heartburn."),
            ["conservative_therapy:nsaids 21d", "intolerance:naproxen"]
        );
        assert!(summary("Naproxen stopped because of her CKD.").is_empty());
        assert!(summary("Metformin held for contrast.").is_empty());
        // A class is not a drug, and not tolerating it is not a failure.
        assert!(summary("Avoid NSAIDs (intolerance).").is_empty());
    }

    #[test]
    fn dates_nearest_the_cue_and_in_words() {
        assert_eq!(
            summary("Gabapentin started 01/2023, stopped 06/2023 because of dizziness."),
            ["intolerance:gabapentin @2023-06"]
        );
        assert_eq!(
            summary("Metformin was stopped in July due to diarrhea."),
            ["intolerance:metformin @2026-07"]
        );
        assert_eq!(
            summary("Sulfasalazine 2019-2022 - failed."),
            ["treatment_failure:sulfasalazine @2022"]
        );
        assert_eq!(
            summary("CPAP failure documented in October 2025."),
            ["treatment_failure:cpap @2025-10"]
        );
        assert_eq!(
            summary("A1c 9% despite metformin 2000 mg daily."),
            ["treatment_failure:metformin"]
        );
    }

    #[test]
    fn red_flags_as_clinicians_write_them() {
        assert_eq!(
            summary("Weakness has progressed to the ankle. Progressive bilateral sensory loss."),
            ["red_flag:progressive_neurological_deficit"]
        );
        assert_eq!(
            summary("Hx of melanoma, excised 2015."),
            ["red_flag:malignancy"]
        );
        assert!(summary("- Fever/chills: no\n- Weight loss: no").is_empty());
        assert!(summary("Call if new weakness or fever.").is_empty());
        assert!(summary("Cancer screening up to date.").is_empty());
    }

    #[test]
    fn the_symptom_duration_nearest_its_symptom() {
        assert_eq!(
            summary("Last drink 2 days ago, back pain for 9 days."),
            ["symptom_duration 9d"]
        );
        assert_eq!(
            summary("Chronic LBP for 6 months."),
            ["symptom_duration 180d"]
        );
    }

    #[test]
    fn huge_notes_are_read_in_linear_time() {
        let text = "Patient reports low back pain. ".repeat(170_000);
        assert!(text.len() > 5_000_000);
        let note = Note {
            reference: "DocumentReference/1".into(),
            text,
            date: None,
        };
        let facts = extract(&note);
        assert!(facts.is_empty(), "{facts:?}");
        // One endless sentence is cut into pieces rather than scanned against itself.
        let text =
            "metformin caused nausea, PT for 3 weeks, no fever, pain for 2 days, ".repeat(20_000);
        let note = Note {
            reference: "DocumentReference/1".into(),
            text,
            date: None,
        };
        assert_eq!(extract(&note).len(), 3);
        // So is one endless line of tick boxes.
        let text = "[ ] Fever [x] PT x 3 weeks [ ] History of cancer ".repeat(110_000);
        assert!(text.len() > 5_000_000);
        let note = Note {
            reference: "DocumentReference/1".into(),
            text,
            date: None,
        };
        let facts = extract(&note);
        assert_eq!(facts.len(), 1, "{facts:?}");
    }

    #[test]
    fn unticked_boxes_are_not_facts() {
        assert_eq!(
            summary(
                "[x] Physical therapy  Duration: 6 weeks\n[ ] Chiropractic  Duration: 4 weeks\n\
                 [ ] Fever  [x] History of cancer  [] Fracture\n☐ Saddle anesthesia"
            ),
            [
                "conservative_therapy:physical_therapy 42d",
                "red_flag:malignancy"
            ]
        );
        assert_eq!(
            summary("Metformin:  [x] Inadequate response  [ ] Intolerance  [ ] Contraindication"),
            ["treatment_failure:metformin"]
        );
    }

    #[test]
    fn a_denying_header_covers_the_list_under_it() {
        assert_eq!(
            summary(
                "Red flags - none of the following:\n- saddle anesthesia\n- fever\n\
                     Exam: foot drop on the left."
            ),
            ["red_flag:progressive_neurological_deficit"]
        );
        assert_eq!(
            summary("ROS negative except:\n- fever\n- weight loss"),
            ["red_flag:infection"]
        );
    }

    #[test]
    fn durations_as_clinicians_abbreviate_them() {
        assert_eq!(summary("Knee pain x3 months."), ["symptom_duration 90d"]);
        assert_eq!(
            summary("Back pain for about 1.5 years."),
            ["symptom_duration 547d"]
        );
        assert_eq!(
            summary("Neck pain x 2 1/2 weeks."),
            ["symptom_duration 17d"]
        );
        assert_eq!(
            summary("Symptoms for a couple of weeks."),
            ["symptom_duration 14d"]
        );
        // "Twice a week" is how often; the time is counted from the date.
        assert_eq!(
            summary("Goes to physical therapy twice a week since 4/20."),
            ["conservative_therapy:physical_therapy 14d"]
        );
    }

    #[test]
    fn activity_changes_and_exercises_at_home() {
        assert_eq!(
            summary("Stopped jogging since 4/1. On light duty at work for 5 weeks."),
            ["conservative_therapy:activity_modification 35d"]
        );
        assert_eq!(
            summary("Does heel slides and bridges at home daily x 2 months."),
            ["conservative_therapy:home_exercise 60d"]
        );
        assert_eq!(
            summary("Performs HEP."),
            ["conservative_therapy:home_exercise"]
        );
        assert!(summary("Recommend light duty for 2 weeks.").is_empty());
    }

    #[test]
    fn side_effects_in_plain_words() {
        assert_eq!(
            summary("Gabapentin caused brain fog and unsteadiness."),
            ["intolerance:gabapentin"]
        );
        assert_eq!(
            summary("Stopped naproxen because it was giving him stomach pain."),
            ["intolerance:naproxen"]
        );
        assert_eq!(
            summary("SSZ 2020-2022: discontinued in 2022 after urticaria."),
            ["intolerance:sulfasalazine @2022"]
        );
        // A range of months is dated by its end, like a range of years.
        assert_eq!(
            summary("Methotrexate 01/2024 - 06/2024; stopped for mouth sores."),
            ["intolerance:methotrexate @2024-06"]
        );
        // Stopping because it did not work is a failure, not an intolerance.
        assert_eq!(
            summary("Metformin stopped because it did not help."),
            ["treatment_failure:metformin"]
        );
        assert_eq!(
            summary("NSAIDs x 3 wks without any relief."),
            [
                "conservative_therapy:nsaids 21d",
                "treatment_failure:nsaids"
            ]
        );
    }

    #[test]
    fn relatives_are_family_history_only_with_what_they_had() {
        assert_eq!(
            summary("Seen with his daughter for back pain for 2 weeks."),
            ["symptom_duration 14d"]
        );
        assert!(summary("Sister had an osteosarcoma at 15.").is_empty());
        assert!(summary("FHx: father w/ prostate cancer.").is_empty());
    }
}
