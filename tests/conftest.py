"""Shared fixtures: small real-data configs so end-to-end runs take seconds on 2 CPU cores."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A slice of every bundled source (real text), a small vocabulary and a very small ModernBERT.
SMALL_PRETRAIN = {
    "name": "test-tiny",
    "seed": 7,
    "model": {
        "architecture": {
            "hidden_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "intermediate_size": 96,
            "max_position_embeddings": 1024,
            "local_attention": 32,
        }
    },
    "tokenizer": {"vocab_size": 1500},
    "corpus": {
        "sources": [
            {"bundled": "pubmedqa", "max_documents": 60},
            {"bundled": "mts_dialog_train", "max_documents": 120},
            {"bundled": "codiesp_train", "max_documents": 20},
            {"bundled": "icd10cm", "max_documents": 1500},
            {"bundled": "icd9cm", "max_documents": 500},
        ],
        "holdout_fraction": 0.05,
    },
    "training": {
        "max_steps": 6,
        "batch_size": 4,
        "max_length": 128,
        "log_every": 1,
        "save_every": 3,
        "learning_rate": 0.002,
        "threads": 2,
    },
    "evaluation": {"batch_size": 8},
}


@pytest.fixture
def small_config(tmp_path: Path):
    """Write SMALL_PRETRAIN (optionally updated) to a YAML file and return its path."""

    def write(update: dict | None = None, name: str = "small.yaml") -> Path:
        data = yaml.safe_load(yaml.safe_dump(SMALL_PRETRAIN))
        _merge(data, update or {})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return path

    return write


def _merge(base: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Rows (dicts with the same keys) as a CSV file with a header."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def run_cmft(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (exit codes and stderr as a user sees them)."""
    return subprocess.run(
        [sys.executable, "-m", "cmft", *args], cwd=cwd or REPO, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """A tiny ModernBERT built by the suite itself: a few `cmft pretrain` steps on bundled text."""
    from cmft.pretraining.run import pretrain

    root = tmp_path_factory.mktemp("encoder")
    config = root / "encoder.yaml"
    data = yaml.safe_load(yaml.safe_dump(SMALL_PRETRAIN))
    data["training"]["max_steps"] = 4
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    return pretrain(config, output_dir=root / "run") / "model"


def run_inline(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI's real entry point in this process (no interpreter start-up): (exit status, stdout, stderr)."""
    from cmft.cli import main

    saved = sys.argv
    sys.argv = ["cmft", *args]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = saved
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# One small run of every head (and its ONNX export), shared by the export and serving tests.
QUICK = ["training.max_steps=4", "training.eval_every=2", "training.max_length=128", "training.threads=2"]
RUNS = {
    "note_classification": ["note_classification"],
    "ner": ["ner"],
    "icd_coding": ["icd_coding", "icd_coding.attention_dim=32"],
    "icd_chunked": [
        "icd_coding",
        "icd_coding.mode=chunked",
        "icd_coding.chunk_size=128",
        "icd_coding.max_chunks=3",
        "training.max_length=384",
        "icd_coding.attention_dim=32",
    ],  # fmt: skip
    "retrieval": ["retrieval"],
}


@pytest.fixture(scope="session")
def runs(tiny_encoder, tmp_path_factory) -> dict[str, Path]:
    from cmft.finetuning.run import finetune

    root = tmp_path_factory.mktemp("heads")
    return {name: finetune(recipe, [f"model.encoder={tiny_encoder}", *QUICK, *extra], output_dir=root / name)
            for name, (recipe, *extra) in RUNS.items()}  # fmt: skip


@pytest.fixture(scope="session")
def exports(runs, tmp_path_factory) -> dict[str, Path]:
    from cmft.export import export_run

    root = tmp_path_factory.mktemp("exports")
    return {name: export_run(run, root / name)[0] for name, run in runs.items()}


def bundled_test_texts(task: str) -> list[str]:
    """The bundled test split of each recipe, as the raw texts a user would send."""
    from cmft.data.ner import read_conll

    if task == "note_classification":
        with open(REPO / "data/mts_dialog/test1.csv", encoding="utf-8", newline="") as handle:
            return [row["section_text"] for row in csv.DictReader(handle)]
    if task == "retrieval":
        with open(REPO / "data/mts_dialog/test1.csv", encoding="utf-8", newline="") as handle:
            return [row["dialogue"] for row in csv.DictReader(handle)]
    if task == "ner":
        sentences, _ = read_conll(REPO / "data/ncbi_disease/test.tsv")
        return [" ".join(words) for words, _ in sentences]
    with open(REPO / "data/codiesp/test.jsonl", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]
