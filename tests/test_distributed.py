"""Several processes (torchrun, gloo on CPU): same training as one process with the same global batch, one run
folder written by rank 0, the batch split reported; the GPU fast-path choices; the GPU benchmark's no-GPU exit.

Masking is seeded per (seed, step, packed row's dataset index), not per process, so a 2-process run and a
1-process run with the same global batch mask every row identically: their losses and weights differ only by
the order of floating-point sums (the gradients' all-reduce)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cmft import distributed, modeling
from cmft.errors import CmftError
from cmft.training import sharding_arguments
from tests.conftest import REPO, run_cmft

LOSS_TOLERANCE = 1e-4  # measured: ≤ 1.5e-6 over 6 steps
WEIGHT_TOLERANCE = 1e-5  # measured: 5e-7


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m cmft ...` as a user runs it (one thread per process: 2 shared cores)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "cmft", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


@pytest.fixture(scope="module")
def pretrain_pair(tmp_path_factory):
    """The same 6-step pretraining (global batch 4) in 1 process and in 2 processes × 2 rows."""
    import yaml

    from tests.conftest import SMALL_PRETRAIN

    root = tmp_path_factory.mktemp("ddp")
    config = root / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL_PRETRAIN), encoding="utf-8")
    one = run_cmft("pretrain", str(config), "training.threads=1", "--output-dir", str(root / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_torchrun("pretrain", str(config), "training.threads=1", "--output-dir", str(root / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    return root / "one", root / "two", two


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(pretrain_pair):
    one, two, _ = pretrain_pair
    losses_one, losses_two = _losses(one), _losses(two)
    assert len(losses_one) == len(losses_two) == 6
    assert max(abs(a - b) for a, b in zip(losses_one, losses_two, strict=True)) < LOSS_TOLERANCE
    weights_one = load_file(one / "model" / "model.safetensors")
    weights_two = load_file(two / "model" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    assert max((weights_one[k] - weights_two[k]).abs().max().item() for k in weights_one) < WEIGHT_TOLERANCE
    shares = [[json.loads(line).get("masked_share") for line in (run / "history.jsonl").read_text().splitlines()]
              for run in (one, two)]  # fmt: skip
    assert shares[0] == shares[1]  # counted over both processes' shards, and the same masks


@pytest.mark.slow
def test_rank_0_alone_writes_one_run_folder_and_reports_the_split(pretrain_pair):
    _, two, result = pretrain_pair
    assert sorted(p.name for p in two.parent.iterdir() if p.name.startswith("two")) == ["two"]
    assert (two / "model" / "model.safetensors").is_file() and (two / "recipe.yaml").is_file()
    summary = json.loads((two / "summary.json").read_text())
    assert (summary["global_batch_size"], summary["per_device_batch_size"], summary["world_size"]) == (4, 2, 2)
    assert json.loads((two / "metrics.json").read_text())["world_size"] == 2
    assert "batch: 2 per device × 2 processes × 1 accumulation" in result.stdout + result.stderr
    assert result.stdout.count("pretrain run finished") == 1
    assert sorted(p.name for p in (two / "checkpoints" / "main").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert {p.name for p in (two / "checkpoints" / "main" / "checkpoint-6").glob("rng_state_*")} == {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }


@pytest.mark.slow
def test_two_process_finetuning_smoke(tiny_encoder, tmp_path):
    out = tmp_path / "runs" / "nc"
    result = run_torchrun("finetune", "note_classification", f"model.encoder={tiny_encoder}", "training.max_steps=4",
                          "training.eval_every=4", "training.max_length=64", "training.threads=1",
                          "--output-dir", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["latest", "nc"]  # one folder, no stray `.partial`
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 16 and metrics["per_device_batch_size"] == 8
    assert (out / "model" / "config.json").is_file()


@pytest.mark.slow
def test_two_process_retrieval_smoke(tiny_encoder, tmp_path):
    # in-batch negatives gathered across processes; rank 0 decides the loss for both (memory check)
    out = tmp_path / "runs" / "ret"
    result = run_torchrun("finetune", "retrieval", f"model.encoder={tiny_encoder}", "training.max_steps=2",
                          "training.eval_every=2", "training.max_length=64", "training.batch_size=8",
                          "training.threads=1", "data.test=null", "--output-dir", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 8 and metrics["per_device_batch_size"] == 4
    assert "loss" not in metrics  # 4 rows × 64 tokens of the tiny model fit: in_batch stands
    assert (out / "model" / "modules.json").is_file()  # a sentence-transformers folder, written once


def test_a_batch_that_does_not_split_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(CmftError, match="training.batch_size: 4 rows cannot be split evenly across 3 processes"):
        distributed.split_batch(4, 2)
    assert distributed.split_batch(6, 2).report() == {
        "global_batch_size": 12,
        "per_device_batch_size": 2,
        "world_size": 3,
        "gradient_accumulation": 2,
    }


def test_fsdp_is_refused_on_cpu_and_wraps_layers_on_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CmftError, match="training.distributed: fsdp needs CUDA GPUs"):
        sharding_arguments("fsdp")
    assert sharding_arguments("ddp") == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sharding_arguments("fsdp", ["ModernBertEncoderLayer"]) == {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {"transformer_layer_cls_to_wrap": ["ModernBertEncoderLayer"]},
    }


@pytest.mark.parametrize(
    ("cuda", "flash_attn", "capability", "model_type", "expected"),
    [(True, True, 8, "modernbert", "flash_attention_2"), (True, True, 7, "modernbert", "banded"),
     (True, False, 9, "modernbert", "banded"), (False, True, 8, "modernbert", "banded"),
     (False, False, 8, "modernbert", "banded"), (True, True, 8, "bert", "sdpa"), (False, False, 8, "bert", "sdpa")],
)  # fmt: skip
def test_auto_attention_rule(monkeypatch, cuda, flash_attn, capability, model_type, expected):
    """flash-attention 2 only with flash-attn on an Ampere-or-newer GPU (a T4 is 7.5, a V100 7.0); banded for
    ModernBERT everywhere else, training or not; sdpa for encoders without local layers. The reason is given."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (capability, 0))
    real_find_spec = modeling.importlib.util.find_spec
    monkeypatch.setattr(
        modeling.importlib.util, "find_spec", lambda name: object() if flash_attn and name == "flash_attn" else (
            None if name == "flash_attn" else real_find_spec(name))
    )  # fmt: skip
    for training in (True, False):
        chosen = modeling.choose_attention("auto", model_type, training)
        assert chosen.choice == expected and chosen.reason
        assert chosen.implementation == {"banded": "cmft_banded"}.get(expected, expected)
    assert modeling.choose_attention("sdpa", model_type, True).implementation == "sdpa"
    if not (cuda and flash_attn and capability >= 8):
        with pytest.raises(CmftError, match="flash_attention_2 needs flash-attn"):
            modeling.choose_attention("flash_attention_2", model_type, True)
    if model_type == "bert":
        with pytest.raises(CmftError, match="banded is for ModernBERT"):
            modeling.choose_attention("banded", model_type, True)
    if not cuda:
        with pytest.raises(CmftError, match="no backward pass on CPU"):
            modeling.choose_attention("flex_attention", model_type, True)
        assert modeling.choose_attention("flex_attention", model_type, False).implementation == "flex_attention"


