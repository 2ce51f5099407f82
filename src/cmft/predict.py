"""`cmft predict`: batch inference over a jsonl or text file with torch or onnxruntime, one JSON line per input.

Inputs are sorted by length and batched (little padding), then written back in input order. Texts longer than the
model's limit are windowed (NER) or truncated (the others), and counted in the summary on stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from cmft.data.readers import iter_records
from cmft.errors import CmftError
from cmft.inference import open_source, predict_texts, search
from cmft.tasks.base import EVIDENCE_K


def read_inputs(path: Path, text_field: str = "text", id_field: str = "id") -> tuple[list[tuple[str, str]], int]:
    """(id, text) pairs from a .jsonl (`text`, optional `id`) or a text file (one text per line), and the number
    of empty texts skipped."""
    if not path.is_file():
        raise CmftError(f"{path}: input file not found")
    records: list[tuple[str, str]] = []
    if path.suffix.lower() in {".jsonl", ".json", ".ndjson"}:
        for number, record in iter_records(path, "jsonl"):
            if not isinstance(record.get(text_field), str):
                raise CmftError(f"{path}: line {number}: needs a string field {text_field!r}")
            records.append((str(record.get(id_field, number)), record[text_field]))
    else:
        try:
            records = [(str(n), line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
        except UnicodeDecodeError:
            raise CmftError(f"{path}: not a UTF-8 text file") from None
    rows = [(identifier, text) for identifier, text in records if text.strip()]
    if not rows:
        raise CmftError(f"{path}: no non-empty input text")
    return rows, len(records) - len(rows)


def predict(source: str | Path, input_path: str | Path, output: str | Path | None = None, onnx: bool = False,
            batch_size: int = 16, corpus: str | Path | None = None, top_k: int = 10, int8: bool = False,
            text_field: str = "text", evidence: bool = False, evidence_k: int | None = None,
            evidence_method: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Predict every text of `input_path`; JSON lines to `output` (written whole, then renamed) or stdout. With
    `evidence`, each prediction that has any (ICD codes) carries its `evidence_k` heaviest spans of the text."""
    if batch_size < 1 or top_k < 1 or (evidence_k is not None and evidence_k < 1):
        raise CmftError("--batch-size, --top-k and --evidence-k must be at least 1")
    if not evidence and (evidence_k is not None or evidence_method is not None):
        raise CmftError("--evidence-k and --evidence-method need --evidence")
    rows, empty = read_inputs(Path(input_path), text_field)
    loaded, backend = open_source(source, onnx, int8)
    if evidence:
        settings = {"k": evidence_k or EVIDENCE_K, "method": evidence_method or "attention"}
        loaded = replace(loaded, meta={**loaded.meta, "evidence": settings})
        backend = loaded.task.evidence_backend(loaded, backend, settings["method"])
    if corpus is not None and not loaded.task.searches:
        raise CmftError(f"--corpus: searching needs a retrieval model; this one is {loaded.task.name}")
    if not loaded.task.predicts:
        raise CmftError(f"{source}: a pretrained encoder has no task head; fine-tune it first (cmft finetune RECIPE)")
    ids, texts = [r[0] for r in rows], [r[1] for r in rows]
    if corpus is not None:
        results, counts = search(loaded, backend, texts, Path(corpus), top_k, batch_size)
    else:
        results, counts = predict_texts(loaded, backend, texts, batch_size, progress=True)
    lines = [json.dumps({"id": identifier, **result}, ensure_ascii=False) for identifier, result in zip(ids, results,
             strict=True)]  # fmt: skip
    _write(lines, output)
    return {"n_inputs": len(rows), "n_empty_skipped": empty, **counts, "backend": backend.name,
            "provider": backend.provider, "task": loaded.task.name}  # fmt: skip


def _write(lines: list[str], output: str | Path | None) -> None:
    if output is None:
        sys.stdout.write("".join(line + "\n" for line in lines))
        return
    output = Path(output)
    if output.is_dir():
        raise CmftError(f"--output: {output} is a folder; name a file")
    temporary = output.with_name(f".{output.name}.partial")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.writelines(line + "\n" for line in lines)
        os.replace(temporary, output)
    except OSError as exc:
        with contextlib.suppress(OSError):  # e.g. its parent is a file: nothing was written
            temporary.unlink(missing_ok=True)
        reason = "a folder on its path is a file" if isinstance(exc, (FileExistsError, NotADirectoryError)) else None
        raise CmftError(f"--output: {output}: cannot write ({reason or exc.strerror})") from None
