"""Training rows for pretraining: the corpus read whole and packed in memory, or streamed from a shard cache."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmft import distributed
from cmft.errors import CmftError
from cmft.pretraining.config import PretrainConfig
from cmft.pretraining.corpus import Corpus, build_corpus
from cmft.pretraining.lexicon import Lexicon
from cmft.pretraining.packing import PackedDataset, tokenize_documents
from cmft.pretraining.streaming import ShardCache, StreamingPackedDataset, build_shard_cache, training_sample

log = logging.getLogger("cmft")
Rows = PackedDataset | StreamingPackedDataset


@dataclass
class TrainingData:
    rows: Rows
    corpus: Corpus
    """In memory: every document; streaming: the held-out slice and per-source counts (train texts stay on disk)."""
    max_steps: int
    summary: dict[str, Any] = field(default_factory=dict)


def read_corpus(config: PretrainConfig) -> Corpus:
    """The documents the tokenizer is trained on: the whole corpus, or (streaming) the head of the stream."""
    if not config.corpus.streaming:
        return build_corpus(config.corpus)
    if config.training.max_steps is None:
        raise CmftError(
            "training.max_steps: required with corpus.streaming=true (a stream has no length to count epochs "
            "over); set it, e.g. training.max_steps=10000"
        )
    return training_sample(config.corpus, config.tokenizer.train_documents)


def steps_for(config: PretrainConfig, rows: int) -> int:
    if config.training.max_steps is not None:
        return config.training.max_steps
    per_step = config.training.batch_size * config.training.gradient_accumulation
    return max(1, math.ceil(config.training.epochs * rows / per_step))


def training_data(config: PretrainConfig, corpus: Corpus, tokenizer, lexicon: Lexicon, max_length: int) -> TrainingData:
    """Rows of at most `max_length` tokens, the step count and what the run summary reports about them."""
    if config.corpus.streaming:
        rows, cache = streamed(config, tokenizer, lexicon, max_length)
        max_steps = steps_for(config, 0)
        log.info(
            "streaming: %d documents (%d tokens) in %d shards (%s), packed on the fly; %d optimizer steps",
            cache.train_documents, cache.train_tokens, len(cache.shards),
            "reused" if cache.reused else "tokenized now", max_steps,
        )  # fmt: skip
        summary = {"train_documents": cache.train_documents, "train_tokens": cache.train_tokens, "streaming": True,
                   "tokenized_shards": len(cache.shards), "cache": str(cache.folder)}  # fmt: skip
        return TrainingData(rows, cache.corpus(), max_steps, summary)
    documents = tokenize_documents(corpus.train, tokenizer, lexicon, max_length, config.masking.whole_word)
    rows = PackedDataset(documents, max_length)
    max_steps = steps_for(config, len(rows))
    log.info(
        "packing: %d documents → %d rows of ≤ %d tokens (%.0f%% full); %d optimizer steps",
        len(documents), len(rows), max_length, 100 * rows.fill_ratio(max_length), max_steps,
    )  # fmt: skip
    summary = {"train_documents": len(corpus.train), "train_tokens": sum(len(d.ids) for d in documents),
               "packed_rows": len(rows), "pack_fill": rows.fill_ratio(max_length)}  # fmt: skip
    return TrainingData(rows, corpus, max_steps, summary)


def streamed(config: PretrainConfig, tokenizer, lexicon: Lexicon, max_length: int
             ) -> tuple[StreamingPackedDataset, ShardCache]:  # fmt: skip
    """The shard cache (built once, on rank 0; reused when its inputs are unchanged) and rows packed from it."""
    c = config.corpus
    root = Path(c.cache_dir).expanduser() if c.cache_dir else None

    def cache() -> ShardCache:
        return build_shard_cache(c, tokenizer, lexicon, max_length, config.masking.whole_word, c.shard_documents, root)

    if distributed.is_main():
        cache()
    distributed.barrier()
    built = cache()  # rank 0 and the others alike: the finished cache, read from disk
    return StreamingPackedDataset(built, max_length, c.buffer_documents, config.seed), built
