"""ICD label helpers: code normalisation, the label space's settings (`icd_coding.label_space`), the per-label plot."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import PositiveInt

from cmft.config import StrictModel

ICD10 = re.compile(r"^[A-Z][0-9][0-9A-Z](\.?[0-9A-Z]{1,4})?$")


class LabelSpaceConfig(StrictModel):
    level: Literal["code", "category"] = "code"
    """`code`: full codes (E11.9); `category`: their 3-character categories (E11)."""
    min_train_count: PositiveInt = 5
    """Keep labels with at least this many train documents; the others are counted and reported."""
    zero_shot: bool = False
    """Also score codes never in the label space: each code of `descriptions` in the 3-character category of a trained
    code, from its description through the fine-tuned encoder, added after training (cmft.tasks.icd_zero_shot)."""
    zero_shot_candidates: PositiveInt | None = 512
    """Per note, score only this many zero-shot codes with the full label attention: those a cheap first-order score
    ranks first (cmft.heads.candidate_scores); the others get probability 0. null: every zero-shot code in full."""


def normalize_code(code: str, level: str = "code") -> str:
    """Upper case with the ICD-10-CM dot (`e119`, `E119`, `e11.9` → `E11.9`); `category` keeps `E11`."""
    code = code.strip().upper()
    if ICD10.match(code):
        code = code.replace(".", "")
        code = code if len(code) <= 3 else f"{code[:3]}.{code[3:]}"
    return code[:3] if level == "category" else code


def per_label_plot(values: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-values["support"])
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(values["precision"][order], ".", label="precision", alpha=0.7)
    ax.plot(values["recall"][order], ".", label="recall", alpha=0.7)
    ax.set_xlabel("labels, most frequent first")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.set_title(f"per-label precision / recall ({len(order)} labels)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
