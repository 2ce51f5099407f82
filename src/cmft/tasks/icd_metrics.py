"""ICD coding metrics over every gold code of a split, not only the codes the model can output.

A coder's label space (the codes it can output) never holds every code a split's notes carry: the label-space
metrics (`micro_f1`, …) leave the others out, which overstates the coder beside a published one. These count a gold
code the model cannot output as a miss, and say how the long tail fares (F1 by how often a code was seen in train).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from cmft.metrics import DEFAULT_THRESHOLD_GRID

# train-document counts → bucket name (`f1_by_train_frequency`); the last bucket is open
FREQUENCY_BUCKETS: tuple[tuple[str, int, float], ...] = (
    ("0", 0, 0),
    ("1", 1, 1),
    ("2-4", 2, 4),
    ("5-9", 5, 9),
    ("10-49", 10, 49),
    ("50+", 50, float("inf")),
)


def frequency_bucket(count: int) -> str:
    """The `f1_by_train_frequency` bucket of a code seen in `count` train documents."""
    return next(name for name, low, high in FREQUENCY_BUCKETS if low <= count <= high)


def category(code: str) -> str:
    """The 3-character ICD category of a normalised code (`E11.65` → `E11`)."""
    return code.replace(".", "")[:3]


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def _counts(gold: Sequence[set[str]], predicted: Sequence[set[str]]) -> tuple[Counter, Counter, Counter]:
    """Per-code true positives, false positives and false negatives."""
    tp, fp, fn = Counter(), Counter(), Counter()
    for g, p in zip(gold, predicted, strict=True):
        tp.update(g & p)
        fp.update(p - g)
        fn.update(g - p)
    return tp, fp, fn


def _micro(tp: Counter, fp: Counter, fn: Counter, codes: Iterable[str] | None = None) -> tuple[float, float, float]:
    """(precision, recall, F1) summed over `codes` (all when None)."""
    pick = (lambda c: sum(c.values())) if codes is None else (lambda c: sum(c[code] for code in codes))
    t, f_p, f_n = pick(tp), pick(fp), pick(fn)
    precision = t / (t + f_p) if t + f_p else 0.0
    recall = t / (t + f_n) if t + f_n else 0.0
    return precision, recall, _f1(t, f_p, f_n)


def all_code_metrics(
    gold: Sequence[set[str]],
    predicted: Sequence[set[str]],
    outputtable: Iterable[str],
    train_counts: Mapping[str, int] | None,
) -> dict[str, object]:
    """Metrics of one split over all of its gold codes.

    gold, predicted: each note's codes (normalised alike). outputtable: the codes the model can output (its label
    space, zero-shot codes included). train_counts: code → train documents (None: unknown, the frequency buckets are
    left out).

    micro_f1_all_codes, precision_all_codes, recall_all_codes: over every gold and predicted code (a gold code outside
    the label space is a false negative). macro_f1_all_codes: the mean per-code F1 over the union of the split's gold
    codes and the predicted codes. label_space_coverage: the share of gold labels whose code the model can output.
    f1_by_train_frequency: micro-F1 over the codes seen in that many train documents (null where a bucket has no gold
    or predicted code). n_codes_never_predicted: label-space codes predicted for no note of the split.
    micro_f1_category: micro-F1 with codes cut to their 3-character category."""
    outputtable = set(outputtable)
    tp, fp, fn = _counts(gold, predicted)
    precision, recall, micro = _micro(tp, fp, fn)
    codes = set(tp) | set(fp) | set(fn)
    macro = sum(_f1(tp[c], fp[c], fn[c]) for c in codes) / len(codes) if codes else 0.0
    n_gold = sum(len(g) for g in gold)
    covered = sum(1 for g in gold for code in g if code in outputtable)
    ever_predicted = set().union(*predicted) if predicted else set()
    cat_tp, cat_fp, cat_fn = _counts([{category(c) for c in g} for g in gold],
                                     [{category(c) for c in p} for p in predicted])  # fmt: skip
    metrics: dict[str, object] = {
        "micro_f1_all_codes": micro,
        "macro_f1_all_codes": macro,
        "precision_all_codes": precision,
        "recall_all_codes": recall,
        "label_space_coverage": covered / n_gold if n_gold else 0.0,
        "n_codes_never_predicted": len(outputtable - ever_predicted),
        "micro_f1_category": _micro(cat_tp, cat_fp, cat_fn)[2],
    }
    if train_counts is not None:
        buckets: dict[str, list[str]] = {name: [] for name, _, _ in FREQUENCY_BUCKETS}
        for code in codes:
            buckets[frequency_bucket(train_counts.get(code, 0))].append(code)
        metrics["f1_by_train_frequency"] = {
            name: (_micro(tp, fp, fn, members)[2] if members else None) for name, members in buckets.items()
        }
    return metrics


def tune_code_thresholds(
    y_true: np.ndarray, probs: np.ndarray, global_threshold: float, min_positives: int
) -> dict[int, float]:
    """Own thresholds for the labels with at least `min_positives` positive notes in these (dev) rows: each label's
    threshold maximises its F1 on the grid (ties: the one nearest the global threshold); the others keep the global
    one. Returns label index → threshold."""
    y, p = np.asarray(y_true).astype(bool), np.asarray(probs, dtype=np.float64)
    grid = DEFAULT_THRESHOLD_GRID
    chosen = {}
    for j in np.flatnonzero(y.sum(axis=0) >= min_positives):
        predicted = p[:, j, None] >= grid[None, :]
        tp = (predicted & y[:, j, None]).sum(axis=0)
        f1 = 2 * tp / (predicted.sum(axis=0) + y[:, j].sum())
        best = np.flatnonzero(f1 == f1.max())
        chosen[int(j)] = float(grid[best[np.argmin(np.abs(grid[best] - global_threshold))]])
    return chosen


def code_thresholds(settings: dict[str, Any]) -> np.ndarray:
    """Each label's decision threshold: its own (icd_coding.thresholds: per_code), the zero-shot codes' (the last
    labels, cmft.tasks.icd_zero_shot), or the global one."""
    own = settings.get("code_thresholds") or {}
    thresholds = np.array([own.get(code, settings["threshold"]) for code in settings["labels"]], dtype=np.float64)
    zero_shot = len(settings.get("zero_shot_labels") or ())
    if zero_shot:
        thresholds[-zero_shot:] = settings["zero_shot_threshold"]
    return thresholds
