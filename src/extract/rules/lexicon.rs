//! The words and patterns the rules read notes with: therapies, red flags, drugs, the cues
//! that a treatment failed or was not tolerated, negations, plans and durations.

use std::sync::LazyLock;

use regex::Regex;

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).unwrap_or_else(|e| panic!("bad built-in pattern {pattern}: {e}"))
}

fn lexicon(entries: &[(&'static str, &str)]) -> Vec<(&'static str, Regex)> {
    entries
        .iter()
        .map(|(value, pattern)| (*value, re(pattern)))
        .collect()
}

// "for the past week" is one week and "2 1/2 weeks" 17 days; "last year" alone is when, not how
// long. "A few weeks" and "several months" are not numbers, so they give no duration.
const NUMBER: &str = r"\d{1,3}(?:\.\d|\s+1/2|\s*½)?|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|a\s+couple(?:\s+of)?|couple(?:\s+of)?|a|an|the\s+(?:past|last|previous)";
const UNIT: &str = r"days?|weeks?|wks?|months?|mos?|years?|yrs?";

// "x3 months" is written without a space as often as with one.
pub(super) static DURATION: LazyLock<Regex> = LazyLock::new(|| {
    re(&format!(
        r"(?i)(?:\bx|\b)(?P<n>{NUMBER})(?:\s*(?:-|to|or)\s*(?P<n2>{NUMBER}))?(?:\s*\+)?[\s-]*(?P<unit>{UNIT})\b"
    ))
});
pub(super) static SINCE: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\bsince\s+(?:(?P<m>\d{1,2})/(?P<d>\d{1,2})(?:/(?P<y>\d{2,4}))?|(?P<month>jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?\s+(?P<day>\d{1,2})(?:st|nd|rd|th)?(?:,?\s+(?P<year>\d{4}))?)\b",
    )
});
/// "Twice a week", "2x a week": how often, not how long.
pub(super) static FREQUENCY_BEFORE: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?i)(?:\b(?:times|twice|once|thrice)|x)\s*$"));
// A range ("2019-2024", "04/2025 - 11/2025") is dated by its end, when the treatment stopped;
// a month named alone ("in September") is in the note's year. "May" alone is too often the
// verb.
pub(super) static DATE: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:(?:19|20)\d{2}\s*(?:-|to)\s*(?P<range_end>(?:19|20)\d{2})|\d{1,2}/(?:\d{1,2}/)?(?:19|20)\d{2}\s*(?:-|to|through|until)\s*(?P<rm>\d{1,2})/(?:(?P<rd>\d{1,2})/)?(?P<ry>(?:19|20)\d{2})|(?P<iy>(?:19|20)\d{2})-(?P<im>\d{2})(?:-(?P<id>\d{2}))?|(?P<m>\d{1,2})/(?:(?P<d>\d{1,2})/)?(?P<y>(?:19|20)\d{2})|(?P<month>jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?\s+(?:(?P<day>\d{1,2}),?\s+)?(?P<year>(?:19|20)\d{2})|(?P<bare_month>january|february|march|april|june|july|august|september|october|november|december)|(?P<year_only>(?:19|20)\d{2}))\b",
    )
});

pub(super) static DOSE_AFTER: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?i)^\s*(?:mg|mcg|g|ml|units?|u|iu|%)(?:\W|$)"));

/// A tick box: `[x]`, `[ ]`, `☐`, `☒`. What follows it up to the next box or the end of the
/// line is the item it ticks.
pub(super) static CHECKBOX: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?P<unticked>\[\s?\]|☐)|\[\s?[xX✓✔*]\s?\]|[☑☒✅]"));

/// What people stop or cut down on to spare a back or a knee.
const ACTIVITIES: &str = r"(?:heavy |all |most |any )?(?:lifting|bending|twisting|running|jogging|jumping|kneeling|squatting|stairs|high-impact|impact|sports?|basketball|soccer|football|tennis|golf|gardening|(?:the )?gym|weightlifting|skiing|hiking|dancing|pivoting|climbing|cycling)";

