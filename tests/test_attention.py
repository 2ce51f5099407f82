"""cmft's banded attention (training, inference and the form `cmft export` traces) equals transformers' sdpa."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, ModernBertConfig, ModernBertModel

from cmft.attention import EXPORT_IMPLEMENTATION, IMPLEMENTATION, banded_attention, export_attention, register


def _model(attention: str, local_attention: int = 128, layers: int = 3) -> ModernBertModel:
    """A random-weight ModernBERT (rotary positions: any length runs); layer types global/local/local."""
    torch.manual_seed(0)
    config = ModernBertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                              intermediate_size=96, local_attention=local_attention, global_attn_every_n_layers=3,
                              max_position_embeddings=8192, attention_dropout=0.0, embedding_dropout=0.0,
                              mlp_dropout=0.0, pad_token_id=0)  # fmt: skip
    config._attn_implementation = attention
    return ModernBertModel(config)


@pytest.fixture(scope="module")
def models(tiny_encoder):
    register()
    sdpa = AutoModel.from_pretrained(tiny_encoder, attn_implementation="sdpa").eval()
    banded = AutoModel.from_pretrained(tiny_encoder, attn_implementation=IMPLEMENTATION).eval()
    export = AutoModel.from_pretrained(tiny_encoder, attn_implementation=EXPORT_IMPLEMENTATION).eval()
    return sdpa, banded, export


def _padded(length: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows: the full length, about a half and a third (right padding)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, length), generator=generator)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, max(1, length // 2):] = 0  # fmt: skip
    mask[2, max(1, length // 3):] = 0  # fmt: skip
    return ids, mask


@pytest.mark.parametrize("length", [1, 15, 16, 17, 33, 48, 49, 100, 301])
def test_banded_attention_matches_sdpa_on_real_positions(models, length):
    sdpa, banded, export = models
    assert banded.config.sliding_window == 16  # the test encoder: a 32-token local window, blocks of 16
    ids, mask = _padded(length, banded.config.vocab_size, length)
    with torch.no_grad():
        expected = sdpa(input_ids=ids, attention_mask=mask).last_hidden_state
        got = banded(input_ids=ids, attention_mask=mask).last_hidden_state
        traced_form = export(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.isfinite(got).all() and torch.isfinite(traced_form).all()
    assert (expected - got).abs()[real].max().item() < 2e-5
    assert (expected - traced_form).abs()[real].max().item() < 2e-5


@pytest.mark.parametrize("length", [17, 200, 1000, 2049, 8192])
def test_long_notes_match_sdpa_with_modernbert_window(length):
    """ModernBERT's own 128-token window (blocks of 64) from 17 to 8,192 tokens, with padding, within 1e-4: the
    training/inference form and the form `cmft export` traces."""
    register()
    sdpa, banded, export = _model("sdpa").eval(), _model(IMPLEMENTATION).eval(), _model(EXPORT_IMPLEMENTATION).eval()
    rows = 3 if length <= 2049 else 1
    ids, mask = _padded(length, 300, length)
    ids, mask = ids[:rows], mask[:rows]
    with torch.no_grad():
        expected = sdpa(input_ids=ids, attention_mask=mask).last_hidden_state
        got = banded(input_ids=ids, attention_mask=mask).last_hidden_state
        traced_form = export(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (expected - got).abs()[mask.bool()].max().item() < 1e-4
    assert (expected - traced_form).abs()[mask.bool()].max().item() < 1e-4


def _packed_batch(lengths_per_row: list[list[int]], vocab: int = 300):
    """Packed rows of documents (per-document positions), right-padded: ids, document index, positions."""
    from cmft.pretraining.packing import Document, collate_packed

    generator = np.random.default_rng(sum(map(sum, lengths_per_row)))
    rows = []
    for lengths in lengths_per_row:
        rows.append([Document(generator.integers(5, vocab, n), np.full(n, -1), np.zeros(n, dtype=bool))
                     for n in lengths])  # fmt: skip
    return collate_packed(rows, pad_id=0)


@pytest.mark.parametrize("lengths", [[[40, 300, 7], [120]], [[700, 500, 1], [1300, 30]]])
def test_packed_documents_match_sdpa_per_document_masks(lengths):
    """Packed rows: banded attention with per-token document indices equals sdpa with the [L × L] same-document
    masks (the form measured exact against one document per row), and no token sees another document."""
    from cmft.pretraining.packing import model_inputs

    register()
    sdpa, banded = _model("sdpa").eval(), _model(IMPLEMENTATION).eval()
    batch = _packed_batch(lengths)
    with torch.no_grad():
        expected = sdpa(**model_inputs(batch, "sdpa", 128)).last_hidden_state
        got = banded(**model_inputs(batch, IMPLEMENTATION, 128)).last_hidden_state
        alone = banded(input_ids=batch["input_ids"][:1, : lengths[0][0]]).last_hidden_state
    real = batch["document"] >= 0
    assert (expected - got).abs()[real].max().item() < 1e-4
    assert (got[0, : lengths[0][0]] - alone[0]).abs().max().item() < 1e-4  # the first document as if alone


@pytest.mark.parametrize("packed", [False, True])
def test_gradients_match_sdpa(packed):
    """Training through the banded form: every parameter's gradient equals sdpa's (small sizes; a 16-token window,
    so 600 tokens take three groups of query blocks)."""
    from cmft.pretraining.packing import model_inputs

    register()
    grads = {}
    for attention in ("sdpa", IMPLEMENTATION):
        model = _model(attention, local_attention=32).train()
        if packed:
            batch = _packed_batch([[90, 37, 5, 300], [550]])
            inputs, real = model_inputs(batch, attention, 32), batch["document"] >= 0
        else:
            ids, mask = _padded(600, 300, 3)
            inputs, real = {"input_ids": ids, "attention_mask": mask}, mask.bool()
        states = model(**inputs).last_hidden_state
        (states[real] * torch.linspace(-1, 1, states.shape[-1])).sum().backward()
        grads[attention] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert grads["sdpa"].keys() == grads[IMPLEMENTATION].keys() and len(grads["sdpa"]) > 10
    for name, grad in grads["sdpa"].items():
        assert (grad - grads[IMPLEMENTATION][name]).abs().max().item() < 1e-4 * max(1.0, grad.abs().max().item()), name


def test_attention_dropout_trains_and_replays_its_mask():
    """With attention dropout, each group is recomputed by torch's checkpoint, which replays the dropout mask: the
    gradient equals that of the same forward run without recomputation."""
    from cmft.attention import _grouped

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 600, 8, generator=generator, requires_grad=True) for _ in range(3))
    segments = torch.zeros(1, 600, dtype=torch.long)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(3)
        out = _grouped(q, k, v, segments, 0.3, 16, 0.2, checkpointed=checkpointed)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, 8)).sum(), (q, k, v)))
    for plain, recomputed in zip(*grads, strict=True):
        assert torch.isfinite(plain).all() and torch.allclose(plain, recomputed, atol=1e-6)


@pytest.mark.parametrize("form", [banded_attention, export_attention])
def test_the_band_is_the_window_and_nothing_else(models, form):
    """Changing a token exactly `window` away changes a local layer's output there; one further does not."""
    _, banded, _ = models
    layer = next(layer.attn for layer in banded.layers if layer.attn.sliding_window is not None)
    window = banded.config.sliding_window
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 80, 8, generator=generator) for _ in range(3))
    mask = torch.ones(1, 80, dtype=torch.bool)
    base, _ = form(layer, q, k, v, mask, 0.3)
    for distance, changes in ((window, True), (window + 1, False)):
        v2 = v.clone()
        v2[:, :, 40 + distance] += 1.0
        out, _ = form(layer, q, k, v2, mask, 0.3)
        assert bool((out[0, 40] - base[0, 40]).abs().max() > 1e-6) is changes, distance


@pytest.mark.parametrize("length", [9, 40, 130])
def test_export_forms_compute_what_the_model_computes(models, length):
    """The split-weight, matmul-rotation forms traced by `cmft export` give the model's own outputs, and the
    model is left exactly as it was."""
    from cmft.onnx_forms import export_forms

    sdpa, banded, _ = models
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
