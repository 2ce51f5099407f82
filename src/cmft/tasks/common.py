"""Helpers shared by the tasks built on transformers' AutoModelFor<Task> classes (not a task itself)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn


def head_modules(model: nn.Module) -> list[str]:
    """The model's own modules besides the encoder (head, classifier, ...): trained fully, and saved with LoRA."""
    base = getattr(model, "base_model_prefix", "model")
    children = model.named_children()
    return [name for name, child in children if name != base and next(child.parameters(), None) is not None]


def saved_labels(folder: Path) -> list[str]:
    """Label names in id order from a saved model's config.json (id2label)."""
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    return [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