/// Therapies that count as conservative care, by the value the policies use.
pub(super) static THERAPIES: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    let activity_modification = format!(
        r"(?i)\bactivity modifications?\b|\bmodified (?:activity|activities|duty)\b|\b(?:light|restricted) duty\b|\b(?:activity|work|lifting) restrictions?\b|\brelative rest\b|\bavoid(?:s|ing|ed)? (?:aggravating|provocative) activit\w*|\b(?:avoid(?:s|ing|ed)?|stopped|quit|gave up|giving up|cut(?:ting)? back on|cut out|refrain(?:s|ing|ed)? from|holding off on|held off on) (?:playing |doing |going to )?{ACTIVITIES}\b|\b(?:limit|reduc|restrict|modif)(?:s|es|e|ing|ed|ied|y)? (?:\w+ )?activit(?:y|ies)\b"
    );
    lexicon(&[
        (
            "physical_therapy",
            r"(?i:\bphysical therapy\b|\bphysiotherapy\b|\bphysio\b|\bphysical therapist\b)|\bP\.?T\b",
        ),
        (
            "chiropractic",
            r"(?i)\bchiropract\w*|\bchiro\b|\bspinal manipulation\b|\bmanipulative therapy\b",
        ),
        (
            // "Quad sets and straight-leg raises at home": the exercises are named, not the
            // program.
            "home_exercise",
            r"(?i)\bhome (?:exercis(?:e|es|ing)|stretch(?:es|ing)?|strengthening)(?: (?:program|routine)s?)?\b|\bHEP\b|\bhome program\b|\bat-home exercises?\b|\b(?:exercis(?:e|es|ing)|stretch(?:es|ing)|strengthening|sets|raises|slides|bridges|routine)\b[^.;:,\n]{0,40}?\bat home\b",
        ),
        (
            "nsaids",
            r"(?i)\bnsaids?\b|\bibuprofen\b|\bnaproxen\b|\bmeloxicam\b|\bdiclofenac\b|\bcelecoxib\b|\bmotrin\b|\baleve\b|\badvil\b|\bnabumetone\b|\banti-?inflammator(?:y|ies)\b",
        ),
        (
            "bracing",
            r"(?i)\bbrac(?:e|es|ed|ing)\b|\bknee sleeve\b|\bunloader\b|\blumbar support\b|\b(?:lumbar|back|support|sacroiliac|si) belt\b|\bcorset\b|\bsplint(?:ing)?\b",
        ),
        ("activity_modification", activity_modification.as_str()),
    ])
});

pub(super) static PLANNED: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:will|would|plan(?:s|ned)?|planning|refer(?:red|ral|ring)?|recommend(?:ed|s)?|consider(?:ing)?|schedul\w*|order(?:ed|ing)?|prescrib\w*|rx|start(?:ing)?|begin|initiate|candidate|discussed|advised|encouraged|to try|to start|next step|if no|may benefit|should)\b",
    )
});
// A ticked box ("[x] Physical therapy") says the therapy was done.
pub(super) static RECEIVED: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:takes|uses|wears|does|(?:is|was|been|remains) on|managed|treated with|completed|complete|has (?:done|had|tried|been|completed|used|worn|attended|taken|participated)|had|tried|trialed|underwent|attended|participated|since|previously|prior|failed|despite|continues|continued|ongoing|currently|did|took|wore|used|using|wearing|taking|doing|limiting|avoiding|performing|performs|completes|attends|participates|practices|follows|getting|gets|receiving|receives|going to|goes to|finished|received|went through|course of|sessions|weeks of|months of|with (?:minimal|partial|no|some|little|temporary)|after)\b|\[\s?[xX✓✔]\s?\]|[☑☒✅]",
    )
});
/// "PT handout", "HEP sheet", "reduced activity tolerance": the words name a document, an
/// order or a finding, not care received.
pub(super) static NOT_THERAPY_AFTER: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)^\s*(?:handouts?|sheets?|printouts?|instructions|eval(?:uation)?s?|referrals?|consults?|orders?|prescriptions?|scripts?|tolerance|level)\b",
    )
});
pub(super) static CONDITIONAL: LazyLock<Regex> = LazyLock::new(|| re(r"(?i)\b(?:if|unless)\b"));
pub(super) static THERAPY_NEGATION: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:no|never|declined|not yet|hasn't|has not|have not|had not|did not|didn't|not|without|denies)\b",
    )
});

