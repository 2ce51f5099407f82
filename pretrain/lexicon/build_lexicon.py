"""Regenerate the medical lexicon files ``drugs.txt`` and ``icd_terms.txt`` in this folder.

Usage (from the repository root, with the project's virtual environment active)::

    python pretrain/lexicon/build_lexicon.py

- drugs.txt: drug names from the PyPI package ``drug-named-entity-recognition`` (MIT, Thomas Wood /
  Fast Data Science). The package ships its dictionary as a bz2-compressed pickle. This script is the
  ONLY place in the repository that unpickles it (a trusted, pinned, locally installed package);
  cmft itself reads only the generated .txt files.
- icd_terms.txt: words from the ICD-10-CM 2024 and ICD-9-CM v32 descriptions bundled in
  ``data/icd_codes/*.tsv.gz`` (US government code sets), so no external data folder is needed.

See README.md in this folder for the exact rules and counts.
"""

from __future__ import annotations

import bz2
import collections
import gzip
import importlib.metadata
import importlib.util
import pickle
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
ICD_DIR = REPO_ROOT / "data" / "icd_codes"
ICD_FILES = ("icd10cm_2024_codes.tsv.gz", "icd9cm_v32_dx_long.tsv.gz")
DRUG_PACKAGE = "drug-named-entity-recognition"
DRUG_MODULE = "drug_named_entity_recognition"
DRUG_PICKLE = "drug_ner_dictionary.pkl.bz2"


def _words(text: str) -> frozenset[str]:
    """Whitespace-separated words of a literal block (keeps the long lists readable)."""
    return frozenset(text.split())


DRUG_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{3,}$")
ICD_WORD_RE = re.compile(r"[a-z]+")
ICD_MIN_LEN = 4
ICD_MIN_DESCRIPTIONS = 3
EXTERNAL_CAUSE_ICD10 = frozenset("VWXY")

# Entries of the drug dictionary that are ordinary English words (foods, materials, everyday words)
# rather than drug names. Found by checking the candidates against ordinary text; kept explicit.
DRUG_STOPLIST = _words(
    """
    amber banan bean beet caps clove cocoa cotton eisen fertilizers gold have help herbicides honey hops
    indicators insecticides kale lamb modus myrrh neon oats orris peach pecan reagents rice rodenticides
    rosin sage silver sits soot thyme time today tuna vitae water wheat whey yeast
    """
)

# English stopwords (function words and very common words); only words of >= 4 letters matter here.
ENGLISH_STOPWORDS = _words(
    """
    about above across after afterwards again against almost alone along already also although always
    among amongst amount another anyhow anyone anything anyway anywhere around back became because
    become becomes becoming been before beforehand behind being below beside besides between beyond
    both bottom call cannot could describe detail does doing done down during each eight either eleven
    else elsewhere empty enough etc even ever every everyone everything everywhere except few fifteen
    fifty fill find fire five former formerly forty found four from front full further get give goes
    going have hence here hereafter hereby herein hereupon hers herself himself however hundred indeed
    interest into itself just keep last latter latterly least less made many maybe meanwhile might
    mine more moreover most mostly move much must myself name namely neither never nevertheless next
    nine nobody none noone nor nothing now nowhere often once one only onto other others otherwise
    ours ourselves over own part per perhaps please put rather same seem seemed seeming seems serious
    several should show side since sincere sixty some somehow someone something sometime sometimes
    somewhere still such system take than that their them themselves then thence there thereafter
    thereby therefore therein thereupon these they thick thin third this those though three through
    throughout thru thus together top toward towards twelve twenty under until upon very via was were
    what whatever when whence whenever where whereafter whereas whereby wherein whereupon wherever
    whether which while whither whoever whole whom whose why will with within without would yet your
    yours yourself yourselves
    """
)

