"""The attention that `cmft export` traces: exact ModernBERT attention, computed the way a CPU graph runs fastest.

ModernBERT's local layers attend only within ±`sliding_window` tokens (64 for a 128-token window), but the eager
and sdpa paths compute the full [sequence × sequence] score matrix and mask most of it away. Here the local layers
work on blocks of `sliding_window` queries, each against its own and its two neighbouring key blocks: a
[3 × window] band per query instead of the whole sequence, with the same mask (|i − j| ≤ window, padded keys
out), so the result is the same up to float summation order and long notes cost far less. Global layers attend
to every unpadded key, with a [batch, 1, 1, keys] bias instead of a materialised [batch, 1, sequence, keys] mask.

The implementation is registered with transformers' attention and mask interfaces under `IMPLEMENTATION`; the
mask it receives is the plain 2D padding mask.
"""

from __future__ import annotations

import torch
from torch import nn

IMPLEMENTATION = "cmft_banded"


def padding_mask(*, batch_size: int, kv_length: int, attention_mask: torch.Tensor | None = None, device=None,
                 **kwargs) -> torch.Tensor:  # fmt: skip
    """The mask interface: hand the 2D key padding mask through (the attention applies the window itself)."""
    if attention_mask is None:
        return torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    return attention_mask.to(torch.bool)


def banded_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query, key, value: [batch, heads, sequence, head_dim]; attention_mask: [batch, sequence] bool (True = token).
    Returns [batch, sequence, heads, head_dim] like transformers' attention functions."""
    batch, _, length, _ = query.shape
    valid = attention_mask if attention_mask is not None else torch.ones(batch, length, dtype=torch.bool)
    negative = torch.finfo(torch.float32).min
    if getattr(module, "sliding_window", None) is None:
        bias = torch.where(valid[:, None, :, None], 0.0, negative).to(query.dtype).expand(-1, key.shape[1], -1, -1)
        # the scale goes on the queries and the padding bias rides along as one more key feature: no pass over the
        # [sequence × keys] scores besides the softmax
        q = torch.cat([query * scaling, torch.ones_like(query[..., :1])], dim=-1)
        k = torch.cat([key, bias], dim=-1)
        scores = torch.matmul(q, k.transpose(2, 3))
        probabilities = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(probabilities, value).transpose(1, 2).contiguous(), None
    window = module.config.sliding_window  # attend iff |i - j| <= window
    output = _banded(query, key, value, valid, scaling, window, negative)
    return output.transpose(1, 2).contiguous(), None


def _banded(query, key, value, valid, scaling: float, window: int, negative: float) -> torch.Tensor:
    batch, heads, length, dim = query.shape
    block = window
    blocks = (length + block - 1) // block
    pad = blocks * block - length
    # keys and values padded by one block on each side: block n of queries sees key blocks n-1, n, n+1
    q = nn.functional.pad(query, (0, 0, 0, pad)).reshape(batch, heads, blocks, block, dim)
    k = nn.functional.pad(key, (0, 0, block, pad + block)).reshape(batch, heads, blocks + 2, block, dim)
    v = nn.functional.pad(value, (0, 0, block, pad + block)).reshape(batch, heads, blocks + 2, block, dim)
    k = torch.cat([k[:, :, :-2], k[:, :, 1:-1], k[:, :, 2:]], dim=3)  # [batch, heads, blocks, 3·block, dim]
    v = torch.cat([v[:, :, :-2], v[:, :, 1:-1], v[:, :, 2:]], dim=3)
    keep = nn.functional.pad(valid, (block, pad + block)).reshape(batch, blocks + 2, block)
    keep = torch.cat([keep[:, :-2], keep[:, 1:-1], keep[:, 2:]], dim=2)  # [batch, blocks, 3·block]
    # query r of a block is at offset block + r in its key band; the band keeps |offset - (block + r)| <= window
    rows = torch.arange(block).unsqueeze(1) + block
    columns = torch.arange(3 * block).unsqueeze(0)
    band = (columns - rows).abs() <= window  # [block, 3·block], the same for every block
    allowed = band[None, None, None] & keep[:, None, :, None, :]
    bias = torch.where(allowed, 0.0, negative).to(query.dtype)
    scores = torch.matmul(q * scaling, k.transpose(-1, -2)) + bias
    probabilities = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(probabilities, v).reshape(batch, heads, blocks * block, dim)
    return output[:, :, :length]


def register() -> str:
    """Register the implementation with transformers (idempotent) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, banded_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, padding_mask)
    return IMPLEMENTATION
