"""cmft's banded attention (what `cmft export` traces for ModernBERT) equals transformers' sdpa attention."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from cmft.onnx_attention import register


@pytest.fixture(scope="module")
def models(tiny_encoder):
    name = register()
    sdpa = AutoModel.from_pretrained(tiny_encoder, attn_implementation="sdpa").eval()
    banded = AutoModel.from_pretrained(tiny_encoder, attn_implementation=name).eval()
    return sdpa, banded


@pytest.mark.parametrize("length", [1, 15, 16, 17, 33, 48, 100, 301])
def test_banded_attention_matches_sdpa_on_real_positions(models, length):
    sdpa, banded = models
    assert banded.config.sliding_window == 16  # the test encoder: a 32-token local window, blocks of 16
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(5, banded.config.vocab_size, (3, length), generator=generator)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, max(1, length // 2):] = 0  # fmt: skip
    mask[2, max(1, length // 3):] = 0  # fmt: skip
    with torch.no_grad():
        expected = sdpa(input_ids=ids, attention_mask=mask).last_hidden_state
        got = banded(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.isfinite(got).all()
    assert (expected - got).abs()[real].max().item() < 2e-5


def test_the_band_is_the_window_and_nothing_else(models):
    """Changing a token exactly `window` away changes a local layer's output there; one further does not."""
    from cmft.onnx_attention import banded_attention

    _, banded = models
    layer = next(layer.attn for layer in banded.layers if layer.attn.sliding_window is not None)
    window = banded.config.sliding_window
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 80, 8, generator=generator) for _ in range(3))
    mask = torch.ones(1, 80, dtype=torch.bool)
    base, _ = banded_attention(layer, q, k, v, mask, 0.3)
    for distance, changes in ((window, True), (window + 1, False)):
        v2 = v.clone()
        v2[:, :, 40 + distance] += 1.0
        out, _ = banded_attention(layer, q, k, v2, mask, 0.3)
        assert bool((out[0, 40] - base[0, 40]).abs().max() > 1e-6) is changes, distance
