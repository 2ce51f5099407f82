"""Where the files cmft reads at run time come from: the installed package, or the user's working directory.

Resolution is explicit, never a fallback:
- `bundled:<path>` names a file shipped inside the package, written as its path in the repository layout
  (`bundled:data/codiesp/train.jsonl`, `bundled:pretrain/lexicon/drugs.txt`); shipped recipes and configs use it.
- any other path is the user's own and resolves from the working directory, so a `./data` folder never changes
  what a bundled recipe reads, and a user's missing file never silently becomes the bundled one.
- bundled recipes and pretraining configs are also reachable by bare name (`icd_coding`, `clinical_tiny`).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from cmft.errors import CmftError

BUNDLED_PREFIX = "bundled:"
# Top-level repository folders that ship inside the package as cmft._bundled.<folder> (setup.py maps them).
BUNDLED_FOLDERS = ("recipes", "pretrain", "export", "data")


def bundled_folder(folder: str) -> Path:
    """The installed copy of one of BUNDLED_FOLDERS, as a real directory."""
    if folder not in BUNDLED_FOLDERS:
        raise ValueError(f"not a bundled folder: {folder}")
    try:
        root = importlib.resources.files(f"cmft._bundled.{folder}")
    except ModuleNotFoundError:
        raise CmftError(
            f"bundled folder {folder}/ is missing from the installed cmft package; reinstall cmft"
        ) from None
    if not isinstance(root, Path):  # a zip import: the readers need real files
        raise CmftError(f"bundled folder {folder}/ is not a directory ({root}); install cmft unzipped")
    return root


def bundled_file(relative: str) -> Path:
    """`data/codiesp/train.jsonl` → that file inside the installed package; a missing one is a CmftError."""
    top, _, rest = relative.strip().lstrip("/").partition("/")
    if top not in BUNDLED_FOLDERS or not rest:
        raise CmftError(
            f"{BUNDLED_PREFIX}{relative}: bundled paths start with one of {', '.join(f + '/' for f in BUNDLED_FOLDERS)}"
        )
    root = bundled_folder(top)
    path = (root / rest).resolve()
    if not path.is_relative_to(root.resolve()) or not path.exists():
        raise CmftError(f"{BUNDLED_PREFIX}{relative}: no such file in the installed cmft package")
    return path


def is_bundled(given: str | Path) -> bool:
    return isinstance(given, str) and given.startswith(BUNDLED_PREFIX)


def resolve_path(given: str | Path) -> Path:
    """`bundled:...` → the package's copy (must exist); anything else → the path as given, from the working
    directory (existence is the caller's check, so it can name its config field)."""
    if is_bundled(given):
        return bundled_file(str(given)[len(BUNDLED_PREFIX) :])
    return Path(given).expanduser()


def bundled_configs(folder: str) -> dict[str, Path]:
    """Bundled YAML files of `recipes` or `pretrain` by name (file stem)."""
    return {path.stem: path for path in sorted(bundled_folder(folder).glob("*.yaml"))}


def looks_like_path(given: str | Path) -> bool:
    """A config argument is a path when it has a folder part or a YAML suffix; otherwise it is a bundled name."""
    text = str(given)
    return isinstance(given, Path) or "/" in text or "\\" in text or text.endswith((".yaml", ".yml"))


def resolve_config(given: str | Path, folder: str, what: str, list_command: str) -> Path:
    """A bundled name (`icd_coding`) → the package's copy; a path → from the working directory; else CmftError."""
    if is_bundled(given):
        return resolve_path(given)
    if looks_like_path(given):
        path = Path(given).expanduser()
        if not path.is_file():
            raise CmftError(f"{given}: {what} file not found")
        return path
    return bundled_config(str(given), folder, what, list_command)


def bundled_config(name: str, folder: str, what: str, list_command: str) -> Path:
    """A bundled recipe or config by name (`icd_coding`, or `icd_coding.yaml`); a one-line error naming the others."""
    named = bundled_configs(folder)
    if name.removesuffix(".yaml") not in named:
        raise CmftError(f"{name}: no bundled {what} of that name (bundled: {', '.join(named)}; `{list_command}`)")
    return named[name.removesuffix(".yaml")]
