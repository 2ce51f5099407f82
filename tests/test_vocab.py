"""Vocabulary refinement of an existing checkpoint: frequent clinical words become single tokens."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer, ModernBertConfig, ModernBertForMaskedLM

from cmft.pretraining.config import SourceConfig
from cmft.pretraining.corpus import iter_source
from cmft.pretraining.lexicon import Lexicon
from cmft.pretraining.vocab import refine_tokenizer, save_tokenizer, tokens_per_word, train_tokenizer


def test_refinement_adds_clinical_words_with_mean_initialised_embeddings(tmp_path):
    # a "base" tokenizer trained on general-ish text (PubMed abstracts) with a small vocabulary,
    # then refined on clinical text (ICD descriptions and case reports)
    base_texts = list(iter_source(SourceConfig(bundled="pubmedqa", max_documents=200)))
    clinical = list(iter_source(SourceConfig(bundled="icd10cm", max_documents=3000)))
    clinical += list(iter_source(SourceConfig(bundled="codiesp_train", max_documents=100)))
    tokenizer = train_tokenizer(base_texts, 600)
    save_tokenizer(tokenizer, tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    config = ModernBertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
        pad_token_id=0,
        cls_token_id=2,
        sep_token_id=3,
        bos_token_id=2,
        eos_token_id=3,
    )
    model = ModernBertForMaskedLM(config)
    old_embeddings = model.get_input_embeddings().weight.detach().clone()
    old_size = len(tokenizer)
    lexicon = Lexicon.from_files(["pretrain/lexicon/drugs.txt", "pretrain/lexicon/icd_terms.txt"])

    result = refine_tokenizer(tokenizer, model, clinical, lexicon, max_new_tokens=50, min_frequency=10, min_pieces=3)

    assert 0 < len(result.added) <= 50
    assert len(tokenizer) == old_size + len(result.added)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.config.vocab_size == len(tokenizer)
    assert result.tokens_per_word_after < result.tokens_per_word_before
    base = AutoTokenizer.from_pretrained(tmp_path / "base")
    for offset, word in enumerate(result.added):
        assert lexicon.is_medical(word)
        old_pieces = base(" " + word, add_special_tokens=False)["input_ids"]
        assert len(old_pieces) >= 3
        assert tokenizer(word, add_special_tokens=False)["input_ids"] == [old_size + offset]
        expected = old_embeddings[old_pieces].mean(0)
        assert torch.allclose(model.get_input_embeddings().weight[old_size + offset], expected, atol=1e-6)
    # a new token inside running text is still recognised as one token
    sentence = f"The patient had {result.added[0]} last year."
    assert old_size in tokenizer(sentence)["input_ids"]
    # the resized model still runs
    ids = tokenizer(sentence, return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == len(tokenizer)
    # saved and reloaded, the refinement survives
    save_tokenizer(tokenizer, tmp_path / "refined")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "refined")
    assert tokens_per_word(reloaded, clinical) == tokens_per_word(tokenizer, clinical)
