"""Crash and resume with real processes: SIGKILL at a random step (and in the middle of a checkpoint write),
`--resume`, and bitwise the same weights and metrics as an uninterrupted run (fine-tuning with gradient
checkpointing); the loss watchdog."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cmft.checkpointing import STAGING, complete_checkpoints
from tests.conftest import REPO, SMALL_PRETRAIN, run_cmft

TIMING = ("seconds", "_per_s", "wall")
PRETRAIN_STEPS = {"training": {"max_steps": 10, "save_every": 2, "log_every": 1, "save_total_limit": 2}}
FINETUNE = ["training.max_steps=10", "training.eval_every=2", "training.log_every=1", "training.max_length=128",
            "training.eval_batch_size=64", "training.gradient_checkpointing=true"]  # fmt: skip
"""Fine-tuning resumes with gradient checkpointing on (pretraining's crash tests run with it off)."""


def _config(tmp_path: Path) -> Path:
    data = yaml.safe_load(yaml.safe_dump(SMALL_PRETRAIN))
    data["training"].update(PRETRAIN_STEPS["training"])
    path = tmp_path / "crash.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _kill_at_step(args: list[str], partial: Path, step: int) -> int:
    """Start the real CLI, SIGKILL it once history.jsonl shows `step` (it must still be running)."""
    proc = subprocess.Popen([sys.executable, "-m", "cmft", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    history = partial / "history.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before step {step} (exit {proc.returncode}): {proc.stderr.read()[-2000:]}")
        if history.is_file():
            steps = [json.loads(line)["step"] for line in history.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.returncode


def _same_weights(a: Path, b: Path) -> None:
    expected, got = load_file(a), load_file(b)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def kill_step(low: int, high: int) -> int:
    """A step in [low, high] to kill at, drawn from a seed that is printed (shown with a failure): rerun the same
    draw with CMFT_CRASH_SEED=<seed>."""
    seed = int(os.environ.get("CMFT_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    step = random.Random(seed).randint(low, high)
    print(f"killing at step {step}: CMFT_CRASH_SEED={seed}")
    return step


def _same_metrics(a: Path, b: Path) -> None:
    first, second = json.loads(a.read_text()), json.loads(b.read_text())
    keep = [k for k in first if not any(t in k for t in TIMING)]
    assert keep and {k: first[k] for k in keep} == {k: second[k] for k in keep}


@pytest.fixture(scope="module")
def pretrain_reference(tmp_path_factory) -> tuple[Path, Path]:
    from cmft.pretraining.run import pretrain

    root = tmp_path_factory.mktemp("crash-pretrain")
    config = _config(root)
    return config, pretrain(config, output_dir=root / "reference")


@pytest.mark.slow
def test_sigkill_during_pretraining_then_resume_is_bitwise_identical(pretrain_reference, tmp_path):
    config, reference = pretrain_reference
    step = kill_step(2, 7)  # a different step each run; the assertion holds for any
    out = tmp_path / "killed"
    partial = out.with_name("killed.partial")
    code = _kill_at_step(["pretrain", str(config), "--output-dir", str(out)], partial, step)
    assert code == -signal.SIGKILL
    assert not out.exists() and partial.is_dir(), "a killed run must not look finished"
    assert all(p.name.startswith("checkpoint-") for p in complete_checkpoints(partial / "checkpoints" / "main"))
    result = run_cmft("pretrain", "--resume", "--output-dir", str(out))
    assert result.returncode == 0, f"killed at step {step}: {result.stderr[-3000:]}"
    assert out.is_dir() and not partial.exists()
    _same_weights(reference / "model" / "model.safetensors", out / "model" / "model.safetensors")
    _same_metrics(reference / "metrics.json", out / "metrics.json")
    _same_card(reference, out)


KILL_IN_CHECKPOINT = """
import os, signal, sys
from transformers import Trainer
original = Trainer._save_rng_state
def dying(self, output_dir):
    if self.state.global_step == 6:
        os.kill(os.getpid(), signal.SIGKILL)  # weights and optimizer are written, RNG and state are not
    original(self, output_dir)
Trainer._save_rng_state = dying
from cmft.cli import main
sys.argv = ["cmft", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_keeps_the_previous_one(pretrain_reference, tmp_path):
    config, reference = pretrain_reference
    out = tmp_path / "torn"
    partial = out.with_name("torn.partial")
    proc = subprocess.run([sys.executable, "-c", KILL_IN_CHECKPOINT, "pretrain", str(config), "--output-dir",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    checkpoints = partial / "checkpoints" / "main"
    torn = checkpoints / STAGING / "checkpoint-6"
    assert torn.is_dir() and not (torn / "trainer_state.json").exists()  # the write really was cut short
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["checkpoint-2", "checkpoint-4"]
    assert not (checkpoints / "checkpoint-6").exists() and not out.exists()
    result = run_cmft("pretrain", "--resume", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from checkpoint-4" in result.stdout + result.stderr
    _same_weights(reference / "model" / "model.safetensors", out / "model" / "model.safetensors")
    _same_metrics(reference / "metrics.json", out / "metrics.json")
    _same_card(reference, out)


@pytest.mark.slow
def test_sigkill_during_finetuning_then_resume_is_bitwise_identical(tiny_encoder, tmp_path):
    from cmft.finetuning.run import finetune

    args = ["note_classification", f"model.encoder={tiny_encoder}", *FINETUNE]
    reference = finetune(args[0], args[1:], output_dir=tmp_path / "reference")
    assert yaml.safe_load((reference / "recipe.yaml").read_text())["training"]["gradient_checkpointing"] is True
    step = kill_step(2, 7)
    out = tmp_path / "killed"
    partial = out.with_name("killed.partial")
    assert _kill_at_step(["finetune", *args, "--output-dir", str(out)], partial, step) == -signal.SIGKILL
    assert not out.exists() and partial.is_dir()
    result = run_cmft("finetune", "--resume", "--output-dir", str(out))
    assert result.returncode == 0, f"killed at step {step}: {result.stderr[-3000:]}"
    _same_weights(reference / "model" / "model.safetensors", out / "model" / "model.safetensors")
    _same_metrics(reference / "metrics.json", out / "metrics.json")
    _same_card(reference, out)


@pytest.mark.parametrize("fault", ["nan", "blowup"])
def test_watchdog_stops_a_diverging_run_and_keeps_the_last_good_checkpoint(fault, tiny_encoder, tmp_path,
                                                                            monkeypatch, capsys):  # fmt: skip
    """The loss turns NaN (or 1000× larger) from step 7: the run stops there with one line, exit 1, and keeps
    checkpoint-6 (written before the fault) for `--resume`; the folder stays unfinished."""
    from cmft.training import FinetuneTrainer
    from tests.conftest import run_inline

    original = FinetuneTrainer.compute_loss

    def faulty(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = original(self, model, inputs, return_outputs, num_items_in_batch)
        if self.state.global_step >= 6 and model.training:
            return loss * float("nan") if fault == "nan" else loss * 1000
        return loss

    monkeypatch.setattr(FinetuneTrainer, "compute_loss", faulty)
    out = tmp_path / "diverged"
    code, _, err = run_inline(capsys, "finetune", "note_classification", f"model.encoder={tiny_encoder}", *FINETUNE,
                              "training.max_steps=20", "--output-dir", str(out))  # fmt: skip
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert "training diverged at step 7" in lines[0] and "checkpoint-6" in lines[0] and "--resume" in lines[0]
    assert ("nan" in lines[0]) if fault == "nan" else ("above 10×" in lines[0])
    partial = out.with_name("diverged.partial")
    assert not out.exists() and partial.is_dir()
    kept = complete_checkpoints(partial / "checkpoints")
    assert kept[-1].name == "checkpoint-6"
    for tensor in load_file(next(kept[-1].glob("*.safetensors"))).values():
        assert torch.isfinite(tensor).all()


def _same_card(reference: Path, out: Path) -> None:
    """The model card is deterministic: the same seed gives the same card, whatever the run folder's name."""
    card = (reference / "model" / "README.md").read_text()
    assert card == (out / "model" / "README.md").read_text()
    assert str(reference.parent) not in card  # nothing of where the runs were made
