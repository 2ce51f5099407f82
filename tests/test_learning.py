"""Fine-tuning learns: for every task, a short run on a small slice of its bundled data beats a trivial baseline
computed here (majority class, all-`O`, the label prior, the same encoder before training) on the held-out split by
a stated margin, and the same model left untrained (one step at a learning rate of 1e-12) does not.

The suite's tiny encoder (4 pretraining steps) knows little, so each slice is one the encoder's token embeddings
alone can separate once fine-tuned; what is checked is that the task's head, loss, collator and optimizer learn."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

import pytest
from sklearn.metrics import f1_score

from cmft.finetuning.run import finetune
from tests.conftest import REPO, write_csv

FAST = ["training.threads=2", "training.early_stopping_patience=null", "training.warmup_ratio=0"]
UNTRAINED = ["training.max_steps=1", "training.learning_rate=1e-12", "training.head_learning_rate=1e-12"]


def _metrics(task: str, encoder: Path, folder: Path, overrides: list[str]) -> dict:
    run = finetune(task, [f"model.encoder={encoder}", *FAST, *overrides], output_dir=folder)
    return json.loads((run / "metrics.json").read_text(encoding="utf-8"))


def _trained_and_untrained(task: str, encoder: Path, tmp: Path, data: list[str], steps: list[str]) -> tuple[dict, dict]:
    trained = _metrics(task, encoder, tmp / "trained", [*data, *steps])
    untrained = _metrics(task, encoder, tmp / "untrained", [*data, *UNTRAINED])
    return trained, untrained


def _mts_rows(split: str, headers: set[str], per_class: int | None = None) -> list[dict]:
    with open(REPO / f"data/mts_dialog/{split}.csv", encoding="utf-8", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["section_header"] in headers]
    if per_class is None:
        return rows
    taken: Counter = Counter()
    kept = []
    for row in rows:
        if taken[row["section_header"]] < per_class:
            taken[row["section_header"]] += 1
            kept.append(row)
    return kept


@pytest.mark.slow
def test_note_classification_beats_the_majority_class(tiny_encoder, tmp_path):
    headers = {"GENHX", "FAM/SOCHX", "MEDICATIONS", "ALLERGY"}
    train = write_csv(tmp_path / "train.csv", _mts_rows("train", headers, per_class=50))
    test_rows = _mts_rows("test1", headers)
    test = write_csv(tmp_path / "test.csv", test_rows)
    gold = [row["section_header"] for row in test_rows]
    majority = Counter(gold).most_common(1)[0][0]
    baseline = f1_score(gold, [majority] * len(gold), average="macro", labels=sorted(headers))
    data = [f"data.train={train}", f"data.dev={test}", f"data.test={test}", "training.max_length=96"]
    trained, untrained = _trained_and_untrained("note_classification", tiny_encoder, tmp_path, data,
                                                ["training.max_steps=60", "training.learning_rate=0.002"])  # fmt: skip
    bar = baseline + 0.2
    assert trained["macro_f1"] >= bar, (trained["macro_f1"], baseline)
    assert untrained["macro_f1"] < bar, (untrained["macro_f1"], baseline)


def _conll_slice(source: Path, target: Path, sentences: int) -> Path:
    blocks = source.read_text(encoding="utf-8").split("\n\n")[:sentences]
    target.write_text("\n\n".join(blocks) + "\n\n", encoding="utf-8")
    return target


@pytest.mark.slow
def test_ner_beats_all_outside(tiny_encoder, tmp_path):
    train = _conll_slice(REPO / "data/ncbi_disease/train.tsv", tmp_path / "train.tsv", 400)
    test = _conll_slice(REPO / "data/ncbi_disease/test.tsv", tmp_path / "test.tsv", 200)
    data = [f"data.train={train}", f"data.dev={test}", f"data.test={test}", "training.max_length=96"]
    trained, untrained = _trained_and_untrained("ner", tiny_encoder, tmp_path, data,
                                                ["training.max_steps=80", "training.learning_rate=0.003"])  # fmt: skip
    bar = 0.0 + 0.1  # tagging every word `O` finds no entity: strict F1 0
    assert trained["f1"] >= bar, trained
    assert untrained["f1"] < bar, untrained


@pytest.mark.slow
def test_icd_coding_ranks_notes_better_than_the_label_prior(tiny_encoder, tmp_path):
    """macro AUC ranks the notes per code: the label prior (every note the same scores) gives 0.5."""
    data = ["training.max_length=192", "icd_coding.attention_dim=32", "icd_coding.label_space.min_train_count=10"]
    trained, untrained = _trained_and_untrained("icd_coding", tiny_encoder, tmp_path, data,
                                                ["training.max_steps=60", "training.learning_rate=0.003"])  # fmt: skip
    bar = 0.5 + 0.08
    assert trained["macro_auc"] >= bar, trained
    assert untrained["macro_auc"] < bar, untrained


@pytest.mark.slow
def test_retrieval_beats_the_encoder_before_training(tiny_encoder, tmp_path):
    """Dialogue → its note section among 100 distinct sections (MTS-Dialog repeats short sections such as
    "None.", which would leave the in-batch loss nothing to learn from)."""
    with open(REPO / "data/mts_dialog/train.csv", encoding="utf-8", newline="") as handle:
        rows = list({row["section_text"]: row for row in csv.DictReader(handle)}.values())
    train = write_csv(tmp_path / "train.csv", rows[:320])
    test = write_csv(tmp_path / "test.csv", rows[320:420])
    data = [f"data.train={train}", f"data.dev={test}", f"data.test={test}", "training.max_length=128"]
    trained, untrained = _trained_and_untrained("retrieval", tiny_encoder, tmp_path, data,
                                                ["training.max_steps=40", "training.learning_rate=0.0005"])  # fmt: skip
    random_ranking = sum(1 / 100 / math.log2(rank + 1) for rank in range(1, 11))  # one relevant among 100: 0.045
    assert untrained["ndcg@10"] >= random_ranking, untrained  # mean pooling of token embeddings matches words
    assert trained["ndcg@10"] >= untrained["ndcg@10"] + 0.05, (trained["ndcg@10"], untrained["ndcg@10"])
