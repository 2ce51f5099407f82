"""Run folders: built under a `.partial` name, renamed when complete, `latest` pointing at the newest."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from cmft import distributed
from cmft.config import apply_overrides, build_config, read_yaml
from cmft.errors import CmftError

PARTIAL = ".partial"


def default_root(kind: str) -> Path:
    return Path("runs") / kind


def new_run_dir(kind: str, name: str, output_dir: str | Path | None) -> Path:
    """The final path of a new run; its work happens in `<path>.partial` until `finish_run`."""
    if output_dir is not None:
        final = Path(output_dir)
    else:
        final = default_root(kind) / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if final.exists() and any(final.iterdir()):
        raise CmftError(f"{final}: output folder exists and is not empty; choose another --output-dir")
    partial = partial_of(final)
    if partial.exists():
        raise CmftError(f"{partial}: an unfinished run is there; continue it with --resume or delete it")
    _check_parents(partial)
    try:
        partial.mkdir(parents=True)
    except OSError as exc:
        raise CmftError(f"{partial}: cannot create the run folder ({exc.strerror})") from None
    return final


def _check_parents(path: Path) -> None:
    """A folder on the way to `path` that is a file or a dangling link, named as such (mkdir only says
    'File exists')."""
    for parent in reversed(path.parents):
        if parent.is_symlink() and not parent.exists():
            raise CmftError(f"{parent}: a dangling symbolic link (to {os.readlink(parent)}) stands where the run "
                            "folder goes; remove it or choose --output-dir")  # fmt: skip
        if parent.exists() and not parent.is_dir():
            raise CmftError(f"{parent}: a file stands where a folder of the run path goes; move it or choose "
                            "--output-dir")  # fmt: skip


def partial_of(final: Path) -> Path:
    return final.with_name(final.name + PARTIAL)


def find_resumable(kind: str, output_dir: str | Path | None) -> Path:
    """The final path of the run to resume: `--output-dir`'s, or the newest unfinished one under runs/<kind>."""
    if output_dir is not None:
        final = Path(output_dir)
        if not partial_of(final).is_dir():
            raise CmftError(f"{final}: no unfinished run to resume there ({partial_of(final)} is missing)")
        return final
    root = default_root(kind)
    candidates = sorted(root.glob(f"*{PARTIAL}"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not candidates:
        raise CmftError(f"--resume: no unfinished run under {root}/; start a new one without --resume")
    newest = candidates[-1]
    return newest.with_name(newest.name[: -len(PARTIAL)])


def finish_run(final: Path) -> Path:
    """Rename the completed `.partial` folder into place and point `latest` at it (rank 0; the other processes
    of a multi-process run wait for it)."""
    if distributed.is_main():
        _rename_into_place(final)
    distributed.barrier()
    return final


def _rename_into_place(final: Path) -> None:
    partial = partial_of(final)
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    link = final.parent / "latest"
    tmp_link = final.parent / ".latest.tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(final.name, tmp_link)
    os.replace(tmp_link, link)


def discard_run(final: Path) -> None:
    """Remove the work folder of a run that failed on bad input before training started."""
    if distributed.is_main():
        shutil.rmtree(partial_of(final), ignore_errors=True)


def start_or_resume(
    kind: str,
    schema: type,
    load_new: Callable[[], Any],
    output_dir: str | Path | None,
    resume: bool,
    overrides: list[str],
) -> tuple[Any, Path, Path]:
    """(config, final path, work folder): a new run from `load_new()`, or the unfinished one to resume
    with its saved recipe.yaml (plus any overrides). Under torchrun, rank 0 chooses (and creates) the folder and
    the other processes take its choice."""
    distributed.start()
    distributed.quiet_other_ranks()
    if resume:
        final = distributed.agree(lambda: find_resumable(kind, output_dir))
        work = partial_of(final)
        data = apply_overrides(read_yaml(work / "recipe.yaml"), overrides)
        return build_config(schema, data, str(work / "recipe.yaml")), final, work
    config = load_new()
    final = distributed.agree(lambda: new_run_dir(kind, config.run_name, output_dir))
    return config, final, partial_of(final)


def run_or_discard(final: Path, resume: bool, body: Callable[[], Path]) -> Path:
    """Run `body`; on bad input discovered mid-way, leave no half-written new run folder behind."""
    try:
        return body()
    except CmftError as exc:
        if not resume and not exc.keeps_run:
            discard_run(final)
        raise
