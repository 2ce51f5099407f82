"""Long notes: gradient checkpointing (same gradients, the auto rule, the memory estimate), whole-note ICD coding at
8,192 tokens end to end (train, predict, ONNX export), and the long-context benchmark's quick mode."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import ModernBertConfig, ModernBertForMaskedLM

from cmft import memory
from cmft.attention import IMPLEMENTATION, register
from cmft.memory import activation_bytes, choose_checkpointing, enable_checkpointing
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))


def _masked_lm(attention: str, seed: int = 0) -> ModernBertForMaskedLM:
    torch.manual_seed(seed)
    config = ModernBertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                              intermediate_size=96, local_attention=32, max_position_embeddings=8192, pad_token_id=0,
                              sparse_prediction=True)  # fmt: skip
    config._attn_implementation = attention
    return ModernBertForMaskedLM(config).train()


def _packed_inputs(attention: str) -> dict:
    from cmft.pretraining.packing import Document, collate_packed, model_inputs

    rng = torch.Generator().manual_seed(5)
    rows = [
        [
            Document(
                torch.randint(5, 300, (n,), generator=rng).numpy(),
                torch.full((n,), -1).numpy(),
                torch.zeros(n, dtype=torch.bool).numpy(),
            )
            for n in lengths
        ]
        for lengths in ([150, 40], [230])
    ]
    batch = collate_packed(rows, pad_id=0)
    batch["labels"] = torch.where(
        (torch.arange(batch["input_ids"].numel()).reshape(batch["input_ids"].shape) % 7 == 0)
        & (batch["document"] >= 0),
        batch["input_ids"],
        -100,
    )
    return model_inputs(batch, attention, 32)  # fmt: skip


def _gradients(model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    model(**inputs).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True])
def test_checkpointing_gives_the_same_gradients_with_packing_and_lora(lora):
    """Packed documents under banded attention, with and without LoRA: recomputing each layer in the backward pass
    changes no gradient, and it really recomputes (the layers run twice)."""
    register()
    grads, calls = [], []
    for checkpointing in (False, True):
        model = _masked_lm(IMPLEMENTATION)
        if lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["Wqkv", "Wo", "Wi"]))
        if checkpointing:
            assert enable_checkpointing(model) >= 1
        counter: list[int] = []
        layer = next(m for m in model.modules() if type(m).__name__ == "ModernBertEncoderLayer")
        layer.attn.register_forward_hook(lambda *args, seen=counter: seen.append(1))
        grads.append(_gradients(model, _packed_inputs(IMPLEMENTATION)))
        calls.append(len(counter))
    assert calls == [1, 2]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) >= (6 if lora else 20)
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6, rtol=1e-5), name


def test_auto_checkpointing_follows_the_free_memory(monkeypatch):
    config = ModernBertConfig(hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152)
    gib = 2**30
    need = activation_bytes(config, 1, 8192, IMPLEMENTATION, checkpointing=False)
    assert 10 * gib < need < 14 * gib  # ModernBERT-base at 8,192 tokens: about 12 GiB of activations
    assert activation_bytes(config, 1, 8192, IMPLEMENTATION, checkpointing=True) < need / 10
    assert activation_bytes(config, 1, 8192, "sdpa", False) == need + 2 * 8192**2  # its two [L × L] bool masks
    assert activation_bytes(config, 1, 8192, "eager", False) > 2 * need  # a score matrix in every layer
    monkeypatch.setattr(memory, "available_memory", lambda: 20 * gib)
    chosen, why = choose_checkpointing("auto", config, [(8, 512), (1, 8192)], IMPLEMENTATION)
    assert chosen is True and "1 × 8192 micro-batch ≈ 12" in why and "20.0 GiB free" in why
    assert choose_checkpointing("auto", config, [(8, 512)], IMPLEMENTATION)[0] is False
    assert choose_checkpointing(False, config, [(1, 8192)], IMPLEMENTATION)[0] is False  # an explicit value stands
    assert choose_checkpointing(True, config, [(1, 16)], IMPLEMENTATION)[0] is True


@pytest.mark.parametrize(("attention", "length"), [(IMPLEMENTATION, 1024), ("sdpa", 1024), (IMPLEMENTATION, 2048)])
def test_activation_estimate_stays_on_the_safe_side(attention, length):
    """What autograd really keeps (saved-tensor hooks, distinct storages) is at most the estimate, and more than
    half of it: the auto rule neither runs out of memory nor checkpoints for nothing."""
    register()
    for checkpointing in (False, True):
        model = ModernBertForMaskedLM(ModernBertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=3,
                                                       num_attention_heads=4, intermediate_size=96,
                                                       local_attention=128, max_position_embeddings=8192,
                                                       pad_token_id=0)).model  # fmt: skip
        model.config._attn_implementation = attention
        if checkpointing:
            enable_checkpointing(model)
        model.train()
        storages: dict[int, int] = {}

        def keep(tensor: torch.Tensor, storages: dict[int, int] = storages) -> torch.Tensor:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        ids = torch.randint(5, 300, (2, length))
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            states = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        kept = sum(size for pointer, size in storages.items() if pointer not in parameters)
        estimate = activation_bytes(model.config, 2, length, attention, checkpointing)
        assert kept <= estimate, (checkpointing, kept, estimate)
        assert checkpointing or kept > estimate / 2, (kept, estimate)
        states.sum().backward()


def _long_encoder(tiny_encoder: Path, folder: Path) -> Path:
    """The suite's tiny encoder with an 8,192-position limit (rotary positions: no weight depends on it)."""
    shutil.copytree(tiny_encoder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 8192
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow
def test_whole_note_icd_coding_at_8192_tokens_trains_predicts_and_exports(tiny_encoder, tmp_path):
    """Constructed long notes (up to 8,192 tokens and beyond), whole mode at max_length 8,192 on CPU: training with
    checkpointing, `cmft predict` (a note longer than 8,192 tokens is truncated, and said so) and the ONNX export
    with parity at 8,192 tokens."""
    from make_long_notes import build

    from cmft.export import export_run
    from cmft.finetuning.run import finetune
    from cmft.predict import predict

    encoder = _long_encoder(tiny_encoder, tmp_path / "encoder")
    data = build(tmp_path / "notes", tokenizer=str(encoder), min_tokens=6000, max_tokens=8192, max_notes=3)
    assert data["constructed"] and data["train_notes"] == 3 and data["train_tokens_min_median_max"][2] <= 8192
    notes = [json.loads(line) for line in Path(data["test"]).read_text().split("\n") if line]
    assert all(note["constructed"] and len(note["sources"]) >= 5 for note in notes)
    longer = tmp_path / "longer.jsonl"
    longer.write_text(json.dumps({"id": "twice", "text": notes[0]["text"] + "\n\n" + notes[1]["text"]}) + "\n")
    run = finetune("icd_coding", [f"model.encoder={encoder}", "training.max_length=8192", "training.max_steps=2",
                                  "training.batch_size=1", "training.eval_batch_size=1",
                                  "training.gradient_checkpointing=true", f"data.train={data['train']}",
                                  f"data.dev={data['few']}", f"data.test={data['few']}",
                                  "icd_coding.label_space.min_train_count=1"], output_dir=tmp_path / "run")  # fmt: skip
    text = (run / "recipe.yaml").read_text()
    recipe = yaml.safe_load(text)
    assert recipe["model"]["attention"] == "banded" and recipe["training"]["gradient_checkpointing"] is True
    assert "attention: banded  # ModernBERT on CPU: local layers attend within their window" in text
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_examples"] == 2 and 0 <= metrics["micro_f1"] <= 1
    summary = predict(str(run), longer, tmp_path / "predictions.jsonl")
    assert summary["n_inputs"] == 1 and summary["n_truncated"] == 1
    folder, parity = export_run(run, tmp_path / "export", overrides=["check_lengths=[17,8192]", "check_batch=2"])
    assert parity["passed"] and list(parity["per_length"]) == ["17", "8192"] and parity["max_abs_diff"] <= 1e-4
    onnx = predict(str(folder), longer, tmp_path / "onnx.jsonl", onnx=True)
    assert onnx["n_truncated"] == 1
    torch_codes = json.loads((tmp_path / "predictions.jsonl").read_text())
    onnx_codes = json.loads((tmp_path / "onnx.jsonl").read_text())
    assert torch_codes.keys() == onnx_codes.keys()


@pytest.mark.slow
def test_long_context_benchmark_quick_mode(tiny_encoder, tmp_path):
    """The benchmark's smoke test: small geometry, every path and the ICD parts run; banded equals sdpa."""
    encoder = _long_encoder(tiny_encoder, tmp_path / "encoder")
    result = subprocess.run([sys.executable, "benchmarks/long_context.py", "--quick", "--encoder", str(encoder)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["max_abs_diff"] <= 1e-4
    assert {(r["path"], r["mode"]) for r in report["settings"]} == {
        ("sdpa", "forward"),
        ("cmft", "forward"),
        ("sdpa", "train"),
        ("cmft", "train"),
    }
    assert all("seconds" in row for row in report["settings"])
    assert report["peak_gb_train_1024"]["cmft_checkpointing"] is not None
    icd = report["icd_long_notes"]
    assert icd["whole"]["n_examples"] == icd["chunked"]["n_examples"] > 0
    assert report["icd_whole_8192_base_geometry"]["predicted_notes"]["n_inputs"] == 2
