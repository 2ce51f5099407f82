"""The parts folder of `cmft predict --output OUT`: `OUT.parts/`, what makes a long run resumable and shardable.

The input is cut into buffers of `buffer_rows` consecutive rows (buffer k: rows k·B … k·B + B − 1, blank ones
included). Each buffer's predictions land in `part-<k>.jsonl` (the JSON lines OUT will hold) beside `part-<k>.json`
(its counts, and the kind of each result field for a Parquet OUT). Both are written under a temporary name, synced
and renamed, the counts first: a `part-<k>.jsonl` is complete, and a killed run leaves no half row. `state.json`
names the input, the model and every setting the predictions depend on; `--resume` refuses to mix parts made
differently. `end.json` says how many rows and buffers the input had, once a process has read it all.

A part does not depend on the process that made it (every batch is the one a single process runs), so a run may be
resumed with a different number of processes; OUT is assembled from the parts in order when all are done.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from cmft.errors import CmftError

STATE, END = "state.json", "end.json"
VERSION = 1  # of the folder's layout


def parts_folder(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def write_atomically(path: Path, text: str) -> None:
    """`path` holds `text` whole or not at all, even on a kill or a power cut."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def cannot_write(path: Path, exc: OSError) -> CmftError:
    reason = "a folder on its path is a file" if isinstance(exc, (FileExistsError, NotADirectoryError)) else None
    return CmftError(f"--output: {path}: cannot write ({reason or exc.strerror})")


def file_identity(path: Path) -> dict[str, Any]:
    """A file as resuming compares it: where it is, its size and when it last changed."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class Parts:
    def __init__(self, output: Path):
        self.output = output
        self.folder = parts_folder(output)

    def jsonl(self, k: int) -> Path:
        return self.folder / f"part-{k:06d}.jsonl"

    def counts(self, k: int) -> Path:
        return self.folder / f"part-{k:06d}.json"

    def done(self) -> set[int]:
        """The buffers whose part is complete."""
        return {int(path.stem.removeprefix("part-")) for path in self.folder.glob("part-*.jsonl")}

    # starting -----------------------------------------------------------------------------------------------------
    def prepare(self, state: dict[str, Any], resume: bool) -> set[int]:
        """Start the folder, or with `resume` check that its parts were made as this run would make them; the
        buffers already done. Rank 0 alone calls it."""
        if self.folder.exists():
            if not resume:
                raise CmftError(f"{self.folder}: parts of an unfinished run are here; continue it with --resume, or "
                                f"delete the folder to start over")  # fmt: skip
            self._check_state(state)
            return self.done()
        try:
            self.folder.mkdir(parents=True)
            write_atomically(self.folder / STATE, json.dumps({"version": VERSION, **state}, indent=1) + "\n")
        except OSError as exc:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.folder)
            raise cannot_write(self.output, exc) from None
        return set()

    def _check_state(self, state: dict[str, Any]) -> None:
        try:
            saved = json.loads((self.folder / STATE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            raise CmftError(f"{self.folder}: no readable {STATE}; delete the folder to start over") from None
        for key, value in {"version": VERSION, **state}.items():
            if saved.get(key) != value:
                where, then, now = _first_difference(saved.get(key), value, key)
                raise CmftError(f"--resume: the parts in {self.folder} were made otherwise ({where}: {then} then, "
                                f"{now} now); resume with the same input, model and settings, or delete the folder "
                                f"to start over")  # fmt: skip

    # writing ------------------------------------------------------------------------------------------------------
    def write(self, k: int, lines: list[str], counts: dict[str, Any]) -> None:
        """Buffer k's lines and counts, the lines last: once `part-<k>.jsonl` exists, the part is complete."""
        write_atomically(self.counts(k), json.dumps(counts) + "\n")
        write_atomically(self.jsonl(k), "".join(line + "\n" for line in lines))

    def write_end(self, rows: int, buffers: int) -> None:
        write_atomically(self.folder / END, json.dumps({"rows": rows, "buffers": buffers}) + "\n")

    # finishing ----------------------------------------------------------------------------------------------------
    def read_end(self) -> dict[str, int]:
        if not self.folder.is_dir():
            raise CmftError(f"{self.folder}: no parts folder here; nothing to merge")
        try:
            return json.loads((self.folder / END).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            raise CmftError(f"{self.folder}: the input was never read to its end; continue the run with "
                            f"--resume") from None  # fmt: skip

    def all_counts(self) -> list[dict[str, Any]]:
        """Every buffer's counts, in order; a one-line error naming the parts still missing."""
        buffers = self.read_end()["buffers"]
        missing = sorted(set(range(buffers)) - self.done())
        if missing:
            raise CmftError(f"{self.folder}: {len(missing)} of {buffers} parts are missing (the first: "
                            f"{self.jsonl(missing[0]).name}); continue the run with --resume")  # fmt: skip
        return [json.loads(self.counts(k).read_text(encoding="utf-8")) for k in range(buffers)]

    def lines(self, k: int) -> list[str]:
        return self.jsonl(k).read_text(encoding="utf-8").splitlines()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _first_difference(saved: Any, current: Any, where: str) -> tuple[str, str, str]:
    """The first place where two states differ, and the two values there, briefly."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in [*current, *(k for k in saved if k not in current)]:
            if saved.get(key) != current.get(key):
                return _first_difference(saved.get(key), current.get(key), f"{where}.{key}")
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        for index, (old, new) in enumerate(zip(saved, current, strict=True)):
            if old != new:
                return _first_difference(old, new, f"{where}[{index}]")
    return where, _short(saved), _short(current)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else "…" + text[-59:]
