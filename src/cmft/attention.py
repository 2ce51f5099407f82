"""cmft's banded attention: exact ModernBERT attention whose local layers cost O(length × window), not O(length²).

ModernBERT's local layers (two of every three) attend only within ±`sliding_window` tokens (64 for its 128-token
window), but transformers' sdpa and eager paths give them the full [length × length] score matrix and mask most
of it away; only flash-attention 2 (CUDA, Ampere or newer) skips it. Here a local layer works on blocks of
`window` queries, each against its own and its two neighbouring key blocks: a [3 × window] band per query, with
the same rule (|i − j| ≤ window, same document, no padded keys), so the result equals sdpa's up to float
summation order — for training (autograd runs through it) and inference, on CPU and any GPU, with padding and
with packed documents. Global layers attend to every key of their document.

The mask each layer receives is either the plain 2D padding mask (bool [batch, length], what the registered mask
function hands through) or, for packed rows, the per-token document index (int64 [batch, length], −1 on padding)
that `segment_masks` builds. Two forms are registered with transformers:
- `IMPLEMENTATION` (training and torch inference): groups of 16 query blocks through torch's
  scaled_dot_product_attention; in training only query, key and value are kept, and the backward pass rebuilds one
  group's bands at a time (less memory than sdpa keeps). Sequences of at most `DENSE_BLOCKS` blocks use one masked
  call.
- `EXPORT_IMPLEMENTATION` (what `cmft export` traces): plain matmul/softmax with additive biases, one graph for
  every length, no shape-dependent branch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

IMPLEMENTATION = "cmft_banded"
EXPORT_IMPLEMENTATION = "cmft_banded_export"
FUSED_GLOBAL_ATTENTION = True
"""While exporting, global layers become onnxruntime's com.microsoft.MultiHeadAttention (benchmarks/inference.py
turns this off to time the unfused graph beside it)."""
DENSE_BLOCKS = 4
"""Up to this many window blocks (256 tokens at ModernBERT's window) a local layer is one masked sdpa call: measured
with ModernBERT-base, batch 8 (benchmarks/long_context.py --short), the bands were 10% slower at 256 tokens and
level at 512."""
OUTSIDE = -2
"""The segment of positions beyond the sequence (block padding): equal to no real or padded token."""


def padding_mask(*, batch_size: int, kv_length: int, attention_mask: torch.Tensor | None = None, device=None,
                 **kwargs) -> torch.Tensor:  # fmt: skip
    """The mask interface: hand the 2D key padding mask through (the attention applies the window itself)."""
    if attention_mask is None:
        return torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    return attention_mask.to(torch.bool)


def segment_masks(document: torch.Tensor) -> dict[str, torch.Tensor]:
    """ModernBERT's per-layer-type masks for packed rows under banded attention: the document index of each token
    (−1 on padding), O(length) instead of the [length × length] masks sdpa needs."""
    return {"full_attention": document, "sliding_attention": document}


def _segments(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.zeros(batch, length, dtype=torch.long, device=device)
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, 0, -1).long()
    return attention_mask.long()


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
    """query, key, value: [batch, heads, length, head_dim]; attention_mask: bool padding mask or int64 segments
    [batch, length]. Returns [batch, length, heads, head_dim] like transformers' attention functions."""
    batch, _, length, _ = query.shape
    local = getattr(module, "sliding_window", None) is not None
    window = module.config.sliding_window  # attend iff |i - j| <= window
    if local and length > DENSE_BLOCKS * window:
        segments = _segments(attention_mask, batch, length, query.device)
        output = _banded_sdpa(query, key, value, segments, scaling, window, dropout)
    else:  # one masked call: as fast as the bands, or faster, this short
        mask = _dense_mask(attention_mask, length, window if local else None, query.device)
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return output.transpose(1, 2).contiguous(), None


def _dense_mask(attention_mask: torch.Tensor | None, length: int, window: int | None, device: torch.device
                ) -> torch.Tensor | None:  # fmt: skip
    """A bool mask broadcastable to [batch, heads, length, length]; None when every key is visible. Local layers
    and packed rows keep keys of the query's own segment (padding sees padding: no row is empty, no NaN)."""
    packed = attention_mask is not None and attention_mask.dtype != torch.bool
    if window is None and not packed:
        if attention_mask is None or bool(attention_mask.all()):
            return None
        return attention_mask[:, None, None, :]
    mask = None
    if attention_mask is not None and (packed or not bool(attention_mask.all())):
        segments = _segments(attention_mask, 0, length, None)
        mask = segments[:, None, :, None] == segments[:, None, None, :]
    if window is not None and length > window + 1:
        position = torch.arange(length, device=device)
        near = (position[:, None] - position[None, :]).abs() <= window
        mask = near if mask is None else mask & near
    return mask


def _bands(tensor: torch.Tensor, block: int, left: int, right: int, fill: float | int = 0) -> torch.Tensor:
    """[..., length(, dim)] padded by `left` and `right` positions → [..., blocks, 3·block(, dim)]: each block's keys
    with its two neighbours'."""
    matrix = tensor.dim() == 4
    padded = F.pad(tensor, (0, 0, left, right) if matrix else (left, right), value=fill)
    blocks = padded.shape[-2 if matrix else -1] // block
    shaped = padded.reshape(*tensor.shape[: -2 if matrix else -1], blocks, block, *tensor.shape[-1:] if matrix else ())
    axis = -3 if matrix else -2
    parts = [shaped.narrow(axis, start, blocks - 2) for start in range(3)]
    return torch.cat(parts, dim=axis + 1)


GROUP_BLOCKS = 16
"""Query blocks attended in one call (1,024 queries at ModernBERT's window): the bands, their mask and, in training,
their gradients exist for one group at a time, so a long note's transient memory stays that of 1,024 tokens."""


def _banded_sdpa(query, key, value, segments: torch.Tensor, scaling: float, window: int, dropout: float):
    """The local layer over groups of query blocks, each against its keys (one block of context on each side)."""
    if not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
        return _grouped(query, key, value, segments, scaling, window, dropout)
    if dropout == 0.0:
        return _BandedAttention.apply(query, key, value, segments, scaling, window)
    # attention dropout: each group recomputed by torch's checkpoint, which replays its random state
    return _grouped(query, key, value, segments, scaling, window, dropout, checkpointed=True)


def _groups(length: int, window: int):
    """(query start, query end, key start, key end) of each group of query blocks."""
    span = GROUP_BLOCKS * window
    for start in range(0, length, span):
        end = min(start + span, length)
        yield start, end, max(0, start - window), min(length, end + window)


def _grouped(query, key, value, segments, scaling: float, window: int, dropout: float, checkpointed: bool = False):
    outputs = []
    for start, end, low, high in _groups(query.shape[2], window):
        parts = (query[:, :, start:end], key[:, :, low:high], value[:, :, low:high], segments[:, start:end],
                 segments[:, low:high], start - low, scaling, window, dropout)  # fmt: skip
        if checkpointed:
            outputs.append(checkpoint(_band_group, *parts, use_reentrant=False))
        else:
            outputs.append(_band_group(*parts))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


class _BandedAttention(torch.autograd.Function):
    """Banded attention that keeps only query, key and value for the backward pass, which recomputes one group at a
    time and adds its gradients into one buffer per input: the bands, their mask and their gradients exist for one
    group only, and no per-group full-size gradient is made (slicing's backward would make one per group)."""

    @staticmethod
    def forward(ctx, query, key, value, segments, scaling, window):
        ctx.save_for_backward(query, key, value, segments)
        ctx.scaling, ctx.window = scaling, window
        return _grouped(query, key, value, segments, scaling, window, 0.0)

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, segments = ctx.saved_tensors
        grads = (torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value))
        for start, end, low, high in _groups(query.shape[2], ctx.window):
            inputs = (query[:, :, start:end].detach().requires_grad_(), key[:, :, low:high].detach().requires_grad_(),
                      value[:, :, low:high].detach().requires_grad_())  # fmt: skip
            with torch.enable_grad():
                output = _band_group(*inputs, segments[:, start:end], segments[:, low:high], start - low,
                                     ctx.scaling, ctx.window, 0.0)  # fmt: skip
            dq, dk, dv = torch.autograd.grad(output, inputs, grad_output[:, :, start:end])
            grads[0][:, :, start:end] += dq
            grads[1][:, :, low:high] += dk
            grads[2][:, :, low:high] += dv
        return *grads, None, None, None


