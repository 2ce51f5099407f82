"""Task heads that transformers lacks: label-wise attention (LAAT) and mean pooling over tokens (`mean_pool`, the one
masked mean of cmft: the pooled ICD head, the retrieval embedding, ICD description queries)."""

from __future__ import annotations

import math

import torch
from torch import nn


class LabelAttentionHead(nn.Module):
    """LAAT (Vu et al. 2020) as used by PLM-ICD: each label attends over the note's token states.

    z = tanh(W h_t); a_l = softmax_t(u_l · z); v_l = Σ_t a_lt h_t; logit_l = w_l · v_l + b_l.
    The attention softmax and the label-state products run in fp32: under bf16 a softmax over thousands
    of tokens loses the small weights that rare codes depend on (where PLM-ICD diverges)."""

    def __init__(self, hidden_size: int, num_labels: int, attention_dim: int = 256):
        super().__init__()
        self.project = nn.Linear(hidden_size, attention_dim, bias=False)
        self.label_queries = nn.Linear(attention_dim, num_labels, bias=False)
        self.output_weight = nn.Parameter(torch.empty(num_labels, hidden_size))
        self.output_bias = nn.Parameter(torch.zeros(num_labels))
        nn.init.xavier_uniform_(self.project.weight)
        nn.init.xavier_uniform_(self.label_queries.weight)
        nn.init.normal_(self.output_weight, std=1 / math.sqrt(hidden_size))

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """states [B, T, H], mask [B, T] (True on real tokens) → logits [B, L]."""
        return self.attend(states, mask)[0]

    def attend(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, L] and each label's attention over the tokens [B, L, T] (0 on padding; ICD evidence)."""
        hidden = torch.tanh(self.project(states))
        scores = self.label_queries(hidden).transpose(1, 2).float()
        scores = scores.masked_fill(~mask[:, None, :].bool(), torch.finfo(torch.float32).min)
        weights = scores.softmax(dim=-1)
        label_states = weights @ states.float()
        return (label_states * self.output_weight.float()).sum(-1) + self.output_bias.float(), weights


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
