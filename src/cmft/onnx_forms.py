"""Export forms of ModernBERT's attention and MLP blocks: the same arithmetic, laid out for a CPU graph.

Traced as written, each layer spends a tenth of onnxruntime's time copying: the fused Wqkv output and the GeGLU
Wi output are each cut into pieces by Slice nodes, and rotary embeddings rotate half of every query and key with
two Slices, a Neg and a Concat. While `cmft export` traces, `export_forms(model)` gives every ModernBERT attention
and MLP module a forward that multiplies by the weight blocks separately (one MatMul per piece and no Slice; the
blocks are parameters, so they export as initializers the int8 quantizer sees) and rotates half of each head with
one small MatMul by a signed permutation matrix (exact: its entries are 0 and ±1). The weights and results are the
same; only float summation order differs. The original forwards are restored afterwards.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _blocks(linear: nn.Linear, pieces: int) -> nn.ModuleList:
    """`linear` cut along its outputs into `pieces` linear layers (parameters, so they export as initializers that
    the int8 quantizer sees)."""
    blocks = nn.ModuleList()
    weights = linear.weight.detach().chunk(pieces, dim=0)
    biases = linear.bias.detach().chunk(pieces, dim=0) if linear.bias is not None else [None] * pieces
    for weight, bias in zip(weights, biases, strict=True):
        block = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
        block.weight = nn.Parameter(weight.clone(), requires_grad=False)
        if bias is not None:
            block.bias = nn.Parameter(bias.clone(), requires_grad=False)
        blocks.append(block)
    return blocks


def _rotation(dim: int) -> torch.Tensor:
    """R with x @ R == rotate_half(x) == cat(-x[half:], x[:half]): entries 0 and ±1, so the product is exact."""
    half = dim // 2
    rotation = torch.zeros(dim, dim)
    rotation[torch.arange(half, dim), torch.arange(0, half)] = -1.0
    rotation[torch.arange(0, half), torch.arange(half, dim)] = 1.0
    return rotation


def _attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
    from transformers.models.modernbert.modeling_modernbert import ALL_ATTENTION_FUNCTIONS, eager_attention_forward

    batch, length = hidden_states.shape[:2]
    heads, dim = self.config.num_attention_heads, self.head_dim
    query, key, value = (
        block(hidden_states).view(batch, length, heads, dim).transpose(1, 2) for block in self.cmft_qkv
    )
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotation = _rotation(dim).to(hidden_states.device)
    query, key = (
        (x.float() * cos + torch.matmul(x.float(), rotation) * sin).to(hidden_states.dtype) for x in (query, key)
    )
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    output, weights = attention(self, query, key, value, attention_mask, dropout=0.0, scaling=dim**-0.5,
                                sliding_window=self.sliding_window, **kwargs)  # fmt: skip
    output = output.reshape(batch, length, -1).contiguous()
    return self.out_drop(self.Wo(output)), weights


def _mlp_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    gelu_in, gate = self.cmft_wi
    return self.Wo(self.drop(self.act(gelu_in(hidden_states)) * gate(hidden_states)))


@contextmanager
def export_forms(model: nn.Module) -> Iterator[int]:
    """Within the block, ModernBERT attention and MLP modules of `model` use their export forms; yields how many
    modules were switched (0 for other encoders, which are traced as they are)."""
    from transformers.models.modernbert.modeling_modernbert import ModernBertAttention, ModernBertMLP

    switched: list[nn.Module] = []
    try:
        for module in list(model.modules()):  # a fixed list: the loop adds submodules
            if isinstance(module, ModernBertAttention):
                module.cmft_qkv = _blocks(module.Wqkv, 3)
                module.forward = types.MethodType(_attention_forward, module)
            elif isinstance(module, ModernBertMLP):
                module.cmft_wi = _blocks(module.Wi, 2)
                module.forward = types.MethodType(_mlp_forward, module)
            else:
                continue
            switched.append(module)
        yield len(switched)
    finally:
        for module in switched:
            del module.forward
            for name in ("cmft_qkv", "cmft_wi"):
                if hasattr(module, name):
                    delattr(module, name)
