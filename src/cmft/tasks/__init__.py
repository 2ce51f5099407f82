"""One module per task behind one interface (`cmft.tasks.base.Task`); this registry maps a recipe's `task` to it.

Task modules are imported on first use: each pulls in its own dependencies. A task never imports another task, and
nothing outside this package compares task names.
"""

from __future__ import annotations

import importlib
from typing import Any

from cmft.errors import CmftError

BARE_ENCODER = "encoder"  # a `cmft pretrain` run's bare encoder: inference and export only
REGISTRY = {
    "ner": "cmft.tasks.ner:NerTask",
    "icd_coding": "cmft.tasks.icd_coding:IcdCodingTask",
    "note_classification": "cmft.tasks.classification:ClassificationTask",
    "retrieval": "cmft.tasks.retrieval:RetrievalTask",
    "assertion": "cmft.tasks.assertion:AssertionTask",
    BARE_ENCODER: "cmft.tasks.encoder:EncoderTask",
}


def task_class(name: str) -> type:
    """The Task class registered under `name`."""
    if name not in REGISTRY:
        raise CmftError(f"task {name!r}: unknown; choose one of {', '.join(sorted(REGISTRY))}")
    module, _, attribute = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def get_task(recipe: Any):
    return task_class(recipe.task)(recipe)