/// Red flags that justify imaging without conservative care first.
pub(super) static RED_FLAGS: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    lexicon(&[
        (
            "cauda_equina",
            r"(?i)\bsaddle (?:an(?:a)?esthesia|numbness|paresthesias?|hypoesthesia|sensory loss)\b|\b(?:perineal|perianal) (?:numbness|an(?:a)?esthesia|hypoesthesia|sensory loss)\b|\bcauda equina\b|\b(?:bowel|bladder|bowel/bladder|bowel or bladder|bowel and bladder) (?:incontinence|dysfunction|retention|control loss)\b|\burinary (?:retention|incontinence)\b|\b(?:incontinence|loss of control) of (?:bowel|bladder|urine|stool)\b|\bfecal incontinence\b|\bnew(?:-onset)? incontinence\b|\bpost-?void residual\b|\b(?:decreased|diminished|reduced|absent|loss of|lax) (?:rectal|anal|sphincter) tone\b",
        ),
        (
            "malignancy",
            r"(?i)\bcancer\b|\b\w*carcinoma\b|\bmelanoma\b|\bglioma\b|\bmesothelioma\b|\bmalignan\w*|\bmetasta\w*|\blymphoma\b|\bmyeloma\b|\b\w*sarcoma\b|\bleuk(?:a)?emia\b|\bneoplasm\b|\b(?:RCC|NSCLC|SCLC|DCIS)\b",
        ),
        ("fracture", r"(?i)\bfractures?\b|\bfx\b"),
        (
            "progressive_neurological_deficit",
            r"(?i)\bfoot drop\b|\b(?:progressive|progressing|worsening|increasing|new)\s+(?:\w+\s+){0,2}?(?:weakness|numbness|neurologic(?:al)? deficits?|deficits?|paresis|sensory loss)\b|\b(?:weakness|numbness|sensory loss|deficits?) (?:is |has |have |has been |that is )?(?:progressive|progress(?:ed|ing)|worse(?:ned|ning)|getting worse|spread(?:ing)?)\b|\bprogressive neurologic\w*",
        ),
        (
            "infection",
            r"(?i)\b(?:epidural|spinal|paraspinal|psoas) abscess\b|\bosteomyelitis\b|\bdiscitis\b|\bspinal infection\b|\b(?:iv|intravenous|injection) drug use\b|\bivd[ua]\b|\bfevers?\b|\bfebrile\b",
        ),
    ])
});
pub(super) static NEGATION: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:no|not|denies|denied|deny|denying|without|negative for|neg for|free of|absence of|ruled out|rules out|r/o|rule out|never|none|resolved|screening|screen|if)\b",
    )
});
// "Fever/chills: no": a screening line answers for every finding before its colon.
pub(super) static POST_NEGATION: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)^(?:[^:.;\n]{0,20}:)?[\s:,-]*(?:\(?-\)?|none|no\b|denied|denies|negative|neg\b|absent|ruled out|not present|not seen|unlikely|screening\b)",
    )
});
pub(super) static SCOPE_END: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:but|however|although|though|except|reports|endorses|with new|positive for|notable for)\b",
    )
});
/// The words of a header that denies the list under it: "Denies:", "None of the following:".
pub(super) static LIST_NEGATION: LazyLock<Regex> = LazyLock::new(|| {
    re(r"(?i)\b(?:no|not|none|denies|denied|negative|neg|without|never|absent|free of)\b")
});
/// A list item: "- fever", "2) weight loss", "• saddle anesthesia".
pub(super) static LIST_ITEM: LazyLock<Regex> =
    LazyLock::new(|| re(r"^\s*(?:[-*•·]|\d{1,2}[.)]|[a-z][.)])\s"));
// A relative is family history only with what they had: "mother had", "sister w/", "father's
// history"; "seen with her mother" and "for his daughter" are about the patient.
pub(super) static FAMILY: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:family (?:history|hx)|fam hx|fhx|fh:|fh of)|\b(?:mother|father|mom|dad|parents?|sisters?|brothers?|aunts?|uncles?|grand(?:mother|father|parent)s?|siblings?|cousins?|daughters?|sons?)(?:'s)?\s+(?:(?:also|both|each|who)\s+)?(?:had|has|have|with|w/|died|passed|diagnosed|dx|hx|history|developed|treated|uses|use)\b",
    )
});

