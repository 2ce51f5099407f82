"""Zero-shot ICD codes (icd_coding.label_space.zero_shot): codes never in the train label space, scored from their
descriptions by the fine-tuned model, added once training is done.

Which codes: the codes of the description table (icd_coding.descriptions) outside the label space whose 3-character
category holds a trained code: the siblings of the trained codes. They follow from the table and the train split alone,
never from dev or test gold codes. On CodiEsp, 247 trained codes in 189 categories give 3,957 siblings, and the share
of test gold codes the model can output rises from 0.54 to 0.67; all 74,044 table codes would multiply the head's work
per note by 300 (with the siblings, `cmft predict` took 1.64× as long on 50 CodiEsp test notes with a
4.4M-parameter ModernBERT at 1,024 tokens, one CPU thread).

How a zero-shot code z is scored: by the same label-wise attention as a trained code (cmft.heads.LabelAttentionHead),
its rows appended to the head, so that the saved model, `cmft predict`, `cmft serve` and the ONNX export (made from the
saved model) score it like any other code. Its label query u_z is its description through the fine-tuned encoder,
mean-pooled, through the head's projection (tanh(W · h)), at the trained queries' mean norm: how init_from_descriptions
starts trained queries. Its output weight w_z is the mean of the trained codes' output weights: what the head learnt
to count as evidence for a code in general, read from the tokens u_z attends to. Its bias b_z is the trained codes'
mean bias moved by the log-odds of z's train prior, (n_z + 0.5) / (N + 1) with n_z its train documents (often 0), less
the trained codes' mean train log-odds: rarer than a trained code by as much as the train data say. (On CodiEsp dev,
with a small ModernBERT, the mean of all trained output weights ranked zero-shot codes better than the mean of each
code's trained siblings: micro AUC 0.848 against 0.815, average precision 0.0055 against 0.0034.)

Candidates (label_space.zero_shot_candidates, K): each note scores only K zero-shot codes with the full attention,
those that cmft.heads.candidate_scores ranks first: b_z + u_z · Σ_t (s_t − s̄) z_t / T with s_t = w̄ · h_t, the
zero-shot logit to first order in the attention scores, at a cost of Z × D per note instead of Z × T × D. The others
get probability 0 (and no attention: no evidence). Because every w_z is w̄, a candidate's logit is Σ_t a_zt (w̄ · h_t)
+ b_z, with no [Z, T, H] product. The head keeps the count of zero-shot rows and K (the model's settings:
zero_shot_candidates); a model saved before K existed scores every zero-shot code in full, as it did.

Threshold: the trained codes keep theirs, tuned on dev; the zero-shot codes get one of their own, chosen on dev once
they are added: of the threshold grid, the trained codes' global threshold, the zero-shot probabilities of dev's gold
zero-shot codes and 1.0 (as good as never), the one with the best dev micro F1 over all gold codes. Zero-shot codes
never enter the training targets or loss, nor the label-space metrics (micro_f1 and the others are over the trained
codes); the all-codes metrics count them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from cmft.metrics import DEFAULT_THRESHOLD_GRID
from cmft.tasks.icd_descriptions import description_queries, scaled
from cmft.tasks.icd_labels import normalize_code
from cmft.tasks.icd_metrics import code_thresholds


def zero_shot_codes(descriptions: dict[str, str], trained: list[str]) -> list[str]:
    """The codes of `descriptions` outside `trained` whose 3-character category holds a trained code, sorted."""
    categories, known = {normalize_code(code, "category") for code in trained}, set(trained)
    return sorted(code for code in descriptions if code not in known and normalize_code(code, "category") in categories)


def add_zero_shot_codes(task: Any, coder: nn.Module, tokenizer: Any) -> None:
    """Append the zero-shot codes to the trained `coder`'s head and to `task.labels` (after the trained codes), listed
    in `task.zero_shot_labels`; their threshold starts at the trained codes' until dev chooses one."""
    trained = list(task.labels)
    codes = zero_shot_codes(task.descriptions, trained)
    task.report["n_zero_shot_labels"] = len(codes)
    if not codes:
        return
    head = coder.head
    queries = description_queries(coder, tokenizer, [task.descriptions[code] for code in codes])
    with torch.no_grad():
        trained_queries = head.label_queries.weight
        queries = scaled(queries, trained_queries.norm(dim=1).mean()).to(trained_queries.dtype)
        weights = head.output_weight.mean(0).expand(len(codes), -1)
        biases = torch.tensor(_zero_shot_biases(task, codes, head.output_bias.detach().cpu().numpy()))
    _append_rows(head, queries, weights, biases.to(head.output_bias))
    head.zero_shot, head.candidates = len(codes), task.options.label_space.zero_shot_candidates
    task.zero_shot_candidates = head.candidates
    task.labels = trained + codes
    task.zero_shot_labels = codes
    task.zero_shot_threshold = task.threshold


