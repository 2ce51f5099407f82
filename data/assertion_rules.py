"""Silver assertion labels for the bundled assertion data (data/assertion/): a finding lexicon and a small ConText-style
rule labeller, used by data/build_data.py only (not shipped, not read at run time).

The labels are i2b2/n2c2 2010's: present, absent, possible, conditional, hypothetical, associated_with_someone_else.
They are made by rules, not by people: read them as silver labels, good enough to exercise the task and to give a
model a start, not as a gold standard.

How a span is labelled, in the manner of NegEx (Chapman et al. 2001) and ConText (Harkema et al. 2009):
- the sentence is split into words and punctuation marks; trigger phrases are found longest first, after the pseudo-
  triggers ("no change", "gram negative", ...) have been masked;
- a *preceding* trigger ("no", "denies", "possible", "if", "mother") reaches forward over at most `scope` words, a
  *following* trigger ("was ruled out", "cannot be excluded", "on exertion") backward over at most `scope` words;
- a scope stops at a termination term ("but", "however", "which", "due to", ...), at ';' or ':' and at the end of the
  sentence; the scope of a family trigger also stops at the patient ("he", "she", "the patient");
- when triggers of several kinds reach a span, the first of PRECEDENCE wins: a family member's finding is not the
  patient's whatever its status; a hypothetical statement describes no current state; then absent, possible,
  conditional; a span no trigger reaches is present.
"""

from __future__ import annotations

import re

PRECEDENCE = ("associated_with_someone_else", "hypothetical", "absent", "possible", "conditional")
WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")
SCOPE_PUNCTUATION = {";", ":", ".", "!", "?"}

# (phrase, label, direction, scope in words). "pre": the trigger precedes the span; "post": it follows it.
_NEGATION_PRE = ["no", "not", "denies", "denied", "deny", "denying", "without", "negative for", "negative",
                 "no evidence of", "no sign of", "no signs of", "no history of", "no known", "no complaints of",
                 "never", "never had", "free of", "absence of", "absent", "ruled out", "ruled out for", "rules out",
                 "nor", "neither", "fails to reveal", "failed to reveal", "did not show", "does not show",
                 "did not reveal", "not demonstrate", "does not have", "did not have", "doesn't have", "didn't have",
                 "lack of", "unremarkable for"]  # fmt: skip
_NEGATION_POST = ["was ruled out", "were ruled out", "is ruled out", "has been ruled out", "have been ruled out",
                  "was excluded", "were excluded", "has been excluded", "is negative", "was negative", "were negative",
                  "negative", "free", "absent", "is absent", "was absent", "not seen", "not present", "not identified",
                  "not detected", "not found", "not observed", "not noted"]  # fmt: skip
_POSSIBLE_PRE = ["possible", "possibly", "probable", "probably", "likely", "suspected", "suspect", "suspicion of",
                 "suspicious for", "suspicious of", "questionable", "question of", "rule out", "r / o", "to rule out",
                 "to exclude", "differential diagnosis", "differential", "concern for", "concerning for",
                 "worrisome for", "may have", "may be", "might have", "might be", "could be", "could have",
                 "cannot exclude", "can not exclude", "presumed", "presumptive", "compatible with", "suggestive of",
                 "suggesting", "versus", "vs"]  # fmt: skip
_POSSIBLE_POST = ["cannot be excluded", "can not be excluded", "could not be excluded", "not excluded",
                  "cannot be ruled out", "can not be ruled out", "could not be ruled out", "not ruled out",
                  "not been ruled out", "is suspected", "was suspected", "were suspected", "is likely", "was likely",
                  "is possible", "is probable", "versus", "vs"]  # fmt: skip
_HYPOTHETICAL_PRE = ["if", "return if", "call if", "in case of", "should", "should he", "should she",
                     "should the patient", "watch for", "monitor for", "to prevent", "prevention of", "prophylaxis",
                     "prophylaxis for", "precautions", "warning signs of", "at risk for", "risk of"]  # fmt: skip
_CONDITIONAL_PRE = ["exertional"]
_CONDITIONAL_POST = ["on exertion", "with exertion", "upon exertion", "exertion", "with activity", "with exercise",
                     "on exercise", "when walking", "on walking", "with walking", "when climbing", "when lying",
                     "when lying down", "on lying down", "with movement", "on movement", "when standing",
                     "on standing", "with eating", "after eating", "after meals", "with meals"]  # fmt: skip
