"""The assertion task: marked spans read through a window, a marker head, LoRA with the marker rows, predict, export.

One small training run on a bundled slice (present/absent rows) is shared by the tests that need a finished run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from cmft.finetuning.run import finetune, load_recipe
from cmft.tasks.assertion import AssertionClassifier, AssertionTask, SpanRow, read_rows, span_ids
from tests.cards import check_card, run_blocks
from tests.conftest import REPO, run_inline

NEGEX = REPO.parent / "shared" / "data" / "negex"
BUNDLED = REPO / "data" / "assertion"
MARGIN = 0.15  # accuracy above the majority class that 60 steps must reach (0.82 against 0.50 when written), and an
# untrained model must not
TRAIN = ["training.max_length=64", "training.threads=2", "training.batch_size=16", "training.eval_batch_size=64",
         "training.learning_rate=0.002", "training.head_learning_rate=0.004", "training.warmup_ratio=0.05"]  # fmt: skip


def _slice(source: Path, target: Path, per_label: int) -> Path:
    """The first `per_label` present and absent rows of a bundled split (a two-label task that trains in seconds)."""
    kept, seen = [], Counter()
    for line in source.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["label"] in ("present", "absent") and seen[row["label"]] < per_label:
            kept.append(line)
            seen[row["label"]] += 1
    target.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return target


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assertion_data")
    return {"train": _slice(BUNDLED / "train.jsonl", root / "train.jsonl", 400),
            "dev": _slice(BUNDLED / "dev.jsonl", root / "dev.jsonl", 100),
            "small_dev": _slice(BUNDLED / "dev.jsonl", root / "small_dev.jsonl", 10)}  # fmt: skip


def _data(slices: dict[str, Path]) -> list[str]:
    return [f"data.train={slices['train']}", f"data.dev={slices['dev']}", "data.test=null"]


@pytest.fixture(scope="module")
def run(tiny_encoder, slices, tmp_path_factory) -> Path:
    steps = ["training.max_steps=60", "training.eval_every=60"]
    output = tmp_path_factory.mktemp("assertion") / "run"
    return finetune("assertion", [f"model.encoder={tiny_encoder}", *_data(slices), *TRAIN, *steps], output_dir=output)


def _majority(path: Path) -> float:
    labels = Counter(json.loads(line)["label"] for line in path.read_text(encoding="utf-8").splitlines())
    return max(labels.values()) / sum(labels.values())


@pytest.mark.slow
def test_training_beats_the_majority_class_and_an_untrained_model_does_not(run, slices, tiny_encoder):
    from cmft.evaluation import evaluate, evaluate_run
    from cmft.finetuning.engine import load_tokenizer
    from cmft.inference import TorchBackend
    from cmft.tasks import get_task

    baseline = _majority(slices["dev"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "dev" and metrics["n_examples"] == 200
    assert set(metrics["per_label"]) == {"present", "absent"}
    assert metrics["accuracy"] >= baseline + MARGIN, (metrics["accuracy"], baseline)
    assert 0 <= metrics["macro_f1"] <= 1 and metrics["per_label"]["absent"]["support"] == 100
    again = evaluate_run(run, "dev")  # `cmft evaluate`: the saved model, tokenizer and labels give the same figures
    assert again["accuracy"] == pytest.approx(metrics["accuracy"]) and again["per_label"] == metrics["per_label"]

    recipe = load_recipe("assertion", [f"model.encoder={tiny_encoder}", *_data(slices), *TRAIN])
    task = get_task(recipe)
    tokenizer = load_tokenizer(str(tiny_encoder), False)
    task.prepare(tokenizer, splits=("train", "dev"))
    torch.manual_seed(0)
    untrained = task.build_model(str(tiny_encoder), "sdpa", False).eval()
    before = evaluate(task, TorchBackend(task.inference_module(untrained)), "dev", 64, tokenizer.pad_token_id)
    assert before["accuracy"] < baseline + MARGIN, (before["accuracy"], baseline)


@pytest.mark.slow
def test_the_markers_are_special_tokens_of_the_saved_tokenizer(run, tiny_encoder):
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    ids = tokenizer.convert_tokens_to_ids(["[E]", "[/E]"])
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(tiny_encoder)) + 2
    assert tokenizer.unk_token_id not in ids and set(ids) <= set(tokenizer.all_special_ids)
    assert tokenizer("no [E]fever[/E]", add_special_tokens=False)["input_ids"].count(ids[0]) == 1
    model = AssertionClassifier.from_pretrained(run / "model")
    assert model.encoder.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.settings["marker_ids"] == ids and (run / "plots" / "confusion_matrix.png").is_file()


@pytest.mark.slow
def test_predict_gives_each_row_a_label_and_the_card_runs(run, tmp_path, capsys):
    rows = [{"id": "a", "text": "The patient denies chest pain but reports fever.", "start": 19, "end": 29},
            {"id": "b", "text": "The patient denies chest pain but reports fever.", "start": 42, "end": 47},
            {"id": "c", "text": "No [E]pneumothorax[/E] is seen."}]  # fmt: skip
    inputs = tmp_path / "rows.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    code, out, err = run_inline(capsys, "predict", str(run), str(inputs))
    assert code == 0, err[-2000:]
    got = [json.loads(line) for line in out.splitlines()]
    assert [g["id"] for g in got] == ["a", "b", "c"]
    for g in got:
        assert g["label"] in ("present", "absent") and g["score"] == max(g["probabilities"].values())
        assert sum(g["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert (got[0]["start"], got[0]["end"], got[2]["start"], got[2]["end"]) == (19, 29, 3, 15)
    blocks = check_card(run / "model", run / "metrics.json")
    assert blocks["cmft"]["label"] in ("present", "absent")


@pytest.mark.slow
def test_onnx_export_keeps_two_inputs_and_passes_parity(run, tmp_path):
    import onnxruntime as ort

    from cmft.export import export_run
    from cmft.inference import OnnxBackend, load_export, predict_texts

    folder, report = export_run(run, tmp_path / "onnx")
    assert report["passed"] and report["max_abs_diff"] < 1e-4
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    loaded = load_export(folder)
    onnx = predict_texts(loaded, OnnxBackend(folder / "model.onnx"), ["She denies [E]nausea[/E] today."])[0][0]
    torch_side = AssertionClassifier.from_pretrained(run / "model").predict([{"text": "She denies nausea today.",
                                                                              "start": 11, "end": 17}])[0]  # fmt: skip
    assert onnx["label"] == torch_side["label"] and onnx["score"] == pytest.approx(torch_side["score"], abs=1e-4)
    feed = run_blocks(folder, (folder / "README.md").read_text())["onnxruntime"]
    assert feed["logits"].shape == (1, 2)


@pytest.mark.slow
def test_lora_trains_the_marker_rows_and_saves_them_with_the_adapter(tiny_encoder, slices, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    lora = ["tuning.method=lora", "training.max_steps=3", "training.eval_every=3", f"data.dev={slices['small_dev']}"]
    run = finetune("assertion", [f"model.encoder={tiny_encoder}", *_data(slices), *TRAIN, *lora],
                   output_dir=tmp_path / "lora")  # fmt: skip
    merged = AssertionClassifier.from_pretrained(run / "model")
    markers = merged.settings["marker_ids"]
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert list(config["trainable_token_indices"].values()) == [markers] and "head" in config["modules_to_save"]
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as handle:
        rows = next(handle.get_tensor(k) for k in handle.keys() if k.endswith("trainable_tokens_delta"))  # noqa: SIM118
    assert torch.allclose(rows, merged.encoder.get_input_embeddings().weight[markers])
    fresh = AutoModel.from_pretrained(tiny_encoder)
    fresh.resize_token_embeddings(len(merged.tokenizer))
    adapted = PeftModel.from_pretrained(AssertionClassifier(fresh, merged.settings), run / "adapter").eval()
    ids = torch.tensor([span_ids(merged.tokenizer, SpanRow("No fever today.", 3, 8), merged.settings)[0]])
    with torch.no_grad():
        want = merged(ids, torch.ones_like(ids))["logits"]
        assert torch.allclose(adapted(input_ids=ids, attention_mask=torch.ones_like(ids))["logits"], want, atol=1e-5)
    blocks = check_card(run / "model", run / "metrics.json")
    assert blocks["peft"]["same"]["label"] == blocks["cmft"]["status"]["label"]


def test_a_window_around_a_span_in_a_long_text_keeps_the_span(tiny_encoder):
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    settings = {"max_length": 48, "window": None, "normalise_case": True, "markers": ["[E]", "[/E]"],
                "cls_id": tokenizer.cls_token_id, "sep_id": tokenizer.sep_token_id}  # fmt: skip
    from cmft.tasks.assertion import add_markers

    settings["marker_ids"] = add_markers(tokenizer, settings["markers"])
    filler = "The patient was seen in clinic today and is doing well overall. " * 60
    for where in (0, len(filler) // 2, len(filler)):
        text = filler[:where] + "She denies CHEST PAIN at rest. " + filler[where:]
        start = text.index("CHEST PAIN")
        ids, windowed, cut = span_ids(tokenizer, SpanRow(text, start, start + 10), settings)
        assert len(ids) <= 48 and windowed and not cut
        first, last = ids.index(settings["marker_ids"][0]), ids.index(settings["marker_ids"][1])
        assert tokenizer.decode(ids[first + 1 : last]).strip() == "chest pain"  # normalise_case
        if 0 < where < len(filler):  # centred: about as much context on each side
            assert abs(first - (len(ids) - 1 - last)) <= 2
    units, counts = AssertionTask.encode(tokenizer, [filler + "[E]fever[/E]", "[E]" + filler + "[/E]"],
                                         {"assertion": settings, "max_length": 48})  # fmt: skip
    assert counts == {"n_windowed": 1, "n_truncated": 1}  # the second span alone is longer than max_length
    assert all(settings["marker_ids"][0] in u.input_ids and settings["marker_ids"][1] in u.input_ids for u in units)
    limited = span_ids(tokenizer, SpanRow(filler + "fever", len(filler), len(filler) + 5), {**settings, "window": 4})
    assert len(limited[0]) == 1 + 4 + 3 + 1 and limited[1]  # [CLS], 4 tokens of context, [E] fever [/E], [SEP]


def test_ner_span_rows_with_an_assertion_field_are_read(tmp_path):
    path = tmp_path / "spans.jsonl"
    entities = [{"start": 3, "end": 8, "label": "Finding", "assertion": "absent"},
                {"start": 15, "end": 20, "label": "Finding", "assertion": "present"},
                {"start": 10, "end": 14, "label": "Finding"}]  # fmt: skip
    family = {"text": "Mother had diabetes.", "start": 11, "end": 19, "label": "associated_with_someone_else"}
    rows = [{"text": "No fever, mild cough.", "entities": entities}, family]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    read, unlabelled = read_rows(path)
    assert [(r.text[r.start : r.end], r.label) for r in read] == [
        ("fever", "absent"), ("cough", "present"), ("diabetes", "associated_with_someone_else"),
    ]  # fmt: skip
    assert unlabelled == 1


BAD_ROWS = {
    "no_start": ({"text": "No fever.", "end": 8, "label": "absent"}, "needs `start`"),
    "end_beyond_text": ({"text": "No fever.", "start": 3, "end": 80, "label": "absent"}, "end 80 lies beyond the text"),
    "start_not_before_end": ({"text": "No fever.", "start": 8, "end": 3, "label": "absent"}, "0 ≤ start < end"),
    "start_not_a_number": ({"text": "No fever.", "start": "3", "end": 8, "label": "absent"}, "whole number"),
    "no_label": ({"text": "No fever.", "start": 3, "end": 8}, "`label` must be a non-empty label name"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BAD_ROWS))
def test_a_bad_row_is_one_line_and_exit_2(name, tiny_encoder, tmp_path, capsys):
    row, expected = BAD_ROWS[name]
    good = {"text": "Mild cough.", "start": 5, "end": 10, "label": "present"}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    code, out, err = run_inline(capsys, "validate", "assertion", f"model.encoder={tiny_encoder}", f"data.train={path}",
                                "data.dev=null", "data.test=null")  # fmt: skip
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in out + err, err[-2000:]
    assert lines[0].startswith("error: ") and "line 2" in lines[0] and expected in lines[0], lines[0]
    assert "No fever" not in lines[0]  # the message names the file and line, never the text


@pytest.mark.slow
def test_a_bad_predict_row_is_one_line_and_exit_2(run, tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "ok", "start": 0, "end": 2}\n{"text": "No fever.", "start": 3, "end": 99}\n')
    code, _, err = run_inline(capsys, "predict", str(run), str(path))
    assert code == 2 and err.strip().count("\n") == 0 and "line 2: end 99 lies beyond the text" in err


@pytest.mark.skipif(not NEGEX.is_dir(), reason="../shared/data/negex is not here (it is never copied into the repo)")
def test_the_reader_loads_every_negex_row():
    train, unlabelled = read_rows(NEGEX / "train.jsonl")
    dev, _ = read_rows(NEGEX / "dev.jsonl")
    assert (len(train), len(dev), unlabelled) == (1306, 282, 0)
    assert Counter(r.label for r in train) == {"affirmed": 1015, "negated": 291}
    assert all(r.text[r.start : r.end].strip() for r in train + dev)
    assert np.mean([r.text[r.start : r.end].isupper() for r in train]) > 0.9  # why normalise_case is on
