"""Where bundled files live: the repository's `data/`, `pretrain/`, `recipes/` folders."""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The cmft repository root (`CMFT_HOME` overrides), found from the installed package."""
    if env := os.environ.get("CMFT_HOME"):
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        if (parent / "data" / "DATA.md").is_file() and (parent / "pretrain").is_dir():
            return parent
    return Path.cwd()


def data_dir() -> Path:
    return repo_root() / "data"


def resolve_bundled(path: str | Path) -> Path:
    """A path as given if it exists from the working directory, else relative to the repository root."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    candidate = repo_root() / path
    return candidate if candidate.exists() else path
