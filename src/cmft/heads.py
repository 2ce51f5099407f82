"""Task heads that transformers lacks: label-wise attention (LAAT) and mean pooling over tokens (`mean_pool`, the one
masked mean of cmft: the pooled ICD head, the retrieval embedding, ICD description queries)."""

from __future__ import annotations

import math

import torch
from torch import nn

NOT_A_CANDIDATE = -700.0
"""The logit of a zero-shot code outside a note's candidates: its sigmoid is exactly 0 in fp32, and exp(700) is still
finite in float64 (a lower logit overflows numpy's sigmoid)."""


class LabelAttentionHead(nn.Module):
    """LAAT (Vu et al. 2020) as used by PLM-ICD: each label attends over the note's token states.

    z = tanh(W h_t); a_l = softmax_t(u_l · z); v_l = Σ_t a_lt h_t; logit_l = w_l · v_l + b_l.
    The attention softmax and the label-state products run in fp32: under bf16 a softmax over thousands
    of tokens loses the small weights that rare codes depend on (where PLM-ICD diverges).

    Zero-shot rows (`zero_shot`: the last rows, cmft.tasks.icd_zero_shot) share one output weight w̄ (the first of
    them). With `candidates` set, each note scores only its `candidates` best zero-shot rows by `candidate_scores`
    with the full attention, as logit_z = Σ_t a_zt (w̄ · h_t) + b_z, and gives the others NOT_A_CANDIDATE (and zero
    attention); `candidates` None scores every row as a trained one (models saved before candidates existed)."""

    def __init__(self, hidden_size: int, num_labels: int, attention_dim: int = 256, zero_shot: int = 0,
                 candidates: int | None = None):  # fmt: skip
        super().__init__()
        self.project = nn.Linear(hidden_size, attention_dim, bias=False)
        self.label_queries = nn.Linear(attention_dim, num_labels, bias=False)
        self.output_weight = nn.Parameter(torch.empty(num_labels, hidden_size))
        self.output_bias = nn.Parameter(torch.zeros(num_labels))
        nn.init.xavier_uniform_(self.project.weight)
        nn.init.xavier_uniform_(self.label_queries.weight)
        nn.init.normal_(self.output_weight, std=1 / math.sqrt(hidden_size))
        self.zero_shot, self.candidates = zero_shot, candidates

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """states [B, T, H], mask [B, T] (True on real tokens) → logits [B, L]."""
        return self.attend_rows(states, mask)[0]

    @property
    def chooses(self) -> bool:
        """Whether each note scores only some of the zero-shot rows (fewer candidates than rows)."""
        return self.candidates is not None and self.candidates < self.zero_shot

    def attend(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, L] and each label's attention over the tokens [B, L, T] (0 on padding and for zero-shot rows
        outside the candidates; ICD evidence)."""
        logits, weights, rows = self.attend_rows(states, mask)
        if rows is None:
            return logits, weights
        every = weights.new_zeros((weights.shape[0], logits.shape[1], weights.shape[2]))
        return logits, every.scatter(1, rows[..., None].expand_as(weights), weights)

    def attend_rows(self, states: torch.Tensor, mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Logits [B, L], the attention [B, R, T] of the R labels scored in full and their label indices [B, R]: the
        trained rows and each note's zero-shot candidates when the head `chooses`, else every label (indices None)."""
        hidden = torch.tanh(self.project(states))
        if not self.zero_shot or self.candidates is None:  # every row as a trained one
            scores = self.label_queries(hidden).transpose(1, 2).float()
            return (*_label_attention(scores, states, mask, self.output_weight, self.output_bias), None)
        trained = self.output_bias.shape[0] - self.zero_shot
        queries, weight, bias = self.label_queries.weight, self.output_weight, self.output_bias
        scores = nn.functional.linear(hidden, queries[:trained]).transpose(1, 2).float()
        logits, weights = _label_attention(scores, states, mask, weight[:trained], bias[:trained])
        extra, extra_weights, chosen = candidate_attention(hidden, states, mask, queries[trained:], weight[trained],
                                                           bias[trained:], self.candidates)  # fmt: skip
        logits, weights = torch.cat([logits, extra], 1), torch.cat([weights, extra_weights], 1)
        if chosen is None:
            return logits, weights, None
        first = torch.arange(trained, device=chosen.device).expand(chosen.shape[0], -1)
        return logits, weights, torch.cat([first, chosen + trained], 1)


