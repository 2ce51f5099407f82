"""`training.learning_rate: auto`: the encoder rate measured for this kind of encoder, task and tuning method.

Two kinds of encoder: the tiny one `cmft pretrain` makes (its run folder says so, and it is no larger than the
bundled `clinical_tiny` geometry) and every other one: a real pretrained encoder, or a cmft-pretrained encoder of a
larger geometry. Each task holds its rates per kind and method (`Task.learning_rates`); the runs behind them are in
benchmarks/README.md, "Learning rates". An explicit number in the recipe always wins.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cmft.config import read_yaml
from cmft.modeling import GEOMETRY
from cmft.paths import bundled_file
from cmft.recipe import RecipeBase
from cmft.tasks import task_class

log = logging.getLogger("cmft")
TINY_CONFIG = "pretrain/clinical_tiny.yaml"


def made_by_cmft_pretrain(encoder: str) -> bool:
    """Whether the encoder is the model folder of a `cmft pretrain` run (whose run folder keeps summary.json)."""
    run = Path(encoder).parent
    return (run / "summary.json").is_file() and (run / "recipe.yaml").is_file()


def tiny_geometry() -> dict[str, int]:
    """The bundled clinical_tiny encoder's size (the encoder the tiny rates were measured on)."""
    architecture = read_yaml(bundled_file(TINY_CONFIG))["model"]["architecture"]
    return {key: int(architecture[key]) for key in GEOMETRY}


def encoder_kind(encoder: str) -> tuple[str, str]:
    """(`tiny` or `pretrained`, why) for an encoder folder or hub id."""
    if not made_by_cmft_pretrain(encoder):
        return "pretrained", "an encoder not made by `cmft pretrain`: the rate measured for a real pretrained encoder"
    try:
        config = json.loads((Path(encoder) / "config.json").read_text(encoding="utf-8"))
        size = {key: int(config[key]) for key in GEOMETRY}
    except (OSError, ValueError, KeyError, TypeError):
        return "pretrained", "a `cmft pretrain` encoder of unknown size: the rate for a real pretrained encoder"
    tiny = tiny_geometry()
    shown = f"hidden {size['hidden_size']}, {size['num_hidden_layers']} layers"
    if all(size[key] <= tiny[key] for key in GEOMETRY):
        return "tiny", f"the tiny encoder `cmft pretrain` makes ({shown}): the rate measured for it"
    return "pretrained", (f"a `cmft pretrain` encoder larger than clinical_tiny ({shown}): the rate measured for a "
                          "real pretrained encoder")  # fmt: skip


def choose_learning_rate(recipe: RecipeBase, encoder: str) -> tuple[float, str]:
    """The encoder learning rate `auto` stands for, and why (one line for the log and recipe.yaml)."""
    kind, why = encoder_kind(encoder)
    method = recipe.tuning.method
    rate = task_class(recipe.task).learning_rates[kind][method]
    return rate, f"{why}, {recipe.task} {method} tuning (benchmarks/README.md, Learning rates)"


def resolve_learning_rate(recipe: RecipeBase, encoder: str) -> str | None:
    """Replace `auto` in the recipe by its rate and log the choice; the reason, or None for an explicit number."""
    if recipe.training.learning_rate != "auto":
        return None
    rate, why = choose_learning_rate(recipe, encoder)
    recipe.training.learning_rate = rate
    log.info("training.learning_rate: auto → %g (%s)", rate, why)
    return why
