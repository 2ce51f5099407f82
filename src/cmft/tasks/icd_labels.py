"""ICD label helpers: code normalisation, label queries started from code descriptions, the per-label plot."""

from __future__ import annotations

import csv
import gzip
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmft.paths import bundled_file

ICD10 = re.compile(r"^[A-Z][0-9][0-9A-Z](\.?[0-9A-Z]{1,4})?$")


def normalize_code(code: str, level: str = "code") -> str:
    """Upper case with the ICD-10-CM dot (`e119`, `E119`, `e11.9` → `E11.9`); `category` keeps `E11`."""
    code = code.strip().upper()
    if ICD10.match(code):
        code = code.replace(".", "")
        code = code if len(code) <= 3 else f"{code[:3]}.{code[3:]}"
    return code[:3] if level == "category" else code


def init_queries_from_descriptions(coder: Any, tokenizer, labels: list[str]) -> None:
    """Label query u_l ← tanh(W · mean-pooled encoding of the code's ICD-10-CM description) (when known)."""
    descriptions: dict[str, str] = {}
    with gzip.open(bundled_file("data/icd_codes/icd10cm_2024_codes.tsv.gz"), "rt", encoding="utf-8") as handle:
        for code, text in csv.reader(handle, delimiter="\t"):
            descriptions.setdefault(normalize_code(code), text)
            descriptions.setdefault(normalize_code(code, "category"), text)
    known = [(i, descriptions[c]) for i, c in enumerate(labels) if c in descriptions]
    if not known:
        return
    with torch.no_grad():
        for start in range(0, len(known), 64):
            rows = known[start : start + 64]
            batch = tokenizer([t for _, t in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
            states = coder.encoder(**batch).last_hidden_state
            weights = batch["attention_mask"][..., None].float()
            pooled = (states * weights).sum(1) / weights.sum(1)
            queries = torch.tanh(coder.head.project(pooled))
            scale = coder.head.label_queries.weight.norm(dim=1).mean() / queries.norm(dim=1).clamp_min(1e-6)
            coder.head.label_queries.weight[[i for i, _ in rows]] = queries * scale[:, None]


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