_RELATIVES = ["mother", "father", "mom", "dad", "brother", "brothers", "sister", "sisters", "sibling", "siblings",
              "son", "sons", "daughter", "daughters", "aunt", "aunts", "uncle", "uncles", "grandmother",
              "grandfather", "grandparents", "parents", "cousin", "cousins", "wife", "husband", "family history",
              "family history of", "family", "maternal", "paternal"]  # fmt: skip

TRIGGERS: list[tuple[str, str, str, int]] = (
    [(p, "absent", "pre", 8) for p in _NEGATION_PRE]
    + [(p, "absent", "post", 4) for p in _NEGATION_POST]
    + [(p, "possible", "pre", 6) for p in _POSSIBLE_PRE]
    + [(p, "possible", "post", 4) for p in _POSSIBLE_POST]
    + [(p, "hypothetical", "pre", 5 if p.startswith("should") else 8) for p in _HYPOTHETICAL_PRE]
    + [(p, "conditional", "pre", 1) for p in _CONDITIONAL_PRE]
    + [(p, "conditional", "post", 3) for p in _CONDITIONAL_POST]
    + [(p, "associated_with_someone_else", "pre", 8) for p in _RELATIVES]
    + [(p, "associated_with_someone_else", "post", 5) for p in _RELATIVES]
)
PSEUDO = ["no increase", "no change", "no significant change", "no interval change", "no further", "not only",
          "not necessarily", "not certain if", "not certain whether", "without difficulty", "gram negative",
          "not cause", "not extend", "no suspicious change", "even if", "as if", "if any", "whether or not",
          "negative pressure", "rh negative", "family physician", "family doctor", "family members"]  # fmt: skip
TERMINATION = ["but", "however", "although", "though", "nevertheless", "yet", "except", "aside from", "apart from",
               "which", "who", "whose", "because", "since", "due to", "secondary to", "cause of", "source of",
               "reason for", "presents", "presented", "presenting", "reports", "reported", "complains",
               "complained", "now", "then"]  # fmt: skip
PATIENT = ["he", "she", "patient", "the patient", "pt"]  # end a family trigger's scope

# Findings and problems looked for in the notes (case-insensitive, whole words, longest first; a plural "s" allowed).
FINDINGS = """
abdominal distension, abdominal pain, abscess, acute kidney injury, adenopathy, allergies, alzheimer's disease,
anemia, aneurysm, angina, anorexia, anxiety, aphasia, appendicitis, arrhythmia, arthritis, ascites, asthma, ataxia,
atelectasis, atrial fibrillation, back pain, bleeding, blood in the stool, blurred vision, bradycardia, breast cancer,
bronchitis, bruising, calcification, cancer, carcinoma, cardiomegaly, cellulitis, chest pain, chest tightness, chills,
cholecystitis, cirrhosis, claudication, colon cancer, confusion, congestive heart failure, constipation, copd,
coronary artery disease, cough, crackles, cyanosis, cyst, deep vein thrombosis, dehydration, dementia, depression,
diabetes, diabetes mellitus, diaphoresis, diarrhea, dissection, diverticulitis, dizziness, drug allergies, dysphagia,
dyspnea, dyspnoea, dysuria, eczema, edema, effusion, embolism, epistaxis, erythema, fatigue, fever, fevers, fistula,
fracture, gastroesophageal reflux disease, gerd, gout, headache, hearing loss, heart attack, heart disease,
heart failure, heartburn, hematemesis, hematochezia, hematoma, hematuria, hemoptysis, hemorrhage, hepatitis,
hepatomegaly, hernia, high blood pressure, high cholesterol, hiv, hoarseness, hydronephrosis, hyperlipidemia,
hypertension, hypotension, hypothyroidism, hyperthyroidism, hypoxia, incontinence, infarction, infection,
inflammation, insomnia, ischemia, itching, jaundice, joint pain, kidney disease, kidney stones, lesion, leukemia,
loss of appetite, loss of consciousness, lung cancer, lymphadenopathy, lymphoma, malaise, malignancy, mass, melanoma,
melena, meningitis, metastasis, metastases, migraine, murmur, myalgia, myocardial infarction, nausea, neck pain,
neck stiffness, necrosis, neoplasm, nephropathy, neuropathy, night sweats, nodule, numbness, obesity, orthopnea,
osteoarthritis, osteomyelitis, osteoporosis, pain, pallor, palpitations, pancreatitis, paralysis, paresthesia,
parkinson's disease, peritonitis, photophobia, pleural effusion, pneumonia, pneumothorax, polyp, polydipsia,
polyuria, prostate cancer, proteinuria, pruritus, psoriasis, pulmonary embolism, rash, reflux, renal failure,
retinopathy, rheumatoid arthritis, seizure, sepsis, shortness of breath, sinusitis, sore throat, splenomegaly,
stenosis, stroke, suicidal ideation, swelling, syncope, tachycardia, tenderness, thrombosis, tingling, tinnitus,
tremor, tuberculosis, tumor, tumour, ulcer, urinary tract infection, vertigo, vision changes, vomiting, weakness,
weight gain, weight loss, wheezing
"""
FINDING_TERMS = sorted({term.strip() for term in FINDINGS.replace("\n", " ").split(",") if term.strip()})


