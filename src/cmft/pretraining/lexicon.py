"""The medical lexicon: which words of a text are drugs, diagnoses, procedures or codes."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from cmft.errors import CmftError
from cmft.paths import resolve_path

WORD = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-'][A-Za-z0-9]+)*")
# ICD-10-CM (E11.9, Z20.818, S72.001A) and ICD-9-CM (250.00, V10.46, E888.9) codes as written in notes.
CODE = re.compile(
    r"\b(?:[A-TV-Z][0-9][0-9A-Z](?:\.[0-9A-Z]{1,4})?|[0-9]{3}\.[0-9]{1,2}|V[0-9]{2}\.[0-9]{1,2}|E[0-9]{3}\.[0-9])\b"
)


class Lexicon:
    """Lower-cased medical words; `spans` finds them and code patterns in raw text."""

    def __init__(self, words: Iterable[str]):
        self.words = frozenset(w.lower() for w in words)

    @classmethod
    def from_files(cls, paths: Iterable[str | Path]) -> Lexicon:
        words: set[str] = set()
        for given in paths:
            path = resolve_path(given)
            if not path.is_file():
                raise CmftError(f"masking.lexicon: {given}: file not found")
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError:
                raise CmftError(f"masking.lexicon: {given}: not a UTF-8 text file") from None
            words.update(line.strip() for line in lines if line.strip() and not line.startswith("#"))
        return cls(words)

    def __len__(self) -> int:
        return len(self.words)

    def is_medical(self, word: str) -> bool:
        return word.lower() in self.words or CODE.fullmatch(word) is not None

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Sorted, non-overlapping (start, end) character spans of medical words and codes."""
        found = [m.span() for m in CODE.finditer(text)]
        found += [m.span() for m in WORD.finditer(text) if m.group().lower() in self.words]
        found.sort()
        merged: list[tuple[int, int]] = []
        for start, end in found:
            if merged and start < merged[-1][1]:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        return merged
