"""`cmft pretrain`: validate the config (fast, before heavy imports), then run the engine in a run folder."""

from __future__ import annotations

from pathlib import Path

from cmft.config import apply_overrides, build_config, load_config, read_yaml
from cmft.errors import CmftError
from cmft.paths import resolve_bundled
from cmft.pretraining.config import PretrainConfig
from cmft.runs import discard_run, find_resumable, new_run_dir, partial_of

DEFAULT_CONFIG = "pretrain/clinical_tiny.yaml"


def pretrain(
    config_path: str | Path | None = None,
    overrides: list[str] | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
) -> Path:
    """Run the pretraining stage; returns the finished run folder (its `model/` loads with transformers)."""
    overrides = list(overrides or [])
    if resume:
        final = find_resumable("pretrain", output_dir)
        work = partial_of(final)
        data = apply_overrides(read_yaml(work / "recipe.yaml"), overrides)
        config = build_config(PretrainConfig, data, str(work / "recipe.yaml"))
    else:
        config = load_config(PretrainConfig, resolve_bundled(config_path or DEFAULT_CONFIG), overrides)
        final = new_run_dir("pretrain", config.name, output_dir)
        work = partial_of(final)
    from cmft.pretraining.engine import run_pretraining

    try:
        return run_pretraining(config, final, work, resume)
    except CmftError:
        if not resume:
            discard_run(final)
        raise
