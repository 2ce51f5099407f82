"""Crash-safe training: atomic checkpoints, resuming from the newest complete one, and a loss watchdog.

A checkpoint is written into `<checkpoints>/.staging/checkpoint-N` and renamed into place only when every
file (weights, optimizer, scheduler, RNG states, trainer state, cmft's own state) is on disk, so a kill at any
moment leaves the previous checkpoints loadable. Older checkpoints are rotated away only after the rename.
With several processes (torchrun) every process writes its own RNG state into the staging folder, and only the
process that saves (`args.should_save`: rank 0) prepares, renames and rotates, the others waiting for it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from cmft import distributed
from cmft.errors import CmftError

log = logging.getLogger("cmft")
STAGING = ".staging"
CMFT_STATE = "cmft_state.json"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class DivergenceError(CmftError):
    """Training stopped by the loss watchdog; the last good checkpoint is kept for `--resume`."""

    exit_code = 1
    keeps_run = True


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_complete(folder: Path) -> bool:
    """A checkpoint folder with its trainer state, cmft state and weights (renamed into place complete)."""
    if not (folder / TRAINER_STATE).is_file() or not (folder / CMFT_STATE).is_file():
        return False
    return any(folder.glob("*.safetensors")) or any(folder.glob("*/*.safetensors"))


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest step first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if is_complete(p)]


def resume_point(root: Path, resume: bool) -> str | None:
    """The newest complete checkpoint to resume from (None: start from step 0); leftovers of an interrupted
    write are removed."""
    if not resume:
        return None
    if distributed.is_main():
        shutil.rmtree(root / STAGING, ignore_errors=True)
    distributed.barrier()
    checkpoints = complete_checkpoints(root)
    if not checkpoints:
        return None
    log.info("resuming from %s", checkpoints[-1].name)
    return str(checkpoints[-1])


class SafeTrainerMixin:
    """Mix into a transformers Trainer subclass (before it): atomic checkpoints with cmft's state, own rotation,
    and a watchdog that stops on a non-finite or blown-up loss.

    Subclasses may override `cmft_state()` / `load_cmft_state()` to keep more (e.g. a tuned threshold)."""

    divergence_factor: float | None = 10.0
    _staging: str | None = None
    _loss_ema: float | None = None
    _loss_floor: float | None = None

    def setup_safety(self, divergence_factor: float | None) -> None:
        self.divergence_factor = divergence_factor
        self.keep_checkpoints = self.args.save_total_limit
        self.args.save_total_limit = None  # rotation happens here, after the rename

    # -- checkpoints --------------------------------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:
        return self._staging if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        root = Path(super()._get_output_dir(trial))
        staging = root / STAGING
        saver = self.args.should_save
        if saver:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()  # the staging folder is ready before anyone writes into it
        self._staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every process's files (e.g. rng_state_<rank>.pth) are written
        best = self.state.best_model_checkpoint
        moved = best is not None and Path(best).parent == staging
        if moved:  # the staging path → the final one, in every process's state
            self.state.best_model_checkpoint = str(root / Path(best).name)
        if saver:
            self._commit_checkpoint(root, staging, moved)
        self.accelerator.wait_for_everyone()

    def _commit_checkpoint(self, root: Path, staging: Path, best_moved: bool) -> None:
        name = f"checkpoint-{self.state.global_step}"
        staged, final = staging / name, root / name
        if best_moved:
            self.state.save_to_json(str(staged / TRAINER_STATE))
        (staged / CMFT_STATE).write_text(json.dumps(self.cmft_state(), indent=2), encoding="utf-8")
        _fsync_tree(staged)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staged, final)
        _fsync_dir(root)
        shutil.rmtree(staging, ignore_errors=True)
        self._rotate(root)

    def _rotate(self, root: Path) -> None:
        limit = getattr(self, "keep_checkpoints", None)
        if not limit:
            return
        checkpoints = complete_checkpoints(root)
        best = self.state.best_model_checkpoint
        keep = set(checkpoints[-limit:])
        if best is not None:
            keep.add(Path(best))
        for path in checkpoints:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def cmft_state(self) -> dict[str, Any]:
        return {"global_step": self.state.global_step, "loss_ema": self._loss_ema, "loss_floor": self._loss_floor}

    def load_cmft_state(self, state: dict[str, Any]) -> None:
        self._loss_ema = state.get("loss_ema")
        self._loss_floor = state.get("loss_floor")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # sentence-transformers' trainer takes the path only (and calls it so to load the best model at the end)
        args = (resume_from_checkpoint,) if model is None else (resume_from_checkpoint, model)
        super()._load_from_checkpoint(*args)
        path = Path(resume_from_checkpoint) / CMFT_STATE
        if path.is_file():
            self.load_cmft_state(json.loads(path.read_text(encoding="utf-8")))

    # -- watchdog -----------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        watched = loss.detach()
        if self.args.world_size > 1:  # every process must take the same decision to stop
            watched = self.accelerator.reduce(watched.clone(), reduction="mean")
        self._watch(float(watched))
        return loss

    def _watch(self, value: float) -> None:
        step = self.state.global_step + 1
        if not math.isfinite(value):
            self._diverged(step, f"the loss is {value}")
        if self.divergence_factor is None:
            return
        self._loss_ema = value if self._loss_ema is None else 0.9 * self._loss_ema + 0.1 * value
        self._loss_floor = self._loss_ema if self._loss_floor is None else min(self._loss_floor, self._loss_ema)
        limit = self.divergence_factor * max(self._loss_floor, 0.1)
        if self._loss_ema > limit:
            self._diverged(
                step,
                f"the smoothed loss {self._loss_ema:.3g} is above {self.divergence_factor:g}× its lowest "
                f"({self._loss_floor:.3g})",
            )

    def _diverged(self, step: int, why: str) -> None:
        root = Path(self.args.output_dir)
        checkpoints = complete_checkpoints(root)
        kept = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"
        raise DivergenceError(
            f"training diverged at step {step}: {why}; stopped, {kept}. Lower training.learning_rate "
            f"(or raise training.divergence_factor) and continue with --resume"
        )
