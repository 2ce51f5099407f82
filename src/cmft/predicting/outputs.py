"""The final output of `cmft predict --output OUT`, assembled from its parts in input order: JSON lines (the parts'
bytes, one after another), or with a `.parquet` OUT one row per prediction.

Parquet columns: `id` (string), then each top-level field of the predictions, typed where a field holds one kind
of value: text → string, whole numbers → int64, numbers → double, true/false → bool, lists of numbers
(embeddings) → list<double>; nested values (NER entities, ICD codes, hits, a classifier's scores) are a string
column holding their JSON, exactly as the JSON lines write them. The kinds are recorded per part when it is written,
so the schema is known before the first row is assembled and no memory grows with the number of rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from cmft.errors import CmftError
from cmft.predicting.parts import Parts, cannot_write

PARQUET_SUFFIXES = {".parquet", ".pq"}


def is_parquet(output: Path) -> bool:
    return output.suffix.lower() in PARQUET_SUFFIXES


def value_kind(value: Any) -> str | None:
    """The column kind of one value; None when it says nothing (null, an empty list)."""
    if value is None or value == []:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return "floats"
    return "json"


def joined_kind(first: str | None, second: str | None) -> str | None:
    if first is None or first == second:
        return second if first is None else first
    if second is None:
        return first
    return "double" if {first, second} == {"int64", "double"} else "json"


def field_kinds(results: list[dict[str, Any]], kinds: dict[str, str | None] | None = None) -> dict[str, str | None]:
    """Each field's kind over `results` (joined with `kinds`), fields in order of first appearance."""
    kinds = dict(kinds or {})
    for result in results:
        for key, value in result.items():
            kinds[key] = joined_kind(kinds.get(key), value_kind(value))
    return kinds


def assemble(parts: Parts, counts: list[dict[str, Any]]) -> None:
    """Write OUT from every part (under a temporary name, renamed when whole)."""
    output = parts.output
    temporary = output.with_name(f".{output.name}.partial")
    try:
        if is_parquet(output):
            _write_parquet(parts, counts, temporary)
        else:
            with open(temporary, "wb") as handle:
                for k in range(len(counts)):
                    with open(parts.jsonl(k), "rb") as part:
                        shutil.copyfileobj(part, handle)
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, output)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise cannot_write(output, exc) from None


def _write_parquet(parts: Parts, counts: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    kinds: dict[str, str | None] = {}
    for part in counts:
        for key, kind in part["kinds"].items():
            kinds[key] = joined_kind(kinds.get(key), kind)
    types = {"string": pa.string(), "json": pa.string(), "int64": pa.int64(), "double": pa.float64(),
             "bool": pa.bool_(), "floats": pa.list_(pa.float64()), None: pa.string()}  # fmt: skip
    schema = pa.schema([("id", pa.string()), *((key, types[kind]) for key, kind in kinds.items())])
    with pq.ParquetWriter(path, schema) as writer:
        for k in range(len(counts)):
            records = [json.loads(line) for line in parts.lines(k)]
            if not records:  # a buffer of blank texts only
                continue
            columns = {"id": [record.pop("id") for record in records]}
            for key, kind in kinds.items():
                values = [record.get(key) for record in records]
                if kind in ("json", None):
                    values = [None if v is None else json.dumps(v, ensure_ascii=False) for v in values]
                elif kind == "double":
                    values = [None if v is None else float(v) for v in values]
                columns[key] = values
            writer.write_table(pa.table(columns, schema=schema))


def check_output(output: Path) -> None:
    """A one-line refusal, before any work, of an OUT that cannot be a file."""
    if output.is_dir():
        raise CmftError(f"--output: {output} is a folder; name a file")
