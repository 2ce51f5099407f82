"""cmft: pretrain, fine-tune and export clinical ModernBERT encoders."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def pretrain(config: str | Path | None = None, overrides: list[str] | None = None, **kwargs) -> Path:
    """Run `cmft pretrain` from Python; returns the run folder."""
    from cmft.pretraining.run import pretrain as run

    return run(config, overrides, **kwargs)


__all__ = ["__version__", "pretrain"]
