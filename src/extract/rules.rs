//! The deterministic extractor: lexicons and patterns over the note, sentence by sentence.
//!
//! It reads what clinicians write in prior-authorization notes — "completed 8 weeks of PT",
//! "PT twice weekly since 3/2", "could not tolerate metformin (GI upset) in 2024", "denies
//! saddle anesthesia" — and keeps a fact only when it was done (not planned), present (not
//! denied) and about the patient (not the family). Every fact carries its span, so a reviewer
//! can see the words it came from. The evaluation set in `tests/fixtures/notes/` is the
//! measure of these rules (`fhirgate extract eval`).

use std::sync::LazyLock;

use regex::Regex;

use super::{unit_days, Note, NoteFact};

/// A sentence-like piece of the note: `[start, end)` byte offsets.
type Span = (usize, usize);

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).unwrap_or_else(|e| panic!("bad built-in pattern {pattern}: {e}"))
}

fn lexicon(entries: &[(&'static str, &str)]) -> Vec<(&'static str, Regex)> {
    entries
        .iter()
        .map(|(value, pattern)| (*value, re(pattern)))
        .collect()
}

// "for the past week" is one week; "last year" alone is when, not how long.
const NUMBER: &str = r"\d{1,3}|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|a|an|the\s+(?:past|last|previous)";
const UNIT: &str = r"days?|weeks?|wks?|months?|mos?|years?|yrs?";

static DURATION: LazyLock<Regex> = LazyLock::new(|| {
    re(&format!(
        r"\b(?P<n>{NUMBER})(?:\s*(?:-|to|or)\s*(?P<n2>{NUMBER}))?(?:\s*\+)?[\s-]*(?P<unit>{UNIT})\b"
    ))
});
static SINCE: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"\bsince\s+(?:(?P<m>\d{1,2})/(?P<d>\d{1,2})(?:/(?P<y>\d{2,4}))?|(?P<month>jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?\s+(?P<day>\d{1,2})(?:st|nd|rd|th)?(?:,?\s+(?P<year>\d{4}))?)\b",
    )
});
// A year range ("2019-2024") is dated by its end, when the treatment stopped; a month named
// alone ("in September") is in the note's year. "May" alone is too often the verb.
static DATE: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:(?:19|20)\d{2}\s*(?:-|to)\s*(?P<range_end>(?:19|20)\d{2})|(?P<iy>(?:19|20)\d{2})-(?P<im>\d{2})(?:-(?P<id>\d{2}))?|(?P<m>\d{1,2})/(?:(?P<d>\d{1,2})/)?(?P<y>(?:19|20)\d{2})|(?P<month>jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?\s+(?:(?P<day>\d{1,2}),?\s+)?(?P<year>(?:19|20)\d{2})|(?P<bare_month>january|february|march|april|june|july|august|september|october|november|december)|(?P<year_only>(?:19|20)\d{2}))\b",
    )
});

static DOSE_AFTER: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?i)^\s*(?:mg|mcg|g|ml|units?|u|iu|%)(?:\W|$)"));

/// Therapies that count as conservative care, by the value the policies use.
static THERAPIES: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    lexicon(&[
        (
            "physical_therapy",
            r"(?i:\bphysical therapy\b|\bphysiotherapy\b|\bphysical therapist\b)|\bP\.?T\b",
        ),
        (
            "chiropractic",
            r"(?i)\bchiropract\w*|\bspinal manipulation\b|\bmanipulative therapy\b",
        ),
        (
            "home_exercise",
            r"(?i)\bhome exercises?(?: program)?\b|\bHEP\b|\bhome stretching\b|\bhome (?:strengthening|stretching) program\b",
        ),
        (
            "nsaids",
            r"(?i)\bnsaids?\b|\bibuprofen\b|\bnaproxen\b|\bmeloxicam\b|\bdiclofenac\b|\bcelecoxib\b|\bmotrin\b|\baleve\b|\badvil\b|\bnabumetone\b|\banti-?inflammator(?:y|ies)\b",
        ),
        (
            "bracing",
            r"(?i)\bbrac(?:e|es|ed|ing)\b|\bknee sleeve\b|\bunloader\b|\blumbar support\b|\bsplint(?:ing)?\b",
        ),
        (
            "activity_modification",
            r"(?i)\bactivity modifications?\b|\bmodified (?:activity|activities|duty)\b|\bactivity restrictions?\b|\brelative rest\b|\bavoid(?:s|ing|ed)? (?:aggravating|provocative) activit\w*|\bavoid(?:s|ing|ed)? (?:heavy )?(?:lifting|bending|twisting|running|jumping|kneeling|squatting|high-impact|impact|sports)\b|\blimit(?:s|ing|ed)? (?:\w+ )?activit(?:y|ies)\b",
        ),
    ])
});

