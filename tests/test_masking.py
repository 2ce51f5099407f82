"""Mask-rate schedule, exact overall rate, medical emphasis, whole-word masking and 80/10/10."""

from __future__ import annotations

import pytest
import torch

from cmft.pretraining.lexicon import Lexicon
from cmft.pretraining.masking import Masker, scheduled_rate
from cmft.pretraining.packing import collate_packed, tokenize_documents
from cmft.pretraining.vocab import train_tokenizer


def test_schedule_starts_at_30_and_reaches_15_at_the_last_step():
    rates = [scheduled_rate(step, 100, 0.30, 0.15) for step in range(100)]
    assert rates[0] == pytest.approx(0.30)
    assert rates[-1] == pytest.approx(0.15)
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))  # falls at every step, not per epoch
    cosine = [scheduled_rate(step, 100, 0.30, 0.15, "cosine") for step in range(100)]
    assert cosine[0] == pytest.approx(0.30) and cosine[-1] == pytest.approx(0.15)
    assert scheduled_rate(500, 100, 0.30, 0.15) == pytest.approx(0.15)  # never below the end rate


@pytest.fixture(scope="module")
def clinical_batch():
    """Real clinical text: CodiEsp train notes and ICD-10-CM lines from the bundled corpus."""
    from cmft.pretraining.config import SourceConfig
    from cmft.pretraining.corpus import iter_source

    notes = list(iter_source(SourceConfig(bundled="codiesp_train", max_documents=40)))
    icd = list(iter_source(SourceConfig(bundled="icd10cm", max_documents=400)))
    tokenizer = train_tokenizer(notes + icd, 1200)
    lexicon = Lexicon.from_files(["pretrain/lexicon/drugs.txt", "pretrain/lexicon/icd_terms.txt"])
    documents = tokenize_documents(notes[:16], tokenizer, lexicon, 512, "medical")
    batch = collate_packed([[d] for d in documents], tokenizer.pad_token_id)
    masker = Masker(tokenizer.mask_token_id, len(tokenizer), tokenizer.all_special_ids, medical_weight=2.0)
    return tokenizer, batch, masker


def test_overall_rate_is_the_scheduled_rate_per_row(clinical_batch):
    tokenizer, batch, masker = clinical_batch
    for rate in (0.30, 0.22, 0.15):
        masked, stats = masker(batch, rate, torch.Generator().manual_seed(0))
        chosen = masked["labels"] != -100
        for row in range(len(chosen)):
            maskable = int((batch["unit"][row] >= 0).sum())
            longest_word = int(torch.unique(batch["unit"][row][batch["unit"][row] >= 0], return_counts=True)[1].max())
            assert abs(int(chosen[row].sum()) - rate * maskable) <= longest_word + 1
        assert stats.rate == pytest.approx(rate, abs=0.01)


def test_special_tokens_and_padding_are_never_masked(clinical_batch):
    tokenizer, batch, masker = clinical_batch
    masked, _ = masker(batch, 0.3, torch.Generator().manual_seed(1))
    chosen = masked["labels"] != -100
    assert not chosen[batch["unit"] < 0].any()
    assert not (batch["input_ids"][chosen] == tokenizer.cls_token_id).any()


def test_medical_emphasis_raises_the_medical_share_of_masked_tokens(clinical_batch):
    _, batch, masker = clinical_batch
    shares = {}
    for weight in (1.0, 2.0, 4.0):
        total = None
        for seed in range(20):
            _, stats = masker(batch, 0.15, torch.Generator().manual_seed(seed), weight=weight)
            if total is None:
                total = stats
            else:
                total.add(stats)
        shares[weight] = (total.medical_share_of_masked, total.medical_share_of_tokens, total.rate)
    uniform, double, quadruple = shares[1.0], shares[2.0], shares[4.0]
    assert uniform[0] == pytest.approx(uniform[1], abs=0.03)  # weight 1: masked share = corpus share
    assert double[0] > uniform[0] + 0.05
    assert quadruple[0] > double[0]
    for share in shares.values():  # the overall rate does not move with the weight
        assert share[2] == pytest.approx(0.15, abs=0.01)


def test_medical_words_are_masked_whole(clinical_batch):
    _, batch, masker = clinical_batch
    masked, _ = masker(batch, 0.3, torch.Generator().manual_seed(2))
    chosen = masked["labels"] != -100
    multi_piece_medical = 0
    for row in range(len(chosen)):
        unit, medical = batch["unit"][row], batch["medical"][row]
        for value in torch.unique(unit[medical]):
            members = chosen[row][unit == value]
            multi_piece_medical += int(len(members) > 1)
            assert members.all() or not members.any()
    assert multi_piece_medical > 20  # the check above really covered split medical words


def test_replacement_is_80_10_10(clinical_batch):
    tokenizer, batch, masker = clinical_batch
    masked, _ = masker(batch, 0.3, torch.Generator().manual_seed(3))
    chosen = masked["labels"] != -100
    n = int(chosen.sum())
    as_mask = int((masked["input_ids"][chosen] == tokenizer.mask_token_id).sum()) / n
    unchanged = int((masked["input_ids"][chosen] == batch["input_ids"][chosen]).sum()) / n
    assert as_mask == pytest.approx(0.8, abs=0.04)
    assert unchanged == pytest.approx(0.1, abs=0.04)  # plus the rare random draw of the same token
    assert masked["labels"][chosen].eq(batch["input_ids"][chosen]).all()


def test_masking_is_reproducible_from_the_seed(clinical_batch):
    _, batch, masker = clinical_batch
    first, _ = masker(batch, 0.25, torch.Generator().manual_seed(9))
    second, _ = masker(batch, 0.25, torch.Generator().manual_seed(9))
    assert torch.equal(first["input_ids"], second["input_ids"])
    assert torch.equal(first["labels"], second["labels"])
