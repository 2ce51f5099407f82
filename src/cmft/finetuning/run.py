"""`cmft finetune` entry: validate the recipe (fast, before heavy imports), then run the engine."""

from __future__ import annotations

from pathlib import Path

from cmft.config import apply_overrides, build_config, load_config, read_yaml
from cmft.errors import CmftError
from cmft.finetuning.config import RecipeConfig
from cmft.paths import repo_root
from cmft.runs import discard_run, find_resumable, new_run_dir, partial_of


def bundled_recipes() -> dict[str, Path]:
    folder = repo_root() / "recipes"
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def resolve_recipe(recipe: str | Path) -> Path:
    """A path, or the name of a bundled recipe (`icd_coding`, `note_classification`, ...)."""
    path = Path(recipe)
    if path.is_file():
        return path
    named = bundled_recipes().get(str(recipe).removesuffix(".yaml"))
    if named is not None:
        return named
    known = ", ".join(bundled_recipes()) or "none"
    raise CmftError(f"{recipe}: no such recipe file or bundled recipe (bundled: {known})")


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
    if resume:
        final = find_resumable("finetune", output_dir)
        work = partial_of(final)
        data = apply_overrides(read_yaml(work / "recipe.yaml"), overrides)
        config = build_config(RecipeConfig, data, str(work / "recipe.yaml"))
    else:
        if recipe is None:
            raise CmftError("cmft finetune needs a recipe: a path or a bundled name (see `cmft recipes list`)")
        config = load_recipe(recipe, overrides)
        final = new_run_dir("finetune", config.run_name, output_dir)
        work = partial_of(final)
    from cmft.finetuning.engine import run_finetuning

    try:
        return run_finetuning(config, final, work, resume)
    except CmftError:
        if not resume:
            discard_run(final)
        raise