def _band_group(query, key, value, query_segment: torch.Tensor, key_segment: torch.Tensor, offset: int,
                scaling: float, window: int, dropout: float) -> torch.Tensor:  # fmt: skip
    """Queries that start `offset` positions into the keys (0 or one block): blocks of `window` queries, each
    against its own and its two neighbouring key blocks."""
    batch, heads, length, dim = query.shape
    block = window
    blocks = (length + block - 1) // block
    pad = blocks * block - length
    left = block - offset  # the first query block sits at key block 1
    right = (blocks + 2) * block - left - key.shape[2]
    q = F.pad(query, (0, 0, 0, pad)).reshape(batch, heads * blocks, block, dim)
    k = _bands(key, block, left, right).reshape(batch, heads * blocks, 3 * block, dim)
    v = _bands(value, block, left, right).reshape(batch, heads * blocks, 3 * block, dim)
    query_segment = F.pad(query_segment, (0, pad), value=OUTSIDE).reshape(batch, blocks, block, 1)
    key_segment = _bands(key_segment, block, left, right, fill=OUTSIDE)[:, :, None, :]  # [batch, blocks, 1, 3·block]
    # query r of a block sits at offset block + r of its key band
    distance = torch.arange(3 * block, device=query.device)[None, :] - torch.arange(block, device=query.device)[:, None]
    allowed = ((distance - block).abs() <= window) & (query_segment == key_segment)  # [batch, blocks, block, 3·block]
    allowed = allowed[:, None].expand(batch, heads, blocks, block, 3 * block).reshape(batch, heads * blocks, block, -1)
    output = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scaling)
    return output.reshape(batch, heads, blocks * block, dim)[:, :, :length]


