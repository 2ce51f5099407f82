"""Evaluating saved models: `cmft evaluate` and the export's int8 check run a run's split through any back end (torch
or onnxruntime, fp32 or int8) with the one evaluation loop every figure comes from (`Task.evaluate`: training's final
metrics, retrieval's dev evaluation and the benchmarks too), so their figures agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cmft.backends import Backend, TorchBackend
from cmft.errors import CmftError
from cmft.inference import Loaded, load_run, run_kind
from cmft.tasks import get_task
from cmft.tasks.base import Task


def split_outputs(task: Task, backend: Backend, split: str, batch_size: int, pad_id: int) -> list[np.ndarray]:
    """The back end's output for every prepared row of `split`, in row order (`Task.split_outputs`)."""
    return task.split_outputs(backend, split, batch_size, pad_id)


def evaluate(task: Task, backend: Backend, split: str, batch_size: int, pad_id: int, tune: bool = False
             ) -> dict[str, Any]:  # fmt: skip
    """The task's metrics on a prepared split (`Task.evaluate`; `tune`: choose settings on it, e.g. the ICD
    threshold on dev)."""
    return task.evaluate(backend, split, batch_size, pad_id, tune)


def evaluate_loaded(loaded: Loaded, backend: Backend, split: str = "dev", batch_size: int = 16) -> dict[str, Any]:
    """Metrics of a loaded run (its recipe, its saved labels and settings) through `backend` on a split."""
    if getattr(loaded.recipe.data, split) is None:
        raise CmftError(f"{loaded.run_dir}: the recipe has no {split} split; pass --data PATH")
    task = get_task(loaded.recipe)
    task.restore(loaded.meta)
    task.prepare(loaded.tokenizer, splits=(split,))
    metrics = task.evaluate(backend, split, batch_size, loaded.pad_id)
    return {**metrics, "split": split, **task.counts(split)}


def evaluate_run(run_dir: str | Path, split: str | None = None, data: str | Path | None = None) -> dict[str, Any]:
    """`cmft evaluate`: metrics of `run_dir/model` on a split of its recipe (default test; or on `data`, read as that
    split), and the attention and dtype that ran (cmft.modeling.choose_inference). A pretraining run: the held-out
    top-k accuracies of its metrics.json (or on the documents of `data`)."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file() or not (run_dir / "model" / "config.json").is_file():
        raise CmftError(f"{run_dir}: not a finished fine-tuning run or pretraining run (needs recipe.yaml and model/)")
    from cmft.modeling import check_model_folder

    check_model_folder(run_dir / "model", "evaluate")
    if run_kind(run_dir) == "pretrain":
        from cmft.pretraining.evaluate import evaluate_pretraining_run

        return evaluate_pretraining_run(run_dir, split, Path(data) if data is not None else None)
    split = split or "test"
    if split not in ("train", "dev", "test"):
        raise CmftError(f"--split {split}: choose train, dev or test")
    loaded = load_run(run_dir)
    if data is not None:  # read as that split
        setattr(loaded.recipe.data, split, str(Path(data).resolve()))
    backend = TorchBackend(loaded.module)
    return {**evaluate_loaded(loaded, backend, split, loaded.recipe.training.eval_batch_size), **backend.ran()}
