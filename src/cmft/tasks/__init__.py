"""One module per task behind one interface (`cmft.tasks.base.Task`); this registry maps a recipe's `task` to it.

Adding a task: its module (cmft/tasks/<name>.py, with its `Task` subclass and its recipe section) and one line here.
The recipe (cmft.finetuning.config.RecipeConfig) takes its keys from the registered classes. Task modules are
imported on first use: each pulls in its own dependencies. A task never imports another task, and nothing outside
this package compares task names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cmft.errors import CmftError

if TYPE_CHECKING:
    from cmft.tasks.base import Task

BARE_ENCODER = "encoder"  # a `cmft pretrain` run's bare encoder: inference and export only
REGISTRY = {
    "ner": "cmft.tasks.ner:NerTask",
    "icd_coding": "cmft.tasks.icd_coding:IcdCodingTask",
    "note_classification": "cmft.tasks.classification:ClassificationTask",
    "retrieval": "cmft.tasks.retrieval:RetrievalTask",
    "assertion": "cmft.tasks.assertion:AssertionTask",
    BARE_ENCODER: "cmft.tasks.encoder:EncoderTask",
}


def task_class(name: str) -> type[Task]:
    """The Task class registered under `name`."""
    if name not in REGISTRY:
        raise CmftError(f"task {name!r}: unknown; choose one of {', '.join(sorted(REGISTRY))}")
    module, _, attribute = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def recipe_tasks() -> list[type[Task]]:
    """The tasks a recipe may name (those with a recipe section), in registry order."""
    return [task for task in map(task_class, REGISTRY) if task.section is not None]


def get_task(recipe: Any) -> Task:
    """A fresh task for a recipe (a cmft.finetuning.config.RecipeConfig)."""
    return task_class(recipe.task)(recipe)
