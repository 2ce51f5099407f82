"""Regenerate the bundled data sets in ``data/`` from the raw public data folder.

Usage::

    python data/build_data.py [SHARED_DATA_DIR]

    python data/build_data.py --only assertion     # rebuild data/assertion/ alone, from the bundled notes

``SHARED_DATA_DIR`` defaults to ``../shared/data`` relative to the repository root. It must hold
the raw upstream folders (each with a SOURCE.md): pubmedqa/, mts_dialog/, codiesp/, ncbi_disease/
and icd_codes/. nfcorpus/, hoc/ and negex/ are deliberately NOT copied (their licences forbid it, or
state none). data/assertion/ is made from the bundled CodiEsp and MTS-Dialog notes, with silver labels
from the rules of data/assertion_rules.py.
See data/DATA.md for origin, licences and what this script changes.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
REPO_ROOT = DATA_DIR.parent
DEFAULT_SHARED = REPO_ROOT.parent / "shared" / "data"

MTS_FILES = {
    "MTS-Dialog-TrainingSet.csv": "train.csv",
    "MTS-Dialog-ValidationSet.csv": "validation.csv",
    "MTS-Dialog-TestSet-1-MEDIQA-Chat-2023.csv": "test1.csv",
    "MTS-Dialog-TestSet-2-MEDIQA-Sum-2023.csv": "test2.csv",
}
NCBI_FILES = ("train.tsv", "devel.tsv", "test.tsv")
ICD_GZIP = ("icd10cm_2024_codes.tsv", "icd9cm_v32_dx_long.tsv")
ICD_PLAIN = ("icd10cm_chapters.tsv", "icd10cm_blocks.tsv")
CODIESP_SPLITS = ("train", "dev", "test")

# Expected counts from codiesp/SOURCE.md: split -> (docs, distinct D codes, distinct P codes).
CODIESP_EXPECTED = {"train": (500, 1767, 563), "dev": (250, 1158, 375), "test": (250, 1143, 371)}

# ICD-10-CM (diagnoses): letter, 2 alphanumerics, optional dot + 1-4 alphanumerics.
D_CODE_RE = re.compile(r"^[A-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?$")
# ICD-10-PCS (procedures): 7 characters, or shorter prefixes; no dot.
P_CODE_RE = re.compile(r"^[0-9A-Z]{3,7}$")


def normalise_ws(text: str) -> str:
    """Collapse every run of whitespace into one space and strip the ends."""
    return " ".join(text.split())


def pubmedqa_abstract(entry: dict) -> str:
    """CONTEXTS joined + LONG_ANSWER, whitespace normalised (as in pubmedqa/SOURCE.md)."""
    return normalise_ws(" ".join(entry["CONTEXTS"]) + " " + entry["LONG_ANSWER"])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as UTF-8 JSON lines (non-ASCII kept as is)."""
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_pubmedqa(src: Path, dst: Path) -> dict[str, int]:
    """Copy abstracts.txt and LICENSE, write questions_{train,dev,test}.jsonl; check text agrees with the txt."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "pubmedqa_abstracts.txt", dst / "abstracts.txt")
    shutil.copyfile(src / "LICENSE.upstream", dst / "LICENSE.upstream")
    with (src / "ori_pqal.json").open(encoding="utf-8") as f:
        pqal = json.load(f)
    lines = (src / "pubmedqa_abstracts.txt").read_text(encoding="utf-8").splitlines()
    if len(lines) != len(pqal):
        raise ValueError(f"pubmedqa: {len(lines)} abstract lines but {len(pqal)} JSON entries")
    rows = []
    for (pmid, entry), line in zip(pqal.items(), lines, strict=True):
        abstract = pubmedqa_abstract(entry)
        if abstract != line:
            raise ValueError(f"pubmedqa: abstract of PMID {pmid} differs from its txt line")
        rows.append(
            {
                "id": pmid,
                "question": entry["QUESTION"],
                "abstract": abstract,
                "meshes": list(entry["MESHES"]),
                "final_decision": entry["final_decision"],
            }
        )
    # question -> abstract retrieval splits, in ori_pqal.json order: 800 train, 100 dev, 100 test
    for name, part in (("train", rows[:800]), ("dev", rows[800:900]), ("test", rows[900:])):
        write_jsonl(dst / f"questions_{name}.jsonl", part)
    return {"abstracts": len(rows)}


def build_mts_dialog(src: Path, dst: Path) -> dict[str, int]:
    """Copy the four CSVs unchanged under short names."""
    dst.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, new in MTS_FILES.items():
        shutil.copyfile(src / name, dst / new)
        with (dst / new).open(encoding="utf-8", newline="") as f:
            counts[new] = sum(1 for _ in csv.DictReader(f))
    return counts


def read_codes(path: Path, pattern: re.Pattern[str], problems: list[str]) -> dict[str, list[str]]:
    """articleID -> upper-cased codes, de-duplicated in order of first appearance."""
    codes: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            doc_id, code = line.split("\t")
            code = code.strip().upper()
            if not pattern.match(code):
                problems.append(f"{path.name}:{lineno}: unusual code {code!r}")
            doc_codes = codes.setdefault(doc_id.strip(), [])
            if code not in doc_codes:
                doc_codes.append(code)
    return codes


def read_english_text(path: Path) -> str:
    """Lines stripped, empty lines dropped, joined with newlines."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return "\n".join(line for line in lines if line)


