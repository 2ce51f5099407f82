"""Installable anywhere: bundled files come from the package, the user's paths from the working directory, and
neither ever stands in for the other. (CI also installs the wheel into a fresh venv and runs the quickstart from an
empty folder outside the checkout: .ci/wheel_smoke.)"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
import yaml

from cmft.paths import BUNDLED_FOLDERS, bundled_file, bundled_folder
from tests.conftest import REPO, run_cmft, run_inline

SHADOW_SENTENCE = "Shadow\tB-Disease\nfile\tO\n.\tO\n"


def _shadow_data(cwd: Path) -> None:
    """A user's own `./data/ncbi_disease/*.tsv`: one sentence each, at the paths the bundled recipe names."""
    folder = cwd / "data" / "ncbi_disease"
    folder.mkdir(parents=True)
    for split in ("train", "devel", "test"):
        (folder / f"{split}.tsv").write_text(SHADOW_SENTENCE, encoding="utf-8")


def _examples(stdout: str) -> dict[str, int]:
    return {name: int(n) for name, n in re.findall(r"(train|dev|test) (\d+)", stdout.split("examples:")[1])}


@pytest.mark.slow
def test_a_data_folder_in_the_working_directory_does_not_change_a_bundled_recipe(tmp_path, tiny_encoder):
    empty, shadowed = tmp_path / "empty", tmp_path / "shadowed"
    empty.mkdir()
    shadowed.mkdir()
    _shadow_data(shadowed)
    encoder = f"model.encoder={tiny_encoder}"
    plain = run_cmft("validate", "ner", encoder, cwd=empty)
    beside = run_cmft("validate", "ner", encoder, cwd=shadowed)
    assert plain.returncode == 0 and beside.returncode == 0, plain.stderr[-2000:] + beside.stderr[-2000:]
    bundled_counts = _examples(plain.stdout)
    assert _examples(beside.stdout) == bundled_counts
    assert bundled_counts["train"] > 5000  # NCBI-disease train: thousands of sentences, not the shadow's one

    # the reverse: a recipe naming the user's own path reads the working directory's file, never the bundled one
    own = ["data.train=data/ncbi_disease/train.tsv", "data.dev=data/ncbi_disease/devel.tsv",
           "data.test=data/ncbi_disease/test.tsv"]  # fmt: skip
    mine = run_cmft("validate", "ner", encoder, *own, cwd=shadowed)
    assert mine.returncode == 0, mine.stderr[-2000:]
    assert _examples(mine.stdout) == {"train": 1, "dev": 1, "test": 1}
    missing = run_cmft("validate", "ner", encoder, *own, cwd=empty)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == ["error: data.train: data/ncbi_disease/train.tsv: file not found"]


def test_the_default_lexicon_is_the_packaged_one(tmp_path, monkeypatch):
    from cmft.pretraining.config import MaskingConfig
    from cmft.pretraining.lexicon import Lexicon

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrain" / "lexicon").mkdir(parents=True)
    (tmp_path / "pretrain" / "lexicon" / "drugs.txt").write_text("shadowdrugname\n", encoding="utf-8")
    lexicon = Lexicon.from_files(MaskingConfig().lexicon)
    assert "shadowdrugname" not in lexicon.words and "metformin" in lexicon.words
    assert "shadowdrugname" in Lexicon.from_files(["pretrain/lexicon/drugs.txt"]).words  # a user path: theirs


def test_a_missing_bundled_file_is_one_line_and_exit_2(tiny_encoder, capsys):
    encoder = f"model.encoder={tiny_encoder}"
    code, out, err = run_inline(capsys, "validate", "ner", encoder, "data.train=bundled:data/ncbi_disease/nope.tsv")
    assert code == 2 and err.strip().splitlines() == [
        "error: bundled:data/ncbi_disease/nope.tsv: no such file in the installed cmft package"
    ]
    code, _, err = run_inline(capsys, "validate", "ner", encoder, "data.train=bundled:../../setup.py")
    assert code == 2 and "bundled paths start with one of recipes/, pretrain/, export/, data/" in err


def _strings(node) -> list[str]:
    """Every `bundled:` string value in a parsed YAML document."""
    if isinstance(node, dict):
        return [value for child in node.values() for value in _strings(child)]
    if isinstance(node, list):
        return [value for child in node for value in _strings(child)]
    return [node] if isinstance(node, str) and node.startswith("bundled:") else []


def test_every_shipped_config_names_bundled_files_that_exist():
    """Every `bundled:` reference in a shipped recipe or config resolves inside the package, and each bundled
    folder is the repository's own (one copy: the editable install maps the repository folders themselves)."""
    for folder in BUNDLED_FOLDERS:
        assert bundled_folder(folder).resolve() == (REPO / folder).resolve()
    references = []
    for path in [*sorted((REPO / "recipes").glob("*.yaml")), *sorted((REPO / "pretrain").glob("*.yaml"))]:
        text = path.read_text(encoding="utf-8")
        references += [value.removeprefix("bundled:") for value in _strings(yaml.safe_load(text))]
        assert not re.search(r"^\s+(train|dev|test): data/", text, re.M), f"{path.name}: a bare data/ path"
    assert len(references) >= 21  # 7 recipes × 3 splits
    for relative in references:
        assert bundled_file(relative).is_file()


def test_version_is_the_package_metadata(capsys):
    code, out, _ = run_inline(capsys, "--version")
    assert code == 0 and out.strip() == f"cmft {importlib.metadata.version('cmft')}"
    import cmft

    assert cmft.__version__ == importlib.metadata.version("cmft")
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert f'version = "{cmft.__version__}"' in pyproject
    assert "__version__ =" not in (REPO / "src/cmft/__init__.py").read_text(encoding="utf-8")


def test_configs_list_show_and_cp(tmp_path, capsys):
    code, out, _ = run_inline(capsys, "configs", "list")
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == [
        "clinical_base",
        "clinical_small",
        "clinical_tiny",
    ]
    code, out, _ = run_inline(capsys, "configs", "show", "clinical_tiny")
    assert code == 0 and out == (REPO / "pretrain/clinical_tiny.yaml").read_text(encoding="utf-8")
    code, out, _ = run_inline(capsys, "configs", "cp", "clinical_small", str(tmp_path))
    copied = tmp_path / "clinical_small.yaml"
    assert code == 0 and yaml.safe_load(copied.read_text()) == yaml.safe_load(
        (REPO / "pretrain/clinical_small.yaml").read_text()
    )
    code, _, err = run_inline(capsys, "configs", "cp", "clinical_small", str(tmp_path))
    assert code == 2 and "already exists" in err
    code, _, err = run_inline(capsys, "configs", "show", "clinical_tin")
    assert code == 2 and "bundled: clinical_base, clinical_small, clinical_tiny" in err


def test_a_config_path_is_never_a_bundled_name(tmp_path):
    """`cmft pretrain clinical_small.yaml` in a folder without that file is an error, not the bundled config."""
    result = run_cmft("pretrain", "clinical_small.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: clinical_small.yaml: pretraining config file not found"
    assert not (tmp_path / "runs").exists()