# Words that recur in ICD descriptions as classification templates, laterality, episode of care,
# fracture-healing status, external-cause (transport, place, activity) wording, counts and ordinary
# English, and are not medical terms on their own. Real medical words (fracture, pain, diabetes,
# neoplasm, hypertension, infection, injury, poisoning, burn, ...) are kept.
ICD_GENERIC = _words(
    """
    unspecified specified specify other others classified elsewhere encounter encounters initial
    subsequent sequela sequelae late left right bilateral unilateral side sides without with part parts
    site sites type types unknown degree degrees stage stages more less than upper lower routine healing
    healed delayed nonunion malunion displaced nondisplaced displacement region regions multiple single
    first second third fourth fifth sixth seventh eighth ninth tenth portion portions level levels
    involving involvement except mention mentioned status history personal family contact exposure
    exposures place places activity activities external cause causes caused causing effect effects
    applicable condition conditions following related associated including included affecting affected
    current existing episode episodes care examination screening undetermined intentional unintentional
    accidental accidentally accident accidents purposely self harm assault assaulted perpetrator intent
    complicating complicated open closed iiia iiib iiic collision noncollision occupant occupants
    passenger passengers driver drivers pedestrian vehicle vehicles traffic nontraffic motor motorcycle
    bicycle truck railway train aircraft watercraft sailboat glider streetcar kayak canoe boat ship
    merchant skateboard skates skis scooter rider cyclist boarding alighting wheeled wheel heavy pick
    transport conveyance powered nonpowered unpowered nonmotor stationary military civilian personnel
    terrorism weapon weapons legal intervention enforcement bystander building buildings furniture
    machinery terrain storm snow road utility commercial industrial private public home hospital
    official farm sport sports jumping diving swimming pool falling fall falls struck striking strike
    tripping stumbling slipping colliding collided thrown trapped overboard roller inflatable craft
    onboard landing special fishing street highway station vessel ambulance balloon parachute hang
    aerial agricultural construction explosion explosive explosives munitions firearm firearms rifle
    bomb blast detonation conflagration misadventure supervision occurrence incidents event events means
    manner loss damage process object objects index ring little great greater lesser middle long short
    small smaller large larger high deep base surface area areas zone field group groups class category
    categories number percent grade scale score rate time times hour hours minutes weeks days duration
    early recent prior previous later present presence absence known suspected suspect confirmed stated
    uncertain nature findings state forms form methods problem problems need needs having like best poor
    normal negative positive direct common specific nonspecific source origin resulting response
    products product material materials substance substances agent agents compounds derivatives
    preparations combinations homologues medicaments child children adult adults person persons male
    female human animal animals plant plants food water item items thing things complete incomplete
    partial total simple complex combined mixed general primarily predominantly mainly generally usually
    main major minor limited brief continuing continued completed failed fitting adjustment management
    observation return returned admission discharged delivered born liveborn standing moving drawn light
    heated hot electric electronic nuclear natural synthetic artificial plastic rubber metal glass wood
    paper stone sharp blunt loose fixed stable brown black white blue green yellow red dominant
    nondominant underlying result results involved involves involve due used using use uses order kind
    kinds member members method mother father absolute achieved action active adequacy adequate
    administered administration administrative advanced advice african alleged alternating american
    anonymous appearance applied arising arrival asian aspect attempt attempted awaiting background
    balanced band bands based battery bearing better border branch branched branches break breaks broad
    broken bucket bundle cage carried cave ceiling center certain chain change changes channel chiefly
    chip circle circumstance circumstances classical classifiable clear closing color commands
    communication component compound concentration conflict connection consequences constant content
    contents contiguous continent continuity continuous control controlled conversation conversion
    converted converting correct corrected count created critical custody date dates decision defined
    delay delays dense department dependent deployment depth designated determine difficult difficulties
    difficulty discarded discord distance documented domestic double doubling drop dual eastern eaten
    economic educational elective emergency employment environment environmental equal errors evaluation
    evidence examinations excess excessive exclude excluding executive exposed extending extent extreme
    extremely facilities facility factor factors false features filled financial finding flat floor
    fluctuations follow forced forces formation forming foster free frequent fully function functional
    functioning functions gain gender generator ghost giant global grand guardian handle hard hardship
    harmful hazardous hazards heads healthy hole horizontal host housed household housing identified
    identity illegally immediate immediately imposed inactive inadequate inappropriate increased
    indication indications individual inertia initiating inlet inner institution instruction
    insufficient intake internally investigation issue kissing laboratory lack lacking language lasting
    layer legally length life lifestyle linens linked literacy living localizes locked loop lying
    machines maintaining mate mates matter measures mechanism mesh mode monitoring monster named narrow
    near neighboring noted novel numbers occurring opening openings originating outcome outer outlet
    outside oval partially partner passages paving pattern pathways percentile period permanent
    persisting phase phenomenon pillow planned planning plate plus position possibly post potential
    potentially precipitate predominance predominant prescription presenting preservation producing
    properly provider purposes raised rapidly reading reason reasons referable refusal regaining regimen
    regular relationship relative release remaining remedying replaced reported residential resolved
    responder rest restoration restricted rich ridge roof round ruled satisfactory school sector segment
    services severely shape shift sided significance significant similar size slight slow smooth solar
    sound sounds south north west space species spot spousal stability states stream strands studies
    study successfully surrounding surveillance symbolic taken technology temporary term test testing
    threat threatened threshold training trial tributary true tree umbrella unable unavailability
    unequal unidentified unintended unqualified unrestricted unsatisfactory unusually upbringing urban
    variable versus victim void wake wear welfare wild window word words
    """
)


