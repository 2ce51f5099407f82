"""`cmft predict`'s input, read lazily: rows of (id, text) from a .jsonl, a .csv/.tsv, a .parquet file or a text file
(one text per line), never the whole file at once.

Rows are numbered from 0 in input order, blank texts included (they are skipped later, and counted), so a row's
number says which buffer it belongs to whatever the process reading it. An id defaults to the row's line number
(jsonl, csv, text) or its 1-based row number (Parquet). Errors name the file and the line, never the text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmft.data.readers import iter_records, text_lines
from cmft.errors import CmftError

JSONL = {".jsonl", ".json", ".ndjson"}
CSV = {".csv", ".tsv"}
PARQUET = {".parquet", ".pq"}
PARQUET_BATCH = 2048  # rows decoded at a time
Row = tuple[int, str, str]  # (row number from 0, id, text: "" when empty or null)


@dataclass
class Inputs:
    """An input file, checked on opening (it exists; csv and Parquet: the text column is there); `rows` reads it."""

    path: Path
    text_field: str = "text"
    id_field: str = "id"
    row_text: Callable[[dict[str, Any], str, str], str] | None = None
    """A task's reading of one jsonl/csv record (record, text field, "file: line N") as its text, e.g. an assertion
    model's text with the span of `start`/`end` marked; None: the text field as it is."""

    def __post_init__(self) -> None:
        self.n_rows = 0  # rows read so far, blank ones included: all of them once `rows` is through
        if not self.path.is_file():
            raise CmftError(f"{self.path}: input file not found")
        suffix = self.path.suffix.lower()
        kinds = {**dict.fromkeys(JSONL, "jsonl"), **dict.fromkeys(CSV, "csv"), **dict.fromkeys(PARQUET, "parquet")}
        self.kind = kinds.get(suffix, "text")
        if self.kind == "csv":
            self._check_columns(self._csv_header())
        elif self.kind == "parquet":
            self._check_parquet()

    # reading ------------------------------------------------------------------------------------------------------
    def rows(self, wanted: Callable[[int], bool] = lambda _: True) -> Iterator[Row]:
        """Every row `wanted` asks for, in input order; the others are read past (Parquet: without decoding)."""
        reader = {"jsonl": self._jsonl, "csv": self._csv, "parquet": self._parquet, "text": self._text}[self.kind]
        self.n_rows = 0
        for row in reader(wanted):
            self.n_rows = max(self.n_rows, row[0] + 1)
            if wanted(row[0]):
                yield row

    def count(self) -> int | None:
        """The number of rows, when it costs little to know (Parquet's metadata; the lines of a jsonl or text file,
        which may overcount by its blank jsonl lines); None for csv, whose quoted cells may hold line breaks."""
        if self.kind == "parquet":
            return self._parquet_file().metadata.num_rows
        if self.kind == "csv":
            return None
        lines, last = 0, b"\n"
        with open(self.path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                lines, last = lines + chunk.count(b"\n"), chunk[-1:]
        return lines + (last != b"\n")

    def _jsonl(self, wanted: Callable[[int], bool]) -> Iterator[Row]:
        for index, (number, record) in enumerate(iter_records(self.path, "jsonl")):
            text = record.get(self.text_field)
            if not isinstance(text, str):
                raise CmftError(f"{self.path}: line {number}: needs a string field {self.text_field!r}")
            if self.row_text is not None:
                text = self.row_text(record, self.text_field, f"{self.path}: line {number}")
            yield index, str(record.get(self.id_field, number)), text

    def _csv(self, wanted: Callable[[int], bool]) -> Iterator[Row]:
        for index, (number, record) in enumerate(iter_records(self.path, "csv")):
            text = record.get(self.text_field)
            if text is None:  # a row with fewer cells than the header
                raise CmftError(f"{self.path}: line {number}: no {self.text_field!r} cell")
            if self.row_text is not None:
                text = self.row_text(record, self.text_field, f"{self.path}: line {number}")
            identifier = record.get(self.id_field)
            yield index, str(number if identifier is None else identifier), text

    def _text(self, wanted: Callable[[int], bool]) -> Iterator[Row]:
        for index, text in enumerate(text_lines(self.path)):
            yield index, str(index + 1), text

    def _parquet(self, wanted: Callable[[int], bool]) -> Iterator[Row]:
        import pyarrow as pa

        parquet = self._parquet_file()
        has_id = self.id_field in parquet.schema_arrow.names and self.id_field != self.text_field
        columns = [self.text_field, self.id_field] if has_id else [self.text_field]
        start = 0
        try:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
                size = batch.num_rows
                if any(wanted(index) for index in range(start, start + size)):
                    texts = batch.column(0).to_pylist()
                    ids = batch.column(1).to_pylist() if has_id else [None] * size
                    for offset, (identifier, text) in enumerate(zip(ids, texts, strict=True)):
                        number = start + offset + 1
                        yield number - 1, str(number if identifier is None else identifier), text or ""
                start += size
                self.n_rows = start
        except (pa.ArrowException, OSError) as exc:
            raise CmftError(f"{self.path}: not a readable Parquet file ({_reason(exc)})") from None

    # checks on opening --------------------------------------------------------------------------------------------
    def _csv_header(self) -> list[str]:
        import csv

        try:
            with open(self.path, encoding="utf-8", newline="") as handle:
                delimiter = "\t" if self.path.suffix.lower() == ".tsv" else ","
                return list(csv.DictReader(handle, delimiter=delimiter).fieldnames or [])
        except UnicodeDecodeError:
            raise CmftError(f"{self.path}: not a UTF-8 text file") from None
        except csv.Error as exc:
            raise CmftError(f"{self.path}: malformed CSV ({exc})") from None

    def _check_columns(self, columns: list[str]) -> None:
        if self.text_field not in columns:
            shown = ", ".join(columns[:8]) + (", …" if len(columns) > 8 else "") if columns else "none"
            raise CmftError(f"{self.path}: no column {self.text_field!r} (columns: {shown}); name the text column "
                            f"with --text-field")  # fmt: skip

    def _parquet_file(self) -> Any:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as exc:
            raise CmftError(f"{self.path}: not a readable Parquet file ({_reason(exc)})") from None

    def _check_parquet(self) -> None:
        import pyarrow as pa

        schema = self._parquet_file().schema_arrow
        self._check_columns(schema.names)
        kind = schema.field(self.text_field).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise CmftError(f"{self.path}: column {self.text_field!r} holds {kind}, not text; name the text column "
                            f"with --text-field")  # fmt: skip


def _reason(exc: BaseException) -> str:
    """The first line of pyarrow's message, short: it may quote the file's path, never its content."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return first[:160]