def build_codiesp(src: Path, dst: Path) -> dict[str, dict[str, int]]:
    """Write {split}.jsonl with English text, D codes and P codes per document."""
    dst.mkdir(parents=True, exist_ok=True)
    root = src / "final_dataset_v4_to_publish"
    counts: dict[str, dict[str, int]] = {}
    problems: list[str] = []
    for split in CODIESP_SPLITS:
        sdir = root / split
        d_codes = read_codes(sdir / f"{split}D.tsv", D_CODE_RE, problems)
        p_codes = read_codes(sdir / f"{split}P.tsv", P_CODE_RE, problems)
        en_files = {p.stem: p for p in (sdir / "text_files_en").glob("*.txt")}
        es_ids = {p.stem for p in (sdir / "text_files").glob("*.txt")}
        if set(en_files) != es_ids:
            problems.append(f"{split}: English and Spanish file sets differ")
        for doc_id in set(d_codes) | set(p_codes):
            if doc_id not in en_files:
                problems.append(f"{split}: labelled document {doc_id} has no English text")
        rows = []
        for doc_id in sorted(en_files):
            text = read_english_text(en_files[doc_id])
            if not text:
                problems.append(f"{split}: empty English text for {doc_id}")
            rows.append(
                {
                    "id": doc_id,
                    "text": text,
                    "codes": d_codes.get(doc_id, []),
                    "procedure_codes": p_codes.get(doc_id, []),
                }
            )
        write_jsonl(dst / f"{split}.jsonl", rows)
        distinct_d = {c for r in rows for c in r["codes"]}
        distinct_p = {c for r in rows for c in r["procedure_codes"]}
        counts[split] = {
            "docs": len(rows),
            "distinct_d": len(distinct_d),
            "distinct_p": len(distinct_p),
            "d_labels": sum(len(r["codes"]) for r in rows),
            "p_labels": sum(len(r["procedure_codes"]) for r in rows),
            "docs_with_p": sum(1 for r in rows if r["procedure_codes"]),
        }
        got = (len(rows), len(distinct_d), len(distinct_p))
        if got != CODIESP_EXPECTED[split]:
            problems.append(f"{split}: counts {got} != expected {CODIESP_EXPECTED[split]}")
    for problem in problems:
        print(f"codiesp WARNING: {problem}", file=sys.stderr)
    return counts