/// Medications whose intolerance or failure the policies ask about.
pub(super) static DRUGS: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    lexicon(&[
        (
            "metformin",
            r"(?i)\bmetformin\b|\bglucophage\b|\bglumetza\b|\bfortamet\b",
        ),
        (
            "methotrexate",
            r"(?i)\bmethotrexate\b|\bMTX\b|\btrexall\b|\botrexup\b",
        ),
        ("ibuprofen", r"(?i)\bibuprofen\b|\bmotrin\b|\badvil\b"),
        (
            "naproxen",
            r"(?i)\bnaproxen\b|\baleve\b|\bnaprosyn\b|\banaprox\b",
        ),
        (
            "gabapentin",
            r"(?i)\bgabapentin\b|\bneurontin\b|\bgralise\b",
        ),
        (
            "sulfasalazine",
            r"(?i)\bsulfasalazine\b|\bazulfidine\b|\bSSZ\b|\bSASP\b",
        ),
        ("lisinopril", r"(?i)\blisinopril\b|\bzestril\b|\bprinivil\b"),
    ])
});
/// Treatments that can fail but are not drugs of the list above.
pub(super) static FAILABLE: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    lexicon(&[
        ("cpap", r"(?i)\b(?:cpap|apap|bipap|auto-?pap)\b"),
        (
            "physical_therapy",
            r"(?i:\bphysical therapy\b|\bphysiotherapy\b|\bphysio\b)|\bP\.?T\b",
        ),
        ("nsaids", r"(?i)\bnsaids?\b|\banti-?inflammator(?:y|ies)\b"),
    ])
});
/// Explicit statements that a drug was not tolerated.
pub(super) static INTOLERANCE: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\bintoleran\w*|\b(?:could not|couldn't|unable to|did not|didn't|not able to) tolerate\b|\bcould (?:not|never) take\b|\bnot tolerated\b|\bpoorly tolerated\b|\bside[- ]effects?\b|\badverse (?:effects?|reactions?)\b|\ballerg\w*|\b(?:reactions?|reacted) to\b",
    )
});
/// "Stopped in 2024 due to …": the reason that follows decides whether it was an intolerance.
pub(super) static STOPPED_FOR: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:stopped|discontinued|d/c'?d|dc'?d|held|stopping|discontinuing|quit|came off|taken off) (?:\S+ ){0,3}?(?:due to|because(?: of)?|b/c(?: of)?|secondary to|owing to|for)\b",
    )
});
// Reasons to stop a drug that are not a reaction to it: the kidneys, money, a procedure, or
// that it worked or did not.
pub(super) static NOT_ADVERSE_REASON: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)^\W*(?:\w+\W+){0,3}?(?:ckd|renal|kidney|egfr|gfr|dialysis|cost|price|expensive|afford\w*|insurance|coverage|covered|pregnan\w*|surgery|procedure|pre-?op\w*|contrast|imaging|admission|npo|remission|resolved|better|improved|help(?:s|ed|ing|ful)?|work(?:s|ed|ing)?|effective|ineffective|efficacy|benefit|needed|ran out|forgot)\b",
    )
});
/// Side effects named on their own ("Ibuprofen - GI bleed in 2021"): weaker than a statement.
/// Symptoms of the conditions treated (sleepiness, headaches with sleep apnea) are left out,
/// since a side effect next to CPAP makes it a failure.
pub(super) static ADVERSE: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:stomach|gi|abdominal|belly|epigastric|gastric) (?:upset|pain|aches?|cramp(?:s|ing)?|discomfort|distress|symptoms|side effects|bleed(?:s|ing)?|burning|irritation|complaints)\b|\bstomach ?aches?\b|\bgastrointestinal\b|\bnause(?:a|ated|ous)\b|\bvomiting\b|\bdiarrh(?:o)?ea\b|\bupset (?:his |her |their |my )?stomach\b|\bheartburn\b|\bgastritis\b|\b(?:peptic|gastric|duodenal|gi) ulcers?\b|\b(?:black|dark|tarry) stools\b|\bmelena\b|\bbloating\b|\bdyspepsia\b|\brash\b|\bhives\b|\burticaria\b|\bpruritus\b|\bitch(?:ing|y)\b|\bangioedema\b|\banaphylaxis\b|\b(?:facial|face|lip|tongue|throat) (?:swelling|edema)\b|\bcough\b|\btransaminitis\b|\belevated (?:lfts|liver enzymes|transaminases|alt|ast)\b|\bhepatotoxicity\b|\bcytopenias?\b|\b(?:leuko|neutro|thrombocyto)penia\b|\bmouth (?:sores|ulcers)\b|\bstomatitis\b|\bhair loss\b|\balopecia\b|\bdizz(?:y|iness)\b|\blight-?headed(?:ness)?\b|\bsedat(?:ion|ed)\b|\bdrows(?:y|iness)\b|\bbrain fog\b|\bfogg(?:y|iness)\b|\bconfusion\b|\bcognitive (?:slowing|dulling|side effects|impairment)\b|\bunstead(?:y|iness)\b|\bataxia\b|\bmyalgias?\b|\bmuscle (?:aches|pain|cramps)\b|\bhyperkalemia\b|\blactic acidosis\b|\bclaustrophobi\w*|\baerophagia\b",
    )
});
// "Any", "much" and the like only weigh the words they qualify: "without any relief".
pub(super) static FAILURE: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\bfail(?:ed|ure|ing|s)?\b|\binadequate (?:response|control|relief|improvement)\b|\bno (?:(?:significant|meaningful|lasting|sustained|real|noticeable|appreciable|clinical|further|much|any) )?(?:improvement|relief|benefit|response|change|effect|difference|help)\b|\b(?:did not|didn't|does not|doesn't|has not|hasn't|have not|haven't) (?:improve|help|work|respond|control|relieve|provide)\w*|\bineffective\b|\bnot (?:effective|helpful|working)\b|\bunhelpful\b|\bstopped working\b|\bto no avail\b|\bwithout (?:(?:significant|meaningful|lasting|sustained|real|noticeable|appreciable|clinical|any|much) )?(?:improvement|relief|benefit|response|change|effect)\b|\bdespite\b|\bremain(?:ed|s)? (?:elevated|above|uncontrolled|high|active)\b|\buncontrolled\b|\brefractory\b|\black of (?:efficacy|response|improvement|benefit)\b|\bminimal (?:improvement|relief|benefit|response)\b|\bsuboptimal\b|\bpoor (?:response|control)\b|\blimited (?:relief|improvement|benefit|response)\b|\bpersistent(?:ly)? (?:active|elevated|uncontrolled)\b",
    )
});
/// A preposition that lets a cue reach forwards to its treatment.
pub(super) static CUE_LINK: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?i)^\s*(?:to|of|with|on|from|for)\b"));
pub(super) static LIST_JOIN: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?i)^\s*(?:,|/|&)?\s*(?:and|or)?\s*$"));
pub(super) static CUE_NEGATION: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:no|denies|denied|without|free of|negative for|if|tolerat(?:ing|es|ed) (?:\w+ )?well)\b",
    )
});