static PLANNED: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:will|would|plan(?:s|ned)?|planning|refer(?:red|ral|ring)?|recommend(?:ed|s)?|consider(?:ing)?|schedul\w*|order(?:ed|ing)?|prescrib\w*|start(?:ing)?|begin|initiate|candidate|discussed|advised|encouraged|to try|to start|next step|if no|may benefit|should)\b",
    )
});
static RECEIVED: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:takes|uses|wears|does|(?:is|was|been|remains) on|managed|treated with|completed|complete|has (?:done|had|tried|been|completed|used|worn|attended|taken|participated)|had|tried|trialed|underwent|attended|participated|since|previously|prior|failed|despite|continues|continued|ongoing|currently|did|took|wore|used|using|wearing|taking|doing|limiting|avoiding|performing|finished|received|went through|course of|sessions|weeks of|months of|with (?:minimal|partial|no|some|little|temporary)|after)\b",
    )
});
/// "PT handout", "HEP sheet": the therapy names a document or an order, not care received.
static NOT_THERAPY_AFTER: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)^\s*(?:handouts?|sheets?|printouts?|instructions|eval(?:uation)?s?|referrals?|consults?|orders?|prescriptions?|scripts?)\b",
    )
});
static CONDITIONAL: LazyLock<Regex> = LazyLock::new(|| re(r"(?i)\b(?:if|unless)\b"));
static THERAPY_NEGATION: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:no|never|declined|not yet|hasn't|has not|have not|had not|did not|didn't|not|without|denies)\b",
    )
});

/// Red flags that justify imaging without conservative care first.
static RED_FLAGS: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    lexicon(&[
        (
            "cauda_equina",
            r"(?i)\bsaddle (?:an(?:a)?esthesia|numbness|paresthesias?|hypoesthesia)\b|\bcauda equina\b|\b(?:bowel|bladder|bowel/bladder|bowel or bladder|bowel and bladder) (?:incontinence|dysfunction|retention|control loss)\b|\burinary (?:retention|incontinence)\b|\b(?:incontinence|loss of control) of (?:bowel|bladder|urine|stool)\b|\bfecal incontinence\b|\bnew(?:-onset)? incontinence\b|\bpost-?void residual\b",
        ),
        (
            "malignancy",
            r"(?i)\bcancer\b|\b\w*carcinoma\b|\bmelanoma\b|\bglioma\b|\bmesothelioma\b|\bmalignan\w*|\bmetasta\w*|\blymphoma\b|\bmyeloma\b|\bsarcoma\b|\bleuk(?:a)?emia\b|\bneoplasm\b",
        ),
        ("fracture", r"(?i)\bfractures?\b|\bfx\b"),
        (
            "progressive_neurological_deficit",
            r"(?i)\bfoot drop\b|\b(?:progressive|progressing|worsening|increasing|new)\s+(?:\w+\s+){0,2}?(?:weakness|numbness|neurologic(?:al)? deficits?|deficits?|paresis|sensory loss)\b|\b(?:weakness|numbness|sensory loss|deficits?) (?:is |has |have |has been |that is )?(?:progressive|progress(?:ed|ing)|worse(?:ned|ning)|getting worse|spread(?:ing)?)\b|\bprogressive neurologic\w*",
        ),
        (
            "infection",
            r"(?i)\bepidural abscess\b|\bosteomyelitis\b|\bdiscitis\b|\bspinal infection\b|\b(?:iv|intravenous|injection) drug use\b|\bivdu\b|\bfevers?\b",
        ),
    ])
});
static NEGATION: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:no|not|denies|denied|deny|denying|without|negative for|neg for|free of|absence of|ruled out|rules out|r/o|rule out|never|none|resolved|screening|screen|if)\b",
    )
});
// "Fever/chills: no": a screening line answers for every finding before its colon.
static POST_NEGATION: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)^(?:[^:.;\n]{0,20}:)?[\s:,-]*(?:\(?-\)?|none|no\b|denied|denies|negative|neg\b|absent|ruled out|not present|not seen|unlikely|screening\b)",
    )
});
static SCOPE_END: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:but|however|although|though|except|reports|endorses|with new|positive for|notable for)\b",
    )
});
static FAMILY: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:family history|fhx|fh:|mother|father|sister|brother|aunt|uncle|grand(?:mother|father|parent)|sibling|cousin|daughter|son)\b",
    )
});

