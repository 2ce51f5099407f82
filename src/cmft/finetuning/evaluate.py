"""`cmft evaluate`: recompute a finished run's metrics from its saved model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from cmft.config import apply_overrides, build_config, read_yaml
from cmft.errors import CmftError
from cmft.finetuning.config import RecipeConfig
from cmft.tasks import get_task


@torch.no_grad()
def predict_logits(model: torch.nn.Module, rows: list[dict], collate, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    outputs, labels = [], []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size])
        labels.append(batch.pop("labels").numpy())
        result = model(**batch)
        logits = result["logits"] if isinstance(result, dict) else result.logits
        outputs.append(logits.float().numpy())
    if outputs[0].ndim == 3:  # token logits (NER): batches differ in length; pad to the widest
        width = max(o.shape[1] for o in outputs)
        outputs = [np.pad(o, ((0, 0), (0, width - o.shape[1]), (0, 0))) for o in outputs]
        labels = [np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=-100) for x in labels]
    return np.concatenate(outputs), np.concatenate(labels)


def evaluate_run(run_dir: str | Path, split: str = "test", data: str | Path | None = None) -> dict[str, Any]:
    """Metrics of `run_dir/model` on a split of its recipe (or on `data`, read as that split)."""
    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if not (run_dir / "recipe.yaml").is_file() or not (model_dir / "config.json").is_file():
        raise CmftError(f"{run_dir}: not a finished fine-tuning run (needs recipe.yaml and model/)")
    from cmft.modeling import check_model_folder

    check_model_folder(model_dir, "evaluate")
    if split not in ("train", "dev", "test"):
        raise CmftError(f"--split {split}: choose train, dev or test")
    overrides = [f"data.{split}={Path(data).resolve()}"] if data is not None else []
    recipe = build_config(RecipeConfig, apply_overrides(read_yaml(run_dir / "recipe.yaml"), overrides),
                          str(run_dir / "recipe.yaml"))  # fmt: skip
    if getattr(recipe.data, split) is None:
        raise CmftError(f"{run_dir}: the recipe has no {split} split; pass --data PATH")
    if recipe.task == "retrieval":
        from cmft.data.retrieval import read_retrieval_split
        from cmft.tasks import retrieval

        data_split = read_retrieval_split(recipe.data, split, recipe.retrieval)
        model = retrieval.load_model(model_dir)
        metrics = retrieval.evaluate_split(model, data_split, recipe.retrieval.top_k, recipe.training.eval_batch_size)
        return {**metrics, "split": split}
    task = get_task(recipe)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = task.load_model(model_dir)
    task.prepare(tokenizer, splits=(split,), labels=task.saved_labels(model_dir))
    logits, labels = predict_logits(model, task.datasets[split], task.collator(tokenizer),
                                    recipe.training.eval_batch_size)  # fmt: skip
    metrics = task.metrics(logits, labels, split)
    return {**metrics, "split": split, "n_examples": len(task.datasets[split])}
