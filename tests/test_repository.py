"""What the repository tracks: a fresh clone must work on any machine, so no symbolic links (git stores a link as a
file that .gitignore's `folder/` patterns miss), no large binaries outside data/, and no absolute paths of a
machine in code, tests, CI or results."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO

MAX_BYTES = 5 * 2**20
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:tmp|root|home|work)/")
SCANNED = ("src/", "tests/", "benchmarks/results/", ".ci/")


def _tracked() -> list[tuple[str, str]]:
    """(mode, path) of every file the checkout's index holds."""
    listing = subprocess.run(["git", "ls-files", "-s", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    entries = []
    for record in listing.decode("utf-8").split("\0"):
        if record:
            meta, path = record.split("\t", 1)
            entries.append((meta.split()[0], path))
    return entries


def test_the_checkout_is_a_git_repository_with_files():
    assert len(_tracked()) > 100


def test_no_symbolic_links_are_tracked():
    assert [path for mode, path in _tracked() if mode == "120000"] == []


def test_no_large_files_outside_data():
    large = [path for _, path in _tracked()
             if not path.startswith("data/") and (REPO / path).stat().st_size > MAX_BYTES]  # fmt: skip
    assert large == []


def test_no_machine_paths_in_code_tests_ci_or_results():
    found = []
    for _, path in _tracked():
        if not path.startswith(SCANNED):
            continue
        text = (REPO / path).read_bytes().decode("utf-8", errors="replace")
        found += [f"{path}: {match.group(0)}" for match in MACHINE_PATH.finditer(text)]
    assert found == []


def test_the_machine_path_pattern_finds_what_it_must():
    root = "/"  # joined here, so that this file holds no machine path itself
    assert MACHINE_PATH.search(f'"train": "{root}tmp/tmpab12/long_notes/train.jsonl"')
    assert MACHINE_PATH.search(f"cd {root}work/main && make")
    assert MACHINE_PATH.search(f"{root}root/.cache/x")
    assert MACHINE_PATH.search(f"({root}home/user/runs)")
    assert not MACHINE_PATH.search("cmft finetune ner model.encoder=/path/to/encoder")
    assert not MACHINE_PATH.search("runs/tmp/x and ./tmp/ and ~/work/")
