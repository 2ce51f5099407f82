"""`cmft pretrain` end to end on bundled real text: run folder, reload with plain transformers, resume."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

from cmft.pretraining.run import pretrain
from tests.conftest import run_cmft

METRICS = ("mlm_top1", "mlm_top5", "mlm_top10", "mlm_top25", "mlm_top1_medical", "mlm_top1_other", "eval_loss")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One real CLI run (subprocess) shared by the checks below."""
    import yaml

    from tests.conftest import SMALL_PRETRAIN

    root = tmp_path_factory.mktemp("pretrain")
    config = root / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL_PRETRAIN), encoding="utf-8")
    result = run_cmft("pretrain", str(config), "training.max_steps=8", "--output-dir", str(root / "runs" / "first"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs" / "first"


def test_run_folder_layout(finished_run):
    for name in (
        "recipe.yaml",
        "metrics.json",
        "history.jsonl",
        "summary.json",
        "plots/loss.png",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
    ):
        assert (finished_run / name).is_file(), name
    assert not finished_run.with_name("first.partial").exists()
    assert (finished_run.parent / "latest").resolve() == finished_run.resolve()
    metrics = json.loads((finished_run / "metrics.json").read_text())
    for name in METRICS:
        assert name in metrics
    assert 0 <= metrics["mlm_top1"] <= metrics["mlm_top5"] <= metrics["mlm_top10"] <= metrics["mlm_top25"] <= 1
    assert metrics["split"] == "heldout" and metrics["n_examples"] > 0 and metrics["n_masked_tokens"] > 0


def test_history_logs_every_step_with_falling_mask_rate(finished_run):
    rows = [json.loads(line) for line in (finished_run / "history.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "mask_rate" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    rates = [r["mask_rate"] for r in steps]
    assert rates[0] == pytest.approx(0.30) and rates[-1] == pytest.approx(0.15)
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    for r in steps:
        assert r["tokens_per_s"] > 0 and "loss" in r and "lr" in r
        assert r["medical_share_of_masked"] > r["medical_share_of_tokens"]  # emphasis is visible in the log


def test_model_loads_offline_with_plain_transformers(finished_run):
    model_dir = finished_run / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    mlm = AutoModelForMaskedLM.from_pretrained(model_dir)
    encoder = AutoModel.from_pretrained(model_dir)
    assert mlm.config.model_type == "modernbert" and type(encoder).__name__ == "ModernBertModel"
    assert mlm.config.vocab_size == len(tokenizer)
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    inputs = tokenizer(
        ["ICD-10-CM code E11.9: Type 2 diabetes mellitus", "metformin"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = mlm(**inputs).logits
        hidden = encoder(**inputs).last_hidden_state
    assert logits.shape[:2] == inputs["input_ids"].shape and logits.shape[-1] == len(tokenizer)
    assert hidden.shape[-1] == mlm.config.hidden_size and torch.isfinite(hidden).all()


@pytest.mark.slow
def test_long_context_stage_raises_global_rope_theta(small_config, tmp_path, monkeypatch):
    """The long-context stage, with gradient checkpointing switched on by `auto` because of that stage alone
    (16 MiB free: its 1 × 512 micro-batch keeps about 10 MiB, the main stage's 4 × 64 about 5 MiB)."""
    from cmft import memory

    monkeypatch.setattr(memory, "available_memory", lambda: 16 * 2**20)
    config = small_config(
        {
            "training": {"max_steps": 2, "max_length": 64},
            "long_context": {"max_length": 512, "global_rope_theta": 320000.0, "max_steps": 2},
        }
    )
    run = pretrain(config, output_dir=tmp_path / "long")
    recipe = (run / "recipe.yaml").read_text()
    assert "gradient_checkpointing: true  # auto: activations of a 1 × 512 micro-batch" in recipe
    assert "attention: banded  # ModernBERT on CPU" in recipe
    saved = json.loads((run / "model" / "config.json").read_text())
    assert saved["rope_parameters"]["full_attention"]["rope_theta"] == 320000.0
    assert saved["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["long_context_steps"] == 2


@pytest.mark.slow
def test_continued_pretraining_refines_the_vocabulary(finished_run, small_config, tmp_path):
    config = small_config(
        {
            "model": {"init_from": str(finished_run / "model")},
            "tokenizer": {"refine": {"max_new_tokens": 40, "min_frequency": 5, "min_pieces": 2}},
            "training": {"max_steps": 2},
        }
    )
    run = pretrain(config, output_dir=tmp_path / "continued")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tokenizer"] == "refined" and 0 < summary["tokens_added"] <= 40
    assert summary["tokens_per_word_after"] < summary["tokens_per_word_before"]
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    model = AutoModelForMaskedLM.from_pretrained(run / "model")
    base = AutoTokenizer.from_pretrained(finished_run / "model")
    assert len(tokenizer) == len(base) + summary["tokens_added"] == model.config.vocab_size


def _only_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("update", "overrides", "expected"),
    [
        ({"training": {"max_step": 3}}, [], "did you mean 'training.max_steps'"),
        ({}, ["training.batch_size=lots"], "training.batch_size"),
        ({"corpus": {"sources": [{"path": "/nonexistent/notes.txt"}]}}, [], "file not found"),
        ({}, ["training.max_length=4096"], "max_position_embeddings"),
        ({}, ["model.init_from=./no/such/checkpoint"], "folder not found"),
        ({}, ["training.max_steps=-1"], "training.max_steps"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_run_folder(small_config, tmp_path, update, overrides, expected):
    config = small_config(update)
    out = tmp_path / "runs" / "bad"
    result = run_cmft("pretrain", str(config), *overrides, "--output-dir", str(out))
    assert result.returncode == 2
    assert expected in _only_line(result.stderr)
    assert not out.exists() and not out.with_name("bad.partial").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("content", "expected"), [(b"", "no non-empty document"), (b"\xff\xfe bad\n", "not UTF-8")])
def test_empty_or_non_utf8_corpus(small_config, tmp_path, content, expected):
    corpus = tmp_path / "notes.txt"
    corpus.write_bytes(content)
    config = small_config({"corpus": {"sources": [{"path": str(corpus)}]}})
    out = tmp_path / "runs" / "bad"
    result = run_cmft("pretrain", str(config), "--output-dir", str(out))
    assert result.returncode == 2
    assert expected in _only_line(result.stderr)
    assert not out.exists() and not out.with_name("bad.partial").exists()


@pytest.mark.slow
def test_resume_without_an_unfinished_run(tmp_path):
    result = run_cmft("pretrain", "--resume", "--output-dir", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "no unfinished run" in _only_line(result.stderr)


@pytest.mark.slow
def test_hub_id_fails_offline_with_a_clear_message(small_config, tmp_path, monkeypatch):
    config = small_config({"model": {"init_from": "answerdotai/ModernBERT-base"}})
    result = run_cmft("pretrain", str(config), "--output-dir", str(tmp_path / "hub"))
    assert result.returncode == 2
    line = _only_line(result.stderr)
    assert "answerdotai/ModernBERT-base" in line and "local model folder" in line


@pytest.mark.slow
def test_cli_lists_commands_and_export_needs_a_run(tmp_path):
    help_text = run_cmft("--help").stdout
    for command in ("pretrain", "finetune", "evaluate", "predict", "export", "recipes", "validate"):
        assert command in help_text
    result = run_cmft("export", "--onnx", cwd=tmp_path)  # default runs/finetune/latest: none here
    assert result.returncode == 2 and "runs/finetune/latest: no such run or export folder" in result.stderr


def test_default_config_path_resolves(tmp_path):
    from cmft.pretraining.run import resolve_pretrain_config

    assert resolve_pretrain_config(None).name == "clinical_tiny.yaml" and resolve_pretrain_config(None).is_file()


def test_evaluate_recomputes_a_pretraining_runs_metrics(tiny_encoder, tmp_path, capsys):
    """`cmft evaluate runs/pretrain/latest`: the held-out top-k accuracies of metrics.json, recomputed from model/."""
    from tests.conftest import run_inline

    run = tiny_encoder.parent
    latest = run.parent / "latest"
    assert latest.resolve() == run.resolve()
    saved = json.loads((run / "metrics.json").read_text())
    code, stdout, stderr = run_inline(capsys, "evaluate", str(latest))
    assert code == 0, stderr[-3000:]
    again = json.loads(stdout)
    for name in METRICS:
        assert again[name] == pytest.approx(saved[name], abs=1e-5), name
    assert again["split"] == "heldout" and again["n_examples"] == saved["n_examples"]
    assert again["n_masked_tokens"] == saved["n_masked_tokens"]
    assert json.loads((run / "metrics.json").read_text()) == saved  # printed, metrics.json left as training wrote it
    code, _, stderr = run_inline(capsys, "evaluate", str(latest), "--split", "dev")
    assert code == 2 and "held-out" in stderr and "Traceback" not in stderr
    notes = tmp_path / "notes.txt"
    notes.write_text("Type 2 diabetes mellitus treated with metformin.\nNo chest pain today.\n", encoding="utf-8")
    code, stdout, stderr = run_inline(capsys, "evaluate", str(latest), "--data", str(notes))
    assert code == 0, stderr[-3000:]
    other = json.loads(stdout)
    assert other["split"] == str(notes) and other["n_examples"] == 2 and 0 <= other["mlm_top1"] <= 1