def fake_device(monkeypatch, cuda: bool, flash_attn: bool, capability: int, bf16: bool) -> None:
    """A CUDA GPU of `capability` (or none), with or without flash-attn installed and bf16 support."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (capability, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    real_find_spec = modeling.importlib.util.find_spec
    monkeypatch.setattr(
        modeling.importlib.util, "find_spec", lambda name: object() if flash_attn and name == "flash_attn" else (
            None if name == "flash_attn" else real_find_spec(name))
    )  # fmt: skip


FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize(
    ("cuda", "flash_attn", "capability", "bf16", "model_type", "parity", "expected"),
    [(True, True, 8, True, "modernbert", False, ("flash_attention_2", BF16)),  # A100, H100, L4
     (True, True, 8, False, "modernbert", False, ("flash_attention_2", FP16)),  # Ampere+ without bf16
     (True, True, 7, False, "modernbert", False, ("cmft_banded", FP32)),  # T4 (7.5), V100 (7.0)
     (True, True, 7, False, "bert", False, ("sdpa", FP32)),
     (True, False, 9, True, "modernbert", False, ("cmft_banded", FP32)),  # no flash-attn installed
     (True, True, 8, True, "bert", False, ("sdpa", FP32)),  # no local layers: nothing for flash to skip
     (False, False, 8, False, "modernbert", False, ("cmft_banded", FP32)),  # CPU
     (False, True, 8, False, "bert", False, ("sdpa", FP32)),
     (True, True, 9, True, "modernbert", True, ("cmft_banded", FP32)),  # export parity: fp32, never flash
     (True, True, 9, True, "bert", True, ("sdpa", FP32)),
     (False, False, 8, False, "modernbert", True, ("cmft_banded", FP32))],
)  # fmt: skip
def test_inference_pair_works_on_every_device(monkeypatch, cuda, flash_attn, capability, bf16, model_type, parity,
                                              expected):  # fmt: skip
    """predict, evaluate, serve and the export's parity reference load with one (attention, dtype) pair that runs:
    flash-attention only in bf16 (fp16 without bf16), never in fp32 and never as the parity reference."""
    fake_device(monkeypatch, cuda, flash_attn, capability, bf16)
    chosen = modeling.choose_inference(model_type, parity)
    assert (chosen.implementation, chosen.dtype) == expected and chosen.reason
    assert modeling.inference_dtype(chosen.implementation) == chosen.dtype
    assert not (chosen.implementation == "flash_attention_2" and chosen.dtype == FP32)  # what inference ran before
    if not cuda:  # CPU: unchanged, auto's attention in fp32
        assert chosen.implementation == modeling.choose_attention("auto", model_type, False).implementation


class FakeFlashModel(torch.nn.Module):
    """A model whose config says flash-attention 2 (flash-attn itself is not needed): records its compute dtype."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"_attn_implementation": "flash_attention_2"})()
        self.linear = torch.nn.Linear(3, 2)
        self.computed: list[torch.dtype] = []

    def cuda(self, *args, **kwargs):  # the test machine has no GPU: stay on CPU
        return self

    def forward(self, input_ids, attention_mask):
        hidden = self.linear(torch.stack([input_ids, attention_mask, input_ids], -1).float())
        self.computed.append(hidden.dtype)
        return hidden


