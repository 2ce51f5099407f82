"""Evaluation metrics shared by fine-tuning, benchmarks and reports.

Multi-label metrics follow Edin et al. 2023 ("Automated medical coding on MIMIC-III and MIMIC-IV: a critical
review and replicability study") so numbers are comparable with the published medical-coding literature:
macro scores average only over labels that can be scored on the split, and ranking metrics skip documents
where they are undefined. Everything is vectorised numpy so a 250 x 2,000 evaluation costs milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

DEFAULT_THRESHOLD_GRID = np.round(np.arange(0.01, 1.0, 0.01), 2)


def _validate(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coerce to (bool, float64) so thresholding is identical everywhere (float32 vs float64 would differ)."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 2 or p.ndim != 2:
        raise ValueError(f"y_true and probs must be 2-D [n_docs, n_labels]; got y_true {y.shape} and probs {p.shape}")
    if y.shape != p.shape:
        raise ValueError(f"y_true and probs must have the same shape; got y_true {y.shape} and probs {p.shape}")
    if y.shape[0] == 0 or y.shape[1] == 0:
        raise ValueError(f"need at least one document and one label; got shape {y.shape}")
    binary = (y == 0) | (y == 1)
    if not binary.all():
        bad = np.unique(y[~binary])[:5].tolist()
        raise ValueError(f"y_true must be binary (0/1); found values such as {bad}")
    if not np.isfinite(p).all():
        raise ValueError("probs contains NaN or infinite values")
    return y.astype(bool), p


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise num/den with 0 where den == 0 (sklearn's zero_division=0 convention)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _tie_group_bounds(sorted_vals: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last index of each element's run of equal values along `axis` of an already-sorted array."""
    s = np.moveaxis(sorted_vals, axis, 0)
    n = s.shape[0]
    idx = np.broadcast_to(np.arange(n).reshape((n,) + (1,) * (s.ndim - 1)), s.shape)
    differs = s[1:] != s[:-1]
    is_first = np.concatenate([np.ones((1,) + s.shape[1:], dtype=bool), differs], axis=0)
    is_last = np.concatenate([differs, np.ones((1,) + s.shape[1:], dtype=bool)], axis=0)
    start = np.maximum.accumulate(np.where(is_first, idx, 0), axis=0)
    end = np.minimum.accumulate(np.where(is_last, idx, n)[::-1], axis=0)[::-1]
    return np.moveaxis(start, 0, axis), np.moveaxis(end, 0, axis)