/// Medications whose intolerance or failure the policies ask about.
static DRUGS: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    lexicon(&[
        ("metformin", r"(?i)\bmetformin\b|\bglucophage\b"),
        ("methotrexate", r"(?i)\bmethotrexate\b|\bMTX\b"),
        ("ibuprofen", r"(?i)\bibuprofen\b|\bmotrin\b|\badvil\b"),
        ("naproxen", r"(?i)\bnaproxen\b|\baleve\b|\bnaprosyn\b"),
        ("gabapentin", r"(?i)\bgabapentin\b|\bneurontin\b"),
        ("sulfasalazine", r"(?i)\bsulfasalazine\b|\bazulfidine\b"),
        ("lisinopril", r"(?i)\blisinopril\b"),
    ])
});
/// Treatments that can fail but are not drugs of the list above.
static FAILABLE: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    lexicon(&[
        ("cpap", r"(?i)\b(?:cpap|apap|bipap|auto-?pap)\b"),
        (
            "physical_therapy",
            r"(?i:\bphysical therapy\b|\bphysiotherapy\b)|\bP\.?T\b",
        ),
        ("nsaids", r"(?i)\bnsaids?\b|\banti-?inflammator(?:y|ies)\b"),
    ])
});
/// Explicit statements that a drug was not tolerated.
static INTOLERANCE: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\bintoleran\w*|\b(?:could not|couldn't|unable to|did not|didn't|not able to) tolerate\b|\bcould (?:not|never) take\b|\bnot tolerated\b|\bpoorly tolerated\b|\bside[- ]effects?\b|\badverse (?:effects?|reactions?)\b|\ballerg\w*",
    )
});
/// "Stopped in 2024 due to …": the reason that follows decides whether it was an intolerance.
static STOPPED_FOR: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:stopped|discontinued|d/c'?d|held|stopping|discontinuing) (?:\S+ ){0,3}?(?:due to|because of|b/c(?: of)?|secondary to|for)\b",
    )
});
static NOT_ADVERSE_REASON: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)^\W*(?:\w+\W+){0,3}?(?:ckd|renal|kidney|egfr|gfr|dialysis|cost|insurance|coverage|pregnan\w*|surgery|procedure|pre-?op\w*|contrast|imaging|admission|npo|remission|resolved)\b",
    )
});
/// Side effects named on their own ("Ibuprofen - GI bleed in 2021"): weaker than a statement.
static ADVERSE: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:stomach|gi) (?:upset|side effects|distress|symptoms|bleed(?:ing)?)\b|\bgastrointestinal\b|\bnausea\b|\bvomiting\b|\bdiarrh(?:o)?ea\b|\babdominal (?:pain|cramping|cramps)\b|\bepigastric (?:pain|discomfort)\b|\bupset stomach\b|\bheartburn\b|\bgastritis\b|\b(?:black|dark|tarry) stools\b|\bmelena\b|\bbloating\b|\bdyspepsia\b|\brash\b|\bhives\b|\bangioedema\b|\bcough\b|\btransaminitis\b|\belevated (?:lfts|liver enzymes|transaminases|alt|ast)\b|\bhepatotoxicity\b|\bcytopenias?\b|\bleukopenia\b|\bmouth (?:sores|ulcers)\b|\bstomatitis\b|\bhair loss\b|\bdizz(?:y|iness)\b|\bsedat(?:ion|ed)\b|\bdrows(?:y|iness)\b|\blactic acidosis\b",
    )
});
static FAILURE: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\bfail(?:ed|ure|ing|s)?\b|\binadequate (?:response|control|relief|improvement)\b|\bno (?:significant |meaningful |lasting |sustained )?(?:improvement|relief|benefit|response|change)\b|\b(?:did not|didn't|does not|doesn't|has not|hasn't) (?:improve|help|work|respond|control|relieve|provide)\w*|\bineffective\b|\bnot effective\b|\bwithout (?:significant |meaningful |lasting )?(?:improvement|relief|benefit|response|change)\b|\bdespite\b|\bremain(?:ed|s)? (?:elevated|above|uncontrolled|high|active)\b|\buncontrolled\b|\brefractory\b|\black of (?:efficacy|response|improvement)\b|\bminimal (?:improvement|relief|benefit|response)\b|\bsuboptimal\b|\bpoor (?:response|control)\b|\blimited (?:relief|improvement|benefit|response)\b|\bpersistent(?:ly)? (?:active|elevated|uncontrolled)\b",
    )
});
/// A preposition that lets a cue reach forwards to its treatment.
static CUE_LINK: LazyLock<Regex> = LazyLock::new(|| re(r"(?i)^\s*(?:to|of|with|on|from|for)\b"));
static LIST_JOIN: LazyLock<Regex> = LazyLock::new(|| re(r"(?i)^\s*(?:,|/|&)?\s*(?:and|or)?\s*$"));
static CUE_NEGATION: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:no|denies|denied|without|free of|negative for|if|tolerat(?:ing|es|ed) (?:\w+ )?well)\b",
    )
});

