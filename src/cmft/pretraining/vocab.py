"""Vocabulary: train a tokenizer on the corpus, or refine an existing one with frequent clinical words."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AddedToken, PreTrainedModel, PreTrainedTokenizerFast

from cmft.pretraining.lexicon import CODE, WORD, Lexicon

log = logging.getLogger(__name__)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    lowercase: bool = False,
    min_frequency: int = 2,
    model_max_length: int = 8192,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (ModernBERT's kind) trained on the corpus, with BERT-style special tokens.

    Byte-level BPE never produces [UNK], keeps case (so codes like E11.9 survive) and decodes back to the
    exact text. The `tokenizers` BPE trainer is also deterministic — its WordPiece trainer, and BPE with a
    `##` continuation prefix, break ties differently from run to run — so a rerun with the same seed gives
    the same vocabulary and the same model."""
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    steps = [normalizers.NFC()] + ([normalizers.Lowercase()] if lowercase else [])
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | Path) -> None:
    """Save, naming the class `PreTrainedTokenizerFast` so that transformers 4.x loads it too."""
    tokenizer.save_pretrained(folder)
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") in (None, "TokenizersBackend"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def tokens_per_word(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], limit: int = 2000) -> float:
    """Sub-tokens per word of running text (words as the lexicon sees them) over the first `limit` texts."""
    sample = list(texts[:limit])
    words = sum(1 for text in sample for _ in WORD.finditer(text))
    if not words:
        return 0.0
    tokens = sum(len(ids) for ids in tokenizer(sample, add_special_tokens=False)["input_ids"])
    return tokens / words


@dataclass
class RefineResult:
    added: list[str]
    tokens_per_word_before: float
    tokens_per_word_after: float


def candidate_words(texts: Iterable[str], lexicon: Lexicon) -> Counter[str]:
    """Frequencies of lexicon words and code patterns in the corpus, as written."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(m.group() for m in CODE.finditer(text))
        counts.update(w for w in (m.group() for m in WORD.finditer(text)) if w.lower() in lexicon.words)
    return counts


def refine_tokenizer(
    tokenizer: PreTrainedTokenizerFast,
    model: PreTrainedModel,
    texts: Sequence[str],
    lexicon: Lexicon,
    max_new_tokens: int,
    min_frequency: int,
    min_pieces: int,
) -> RefineResult:
    """Add frequent clinical words that split into ≥ `min_pieces` pieces in running text.

    Each new embedding row starts at the mean of the word's old sub-token embeddings, so the model's view
    of the word is close to unchanged at first."""
    before = tokens_per_word(tokenizer, texts)
    counts = candidate_words(texts, lexicon)
    frequent = [word for word, n in counts.most_common() if n >= min_frequency]
    # pieces as the word appears in running text (after a space: byte-level BPE marks that space)
    in_text = tokenizer([" " + w for w in frequent], add_special_tokens=False)["input_ids"]
    pieces_of = dict(zip(frequent, in_text, strict=True))
    vocab = tokenizer.get_vocab()
    chosen = [w for w in frequent if len(pieces_of[w]) >= min_pieces and w not in vocab][:max_new_tokens]
    if chosen:
        old_size = len(tokenizer)
        # lstrip: the new token absorbs the space before it, as the word's first piece did
        tokenizer.add_tokens([AddedToken(w, single_word=True, lstrip=True, normalized=False) for w in chosen])
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embeddings = model.get_input_embeddings().weight
        with torch.no_grad():
            for offset, word in enumerate(chosen):
                embeddings[old_size + offset] = embeddings[pieces_of[word]].mean(dim=0)
        model.config.vocab_size = len(tokenizer)
    after = tokens_per_word(tokenizer, texts)
    log.info("vocabulary: added %d clinical tokens; tokens per word %.3f → %.3f", len(chosen), before, after)
    return RefineResult(added=chosen, tokens_per_word_before=before, tokens_per_word_after=after)
