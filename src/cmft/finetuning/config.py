"""The fine-tuning recipe (`recipes/*.yaml`): one YAML per task, validated before anything heavy runs.

`RecipeConfig` is built from the task registry (cmft.tasks): `task` is one of the registered tasks that have a recipe
section, and each such task's section (its `section` model under its `section_name` key, defined in the task's own
module) is one optional key. A recipe may hold only its own task's section; a missing one takes its defaults.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

from pydantic import create_model, model_validator

from cmft.recipe import DataConfig, EncoderConfig, FolderSplit, RecipeBase, TaskSection, TrainingConfig, TuningConfig
from cmft.tasks import recipe_tasks, task_class

__all__ = ["DataConfig", "EncoderConfig", "FolderSplit", "RecipeConfig", "TASKS", "StepSchedule", "TaskSection",
           "TrainingConfig", "TuningConfig", "step_schedule"]  # fmt: skip


class StepSchedule(NamedTuple):
    max_steps: int
    steps_per_epoch: int
    eval_every: int
    """Evaluate (and checkpoint) every this many optimizer steps."""
    log_every: int


def step_schedule(t: TrainingConfig, batches_per_epoch: int) -> StepSchedule:
    """Optimizer steps from `batches_per_epoch` (global batches): `max_steps` or `epochs` passes; evaluation every
    `eval_every` steps or once per epoch; nothing beyond the last step."""
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / t.gradient_accumulation))
    max_steps = t.max_steps or max(1, math.ceil(t.epochs * batches_per_epoch / t.gradient_accumulation))
    return StepSchedule(max_steps, steps_per_epoch, min(t.eval_every or steps_per_epoch, max_steps),
                        min(t.log_every, max_steps))  # fmt: skip


class _SectionsOfTheTask(RecipeBase):
    """The check every recipe gets: only its own task's section, defaulted when missing, agreeing with training and
    data (the section's `check`)."""

    @model_validator(mode="after")
    def _sections_match_task(self) -> Any:
        own = task_class(self.task)
        for task in recipe_tasks():
            if task is not own and getattr(self, task.section_name) is not None:
                raise ValueError(f"section `{task.section_name}` is for task {task.name}, but this recipe's task is "
                                 f"{self.task}")  # fmt: skip
        if getattr(self, own.section_name) is None:
            setattr(self, own.section_name, own.section())
        getattr(self, own.section_name).check(self.training, self.data)
        return self


def _recipe_model() -> type[RecipeBase]:
    """RecipeConfig: `task` narrowed to the registered tasks (registry order), then their sections by key."""
    tasks = recipe_tasks()
    sections: dict[str, Any] = {task.section_name: (task.section | None, None)
                                for task in sorted(tasks, key=lambda task: task.section_name)}  # fmt: skip
    task_names: Any = Literal[tuple(task.name for task in tasks)]  # type: ignore[valid-type]
    return create_model("RecipeConfig", __base__=_SectionsOfTheTask, __module__=__name__, task=(task_names, ...),
                        **sections)  # fmt: skip


RecipeConfig = _recipe_model()
TASKS: tuple[str, ...] = tuple(task.name for task in recipe_tasks())
