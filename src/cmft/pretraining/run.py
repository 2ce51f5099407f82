"""`cmft pretrain`: validate the config (fast, before heavy imports), then run the engine in a run folder."""

from __future__ import annotations

from pathlib import Path

from cmft.config import load_config
from cmft.paths import resolve_config
from cmft.pretraining.config import PretrainConfig
from cmft.runs import run_or_discard, start_or_resume

DEFAULT_CONFIG = "clinical_tiny"


def resolve_pretrain_config(config: str | Path | None) -> Path:
    """A bundled name (`clinical_tiny`, the default) → the package's copy; a path → from the working directory."""
    return resolve_config(config or DEFAULT_CONFIG, "pretrain", "pretraining config", "cmft configs list")


def pretrain(
    config_path: str | Path | None = None,
    overrides: list[str] | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
) -> Path:
    """Run the pretraining stage; returns the finished run folder (its `model/` loads with transformers)."""
    overrides = list(overrides or [])
    config, final, work = start_or_resume(
        "pretrain",
        PretrainConfig,
        lambda: load_config(PretrainConfig, resolve_pretrain_config(config_path), overrides),
        output_dir,
        resume,
        overrides,
    )
    from cmft.pretraining.engine import run_pretraining

    return run_or_discard(final, resume, lambda: run_pretraining(config, final, work, resume))
