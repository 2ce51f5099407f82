"""Codes never seen in train: descriptions from the user's file, zero-shot codes scored from them after training,
their own threshold, and a model folder that carries all of it (predict never reads the descriptions file)."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from cmft.errors import CmftError
from cmft.evaluation import evaluate_run
from cmft.finetuning.run import finetune, load_recipe
from cmft.inference import open_source, predict_texts
from cmft.tasks import get_task
from cmft.tasks.icd_coding import IcdCoder, IcdCodingTask
from cmft.tasks.icd_descriptions import description_queries, read_descriptions, scaled
from cmft.tasks.icd_labels import normalize_code
from cmft.tasks.icd_metrics import code_thresholds
from cmft.tasks.icd_zero_shot import choose_zero_shot_threshold, zero_shot_codes
from tests.conftest import REPO

QUICK = ["training.max_steps=2", "training.eval_every=2", "training.max_length=64", "training.threads=2",
         "training.learning_rate=0.01", "icd_coding.attention_dim=16",
         "icd_coding.label_space.min_train_count=2"]  # fmt: skip
INVENTED = "ZZZ unlisted test code, in no ICD-10-CM table"


def _rows(split: str, n: int) -> list[dict]:
    lines = (REPO / f"data/codiesp/{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line) for line in lines]


def _bundled() -> dict[str, str]:
    return read_descriptions("bundled:data/icd_codes/icd10cm_2024_codes.tsv.gz")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    """CodiEsp slices and a user's descriptions file: the label space's codes but one, bundled siblings of the first two
    trained codes and of a test gold code, an invented sibling of the first, and a code of an untrained category."""
    root = tmp_path_factory.mktemp("zero_shot_data")
    files = {}
    for split, n in (("train", 40), ("dev", 20), ("test", 20)):
        files[split] = root / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in _rows(split, n)), encoding="utf-8")
    counts = Counter(normalize_code(c) for row in _rows("train", 40) for c in set(row["codes"]))
    trained = sorted(code for code, n in counts.items() if n >= 2)
    bundled = _bundled()
    described = [code for code in trained if code in bundled][1:]  # the first described code left out
    first, second = (normalize_code(code, "category") for code in described[:2])
    siblings = [c for c in bundled if normalize_code(c, "category") in (first, second) and c not in trained][:4]
    categories = {normalize_code(code, "category") for code in trained}
    test_gold = [normalize_code(c) for row in _rows("test", 20) for c in row["codes"]]
    siblings.append(next(c for c in test_gold if normalize_code(c, "category") in categories and c in bundled
                         and c not in trained and c not in siblings))  # so that coverage can show it  # fmt: skip
    invented = f"{first}.ZZ"
    outsider = next(c for c in bundled if normalize_code(c, "category") not in categories)
    lines = ["code\tdescription"] + [f"{c}\t{bundled[c]}" for c in [*described, *siblings, outsider]]
    lines.append(f"{invented.replace('.', '')}\t{INVENTED}")
    files["descriptions"] = root / "my_codes.tsv"
    files["descriptions"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"files": files, "trained": trained, "zero_shot": sorted([*siblings, invented]),
            "undescribed": len(trained) - len(described)}  # fmt: skip


def _overrides(small: dict, encoder: Path, zero_shot: bool) -> list[str]:
    files = small["files"]
    return [f"model.encoder={encoder}", f"data.train={files['train']}", f"data.dev={files['dev']}",
            f"data.test={files['test']}", f"icd_coding.descriptions={files['descriptions']}",
            f"icd_coding.label_space.zero_shot={str(zero_shot).lower()}", *QUICK]  # fmt: skip


@pytest.fixture(scope="module")
def zero_shot_run(small, tiny_encoder, tmp_path_factory) -> Path:
    return finetune("icd_coding", _overrides(small, tiny_encoder, True),
                    output_dir=tmp_path_factory.mktemp("zero_shot") / "run")  # fmt: skip


def test_descriptions_file_header_optional_gzip_and_codes_normalised(tmp_path):
    plain = tmp_path / "codes.tsv"
    plain.write_text("E119\tType 2 diabetes\n\ne11.9\tlater rows of a code are ignored\n4019\tHypertension\n")
    assert read_descriptions(str(plain)) == {"E11.9": "Type 2 diabetes", "4019": "Hypertension"}
    packed = tmp_path / "codes.tsv.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as handle:
        handle.write("icd9_code\tlong_title\n4019\tHypertension\n")
    assert read_descriptions(str(packed)) == {"4019": "Hypertension"}  # the header row is skipped
    assert len(_bundled()) == 74044
    with pytest.raises(CmftError, match="missing.tsv: file not found"):
        read_descriptions(str(tmp_path / "missing.tsv"))
    plain.rename(tmp_path / "plain.gz")
    with pytest.raises(CmftError, match="plain.gz: not a readable gzip file"):
        read_descriptions(str(tmp_path / "plain.gz"))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("E11.9 Type 2 diabetes\n", "line 1: 1 tab-separated columns; expected code<TAB>description"),
        ("code\tdescription\nE11.9\tdiabetes\textra\n", "line 2: 3 tab-separated columns"),
        ("E11.9\t \n", "line 1: an empty column"),
        ("\n\n", "no code<TAB>description rows"),
        ("code\tdescription\n", "no code<TAB>description rows"),
        (b"\xff\xfe\x00E11", "not a UTF-8 text file"),
    ],
)  # fmt: skip
def test_bad_descriptions_file_is_one_clear_error(tmp_path, content, expected):
    path = tmp_path / "bad.tsv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CmftError) as raised:
        read_descriptions(str(path))
    assert str(raised.value).startswith(f"icd_coding.descriptions: {path}: ") and expected in str(raised.value)


def test_zero_shot_codes_are_the_other_codes_of_trained_categories():
    table = {"E11.9": "", "E11.65": "", "E10.9": "", "I10": "", "I11.9": "", "A00.0": ""}
    assert zero_shot_codes(table, ["E11.9", "I10"]) == ["E11.65"]
    assert zero_shot_codes(table, ["E11.8", "I11.0"]) == ["E11.65", "E11.9", "I11.9"]


def test_zero_shot_threshold_is_chosen_for_all_gold_codes():
    targets, predicted = np.array([[True], [False]]), np.array([[True], [False]])  # one trained hit
    gold = np.array([[True, False], [False, False]])
    helpful = np.array([[0.003, 0.001], [0.001, 0.001]])  # the gold zero-shot code on top, below the whole grid
    assert choose_zero_shot_threshold(targets, predicted, gold, helpful, 0.5, n_gold=3) == pytest.approx(0.003)
    useless = np.array([[0.0, 0.2], [0.2, 0.2]])  # the gold zero-shot code below every other: none helps
    assert choose_zero_shot_threshold(targets, predicted, gold, useless, 0.5, n_gold=3) == 1.0
    settings = {"labels": ["A", "B", "Z"], "threshold": 0.5, "code_thresholds": {"B": 0.3}, "zero_shot_labels": ["Z"],
                "zero_shot_threshold": 0.2}  # fmt: skip
    assert code_thresholds(settings).tolist() == [0.5, 0.3, 0.2]
    meta = {"labels": settings["labels"], "threshold": 0.5, "icd": settings}
    found = IcdCodingTask.decode(meta, "", [np.array([0.6, 0.25, 0.25])], [])["codes"]
    assert found == [{"code": "A", "probability": 0.6}, {"code": "Z", "probability": 0.25, "zero_shot": True}]
    found = IcdCodingTask.decode({**meta, "threshold": 0.1}, "", [np.array([0.6, 0.25, 0.25])], [])["codes"]
    assert [c["code"] for c in found] == ["A", "B", "Z"]  # a request's threshold holds for every code


def test_zero_shot_off_keeps_the_label_space_and_the_model(small, tiny_encoder):
    recipe = load_recipe("icd_coding", _overrides(small, tiny_encoder, False))
    task = get_task(recipe)
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    task.prepare(tokenizer)
    assert task.labels == small["trained"] and task.report["n_labels_without_description"] == small["undescribed"]
    model = task.build_model(str(tiny_encoder), "sdpa", False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert task.finish_model(model, tokenizer) is model and task.labels == small["trained"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert task.settings["zero_shot_labels"] == [] and "n_zero_shot_labels" not in task.report


def test_zero_shot_codes_from_the_users_file_are_in_the_saved_model(zero_shot_run, small, tiny_encoder):
    settings = json.loads((zero_shot_run / "model" / "icd_coding.json").read_text())
    trained, zero_shot = small["trained"], small["zero_shot"]
    assert settings["labels"] == trained + zero_shot and settings["zero_shot_labels"] == zero_shot
    metrics = json.loads((zero_shot_run / "metrics.json").read_text())
    assert metrics["n_labels"] == len(trained) and metrics["n_zero_shot_labels"] == len(zero_shot)
    assert metrics["n_labels_without_description"] == small["undescribed"] > 0
    assert settings["zero_shot_threshold"] == metrics["zero_shot_threshold"] == metrics["dev_zero_shot_threshold"]
    assert 0 < metrics["zero_shot_threshold"] <= 1
    gold = [normalize_code(c) for row in _rows("test", 20) for c in set(row["codes"])]
    outputtable = set(trained) | set(zero_shot)  # the all-codes metrics count zero-shot codes as outputtable
    assert metrics["label_space_coverage"] == pytest.approx(sum(c in outputtable for c in gold) / len(gold))
    assert metrics["label_space_coverage"] > sum(c in trained for c in gold) / len(gold)
    # queries come from the fine-tuned encoder (not the starting one), at the trained queries' mean norm
    coder = IcdCoder.from_pretrained(zero_shot_run / "model")
    head, texts = coder.head, [read_descriptions(str(small["files"]["descriptions"]))[c] for c in zero_shot]
    assert INVENTED in texts
    norm = head.label_queries.weight[: len(trained)].norm(dim=1).mean()
    saved = head.label_queries.weight[len(trained) :]
    assert torch.allclose(saved, scaled(description_queries(coder, coder.tokenizer, texts), norm), atol=1e-5)
    coder.encoder = AutoModel.from_pretrained(tiny_encoder)  # the encoder before fine-tuning
    assert not torch.allclose(saved, scaled(description_queries(coder, coder.tokenizer, texts), norm), atol=1e-3)
    # output weight: the trained codes' mean; bias: below the trained codes' mean by the train priors' log-odds
    expected = head.output_weight[: len(trained)].mean(0).expand(len(zero_shot), -1)
    assert torch.allclose(head.output_weight[len(trained) :], expected, atol=1e-6)
    assert (head.output_bias[len(trained) :] < head.output_bias[: len(trained)].mean()).all()


def test_predict_scores_zero_shot_codes_as_the_reloaded_model_does(zero_shot_run, small, tmp_path, monkeypatch):
    (small["files"]["descriptions"]).rename(tmp_path / "moved.tsv")  # predict and evaluate never read it
    try:
        monkeypatch.chdir(tmp_path)
        texts = [row["text"] for row in _rows("test", 3)]
        loaded, backend = open_source(zero_shot_run, onnx=False)
        loaded.meta = {**loaded.meta, "threshold": 0.0}  # as a request's threshold: every code, with its probability
        results, _ = predict_texts(loaded, backend, texts)
        reloaded = IcdCoder.from_pretrained(zero_shot_run / "model").predict_proba(texts)
        labels = loaded.meta["labels"]
        for result, row in zip(results, reloaded, strict=True):
            got = {c["code"]: c["probability"] for c in result["codes"]}
            assert set(got) == set(labels)
            assert {c["code"] for c in result["codes"] if c.get("zero_shot")} == set(small["zero_shot"])
            assert np.allclose([got[c] for c in labels], row, atol=1e-5)
        saved, again = json.loads((zero_shot_run / "metrics.json").read_text()), evaluate_run(zero_shot_run, "test")
        for key in ("micro_f1", "micro_f1_all_codes", "label_space_coverage", "zero_shot_threshold"):
            assert again[key] == pytest.approx(saved[key], abs=1e-6), key
    finally:
        (tmp_path / "moved.tsv").rename(small["files"]["descriptions"])


def test_lora_adapter_gets_the_zero_shot_rows(tiny_encoder, tmp_path):
    """Zero-shot rows are added to the merged model; refresh_adapter writes the grown head into adapter/, so the base
    encoder plus the adapter scores every code as model/ does."""
    from peft import PeftModel

    from cmft.finetuning.config import TuningConfig
    from cmft.lora import refresh_adapter, wrap_lora
    from cmft.tasks.icd_batches import collate_notes
    from cmft.tasks.icd_coding import encode_note
    from cmft.tasks.icd_zero_shot import _append_rows

    settings = {"labels": ["E11.9", "I10"], "threshold": 0.5, "mode": "whole", "head": "label_attention",
                "attention_dim": 16, "chunk_size": 128, "max_chunks": 2, "max_length": 64, "level": "code"}  # fmt: skip
    torch.manual_seed(0)
    wrapped = wrap_lora(IcdCoder(AutoModel.from_pretrained(tiny_encoder), settings), "modernbert", TuningConfig(),
                        ["head"])  # fmt: skip
    with torch.no_grad():
        for name, weight in wrapped.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.05)  # a trained adapter: not the identity
    wrapped.save_pretrained(tmp_path / "adapter")
    merged = wrapped.merge_and_unload()
    _append_rows(merged.head, torch.randn(3, 16), torch.randn(3, merged.config.hidden_size), torch.zeros(3))
    refresh_adapter(tmp_path / "adapter", merged)
    grown = {**settings, "labels": [*settings["labels"], "E11.65", "E11.8", "I11.9"]}
    adapted = PeftModel.from_pretrained(IcdCoder(AutoModel.from_pretrained(tiny_encoder), grown),
                                        tmp_path / "adapter").eval()  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    batch = collate_notes([{"input_ids": encode_note(tokenizer, "Type 2 diabetes with neuropathy.", grown)[0]}],
                          tokenizer.pad_token_id, grown)  # fmt: skip
    with torch.no_grad():
        expected, got = merged.eval()(**batch)["logits"], adapted(**batch)["logits"]
    assert got.shape == (1, 5) and torch.allclose(expected, got, atol=1e-5)
