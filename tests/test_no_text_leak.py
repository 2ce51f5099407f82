"""No note text leaks: every fine-tuning recipe and pretraining run on small data whose every note carries a marker
string; the marker must appear in no file of the run folder (text or binary) and in nothing printed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SMALL_PRETRAIN, run_inline

MARKER = "ZQXMARKER7731"
QUICK = ["training.max_steps=2", "training.eval_every=1", "training.max_length=64", "training.threads=2",
         "training.batch_size=4", "training.eval_batch_size=8"]  # fmt: skip


def _mts(path: Path, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "section_text": f"{MARKER} {row['section_text']}",
                             "dialogue": f"{MARKER} {row['dialogue']}"})  # fmt: skip
    return str(path)


def _sentences(path: Path, n: int) -> list[str]:
    return path.read_text(encoding="utf-8").strip().split("\n\n")[:n]


@pytest.fixture(scope="module")
def marked(tmp_path_factory) -> dict[str, list[str]]:
    """Small copies of the bundled data with the marker in every note; the overrides pointing recipes at them."""
    root = tmp_path_factory.mktemp("marked")
    with open(REPO / "data/mts_dialog/train.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))[:48]
    mts = [f"data.train={_mts(root / 'train.csv', rows)}", f"data.dev={_mts(root / 'dev.csv', rows[:16])}",
           f"data.test={_mts(root / 'test.csv', rows[16:32])}"]  # fmt: skip
    notes = [json.loads(line) for line in (REPO / "data/codiesp/train.jsonl").read_text().splitlines()[:24]]
    icd = []
    for split, part in (("train", notes), ("dev", notes[:8]), ("test", notes[8:16])):
        path = root / f"icd_{split}.jsonl"
        path.write_text("".join(json.dumps({**n, "text": f"{MARKER} {n['text']}"}) + "\n" for n in part), "utf-8")
        icd.append(f"data.{split}={path}")
    sentences = _sentences(REPO / "data/ncbi_disease/train.tsv", 40)
    ner = []
    for split, part in (("train", sentences), ("dev", sentences[:12]), ("test", sentences[12:24])):
        path = root / f"ner_{split}.tsv"
        path.write_text("\n\n".join(f"{MARKER}\tO\n{s}" for s in part) + "\n", encoding="utf-8")
        ner.append(f"data.{split}={path}")
    return {
        "note_classification": mts,
        "retrieval": mts,
        "icd_coding": [*icd, "icd_coding.label_space.min_train_count=1", "icd_coding.attention_dim=16"],
        "ner": [*ner, "ner.stride=8"],
    }


def _leaks(folder: Path, skip: tuple[str, ...] = ()) -> list[str]:
    needle = MARKER.encode()
    return [str(p.relative_to(folder)) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip and needle in p.read_bytes()]  # fmt: skip


@pytest.mark.parametrize("recipe", ["note_classification", "icd_coding", "ner", "retrieval"])
def test_finetuning_run_folder_holds_no_note_text(recipe, marked, tiny_encoder, tmp_path, capsys):
    run = tmp_path / "run"
    code, stdout, stderr = run_inline(capsys, "finetune", recipe, f"model.encoder={tiny_encoder}", *QUICK,
                                      *marked[recipe], "--output-dir", str(run))  # fmt: skip
    assert code == 0, stderr[-3000:]
    assert (run / "metrics.json").is_file()
    assert _leaks(run) == []  # the tokenizer comes from the encoder: nothing is skipped
    assert MARKER not in stdout + stderr


def test_pretraining_run_folder_holds_no_corpus_text(tmp_path, capsys):
    with open(REPO / "data/mts_dialog/train.csv", encoding="utf-8", newline="") as handle:
        texts = [row["section_text"].replace("\n", " ") for row in csv.DictReader(handle)][:300]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{MARKER} {text}\n" for text in texts), encoding="utf-8")
    config = yaml.safe_load(yaml.safe_dump(SMALL_PRETRAIN))
    config["corpus"]["sources"] = [{"path": str(corpus)}]
    config["training"] |= {"max_steps": 2, "save_every": 1}
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    run = tmp_path / "run"
    code, stdout, stderr = run_inline(capsys, "pretrain", str(path), "--output-dir", str(run))
    assert code == 0, stderr[-3000:]
    # the tokenizer is trained on this corpus: a frequent marker may become a vocabulary entry, which is not text
    assert _leaks(run, skip=("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt")) == []
    assert MARKER not in stdout + stderr
