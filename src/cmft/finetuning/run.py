"""`cmft finetune` entry: validate the recipe (before any data or model is loaded), then run the engine."""

from __future__ import annotations

from pathlib import Path

from cmft.config import load_config
from cmft.errors import CmftError
from cmft.finetuning.config import RecipeConfig
from cmft.paths import resolve_config
from cmft.runs import run_or_discard, start_or_resume


def resolve_recipe(recipe: str | Path) -> Path:
    """The name of a bundled recipe (`icd_coding`, ...) → the package's copy; a path (`my/recipe.yaml`) → from the
    working directory. Never one for the other."""
    return resolve_config(recipe, "recipes", "recipe", "cmft recipes list")


def load_recipe(recipe: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    return load_config(RecipeConfig, resolve_recipe(recipe), overrides)


def finetune(
    recipe: str | Path | None = None,
    overrides: list[str] | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
) -> Path:
    """Fine-tune per the recipe; returns the finished run folder."""
    overrides = list(overrides or [])
    if recipe is None and not resume:
        raise CmftError("cmft finetune needs a recipe: a path or a bundled name (see `cmft recipes list`)")
    config, final, work = start_or_resume(
        "finetune", RecipeConfig, lambda: load_recipe(recipe or "", overrides), output_dir, resume, overrides
    )
    from cmft.finetuning.engine import run_finetuning

    return run_or_discard(final, resume, lambda: run_finetuning(config, final, work, resume))