pub(super) static SYMPTOM: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:pain|ache|aching|hurt(?:s|ing)?|bother(?:s|ing|ed)?|discomfort|sore(?:ness)?|spasms?|symptoms?|snoring|sleepiness|somnolence|fatigue|stiffness|swelling|sciatica|radiculopathy|radicular|numbness|tingling|paresthesias?|weakness|complaints?|hypersomnolence|apneas?|dyspnea|shortness of breath|breathlessness|effusion|instability|locking|giving way|giving out|buckling|limp(?:ing)?|claudication|arthralgias?|synovitis|flares?|hyperglycemia|polyuria|polydipsia|nocturia|dizziness|headaches?|cough|lbp|sx|weight gain|obesity|wounds?|ulcers?|onset|history of|hx of|h/o)\b",
    )
});
pub(super) static ONSET_AGO: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?i)^\s*(?:ago|prior|earlier|back)\b"));
pub(super) static NOT_A_DURATION_BEFORE: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)(?:\bevery|\bq|\bin|\bwithin|\bf/u|\bfollow[- ]up|\breturn|\brtc|\brecheck|\bafter|\bper|\bnext|\bupcoming|\bover the next|\bfor another|\bfor an additional|\bfor \w+ more)\s*$",
    )
});
// "3 days a week" is how often, "2 weeks old" how old.
pub(super) static NOT_A_DURATION_AFTER: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)^(?:-|\s)*(?:/|old\b|of age\b|supply\b|follow|f/u\b|postop|post-op|later\b|(?:a|an|per|each|every)\s+(?:day|week|wk|month|night)\b)",
    )
});
pub(super) static HOMEBOUND: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:home|house)-?\s?bound\b|\bconsiderable and taxing effort\b|\b(?:unable to|cannot|can't|could not) leave (?:the |her |his |their )?(?:home|house)\b|\bconfined to (?:the |her |his )?(?:home|house|bed)\b|\bleaving (?:the )?home (?:requires|is a)\b|\bbed-?bound\b",
    )
});
pub(super) static HOMEBOUND_NEGATION: LazyLock<Regex> = LazyLock::new(|| {
    re(r"(?i)\b(?:not|no longer|isn't|is not|does not meet|doesn't meet|no)\b[^.;\n]{0,25}$")
});