static SYMPTOM: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:pain|ache|aching|symptoms?|snoring|sleepiness|somnolence|fatigue|stiffness|swelling|sciatica|radiculopathy|radicular|numbness|tingling|complaints?|hypersomnolence|apneas?|dyspnea|shortness of breath|breathlessness|effusion|instability|locking|giving way|buckling|arthralgias?|synovitis|flares?|hyperglycemia|polyuria|polydipsia|nocturia|dizziness|headaches?|cough|lbp|sx|weight gain|obesity|wounds?|ulcers?|onset|history of|hx of|h/o)\b",
    )
});
static ONSET_AGO: LazyLock<Regex> = LazyLock::new(|| re(r"(?i)^\s*(?:ago|prior|earlier|back)\b"));
static NOT_A_DURATION_BEFORE: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)(?:\bevery|\bq|\bin|\bwithin|\bf/u|\bfollow[- ]up|\breturn|\brtc|\brecheck|\bafter|\bper|\bnext|\bupcoming|\bover the next|\bfor another|\bfor an additional|\bfor \w+ more)\s*$",
    )
});
static NOT_A_DURATION_AFTER: LazyLock<Regex> = LazyLock::new(|| {
    re(r"(?i)^(?:-|\s)*(?:/|old\b|of age\b|supply\b|follow|f/u\b|postop|post-op|later\b)")
});
static HOMEBOUND: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\bhome-?\s?bound\b|\bconsiderable and taxing effort\b|\bunable to leave (?:the |her |his |their )?home\b|\bconfined to (?:the |her |his )?(?:home|house|bed)\b|\bleaving (?:the )?home (?:requires|is a)\b|\bbed-?bound\b",
    )
});
static HOMEBOUND_NEGATION: LazyLock<Regex> = LazyLock::new(|| {
    re(r"(?i)\b(?:not|no longer|isn't|is not|does not meet|doesn't meet|no)\b[^.;\n]{0,25}$")
});

/// Words whose period never ends a sentence ("Dr. Amsel", "e.g. ibuprofen").
const TITLES: [&str; 10] = ["dr", "mr", "mrs", "ms", "st", "vs", "approx", "e", "i", "g"];
/// Words whose period ends a sentence only before a capital ("b.i.d. with food").
const ABBREVIATIONS: [&str; 14] = [
    "etc", "no", "pt", "wk", "wks", "mo", "mos", "yr", "yrs", "hx", "p", "t", "b", "d",
];

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

