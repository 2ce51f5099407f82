"""One module per task: data preparation, model, metrics, saving. A task never imports another task."""

from __future__ import annotations

from typing import Any


def get_task(recipe: Any):
    """The task object for a validated recipe (imported lazily: each pulls in its own dependencies)."""
    if recipe.task == "note_classification":
        from cmft.tasks.classification import ClassificationTask

        return ClassificationTask(recipe)
    if recipe.task == "icd_coding":
        from cmft.tasks.icd_coding import IcdCodingTask

        return IcdCodingTask(recipe)
    if recipe.task == "ner":
        from cmft.tasks.ner import NerTask

        return NerTask(recipe)
    from cmft.errors import CmftError

    raise CmftError(f"task {recipe.task!r}: has no token-level task object (retrieval trains in sentence-transformers)")