def build_ncbi(src: Path, dst: Path) -> dict[str, int]:
    """Copy the three IOB files unchanged."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in NCBI_FILES:
        shutil.copyfile(src / name, dst / name)
    return {name: (dst / name).stat().st_size for name in NCBI_FILES}


def build_icd(src: Path, dst: Path) -> dict[str, int]:
    """gzip -9 the two code tables (content unchanged, header kept); copy chapters/blocks."""
    dst.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name in ICD_GZIP:
        raw = (src / name).read_bytes()
        # mtime=0 and no file name make the output byte-for-byte reproducible.
        with (
            (dst / f"{name}.gz").open("wb") as fo,
            gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=fo, mtime=0) as gz,
        ):
            gz.write(raw)
        counts[name] = raw.count(b"\n") - 1
    for name in ICD_PLAIN:
        shutil.copyfile(src / name, dst / name)
        counts[name] = (dst / name).read_bytes().count(b"\n") - 1
    return counts


# data/assertion/: which bundled notes feed each split, the sentences kept, and the rows per split.
ASSERTION_SOURCES = {
    "train": ("codiesp/train.jsonl", "mts_dialog/train.csv"),
    "dev": ("codiesp/dev.jsonl", "mts_dialog/validation.csv"),
    "test": ("codiesp/test.jsonl", "mts_dialog/test1.csv"),
}
ASSERTION_ROWS = {"train": 3000, "dev": 600, "test": 600}
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"])")
MAX_SENTENCE_CHARS = 250


def note_sentences(path: Path) -> list[tuple[str, str]]:
    """(note id, sentence) of a bundled CodiEsp jsonl (one sentence per line, split further at sentence ends) or
    MTS-Dialog csv (its section texts); sentences of 3 words to MAX_SENTENCE_CHARS characters."""
    if path.suffix == ".jsonl":
        notes = [(row["id"], row["text"]) for row in map(json.loads, path.read_text(encoding="utf-8").splitlines())]
    else:
        with path.open(encoding="utf-8", newline="") as f:
            notes = [(row["ID"], row["section_text"]) for row in csv.DictReader(f)]
    found = []
    for note, text in notes:
        for line in text.splitlines():
            for sentence in SENTENCE_END.split(normalise_ws(line)):
                if len(sentence.split()) >= 3 and len(sentence) <= MAX_SENTENCE_CHARS:
                    found.append((note, sentence))
    return found


def build_assertion(src: Path, dst: Path) -> dict[str, dict[str, int]]:
    """Rows {id, text, start, end, label} per split: every finding of the lexicon in the split's sentences, labelled
    by the rules. All rows of the rare labels are kept; the rest of ASSERTION_ROWS is filled with absent and present
    rows, half each (fewer present rows than the notes hold: a sample, seeded, so that the output is reproducible)."""
    sys.path.insert(0, str(DATA_DIR))
    from assertion_rules import find_findings, label_span

    dst.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, sources in ASSERTION_SOURCES.items():
        rows: dict[str, list[dict]] = {}
        for source in sources:
            name = source.split("/")[0]
            for number, (note, sentence) in enumerate(note_sentences(src / source)):
                for k, (start, end) in enumerate(find_findings(sentence)):
                    row = {"id": f"{name}:{note}:{number}:{k}", "text": sentence, "start": start, "end": end,
                           "label": label_span(sentence, start, end)}  # fmt: skip
                    rows.setdefault(row["label"], []).append(row)
        generator = random.Random(f"assertion-{split}")
        rare = [row for label, kept in rows.items() if label not in ("present", "absent") for row in kept]
        room = ASSERTION_ROWS[split] - len(rare)
        absent = generator.sample(rows["absent"], min(len(rows["absent"]), room // 2))
        present = generator.sample(rows["present"], min(len(rows["present"]), room - len(absent)))
        chosen = sorted(rare + absent + present, key=lambda row: row["id"])
        write_jsonl(dst / f"{split}.jsonl", chosen)
        counts[split] = dict(Counter(row["label"] for row in chosen).most_common())
        counts[split]["rows"] = len(chosen)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "shared",
        nargs="?",
        type=Path,
        default=DEFAULT_SHARED,
        help="raw public data folder (default: ../shared/data relative to the repository root)",
    )
    parser.add_argument("--only", choices=["assertion"], help="rebuild only this set (from the bundled notes)")
    args = parser.parse_args(argv)
    if args.only == "assertion":
        print(json.dumps({"assertion": build_assertion(DATA_DIR, DATA_DIR / "assertion")}, indent=2))
        return 0
    shared: Path = args.shared.resolve()
    if not shared.is_dir():
        parser.error(f"no such folder: {shared}")
    report = {
        "pubmedqa": build_pubmedqa(shared / "pubmedqa", DATA_DIR / "pubmedqa"),
        "mts_dialog": build_mts_dialog(shared / "mts_dialog", DATA_DIR / "mts_dialog"),
        "codiesp": build_codiesp(shared / "codiesp", DATA_DIR / "codiesp"),
        "ncbi_disease": build_ncbi(shared / "ncbi_disease", DATA_DIR / "ncbi_disease"),
        "icd_codes": build_icd(shared / "icd_codes", DATA_DIR / "icd_codes"),
    }
    report["assertion"] = build_assertion(DATA_DIR, DATA_DIR / "assertion")  # from the notes just written
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
