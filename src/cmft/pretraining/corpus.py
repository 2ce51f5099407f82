"""The pretraining corpus: bundled real text plus the user's own files, streamed, with a held-out slice."""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cmft.data.readers import iter_records
from cmft.errors import CmftError
from cmft.paths import bundled_folder
from cmft.pretraining.config import CorpusConfig, SourceConfig

log = logging.getLogger(__name__)


def dotted_icd10(code: str) -> str:
    """ICD-10-CM tables store `E119`; the dotted form used in notes and in the model card is `E11.9`."""
    return code if len(code) <= 3 else f"{code[:3]}.{code[3:]}"


def dotted_icd9(code: str) -> str:
    """ICD-9-CM diagnosis codes: `25000` → `250.00`, `V1046` → `V10.46`, `E8889` → `E888.9`."""
    head = 4 if code.startswith("E") else 3
    return code if len(code) <= head else f"{code[:head]}.{code[head:]}"


def _icd_lines(file_name: str, system: str) -> Iterator[str]:
    dotted = dotted_icd10 if system == "ICD-10-CM" else dotted_icd9
    with gzip.open(bundled_folder("data") / "icd_codes" / file_name, "rt", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t")
        next(reader)  # header
        for code, description in reader:
            yield f"{system} code {dotted(code)}: {description}"


def _mts_dialog_train() -> Iterator[str]:
    with open(bundled_folder("data") / "mts_dialog" / "train.csv", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            yield row["section_text"]
            yield row["dialogue"]


def _codiesp_train() -> Iterator[str]:
    # Only the train split: dev and test notes are fine-tuning evaluation data and never enter MLM.
    with open(bundled_folder("data") / "codiesp" / "train.jsonl", encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)["text"]


def _pubmedqa() -> Iterator[str]:
    with open(bundled_folder("data") / "pubmedqa" / "abstracts.txt", encoding="utf-8") as handle:
        yield from handle


BUNDLED = {
    "pubmedqa": _pubmedqa,
    "mts_dialog_train": _mts_dialog_train,
    "codiesp_train": _codiesp_train,
    "icd10cm": lambda: _icd_lines("icd10cm_2024_codes.tsv.gz", "ICD-10-CM"),
    "icd9cm": lambda: _icd_lines("icd9cm_v32_dx_long.tsv.gz", "ICD-9-CM"),
}


def _files_of(path_spec: str) -> list[Path]:
    path = Path(path_spec)
    if any(ch in path_spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(path_spec, recursive=True) if Path(p).is_file())
        if not files:
            raise CmftError(f"corpus source {path_spec!r}: the glob matches no file")
        return files
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise CmftError(f"corpus source {path_spec!r}: the folder holds no file")
        return files
    if not path.is_file():
        raise CmftError(f"corpus source {path_spec!r}: file not found")
    return [path]


def _first_bad_json_line(path: Path, text_field: str) -> str | None:
    """The first line that is not a JSON object with a string `text_field`; None when every line is (or the file
    cannot be read now: the caller then reports the stream's own failure)."""
    try:
        for number, record in iter_records(path, "jsonl"):
            if not isinstance(record.get(text_field), str):
                return f"line {number} has no string field {text_field!r}"
    except CmftError as exc:  # bad JSON, not an object, not UTF-8: the reader's own words
        return str(exc).removeprefix(f"{path}: ")
    except OSError:
        return None
    return None


def _stream_file(path: Path, source: SourceConfig) -> Iterator[str]:
    """Stream one file through `datasets` (nothing is loaded whole), mapping failures to CmftError."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    fmt = source.format
    if fmt == "auto":
        fmt = "jsonl" if path.suffix in {".jsonl", ".json"} else "text"
    try:
        if fmt == "jsonl":
            stream = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)
            for record in stream:
                text = record.get(source.text_field)
                if not isinstance(text, str):
                    raise CmftError(f"{path}: a record has no string field {source.text_field!r} (set text_field)")
                yield text
        else:
            stream = datasets.load_dataset(
                "text", data_files=str(path), split="train", streaming=True, sample_by=source.sample_by
            )
            for record in stream:
                yield record["text"]
    except UnicodeDecodeError:
        raise CmftError(f"{path}: not UTF-8 text; convert it (e.g. iconv -t utf-8) or remove it") from None
    except CmftError:
        raise
    except Exception as exc:  # datasets/pyarrow raise many types, for malformed JSON and for everything else
        bad_line = _first_bad_json_line(path, source.text_field) if fmt == "jsonl" else None
        if bad_line is not None:
            raise CmftError(f"{path}: {bad_line}") from None
        reason = " ".join(str(exc).split())[:200] or "no message"
        raise CmftError(f"{path}: reading it as {fmt} failed ({type(exc).__name__}: {reason})") from None


def source_files(source: SourceConfig) -> list[Path]:
    """The user files a source reads, in reading order (none for a bundled source)."""
    return [] if source.bundled is not None else _files_of(source.path or "")


def iter_source(source: SourceConfig) -> Iterator[str]:
    """The non-empty documents of one source, whitespace-stripped, in a stable order."""
    if source.bundled is not None:
        texts: Iterator[str] = BUNDLED[source.bundled]()
    else:
        texts = (text for path in source_files(source) for text in _stream_file(path, source))
    count = 0
    for text in texts:
        text = text.strip()
        if not text:
            continue
        yield text
        count += 1
        if source.max_documents is not None and count >= source.max_documents:
            return


def is_heldout(text: str, fraction: float) -> bool:
    """A stable choice from the text itself, so the held-out slice never depends on order or sources."""
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclass
class Corpus:
    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    documents_per_source: dict[str, int] = field(default_factory=dict)


def split_documents(config: CorpusConfig, counts: dict[str, int] | None = None) -> Iterator[tuple[str, bool]]:
    """Every document of every source as (text, held_out), in order: the held-out slice is chosen by a hash of
    the text and capped at `max_holdout_documents`. Fills `counts` (documents per source) as sources finish."""
    heldout = 0
    for source in config.sources:
        name = source.bundled or source.path or ""
        count = 0
        for text in iter_source(source):
            count += 1
            held = heldout < config.max_holdout_documents and is_heldout(text, config.holdout_fraction)
            heldout += held
            yield text, held
        if count == 0:
            raise CmftError(f"corpus source {name!r}: no non-empty document")
        if counts is not None:
            counts[name] = count


def heldout_documents(config: CorpusConfig) -> list[str]:
    """The held-out slice that `build_corpus` and the streaming cache split off, without keeping the training texts."""
    heldout: list[str] = []
    last_train = None
    for text, held in split_documents(config):
        if held:
            heldout.append(text)
        else:
            last_train = text
    return heldout or ([last_train] if last_train is not None else [])  # as build_corpus when the hash chose none


def build_corpus(config: CorpusConfig) -> Corpus:
    """Read every source and split off the fixed held-out slice (duplicates of a text share its side)."""
    corpus = Corpus()
    for text, held in split_documents(config, corpus.documents_per_source):
        (corpus.heldout if held else corpus.train).append(text)
    if not corpus.heldout:
        corpus.heldout.append(corpus.train.pop())
    if not corpus.train:
        raise CmftError("corpus: nothing left to train on after the held-out slice; add documents")
    log.info("corpus: %d train and %d held-out documents", len(corpus.train), len(corpus.heldout))
    return corpus