def _drug_dictionary_path() -> Path:
    spec = importlib.util.find_spec(DRUG_MODULE)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{DRUG_PACKAGE} is not installed (pip install {DRUG_PACKAGE})")
    return Path(spec.origin).parent / DRUG_PICKLE


def load_drug_names() -> set[str]:
    """All drug names (variants, brand names and canonical names) in the package dictionary."""
    # Trusted input: the pickle shipped inside the installed, pinned package (see module docstring).
    with bz2.open(_drug_dictionary_path(), "rb") as f:
        data = pickle.load(f)  # noqa: S301
    names = set(data["drug_variant_to_canonical"]) | set(data["drug_canonical_to_data"])
    return {str(name).lower() for name in names}


def select_drug_names(names: set[str]) -> list[str]:
    """Single-word names of letters/digits/hyphens, length >= 4, starting with a letter."""
    keep = {n for n in names if DRUG_NAME_RE.match(n) and n not in DRUG_STOPLIST}
    return sorted(keep)


def is_external_cause(table: str, code: str) -> bool:
    """External-cause codes: ICD-10-CM chapter XX (V00-Y99) and ICD-9-CM E-codes (E000-E999)."""
    if table.startswith("icd10"):
        return code[:1] in EXTERNAL_CAUSE_ICD10
    return code.startswith("E")


def read_icd_descriptions(icd_dir: Path = ICD_DIR) -> list[str]:
    """Descriptions of the bundled ICD-10-CM and ICD-9-CM tables, external-cause codes left out.

    External-cause codes describe accidents (vehicles, places, sports, household objects); their
    words are everyday English, so they are not counted.
    """
    descriptions: list[str] = []
    for name in ICD_FILES:
        with gzip.open(icd_dir / name, "rt", encoding="utf-8") as f:
            next(f)
            for line in f:
                code, _, description = line.rstrip("\n").partition("\t")
                if code and not is_external_cause(name, code):
                    descriptions.append(description)
    return descriptions


def select_icd_terms(descriptions: list[str]) -> list[str]:
    """Alphabetic lower-cased words, >= 4 letters, in >= 3 descriptions, minus stop/generic words."""
    doc_freq: collections.Counter[str] = collections.Counter()
    for description in descriptions:
        words = {w for w in ICD_WORD_RE.findall(description.lower()) if len(w) >= ICD_MIN_LEN}
        doc_freq.update(words)
    return sorted(
        w
        for w, n in doc_freq.items()
        if n >= ICD_MIN_DESCRIPTIONS and w not in ENGLISH_STOPWORDS and w not in ICD_GENERIC
    )


def write_list(path: Path, header: list[str], words: list[str]) -> None:
    """Write '#' header lines, then one word per line."""
    lines = [f"# {h}" if h else "#" for h in header] + words
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> int:
    version = importlib.metadata.version(DRUG_PACKAGE)
    drugs = select_drug_names(load_drug_names())
    write_list(
        HERE / "drugs.txt",
        [
            f"Drug names from the PyPI package {DRUG_PACKAGE} {version} ({DRUG_PICKLE}).",
            "Licence: MIT. Copyright (c) 2023 Fast Data Science Ltd; author/maintainer Thomas Wood",
            "(https://fastdatascience.com/drug-named-entity-recognition-python-library).",
            "Lower-cased single words [a-z][a-z0-9-]{3,}, a few common English words removed.",
            f"Generated by pretrain/lexicon/build_lexicon.py; {len(drugs)} names.",
        ],
        drugs,
    )
    descriptions = read_icd_descriptions()
    terms = select_icd_terms(descriptions)
    write_list(
        HERE / "icd_terms.txt",
        [
            "Terms from ICD-10-CM FY2024 (CDC/NCHS) and ICD-9-CM v32 (CMS) code descriptions,",
            "US government code sets (public domain), read from the bundled data/icd_codes/*.tsv.gz.",
            "External-cause codes (ICD-10-CM V00-Y99, ICD-9-CM E-codes) are not counted.",
            f"Lower-cased alphabetic words, >= {ICD_MIN_LEN} letters, in >= {ICD_MIN_DESCRIPTIONS} of the "
            f"{len(descriptions)} other descriptions,",
            "minus English stopwords and generic ICD template words.",
            f"Generated by pretrain/lexicon/build_lexicon.py; {len(terms)} terms.",
        ],
        terms,
    )
    print(f"drugs.txt: {len(drugs)} names; icd_terms.txt: {len(terms)} terms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
