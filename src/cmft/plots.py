"""Plots a task saves beside its metrics (matplotlib, imported on first use)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def confusion_plot(gold: np.ndarray, predicted: np.ndarray, names: list[str], path: Path, cell: float = 0.45,
                   fontsize: int = 6) -> None:  # fmt: skip
    """A confusion matrix of label indices (`names` in index order) as a PNG, its counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(gold, predicted, labels=list(range(len(names))))
    fig, ax = plt.subplots(figsize=(cell * len(names) + 3, cell * len(names) + 2.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (row, col), value in np.ndenumerate(matrix):
        if value:
            ax.text(col, row, str(value), ha="center", va="center", fontsize=fontsize)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