fn number(word: &str) -> Option<u32> {
    const WORDS: [&str; 12] = [
        "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve",
    ];
    let word = word.to_ascii_lowercase();
    // "the past week": the last word is the number.
    match word.split_whitespace().last().unwrap_or_default() {
        "a" | "an" | "past" | "last" | "previous" => Some(1),
        "fifteen" => Some(15),
        "twenty" => Some(20),
        word => WORDS
            .iter()
            .position(|w| *w == word)
            .and_then(|p| u32::try_from(p + 1).ok())
            .or_else(|| word.parse().ok()),
    }
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
            && before.trim_end().to_ascii_lowercase().ends_with("times")
        {
            continue;
        }
        let Some(n) = number(n_word) else { continue };
        // A range counts its lower bound.
        let n = m
            .name("n2")
            .and_then(|g| number(g.as_str()))
            .map_or(n, |n2| n.min(n2));
        let unit = m.name("unit").map_or("", |g| g.as_str());
        let Some(days) = unit_days(n, unit) else {
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

/// Intolerances and failures in one clause. Each cue belongs to the treatment nearest it, so
/// "lisinopril caused angioedema, on metformin" does not make metformin an intolerance. A
/// clause with a cue and no treatment continues the clause before it (`previous`, when only a
/// semicolon separates them): "Took ibuprofen for 2 weeks; stopped because of heartburn".
fn treatment_facts(note: &Note, span: Span, previous: Option<Span>, out: &mut Vec<(NoteFact, u8)>) {
    let text = note.text.as_str();
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
                || (has_reason && NOT_ADVERSE_REASON.is_match(&text[ce..to]))
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

/// All the facts of one note.
pub fn extract(note: &Note) -> Vec<NoteFact> {
    let text = note.text.as_str();
    // Each fact with how strongly it is stated, to choose among repeats.
    let mut facts: Vec<(NoteFact, u8)> = Vec::new();
    let mut symptom: Option<NoteFact> = None;
    let mut previous: Option<Span> = None;
    for span in segments(text) {
        let (from, to) = span;
        let piece = &text[from..to];
        let after_semicolon = from > 0 && text.as_bytes()[from - 1] == b';';
        let clause_before = previous.filter(|_| after_semicolon);
        previous = Some(span);
        if piece.trim().is_empty() {
            continue;
        }
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
            let crosses = |lo: usize, hi: usize| {
                durations
                    .iter()
                    .any(|o| o.start >= lo && o.end <= hi && o.start != d.start)
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
                let punctuated = s >= d.end && text[d.end..s].contains([',', ';', ':', '(', ')']);
                if punctuated {
                    usize::MAX
                } else {
                    distance(s, e)
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
                (Some((dt, i)), ds) if !d.ago && ds.is_none_or(|ds| dt <= ds.0) && dt < 60 => {
                    let (_, s, e) = mentions[i];
                    let start = s.min(d.start);
                    let end = e.max(d.end);
                    if therapy_days[i].is_none_or(|(days, _, _)| d.days > days) {
                        therapy_days[i] = Some((d.days, start, end));
                    }
                }
                (_, Some((ds, anchor)))
                    if ds < 60
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
        for (i, (value, s, e)) in mentions.iter().enumerate() {
            let before = window_before(text, from, *s, 40);
            let negated = THERAPY_NEGATION.find_iter(before).last().is_some_and(|m| {
                let between = &before[m.end()..];
                !between.to_ascii_lowercase().contains("improv")
                    && !between.contains("relief")
                    && !between.contains("benefit")
            });
            // "If no improvement after 6 weeks of PT, …" is a hypothetical.
            if negated || CONDITIONAL.is_match(before) {
                continue;
            }
            let planned_before = PLANNED.is_match(before);
            let received = RECEIVED.is_match(piece);
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
                    if negated_before(text, span, s) || negated_after(text, e, to) {
                        continue;
                    }
                    facts.push((fact(note, "red_flag", Some(value), None, None, s, e), 0));
                }
            }
            treatment_facts(note, span, clause_before, &mut facts);
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
    }
}
