"""cmft: pretrain, fine-tune and export clinical ModernBERT encoders."""

from __future__ import annotations

from pathlib import Path

from cmft.version import __version__


def pretrain(config: str | Path | None = None, overrides: list[str] | None = None, **kwargs) -> Path:
    """Run `cmft pretrain` from Python; returns the run folder."""
    from cmft.pretraining.run import pretrain as run

    return run(config, overrides, **kwargs)


def finetune(recipe: str | Path, overrides: list[str] | None = None, **kwargs) -> Path:
    """Run `cmft finetune` from Python; returns the run folder."""
    from cmft.finetuning.run import finetune as run

    return run(recipe, overrides, **kwargs)


def __getattr__(name: str):
    if name == "IcdCoder":  # imported on use: it pulls in torch and transformers
        from cmft.tasks.icd_coding import IcdCoder

        return IcdCoder
    raise AttributeError(name)


__all__ = ["IcdCoder", "__version__", "finetune", "pretrain"]
