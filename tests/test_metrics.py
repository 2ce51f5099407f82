"""Multi-label (Edin et al. 2023) and single-label metrics: hand-computed cases and scikit-learn cross-checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score

from cmft.metrics import classification_metrics, multilabel_metrics, per_label_precision_recall, tune_threshold

# Labels A B C D. A, B, C are present; D is absent from the split (never gold); C is gold twice, never predicted.
# Doc 2 has no gold label.
Y_HAND = np.array(
    [
        [1, 0, 1, 0],
        [0, 1, 1, 0],
        [0, 0, 0, 0],
    ]
)
P_HAND = np.array(
    [
        [0.9, 0.2, 0.40, 0.10],
        [0.3, 0.8, 0.45, 0.60],
        [0.7, 0.1, 0.42, 0.05],
    ]
)
# At threshold 0.5 the predictions are:
#   d0: A        d1: B, D        d2: A
# A: tp=1 fp=1 fn=0 -> F1 2/3;  B: tp=1 -> F1 1;  C: tp=0 fn=2 -> F1 0;  D: absent, excluded (its fp still counts
# for micro).  Micro: tp=2, predicted=4, gold=4 -> 2*2/(4+4) = 0.5.  Macro: (2/3 + 1 + 0)/3 = 5/9.


def test_hand_case_f1():
    m = multilabel_metrics(Y_HAND, P_HAND, 0.5)
    assert m["micro_f1"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx(5 / 9)  # would be 5/12 if absent D were averaged in as 0
    assert m["threshold"] == 0.5


def test_hand_case_auc():
    # A: pos 0.9 vs neg {0.3, 0.7} -> 1.  B: pos 0.8 vs neg {0.2, 0.1} -> 1.
    # C: pos {0.40, 0.45} vs neg 0.42 -> 1 of 2 pairs ordered -> 0.5.  D: no positive -> skipped.
    # Macro AUC = (1 + 1 + 0.5)/3 = 5/6.
    # Micro: positives 0.9, 0.8, 0.45, 0.4 against 8 negatives {0.2, 0.1, 0.3, 0.6, 0.7, 0.1, 0.42, 0.05}:
    # negatives below each positive = 8, 8, 6, 5 -> 27/32.
    m = multilabel_metrics(Y_HAND, P_HAND, 0.5)
    assert m["macro_auc"] == pytest.approx(5 / 6)
    assert m["micro_auc"] == pytest.approx(27 / 32)


def test_hand_case_ranking():
    # d0 ranking A C B D, gold A C -> hits [1, 1, 0, 0];  d1 ranking B D C A, gold B C -> hits [1, 0, 1, 0].
    # P@5 (only 4 labels, still divided by k): d0 2/5, d1 2/5, d2 0 (no gold, still counted) -> 0.8/3.
    # P@8: (2/8 + 2/8 + 0)/3 = 1/6.
    # R@15 over docs with gold only: d0 2/2, d1 2/2 -> 1 (2/3 if d2 were counted).
    # AP: d0 (1/1 + 2/2)/2 = 1;  d1 (1/1 + 2/3)/2 = 5/6;  MAP over d0, d1 = 11/12.
    m = multilabel_metrics(Y_HAND, P_HAND, 0.5)
    assert m["precision_at_5"] == pytest.approx(0.8 / 3)
    assert m["precision_at_8"] == pytest.approx(1 / 6)
    assert m["recall_at_15"] == pytest.approx(1.0)
    assert m["map"] == pytest.approx(11 / 12)


def test_returns_exactly_the_documented_keys():
    m = multilabel_metrics(Y_HAND, P_HAND, 0.5)
    assert set(m) == {
        "micro_f1",
        "macro_f1",
        "micro_auc",
        "macro_auc",
        "precision_at_5",
        "precision_at_8",
        "recall_at_15",
        "map",
        "threshold",
    }
    assert all(isinstance(v, float) for v in m.values())


def test_ranking_with_more_labels_than_k():
    # One doc, 20 labels ranked in index order; gold at ranks 1, 4, 7, 10, 17.
    # P@5 = 2/5; P@8 = 3/8; R@15 = 4/5; AP = (1/1 + 2/4 + 3/7 + 4/10 + 5/17)/5.
    probs = np.linspace(0.99, 0.01, 20)[None, :]
    y = np.zeros((1, 20), dtype=int)
    y[0, [0, 3, 6, 9, 16]] = 1
    m = multilabel_metrics(y, probs, 0.5)
    assert m["precision_at_5"] == pytest.approx(2 / 5)
    assert m["precision_at_8"] == pytest.approx(3 / 8)
    assert m["recall_at_15"] == pytest.approx(4 / 5)
    assert m["map"] == pytest.approx((1 + 2 / 4 + 3 / 7 + 4 / 10 + 5 / 17) / 5)


def test_ties_are_broken_by_stable_sort_for_top_k():
    # All ten scores equal: the stable order is 0..9, so gold label 0 is in the top 5 and gold label 9 is not.
    # P@5 = 1/5, P@8 = 1/8, R@15 = 2/2. MAP scores the tied block as a whole (precision 2/10), like sklearn.
    y = np.zeros((1, 10), dtype=int)
    y[0, [0, 9]] = 1
    probs = np.full((1, 10), 0.5)
    m = multilabel_metrics(y, probs, 0.5)
    assert m["precision_at_5"] == pytest.approx(1 / 5)
    assert m["precision_at_8"] == pytest.approx(1 / 8)
    assert m["recall_at_15"] == pytest.approx(1.0)
    assert m["map"] == pytest.approx(0.2)
    assert m["map"] == pytest.approx(average_precision_score(y, probs, average="samples"))


def test_nan_only_when_nothing_qualifies():
    y = np.zeros((3, 4), dtype=int)
    m = multilabel_metrics(y, P_HAND, 0.5)
    assert math.isnan(m["macro_auc"]) and math.isnan(m["micro_auc"])
    assert math.isnan(m["macro_f1"]) and math.isnan(m["recall_at_15"]) and math.isnan(m["map"])
    assert m["micro_f1"] == 0.0 and m["precision_at_5"] == 0.0
    # A label with no negative does not qualify for AUC either.
    y[:, 0] = 1
    assert math.isnan(multilabel_metrics(y, P_HAND, 0.5)["macro_auc"])
    # One label with both classes is enough for a macro AUC.
    y[1:, 0] = 0
    assert not math.isnan(multilabel_metrics(y, P_HAND, 0.5)["macro_auc"])


def _random_case(seed: int, n_docs: int = 60, n_labels: int = 40, decimals: int | None = None):
    rng = np.random.default_rng(seed)
    y = (rng.random((n_docs, n_labels)) < 0.08).astype(int)
    y[:, :3] = 0  # labels absent from the split
    y[:4] = 0  # docs with no gold label
    probs = np.clip(0.35 * y + 0.65 * rng.random((n_docs, n_labels)), 0.0, 1.0)
    if decimals is not None:
        probs = np.round(probs, decimals)  # many ties, as with low-precision model outputs
    return y, probs


@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_against_sklearn(seed, decimals):
    y, probs = _random_case(seed, decimals=decimals)
    threshold = 0.4
    m = multilabel_metrics(y, probs, threshold)
    pred = (probs >= threshold).astype(int)

    assert m["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro", zero_division=0))
    present = np.flatnonzero(y.sum(axis=0) > 0)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", labels=present, zero_division=0))

    assert m["micro_auc"] == pytest.approx(roc_auc_score(y, probs, average="micro"))
    qualifying = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < y.shape[0]]
    assert not {0, 1, 2} & set(qualifying)  # the absent labels really are skipped
    assert m["macro_auc"] == pytest.approx(np.mean([roc_auc_score(y[:, j], probs[:, j]) for j in qualifying]))

    has_gold = y.sum(axis=1) > 0
    assert m["map"] == pytest.approx(average_precision_score(y[has_gold], probs[has_gold], average="samples"))

    p5, p8, r15 = [], [], []
    for i in range(y.shape[0]):
        ranked = np.argsort(-probs[i], kind="stable")
        p5.append(y[i, ranked[:5]].sum() / 5)
        p8.append(y[i, ranked[:8]].sum() / 8)
        if y[i].sum() > 0:
            r15.append(y[i, ranked[:15]].sum() / y[i].sum())
    assert m["precision_at_5"] == pytest.approx(np.mean(p5))
    assert m["precision_at_8"] == pytest.approx(np.mean(p8))
    assert m["recall_at_15"] == pytest.approx(np.mean(r15))


def test_float32_probs_give_the_same_result():
    y, probs = _random_case(3)
    p32 = probs.astype(np.float32)
    assert multilabel_metrics(y, p32, 0.3) == pytest.approx(multilabel_metrics(y, p32.astype(np.float64), 0.3))


@pytest.mark.parametrize("decimals", [None, 2])
@pytest.mark.parametrize("seed", [0, 5])
def test_tune_threshold_is_the_grid_optimum(seed, decimals):
    y, probs = _random_case(seed, decimals=decimals)
    grid = np.round(np.arange(0.01, 1.0, 0.01), 2)
    best_t, best_f1 = tune_threshold(y, probs)
    assert best_t in grid
    assert best_f1 == pytest.approx(multilabel_metrics(y, probs, best_t)["micro_f1"], abs=1e-12)
    brute = [f1_score(y, (probs >= t).astype(int), average="micro", zero_division=0) for t in grid]
    assert best_f1 == pytest.approx(max(brute), abs=1e-12)
    assert best_t == grid[int(np.argmax(brute))]  # first maximum = smallest threshold


def test_tune_threshold_ties_pick_the_smallest():
    # Every threshold in (0.2, 0.8] predicts exactly the gold label, so all of them tie at F1 1.
    y = np.array([[1, 0]])
    probs = np.array([[0.8, 0.2]])
    assert tune_threshold(y, probs, grid=np.array([0.7, 0.3, 0.5])) == (0.3, 1.0)
    assert tune_threshold(y, probs) == (0.21, 1.0)


def test_per_label_precision_recall_hand_case():
    # Threshold 0.5: A tp=1 of 2 predicted, 1 gold; B 1/1; C never predicted, 2 gold; D predicted once, no gold.
    out = per_label_precision_recall(Y_HAND, P_HAND, 0.5)
    np.testing.assert_allclose(out["precision"], [0.5, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(out["recall"], [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(out["support"], [1, 1, 2, 0])


def test_classification_metrics_against_sklearn():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, size=200).tolist()
    y_pred = rng.integers(0, 6, size=200).tolist()  # label 5 only ever predicted
    m = classification_metrics(y_true, y_pred, n_labels=6)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))


def test_classification_metrics_hand_case():
    # Labels 0,1,2 seen. F1: label 0 tp=1 fp=1 fn=1 -> 1/2; label 1 tp=1 fp=1 fn=0 -> 2/3; label 2 tp=0 fn=1 -> 0.
    # Accuracy 2/4; macro (1/2 + 2/3 + 0)/3 = 7/18; weighted by support {0: 2, 1: 1, 2: 1}: (1 + 2/3)/4 = 5/12.
    m = classification_metrics([0, 0, 1, 2], [0, 1, 1, 0])
    assert m == pytest.approx({"accuracy": 0.5, "macro_f1": 7 / 18, "weighted_f1": 5 / 12})


def test_input_validation():
    with pytest.raises(ValueError, match="same shape"):
        multilabel_metrics(Y_HAND, P_HAND[:, :3], 0.5)
    with pytest.raises(ValueError, match="2-D"):
        multilabel_metrics(Y_HAND[0], P_HAND[0], 0.5)
    with pytest.raises(ValueError, match="binary"):
        multilabel_metrics(Y_HAND * 2, P_HAND, 0.5)
    with pytest.raises(ValueError, match="same shape"):
        tune_threshold(Y_HAND, P_HAND[:2])
    with pytest.raises(ValueError, match="same shape"):
        per_label_precision_recall(Y_HAND, P_HAND.T, 0.5)
    with pytest.raises(ValueError, match="same length"):
        classification_metrics([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        classification_metrics([0, 1, 2], [0, 1, 1], n_labels=2)
