"""First-fit-decreasing packing, and proof that a packed batch equals running each document alone."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import ModernBertConfig, ModernBertModel

from cmft.pretraining.config import SourceConfig
from cmft.pretraining.corpus import iter_source
from cmft.pretraining.lexicon import Lexicon
from cmft.pretraining.packing import (
    PackedDataset,
    collate_packed,
    flash_attention_inputs,
    model_inputs,
    pack_first_fit_decreasing,
    tokenize_documents,
)
from cmft.pretraining.vocab import train_tokenizer


def naive_first_fit_decreasing(lengths, capacity):
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, free = [], []
    for item in order:
        for b, room in enumerate(free):
            if room >= lengths[item]:
                bins[b].append(item)
                free[b] -= lengths[item]
                break
        else:
            bins.append([item])
            free.append(capacity - lengths[item])
    return bins


@pytest.mark.parametrize("seed", range(5))
def test_packing_matches_textbook_first_fit_decreasing(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(3, 30), rng.randint(30, 512)]) for _ in range(400)]
    bins = pack_first_fit_decreasing(lengths, 512)
    assert bins == naive_first_fit_decreasing(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)


@pytest.fixture(scope="module")
def real_documents():
    notes = list(iter_source(SourceConfig(bundled="codiesp_train", max_documents=6)))
    icd = list(iter_source(SourceConfig(bundled="icd10cm", max_documents=300)))
    tokenizer = train_tokenizer(notes + icd, 800)
    lexicon = Lexicon.from_files(["pretrain/lexicon/drugs.txt"])
    texts = [notes[0], icd[10], icd[200], notes[1][:400], icd[77]]
    return tokenizer, tokenize_documents(texts, tokenizer, lexicon, 512)


def _tiny_modernbert(vocab_size: int, pad_id: int) -> ModernBertModel:
    torch.manual_seed(0)
    config = ModernBertConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=96,
        local_attention=32,
        global_attn_every_n_layers=3,
        max_position_embeddings=1024,
        pad_token_id=pad_id,
        cls_token_id=2,
        sep_token_id=3,
        bos_token_id=2,
        eos_token_id=3,
    )
    config._attn_implementation = "sdpa"
    return ModernBertModel(config).eval()


def test_packed_batch_gives_each_document_its_solo_outputs(real_documents):
    tokenizer, documents = real_documents
    assert max(len(d.ids) for d in documents) > 32  # longer than the sliding window: both layer types checked
    model = _tiny_modernbert(len(tokenizer), tokenizer.pad_token_id)
    # two packed rows of different lengths, so the second is padded as well
    rows = [documents[:3], documents[3:]]
    batch = collate_packed(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(**model_inputs(batch, "sdpa", model.config.local_attention)).last_hidden_state
        worst = 0.0
        for r, row in enumerate(rows):
            cursor = 0
            for doc in row:
                alone = model(input_ids=torch.tensor(doc.ids, dtype=torch.long)[None]).last_hidden_state[0]
                worst = max(worst, float((alone - packed[r, cursor : cursor + len(doc.ids)]).abs().max()))
                cursor += len(doc.ids)
        # the naive alternative (flattened input with per-document position_ids only) mixes documents
        mixed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
    assert worst < 1e-5
    assert float((mixed[0, : len(documents[0].ids)] - packed[0, : len(documents[0].ids)]).abs().max()) > 1e-3


def test_flash_attention_inputs_are_unpadded_with_document_boundaries(real_documents):
    tokenizer, documents = real_documents
    rows = [documents[:3], documents[3:]]
    batch = collate_packed(rows, tokenizer.pad_token_id)
    flat = flash_attention_inputs(batch)
    lengths = [len(d.ids) for row in rows for d in row]
    assert flat["input_ids"].shape == (1, sum(lengths))
    assert flat["cu_seq_lens_q"].tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert flat["max_length_q"] == max(lengths)
    assert flat["input_ids"][0].tolist() == [t for row in rows for d in row for t in d.ids.tolist()]


def test_long_documents_are_split_not_dropped(real_documents):
    tokenizer, _ = real_documents
    lexicon = Lexicon([])
    text = " ".join(["hypertension treated with lisinopril"] * 200)
    pieces = tokenize_documents([text], tokenizer, lexicon, 128)
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(len(p.ids) <= 128 for p in pieces)
    assert [t for p in pieces for t in p.ids[1:-1].tolist()] == body
    dataset = PackedDataset(pieces, 128)
    assert sum(len(d.ids) for row in dataset.rows for d in [pieces[i] for i in row]) == sum(len(p.ids) for p in pieces)