def _label_attention(scores: torch.Tensor, states: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Logits [B, L] and attention [B, L, T] from attention scores [B, L, T] (fp32), rows with their own weights."""
    scores = scores.masked_fill(~mask[:, None, :].bool(), torch.finfo(torch.float32).min)
    weights = scores.softmax(dim=-1)
    label_states = weights @ states.float()
    return (label_states * weight.float()).sum(-1) + bias.float(), weights


def candidate_scores(hidden: torch.Tensor, evidence: torch.Tensor, mask: torch.Tensor, queries: torch.Tensor,
                     bias: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """[B, Z] b_z + u_z · Σ_t (s_t − s̄) z_t / T over the real tokens (`mask`), s_t = w̄ · h_t (`evidence` [B, T]),
    z_t = `hidden` [B, T, D]: the zero-shot logit to first order in the attention scores (softmax_t(u · z_t) ≈
    (1 + u · (z_t − z̄)) / T gives Σ_t a_t s_t ≈ s̄ + u · cov_t(z_t, s_t)), less s̄, the same for every code of a note.
    Cost per note: T × D, then Z × D (the full attention: Z × T × D)."""
    real = mask.float()
    count = real.sum(1, keepdim=True).clamp_min(1.0)
    centred = (evidence - (evidence * real).sum(1, keepdim=True) / count) * real
    covariance = (centred[:, None, :] @ hidden.float()).squeeze(1) / count
    return covariance @ queries.float().T + bias.float()


def candidate_attention(hidden: torch.Tensor, states: torch.Tensor, mask: torch.Tensor, queries: torch.Tensor,
                        weight: torch.Tensor, bias: torch.Tensor, candidates: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Zero-shot rows that share the output weight `weight` [H]: logits [B, Z], the attention [B, K, T] of each note's
    `candidates` (K) best rows (`candidate_scores`) and their indices [B, K], ascending; every row (K = Z, indices
    None) when there are no more. A candidate's logit is Σ_t a_zt (w̄ · h_t) + b_z, with no [K, T, H] product; the
    others get NOT_A_CANDIDATE."""
    evidence = states.float() @ weight.float()  # [B, T]: w̄ · h_t
    real = mask.bool()
    rows, chosen = queries.shape[0], None
    if candidates < rows:
        chosen = candidate_scores(hidden, evidence, real, queries, bias).topk(candidates, dim=1).indices  # [B, K]
        chosen = chosen.sort(dim=1).values  # in code order: the order of near-equal scores is float noise
        scores = (queries[chosen].to(hidden.dtype) @ hidden.transpose(1, 2)).float()  # [B, K, T]
        bias = bias[chosen]
    else:
        scores = nn.functional.linear(hidden, queries).transpose(1, 2).float()
    weights = scores.masked_fill(~real[:, None, :], torch.finfo(torch.float32).min).softmax(dim=-1)
    logits = (weights @ evidence[..., None]).squeeze(-1) + bias.float()
    if chosen is None:
        return logits, weights, None
    return logits.new_full((logits.shape[0], rows), NOT_A_CANDIDATE).scatter(1, chosen, logits), weights, chosen


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, H] fp32 mean of the real tokens' states (`mask` [B, T]: 1 on real tokens); 0 for a row without any."""
    weights = mask[..., None].float()
    return (states.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class PooledHead(nn.Module):
    """Mean of the real tokens' states, then one linear layer: the simple baseline head."""

    def __init__(self, hidden_size: int, num_labels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, num_labels)

    @property
    def output_bias(self) -> nn.Parameter:
        return self.linear.bias

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.linear(mean_pool(states, mask).to(self.linear.weight.dtype)).float()
