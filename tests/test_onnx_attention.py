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


@pytest.mark.parametrize("length", [9, 40, 130])
def test_export_forms_compute_what_the_model_computes(models, length):
    """The split-weight, matmul-rotation forms traced by `cmft export` give the model's own outputs, and the
    model is left exactly as it was."""
    from cmft.onnx_forms import export_forms

    sdpa, banded = models
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(5, banded.config.vocab_size, (2, length), generator=generator)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length // 2 :] = 0
    before = {name: tensor.clone() for name, tensor in banded.state_dict().items()}
    with torch.no_grad():
        expected = sdpa(input_ids=ids, attention_mask=mask).last_hidden_state
        plain = banded(input_ids=ids, attention_mask=mask).last_hidden_state
        with export_forms(banded) as switched:
            assert switched == 2 * banded.config.num_hidden_layers
            formed = banded(input_ids=ids, attention_mask=mask).last_hidden_state
        after = banded(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert (formed - expected).abs()[real].max().item() < 2e-5
    assert torch.equal(after, plain)
    assert banded.state_dict().keys() == before.keys()
    assert all(torch.equal(banded.state_dict()[name], tensor) for name, tensor in before.items())
    assert all("forward" not in vars(module) for module in banded.modules())


def test_rotation_matrix_is_rotate_half():
    from transformers.models.modernbert.modeling_modernbert import rotate_half

    from cmft.onnx_forms import _rotation

    x = torch.randn(3, 5, 64)
    assert torch.equal(x @ _rotation(64), rotate_half(x))


def test_export_forms_leave_other_encoders_alone(tmp_path):
    from transformers import BertConfig, BertModel

    from cmft.onnx_forms import export_forms

    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37))
    with export_forms(model) as switched:
        assert switched == 0