def _column_auc(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """ROC AUC per column via the Mann-Whitney rank sum (ties get average ranks, as in sklearn); NaN if one class."""
    # Rank along contiguous rows (labels x docs): sorting along axis 0 of a C-ordered array is several times slower.
    y, p = np.ascontiguousarray(y.T), np.ascontiguousarray(p.T)
    order = np.argsort(p, axis=1)  # any sort will do: tied scores share their average rank
    start, end = _tie_group_bounds(np.take_along_axis(p, order, axis=1), axis=1)
    ranks = np.empty_like(p)
    np.put_along_axis(ranks, order, (start + end) / 2.0 + 1.0, axis=1)
    n_pos = y.sum(axis=1, dtype=np.float64)
    n_neg = y.shape[1] - n_pos
    rank_sum = np.where(y, ranks, 0.0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def multilabel_metrics(y_true: np.ndarray, probs: np.ndarray, threshold: float | np.ndarray) -> dict[str, float]:
    """Edin et al. 2023 metric suite for multi-label coding, so results line up with the MIMIC literature.

    Macro F1 averages over labels present in y_true (a present label never predicted scores 0); macro AUC over
    labels with both classes; recall@15 and MAP over documents with a gold label; precision@k over all documents.
    Ranking ties are broken by a stable sort, except MAP, which scores tied labels as a block like sklearn does.
    Undefined aggregates (e.g. no label present) are NaN. `threshold`: one for every label, or one per label (then the
    result has no `threshold` key).
    """
    y, p = _validate(y_true, probs)
    threshold = float(threshold) if np.ndim(threshold) == 0 else np.asarray(threshold, dtype=np.float64)
    n_docs, n_labels = y.shape
    pred = p >= threshold

    tp = (pred & y).sum(axis=0)
    n_pred = pred.sum(axis=0)
    n_gold = y.sum(axis=0)
    micro_f1 = float(_safe_div(2 * tp.sum(), n_pred.sum() + n_gold.sum()))
    present = n_gold > 0
    label_f1 = _safe_div(2 * tp, n_pred + n_gold)
    macro_f1 = float(label_f1[present].mean()) if present.any() else float("nan")

    micro_auc = float(_column_auc(y.reshape(-1, 1), p.reshape(-1, 1))[0])
    label_auc = _column_auc(y, p)
    qualifies = ~np.isnan(label_auc)
    macro_auc = float(label_auc[qualifies].mean()) if qualifies.any() else float("nan")

    order = np.argsort(-p, axis=1, kind="stable")
    gold_ranked = np.take_along_axis(y, order, axis=1)
    hits = np.cumsum(gold_ranked, axis=1)

    def hits_at(k: int) -> np.ndarray:
        return hits[:, min(k, n_labels) - 1]

    doc_gold = y.sum(axis=1)
    has_gold = doc_gold > 0
    recall_15 = float((hits_at(15)[has_gold] / doc_gold[has_gold]).mean()) if has_gold.any() else float("nan")

    # MAP: precision is read at the end of each run of tied scores, matching sklearn's average_precision_score.
    _, tie_end = _tie_group_bounds(np.take_along_axis(p, order, axis=1), axis=1)
    prec_at_block_end = np.take_along_axis(hits, tie_end, axis=1) / (tie_end + 1.0)
    doc_ap = np.where(gold_ranked, prec_at_block_end, 0.0).sum(axis=1)
    map_ = float((doc_ap[has_gold] / doc_gold[has_gold]).mean()) if has_gold.any() else float("nan")

    return {
        "micro_f1": micro_f1,
        "macro_f1": macro_f1,
        "micro_auc": micro_auc,
        "macro_auc": macro_auc,
        "precision_at_5": float((hits_at(5) / 5.0).mean()),
        "precision_at_8": float((hits_at(8) / 8.0).mean()),
        "recall_at_15": recall_15,
        "map": map_,
        **({"threshold": threshold} if isinstance(threshold, float) else {}),
    }


def tune_threshold(y_true: np.ndarray, probs: np.ndarray, grid: np.ndarray | None = None) -> tuple[float, float]:
    """Pick one global decision threshold on validation data, since micro F1 is sensitive to calibration.

    Counts for every grid point come from one sort plus binary search, so the sweep is O(N log N) rather than
    one full thresholding pass per grid point. Ties go to the smallest threshold. Returns (threshold, micro_f1).
    """
    y, p = _validate(y_true, probs)
    grid = DEFAULT_THRESHOLD_GRID if grid is None else np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or not np.isfinite(grid).all():
        raise ValueError(f"grid must be a non-empty 1-D array of finite thresholds; got shape {grid.shape}")
    grid = np.unique(grid)  # sorted ascending, so argmax's first maximum is the smallest threshold
    all_sorted = np.sort(p, axis=None)
    gold_sorted = np.sort(p[y])
    # side="left" gives the count of values < t, so the remainder is the count of values >= t, exactly like pred.
    n_pred = all_sorted.size - np.searchsorted(all_sorted, grid, side="left")
    tp = gold_sorted.size - np.searchsorted(gold_sorted, grid, side="left")
    f1 = _safe_div(2 * tp, n_pred + gold_sorted.size)
    best = int(np.argmax(f1))
    return float(grid[best]), float(f1[best])


def per_label_precision_recall(
    y_true: np.ndarray, probs: np.ndarray, threshold: float | np.ndarray
) -> dict[str, np.ndarray]:
    """Per-label precision, recall and support for plotting where the model fails (rare vs frequent codes).

    Precision of a never-predicted label and recall of a label without support are 0 (sklearn's zero_division=0).
    """
    y, p = _validate(y_true, probs)
    pred = p >= np.asarray(threshold, dtype=np.float64)  # one threshold, or one per label
    tp = (pred & y).sum(axis=0)
    support = y.sum(axis=0)
    return {
        "precision": _safe_div(tp, pred.sum(axis=0)),
        "recall": _safe_div(tp, support),
        "support": support.astype(np.int64),
    }


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], n_labels: int | None = None
) -> dict[str, float]:
    """Single-label classification scores; macro averages over labels seen in y_true or y_pred, as sklearn does.

    `n_labels`, when given, only validates that every label id lies in [0, n_labels) to catch mapping bugs early.
    """
    t = np.asarray(y_true)
    pr = np.asarray(y_pred)
    if t.ndim != 1 or pr.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D; got shapes {t.shape} and {pr.shape}")
    if t.shape != pr.shape:
        raise ValueError(f"y_true and y_pred must have the same length; got {t.shape[0]} and {pr.shape[0]}")
    if t.size == 0:
        raise ValueError("y_true and y_pred are empty")
    if n_labels is not None:
        both = np.concatenate([t, pr])
        if (both < 0).any() or (both >= n_labels).any():
            raise ValueError(f"label ids must lie in [0, {n_labels}); found {both.min()}..{both.max()}")
    return {
        "accuracy": float(accuracy_score(t, pr)),
        "macro_f1": float(f1_score(t, pr, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(t, pr, average="weighted", zero_division=0)),
    }


def entity_metrics(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, Any]:
    """Entity-level precision, recall, F1 with seqeval in strict IOB2 mode, plus the same per entity type."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    options = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
    report = classification_report(gold, predicted, output_dict=True, **options)
    per_type = {
        name: {"precision": float(v["precision"]), "recall": float(v["recall"]), "f1": float(v["f1-score"]),
               "support": int(v["support"])}
        for name, v in report.items() if not name.endswith("avg")
    }  # fmt: skip
    return {
        "precision": float(precision_score(gold, predicted, **options)),
        "recall": float(recall_score(gold, predicted, **options)),
        "f1": float(f1_score(gold, predicted, **options)),
        "per_type": per_type,
    }


# retrieval -------------------------------------------------------------------------------------------------------
# The definitions of sentence-transformers' InformationRetrievalEvaluator (binary relevance; ties broken by
# ascending document id), so figures compare directly with sentence-transformers and MTEB-style reports.
RETRIEVAL_CUTOFFS = {"ndcg": (10,), "mrr": (10,), "recall": (10, 100), "map": (100,), "accuracy": (1,)}


def retrieval_metrics(rankings: list[list[str]], relevant: list[set[str]]) -> dict[str, float]:
    """ndcg@10, mrr@10, recall@10, recall@100, map@100 and accuracy@1 of ranked document ids per query."""
    if not rankings or len(rankings) != len(relevant):
        raise ValueError("one ranking per query, and at least one query")
    sums: dict[str, float] = {f"{name}@{k}": 0.0 for name, ks in RETRIEVAL_CUTOFFS.items() for k in ks}
    for ranking, gold in zip(rankings, relevant, strict=True):
        hits = [doc in gold for doc in ranking]
        for k in RETRIEVAL_CUTOFFS["ndcg"]:
            dcg = sum(1 / math.log2(rank + 2) for rank, hit in enumerate(hits[:k]) if hit)
            ideal = sum(1 / math.log2(rank + 2) for rank in range(min(len(gold), k)))
            sums[f"ndcg@{k}"] += dcg / ideal
        for k in RETRIEVAL_CUTOFFS["mrr"]:
            first = next((rank for rank, hit in enumerate(hits[:k]) if hit), None)
            sums[f"mrr@{k}"] += 0.0 if first is None else 1 / (first + 1)
        for k in RETRIEVAL_CUTOFFS["recall"]:
            sums[f"recall@{k}"] += sum(hits[:k]) / len(gold)
        for k in RETRIEVAL_CUTOFFS["map"]:
            found, precision_sum = 0, 0.0
            for rank, hit in enumerate(hits[:k]):
                if hit:
                    found += 1
                    precision_sum += found / (rank + 1)
            sums[f"map@{k}"] += precision_sum / min(k, len(gold))
        for k in RETRIEVAL_CUTOFFS["accuracy"]:
            sums[f"accuracy@{k}"] += float(any(hits[:k]))
    return {key: value / len(rankings) for key, value in sums.items()}


def rank(query_embeddings: Any, corpus_embeddings: Any, corpus_ids: list[str], top_k: int,
         chunk: int = 1024) -> list[list[tuple[str, float]]]:  # fmt: skip
    """Top-k (document id, cosine) per query from torch embeddings, ties broken by ascending id (as
    sentence-transformers does)."""
    import torch

    k = min(top_k, len(corpus_ids))
    results = []
    for start in range(0, len(query_embeddings), chunk):
        scores = query_embeddings[start : start + chunk] @ corpus_embeddings.T
        values, indices = torch.topk(scores, k, dim=1)
        for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True):
            hits = sorted(zip(row_values, row_indices, strict=True), key=lambda h: (-h[0], corpus_ids[h[1]]))
            results.append([(corpus_ids[i], score) for score, i in hits])
    return results