def _zero_shot_biases(task: Any, codes: list[str], trained_bias: np.ndarray) -> np.ndarray:
    """b_z = mean trained bias + logit(z's smoothed train prior) − mean trained train log-odds."""
    counts, n_train = task.train_counts or {}, len(task.splits["train"].examples)
    prior = np.array([(counts.get(code, 0) + 0.5) / (n_train + 1) for code in codes])
    trained_prior = np.clip(task.label_frequency, 1e-4, 1 - 1e-4)  # as build_model started the trained biases

    def logit(p: np.ndarray) -> np.ndarray:
        return np.log(p / (1 - p))

    return (trained_bias.mean() - logit(trained_prior).mean() + logit(prior)).astype(np.float32)


def _append_rows(head: nn.Module, queries: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor) -> None:
    """Grow a LabelAttentionHead by len(queries) labels, the trained rows unchanged."""
    with torch.no_grad():
        old = head.label_queries
        head.label_queries = nn.Linear(old.in_features, old.out_features + len(queries), bias=False).to(old.weight)
        head.label_queries.weight.copy_(torch.cat([old.weight, queries]))
        head.output_weight = nn.Parameter(torch.cat([head.output_weight, weights.to(head.output_weight)]))
        head.output_bias = nn.Parameter(torch.cat([head.output_bias, biases]))


def zero_shot_scores(task: Any, split: str, probabilities: np.ndarray, tune: bool) -> dict[str, Any]:
    """The zero-shot part of an evaluation: {} without zero-shot codes; else their threshold (chosen here on dev when
    `tune`, after the trained codes' thresholds) and count. `probabilities` [notes, labels], zero-shot codes last."""
    codes = task.zero_shot_labels
    if not codes:
        return {}
    if tune:
        examples, trained = task.splits[split].examples, probabilities.shape[1] - len(codes)
        column = {code: j for j, code in enumerate(codes)}
        gold = np.zeros((len(probabilities), len(codes)), dtype=bool)
        for row, example in enumerate(examples):
            gold[row, [column[code] for code in example.label if code in column]] = True
        targets = np.stack([row["labels"] for row in task.datasets[split]]).astype(bool)
        predicted = probabilities[:, :trained] >= code_thresholds(task.settings)[:trained]
        n_gold = sum(len(example.label) for example in examples)
        task.zero_shot_threshold = choose_zero_shot_threshold(targets, predicted, gold, probabilities[:, trained:],
                                                              task.threshold, n_gold)  # fmt: skip
    return {"zero_shot_threshold": task.zero_shot_threshold, "n_zero_shot_labels": len(codes)}


def choose_zero_shot_threshold(targets: np.ndarray, predicted: np.ndarray, gold: np.ndarray, zero_shot: np.ndarray,
                               threshold: float, n_gold: int) -> float:  # fmt: skip
    """The zero-shot codes' threshold with the best micro F1 over all `n_gold` gold codes, the trained codes' gold
    (`targets`) and decisions (`predicted`) as they are: one of the grid, the trained codes' global `threshold`, the
    zero-shot probabilities of the gold zero-shot codes (where F1 can peak, below the grid too) or 1.0 (as good as
    never). Ties go to the largest: as good on dev with fewer zero-shot codes output."""
    hits = int((targets & predicted).sum())
    candidates = np.unique(np.concatenate([DEFAULT_THRESHOLD_GRID, [threshold, 1.0], zero_shot[gold]]))
    every, on_gold = np.sort(zero_shot, axis=None), np.sort(zero_shot[gold])
    n_predicted = every.size - np.searchsorted(every, candidates, side="left")  # zero-shot probabilities ≥ each
    n_hits = on_gold.size - np.searchsorted(on_gold, candidates, side="left")
    f1 = 2 * (hits + n_hits) / np.maximum(int(predicted.sum()) + n_predicted + n_gold, 1)
    return float(candidates[len(f1) - 1 - int(np.argmax(f1[::-1]))])
