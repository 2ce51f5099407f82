"""Fine-tuning data readers. Errors name the file and line/record, never the note text."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmft.errors import CmftError
from cmft.paths import resolve_path
from cmft.recipe import DataConfig, FolderSplit


@dataclass
class Example:
    id: str
    text: str
    label: Any
    """A class name (str) or a list of codes."""


@dataclass
class Split:
    name: str
    examples: list[Example]
    skipped_empty: int = 0
    source: str = ""


def existing(path: str, field_name: str) -> Path:
    resolved = resolve_path(path)  # `bundled:...` raises itself when missing
    if not resolved.exists():
        raise CmftError(f"{field_name}: {path}: file not found")
    return resolved


def iter_records(path: Path, fmt: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or row number, record) from a jsonl or csv file."""
    if fmt == "auto":
        fmt = "csv" if path.suffix.lower() in {".csv", ".tsv"} else "jsonl"
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            if fmt == "csv":
                reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
                for row in reader:
                    yield reader.line_num, row
            else:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        raise CmftError(f"{path}: line {number} is not valid JSON") from None
                    if not isinstance(record, dict):
                        raise CmftError(f"{path}: line {number} is not a JSON object")
                    yield number, record
    except UnicodeDecodeError:
        raise CmftError(f"{path}: not a UTF-8 text file") from None
    except csv.Error as exc:
        raise CmftError(f"{path}: malformed CSV ({exc})") from None


def text_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file, read lazily and split as str.splitlines splits the whole file (\\f, \\u2028 …
    end a line too), blank ones included: one text per line (`cmft predict`'s text input, a `--corpus` .txt)."""
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                yield from line.splitlines()
    except UnicodeDecodeError:
        raise CmftError(f"{path}: not a UTF-8 text file") from None


def _label_value(value: Any, multi_label: bool, where: str) -> Any:
    if multi_label:
        if isinstance(value, str):  # csv cells: codes separated by ; or |
            value = [v for v in value.replace("|", ";").split(";") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise CmftError(f"{where}: the label field must be a list of code strings")
        return [v.strip() for v in value]
    if not isinstance(value, (str, int)) or str(value).strip() == "":
        raise CmftError(f"{where}: the label field must be a non-empty class name")
    return str(value).strip()


def _from_file(path: Path, data: DataConfig, multi_label: bool, name: str) -> Split:
    split = Split(name=name, examples=[], source=str(path))
    seen: dict[str, int] = {}
    for number, record in iter_records(path, data.format):
        where = f"{path}: line {number}"
        for key in (data.text_field, data.label_field):
            if key not in record or record[key] is None:
                raise CmftError(f"{where}: no field {key!r} (set data.text_field / data.label_field)")
        text = record[data.text_field]
        if not isinstance(text, str):
            raise CmftError(f"{where}: field {data.text_field!r} must be a string")
        identifier = str(record.get(data.id_field, number))
        if identifier in seen:
            raise CmftError(f"{where}: duplicate id {identifier!r} (first at line {seen[identifier]})")
        seen[identifier] = number
        if not text.strip():
            split.skipped_empty += 1
            continue
        split.examples.append(Example(identifier, text, _label_value(record[data.label_field], multi_label, where)))
    return split


def _from_folder(source: FolderSplit, multi_label: bool, name: str, field_name: str) -> Split:
    folder = existing(source.texts, f"{field_name}.texts")
    labels_path = existing(source.labels, f"{field_name}.labels")
    if not folder.is_dir():
        raise CmftError(f"{field_name}.texts: {source.texts}: not a folder")
    texts: dict[str, str] = {}
    for path in sorted(folder.glob("*.txt")):
        try:
            texts[path.stem] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CmftError(f"{path}: not a UTF-8 text file") from None
    labels: dict[str, list[str]] = {identifier: [] for identifier in texts}
    with open(labels_path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2:
                raise CmftError(f"{labels_path}: line {number}: expected <id><TAB><label>")
            if parts[0] not in texts:
                raise CmftError(f"{labels_path}: line {number}: document {parts[0]!r} has no .txt file in {folder}")
            labels[parts[0]].append(parts[1].strip())
    split = Split(name=name, examples=[], source=str(folder))
    for identifier, text in texts.items():
        if not text.strip():
            split.skipped_empty += 1
            continue
        if multi_label:
            split.examples.append(Example(identifier, text, labels[identifier]))
        else:
            if len(labels[identifier]) != 1:
                raise CmftError(f"{labels_path}: document {identifier!r} needs exactly one label")
            split.examples.append(Example(identifier, text, labels[identifier][0]))
    return split


def read_split(data: DataConfig, name: str, multi_label: bool) -> Split | None:
    """Read `data.<name>` (train, dev or test); None when the recipe has no such split."""
    source = getattr(data, name)
    if source is None:
        return None
    if isinstance(source, FolderSplit):
        split = _from_folder(source, multi_label, name, f"data.{name}")
    else:
        split = _from_file(existing(source, f"data.{name}"), data, multi_label, name)
    if not split.examples:
        raise CmftError(f"data.{name}: {split.source}: no non-empty example")
    return split