def words(text: str) -> list[tuple[str, int, int]]:
    """(lower-cased word or punctuation mark, start, end) of a text."""
    return [(m.group(0).lower(), m.start(), m.end()) for m in WORD.finditer(text)]


def _phrase(phrase: str) -> tuple[str, ...]:
    return tuple(word for word, _, _ in words(phrase))


def _matches(tokens: list[str], phrases: dict[tuple[str, ...], object], taken: list[bool]) -> list[tuple]:
    """Non-overlapping (first, last + 1, value) of the phrases in the tokens, longest first, skipping taken tokens."""
    found = []
    for phrase in sorted(phrases, key=len, reverse=True):
        size = len(phrase)
        for first in range(len(tokens) - size + 1):
            if tuple(tokens[first : first + size]) == phrase and not any(taken[first : first + size]):
                found.append((first, first + size, phrases[phrase]))
                for k in range(first, first + size):
                    taken[k] = True
    return sorted(found)


_TRIGGERS: dict[tuple[str, ...], list[tuple[str, str, int]]] = {}
for _text, _label, _direction, _scope in TRIGGERS:
    _TRIGGERS.setdefault(_phrase(_text), []).append((_label, _direction, _scope))
_PSEUDO = {_phrase(p): None for p in PSEUDO}
_TERMINATION = {_phrase(p): "end" for p in TERMINATION}
_PATIENT = {_phrase(p): "patient" for p in PATIENT}
_FINDINGS = {_phrase(term): term for term in FINDING_TERMS}
_FINDINGS |= {(*phrase[:-1], phrase[-1] + "s"): term for phrase, term in list(_FINDINGS.items())}


def find_findings(sentence: str) -> list[tuple[int, int]]:
    """Character spans of the lexicon's findings in a sentence (longest match first, no overlaps), except a heading
    (a finding followed by ':', as in "ALLERGIES: none")."""
    tokens = words(sentence)
    found = _matches([t for t, _, _ in tokens], _FINDINGS, [False] * len(tokens))
    return [(tokens[first][1], tokens[last - 1][2]) for first, last, _ in found
            if last >= len(tokens) or tokens[last][0] != ":"]  # fmt: skip


def label_span(sentence: str, start: int, end: int) -> str:
    """The rule label of the span [start, end) of a sentence."""
    tokens = words(sentence)
    names = [t for t, _, _ in tokens]
    inside = [k for k, (_, first, last) in enumerate(tokens) if first < end and last > start]
    if not inside:
        return "present"
    span_first, span_last = inside[0], inside[-1] + 1
    taken = [span_first <= k < span_last for k in range(len(tokens))]  # the span is no trigger for itself
    _matches(names, _PSEUDO, taken)
    triggers = _matches(names, _TRIGGERS, taken)
    stops = {first for first, _, _ in _matches(names, _TERMINATION, list(taken))}
    stops |= {k for k, name in enumerate(names) if name in SCOPE_PUNCTUATION}
    patient = {first for first, _, _ in _matches(names, _PATIENT, list(taken))}
    reached = set()
    for first, last, kinds in triggers:
        for label, direction, scope in kinds:
            if direction == "pre" and last <= span_first:
                between = range(last, span_first)
            elif direction == "post" and first >= span_last:
                between = range(span_last, first)
            else:
                continue
            ends = stops | (patient if label == "associated_with_someone_else" else set())
            if any(k in ends for k in between):
                continue
            if sum(names[k] not in ",/-()" for k in between) <= scope:
                reached.add(label)
    return next((label for label in PRECEDENCE if label in reached), "present")
