"""Build hook: the files cmft reads at run time ship inside the package.

Each bundled file has one copy, in the repository's top-level folders (the layout users see in a clone); this maps
every folder below onto the package `cmft._bundled.<folder>[.<sub-folder>]`, so that a wheel installed anywhere
carries them and `cmft.paths` finds them with importlib. Metadata and dependencies live in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent
# Repository folder -> the file patterns shipped from it (and, where `True`, from its sub-folders).
BUNDLED = {
    "recipes": (["*.yaml"], False),
    "pretrain": (["*.yaml", "*.txt", "*.md"], True),
    "export": (["onnx.yaml"], False),  # only the profile: export/<run>/ folders are a user's artefacts
    "data": (["*.md", "*.jsonl", "*.csv", "*.tsv", "*.tsv.gz", "*.txt", "LICENSE*"], True),
}


def _bundled() -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    packages, package_dir, package_data = [], {}, {}
    for folder, (patterns, recurse) in BUNDLED.items():
        folders = [Path(folder)]
        if recurse:
            folders += sorted(
                path.relative_to(HERE)
                for path in (HERE / folder).rglob("*")
                if path.is_dir() and not any(part.startswith((".", "__")) for part in path.parts)
            )
        for directory in folders:
            name = "cmft._bundled." + ".".join(directory.parts)
            packages.append(name)
            package_dir[name] = directory.as_posix()
            package_data[name] = patterns
    return packages, package_dir, package_data


class BuildPy(build_py):
    """Bundled folders ship their data files and package marker only; maintenance scripts (build_data.py) stay.
    Each build starts from an empty package folder: pip builds in-tree, and a module deleted from src/ would
    otherwise linger in build/lib and ship in the next wheel."""

    def run(self) -> None:
        if not self.editable_mode:
            shutil.rmtree(Path(self.build_lib) / "cmft", ignore_errors=True)
        super().run()

    def find_package_modules(self, package: str, package_dir: str) -> list:
        modules = super().find_package_modules(package, package_dir)
        if package.startswith("cmft._bundled."):
            return [entry for entry in modules if entry[1] == "__init__"]
        return modules


packages, package_dir, package_data = _bundled()
setup(
    packages=find_packages("src") + packages,
    package_dir={"": "src", **package_dir},
    package_data={"cmft": ["py.typed"], **package_data},
    cmdclass={"build_py": BuildPy},
)
