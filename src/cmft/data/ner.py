"""NER data: CoNLL / IOB tsv files and jsonl with character-offset spans, and the one word splitter that training,
evaluation and prediction share. Errors name the file and line, never the text."""

from __future__ import annotations

import json
import re
from pathlib import Path

from cmft.errors import CmftError

# Words and punctuation marks as separate tokens, as NCBI-disease and BC5CDR are tokenised ("X-linked" is X, -,
# linked): raw text is split this way for training on span files and for prediction alike.
WORD = re.compile(r"\w+|[^\w\s]")


def word_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of the words of a raw text."""
    return [(m.start(), m.end()) for m in WORD.finditer(text)]


def read_conll(path: Path, token_column: int = 0, tag_column: int = -1) -> tuple[list[tuple[list, list]], int]:
    """Sentences of (words, tags) from a CoNLL / IOB tsv (blank line between sentences); and the count of
    empty sentences skipped. A line with the wrong number of columns is an error naming the line."""
    sentences: list[tuple[list, list]] = []
    words: list[str] = []
    tags: list[str] = []
    columns = None
    empty = 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CmftError(f"{path}: not a UTF-8 text file") from None
    for number, line in enumerate([*lines, ""], 1):
        if not line.strip() or line.startswith("-DOCSTART-"):
            if words:
                sentences.append((words, tags))
            elif number <= len(lines) and sentences and not line.startswith("-DOCSTART-"):
                empty += 1
            words, tags = [], []
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        columns = columns or len(parts)
        if len(parts) != columns or len(parts) < 2:
            raise CmftError(f"{path}: line {number}: expected {columns or 2} columns, found {len(parts)}")
        words.append(parts[token_column])
        tags.append(parts[tag_column])
    return sentences, empty


def read_span_jsonl(path: Path) -> list[tuple[list, list]]:
    """{"text", "entities": [{"start", "end", "label"}]} → words (\\w+ or punctuation) with IOB2 tags."""
    sentences = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text, entities = record["text"], record.get("entities", [])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CmftError(f"{path}: line {number}: expected JSON with text and entities") from None
        spans = word_spans(text)
        tags = ["O"] * len(spans)
        for entity in entities:
            inside = [i for i, (start, end) in enumerate(spans) if start < entity["end"] and end > entity["start"]]
            for position, i in enumerate(inside):
                tags[i] = ("B-" if position == 0 else "I-") + entity["label"]
        if spans:
            sentences.append(([text[start:end] for start, end in spans], tags))
    return sentences
