"""ICD metrics over every gold code: a hand-made case worked out by hand, and CodiEsp's label space."""

import json

import pytest

from cmft.paths import bundled_file
from cmft.tasks.icd_metrics import all_code_metrics, category, frequency_bucket

GOLD = [{"E11.9", "I10", "Z99.9"}, {"J45.909"}, {"E11.65"}]
PREDICTED = [{"E11.9", "I10", "R51.9"}, set(), {"E11.9"}]
LABEL_SPACE = ["E11.9", "I10", "J45.909", "R51.9", "K21.9"]  # Z99.9 and E11.65 cannot be output
TRAIN_COUNTS = {"E11.9": 60, "I10": 12, "J45.909": 6, "R51.9": 3, "K21.9": 5, "E11.65": 1}


def test_codes_outside_the_label_space_count_as_misses():
    m = all_code_metrics(GOLD, PREDICTED, LABEL_SPACE, TRAIN_COUNTS)
    # tp: E11.9, I10 (note 1); fp: R51.9 (1), E11.9 (3); fn: Z99.9 (1), J45.909 (2), E11.65 (3)
    assert m["precision_all_codes"] == pytest.approx(2 / 4)
    assert m["recall_all_codes"] == pytest.approx(2 / 5)
    assert m["micro_f1_all_codes"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 3))
    # per code over gold ∪ predicted: E11.9 2/(2+1)=2/3, I10 1, Z99.9 0, J45.909 0, E11.65 0, R51.9 0
    assert m["macro_f1_all_codes"] == pytest.approx((2 / 3 + 1) / 6)
    assert m["label_space_coverage"] == pytest.approx(3 / 5)  # E11.9, I10, J45.909 of five gold labels
    assert m["n_codes_never_predicted"] == 2  # J45.909 and K21.9
    # categories: note 1 {E11, I10, Z99} vs {E11, I10, R51}; note 2 {J45} vs {}; note 3 {E11} vs {E11}
    assert m["micro_f1_category"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))


def test_f1_by_train_frequency_buckets_codes_by_train_documents():
    m = all_code_metrics(GOLD, PREDICTED, LABEL_SPACE, TRAIN_COUNTS)
    buckets = m["f1_by_train_frequency"]
    assert list(buckets) == ["0", "1", "2-4", "5-9", "10-49", "50+"]
    assert buckets["0"] == 0.0  # Z99.9: never in train, gold once, missed
    assert buckets["1"] == 0.0  # E11.65
    assert buckets["2-4"] == 0.0  # R51.9: one false positive
    assert buckets["5-9"] == 0.0  # J45.909 missed; K21.9 neither gold nor predicted
    assert buckets["10-49"] == 1.0  # I10
    assert buckets["50+"] == pytest.approx(2 / 3)  # E11.9: tp 1, fp 1
    assert "f1_by_train_frequency" not in all_code_metrics(GOLD, PREDICTED, LABEL_SPACE, None)
    assert [frequency_bucket(n) for n in (0, 1, 2, 4, 5, 9, 10, 49, 50, 900)] == [
        "0", "1", "2-4", "2-4", "5-9", "5-9", "10-49", "10-49", "50+", "50+"]  # fmt: skip
    assert category("E11.65") == "E11" and category("I10") == "I10"


def test_a_perfect_coder_inside_the_label_space_is_perfect_over_all_codes():
    gold = [{"E11.9", "I10"}, {"J45.909"}]
    m = all_code_metrics(gold, gold, ["E11.9", "I10", "J45.909"], {"E11.9": 1})
    assert m["micro_f1_all_codes"] == m["macro_f1_all_codes"] == m["label_space_coverage"] == 1.0
    assert m["f1_by_train_frequency"]["0"] == 1.0 and m["f1_by_train_frequency"]["50+"] is None


def test_codiesp_label_space_of_the_shipped_recipe_covers_about_half_of_test():
    """The issue's figures: codes with ≥ 5 train documents (247) cover 1,545 of CodiEsp test's 2,842 gold labels."""
    from collections import Counter

    from cmft.tasks.icd_labels import normalize_code

    def read(split):
        with open(bundled_file(f"data/codiesp/{split}.jsonl"), encoding="utf-8") as handle:
            return [{normalize_code(c) for c in json.loads(line)["codes"]} for line in handle if line.strip()]

    train, test = read("train"), read("test")
    counts = Counter(code for codes in train for code in codes)
    space = [code for code, n in counts.items() if n >= 5]
    everything = all_code_metrics(test, test, counts, counts)  # every train code outputtable, all predicted
    shipped = all_code_metrics(test, [codes & set(space) for codes in test], space, counts)
    assert len(space) == 247
    assert shipped["label_space_coverage"] == pytest.approx(1545 / 2842)
    assert shipped["recall_all_codes"] == pytest.approx(1545 / 2842)  # a perfect coder of the label space
    assert shipped["f1_by_train_frequency"]["5-9"] == 1.0 and shipped["f1_by_train_frequency"]["0"] == 0.0
    assert everything["label_space_coverage"] == pytest.approx((2842 - 497) / 2842)  # 497 never in train


def test_own_thresholds_go_to_codes_with_enough_dev_positives_and_maximise_their_f1():
    import numpy as np

    from cmft.tasks.icd_metrics import code_thresholds, tune_code_thresholds

    y = np.array([[1, 0, 1], [1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    p = np.array([[0.30, 0.9, 0.6], [0.35, 0.2, 0.1], [0.10, 0.8, 0.2], [0.32, 0.1, 0.3], [0.05, 0.3, 0.4]])
    own = tune_code_thresholds(y, p, global_threshold=0.5, min_positives=2)
    assert set(own) == {0}  # only label 0 has two or more positive notes
    assert 0.10 < own[0] <= 0.30  # every positive (0.30, 0.35, 0.32) above it, the negatives (≤ 0.10) below
    assert own[0] == 0.30  # of the tied best thresholds, the one nearest the global 0.5
    settings = {"labels": ["A", "B", "C"], "threshold": 0.5, "code_thresholds": {"A": own[0]}}
    assert code_thresholds(settings).tolist() == [0.30, 0.5, 0.5]