def test_torch_backend_runs_flash_attention_in_half_precision_not_fp32(monkeypatch):
    """The bug: inference ran flash_attention_2 in fp32, which it has no kernels for. The back end now autocasts a
    flash-attention model to bf16 (fp16 without bf16), returns float32, says what ran, and refuses fp32."""
    from cmft.inference import TorchBackend

    ids, mask = np.array([[1, 2, 3]]), np.array([[1, 1, 0]])
    for bf16, dtype, name in ((True, BF16, "bf16"), (False, FP16, "fp16")):
        fake_device(monkeypatch, True, True, 8, bf16)
        model = FakeFlashModel()
        backend = TorchBackend(model)  # the dtype follows the attention
        if dtype == FP16:  # fp16 autocast on this CPU-only test machine: check the choice, not the kernels
            assert backend.dtype == FP16 and backend.ran()["inference_dtype"] == "fp16"
            continue
        output = backend(ids, mask)
        assert model.computed == [BF16], "flash-attention ran in fp32"
        assert output.dtype == np.float32 and output.shape == (1, 3, 2)
        assert backend.ran() == {"inference_attention": "flash_attention_2", "inference_dtype": name}
    with pytest.raises(CmftError, match="flash_attention_2 has no fp32 kernels"):
        TorchBackend(FakeFlashModel(), FP32)
    fake_device(monkeypatch, False, False, 8, False)
    plain = torch.nn.Linear(3, 2)  # no attention config: fp32, as before
    backend = TorchBackend(plain)
    assert backend.dtype == FP32 and backend.ran() == {"inference_attention": "unknown", "inference_dtype": "fp32"}


def test_bf16_auto_follows_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert modeling.bf16_available()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert not modeling.bf16_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not modeling.bf16_available()


def test_packed_batches_use_cu_seq_lens_under_flash_attention():
    from cmft.pretraining.packing import Document, collate_packed, model_inputs

    def make_document(length: int) -> Document:
        return Document(ids=np.arange(1, length + 1), unit=np.arange(length), medical=np.zeros(length, dtype=bool))

    batch = collate_packed([[make_document(5), make_document(3)], [make_document(4)]], pad_id=0)
    flash = model_inputs(batch, "flash_attention_2", 128)
    assert flash["cu_seq_lens_q"].tolist() == [0, 5, 8, 12] and flash["max_length_q"] == 5
    assert flash["input_ids"].shape == (1, 12) and "attention_mask" not in flash
    sdpa = model_inputs(batch, "sdpa", 128)
    assert set(sdpa["attention_mask"]) == {"full_attention", "sliding_attention"} and "cu_seq_lens_q" not in sdpa
    banded = model_inputs(batch, "cmft_banded", 128)["attention_mask"]
    assert banded["sliding_attention"].tolist() == [[0] * 5 + [1] * 3, [0] * 4 + [-1] * 4]  # one index per token


@pytest.mark.slow
def test_gpu_benchmark_exits_2_with_one_line_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    result = subprocess.run([sys.executable, "benchmarks/gpu_throughput.py", "--lengths", "1024"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "CUDA GPU" in result.stderr