def export_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The traced form (padding masks only): no branch on the length, so one graph serves every length."""
    batch, _, length, _ = query.shape
    valid = attention_mask if attention_mask is not None else torch.ones(batch, length, dtype=torch.bool)
    negative = torch.finfo(torch.float32).min
    if getattr(module, "sliding_window", None) is None and FUSED_GLOBAL_ATTENTION and torch.onnx.is_in_onnx_export():
        heads = int(module.config.num_attention_heads)  # a constant, not a traced size
        dim = int(module.head_dim)
        flat = [x.transpose(1, 2).reshape(batch, length, heads * dim) for x in (query, key, value)]
        output = _MultiHeadAttention.apply(*flat, valid, heads, float(scaling))
        return output.reshape(batch, length, heads, dim), None
    if getattr(module, "sliding_window", None) is None:
        bias = torch.where(valid[:, None, :, None], 0.0, negative).to(query.dtype).expand(-1, key.shape[1], -1, -1)
        # the scale goes on the queries and the padding bias rides along as one more key feature: no pass over the
        # [sequence × keys] scores besides the softmax
        q = torch.cat([query * scaling, torch.ones_like(query[..., :1])], dim=-1)
        k = torch.cat([key, bias], dim=-1)
        scores = torch.matmul(q, k.transpose(2, 3))
        probabilities = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(probabilities, value).transpose(1, 2).contiguous(), None
    output = _banded_matmul(query, key, value, valid, scaling, module.config.sliding_window, negative)
    return output.transpose(1, 2).contiguous(), None


class _MultiHeadAttention(torch.autograd.Function):
    """Full attention over [batch, sequence, heads·dim] inputs with a key padding mask, traced as onnxruntime's
    fused `com.microsoft.MultiHeadAttention` (one kernel: no [sequence × keys] scores between separate ops)."""

    @staticmethod
    def forward(ctx, query, key, value, valid, heads: int, scaling: float):  # the value traced through
        batch, length, width = query.shape
        q, k, v = (x.reshape(batch, length, heads, width // heads).transpose(1, 2) for x in (query, key, value))
        bias = torch.where(valid[:, None, None, :], 0.0, torch.finfo(q.dtype).min).to(q.dtype)
        scores = torch.matmul(q * scaling, k.transpose(2, 3)) + bias
        output = torch.matmul(torch.softmax(scores, dim=-1), v)
        return output.transpose(1, 2).reshape(batch, length, width)

    @staticmethod
    def symbolic(g, query, key, value, valid, heads: int, scaling: float):
        mask = g.op("Cast", valid, to_i=6)  # int32 [batch, keys], 1 = attend
        none = g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor())
        return g.op(
            "com.microsoft::MultiHeadAttention", query, key, value, none, mask, num_heads_i=heads, scale_f=scaling
        )


def _banded_matmul(query, key, value, valid, scaling: float, window: int, negative: float) -> torch.Tensor:
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
    """Register both forms with transformers (idempotent) and return the training/inference one's name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, banded_attention)
    AttentionInterface.register(EXPORT_IMPLEMENTATION, export_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, padding_mask)
    AttentionMaskInterface.register(EXPORT_IMPLEMENTATION, padding_mask)
    return IMPLEMENTATION
