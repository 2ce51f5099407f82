"""Corpora larger than memory: a tokenized shard cache on disk, and packed rows made on the fly from it.

Design, in two stages:

1. `build_shard_cache` reads the configured sources as one stream (`corpus.split_documents`: the same order and
   the same hash-chosen held-out slice as the in-memory path). Held-out texts go to a small list (capped by
   `max_holdout_documents`); training texts are tokenized `shard_documents` at a time with
   `packing.tokenize_documents` (so medical flags, masking units and the splitting of long documents are those
   of the in-memory path) and each shard is written as one `.npz` (concatenated ids, units and medical flags,
   plus document offsets). The folder is built under a temporary name; `manifest.json` is written last
   (temp file + `os.replace`) and the folder renamed into place, so an interrupted build is never used: a
   folder without its manifest is rebuilt. The folder's name is a hash of everything the tokens depend on
   (sources config, each user file's size and mtime, the tokenizer's serialisation, max_length, whole_word,
   the lexicon, shard size, a format version), so a second run with the same inputs reuses it.
   Location: `cache_root` argument, else `$CMFT_CACHE/tokenized`, else `~/.cache/cmft/tokenized`.

2. `StreamingPackedDataset` (a torch IterableDataset) reads shards in a seeded random order per pass, fills a
   buffer of at most `buffer_documents` documents, packs it with `packing.pack_first_fit_decreasing` into rows
   of `max_length`, yields the rows (`PackedRow`s, exactly what `PackedDataset` items are, so `collate_packed`
   is unchanged) in a seeded random order, and refills. Every training document appears exactly once per pass;
   it cycles over passes for ever (the Trainer stops at max_steps). Each row's `dataset_index` is its position
   in the stream, so row-seeded masking never repeats a seed.

Memory holds one shard and one buffer, whatever the corpus size. Resume: for an IterableDataset the HF Trainer
(transformers 5) treats the whole run as one epoch and skips global_step × gradient_accumulation batches by
iterating them (accelerate's `skip_first_batches`); the stream is a pure function of (cache, seed), so the
skipped stream is exactly the uninterrupted one (tested with the real Trainer).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from cmft.errors import CmftError
from cmft.pretraining.config import CorpusConfig
from cmft.pretraining.corpus import Corpus, source_files, split_documents
from cmft.pretraining.lexicon import Lexicon
from cmft.pretraining.packing import Document, PackedRow, pack_first_fit_decreasing, tokenize_documents
from cmft.version import __version__

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HELDOUT = "heldout.jsonl"


def default_cache_root() -> Path:
    """`$CMFT_CACHE/tokenized`, else `~/.cache/cmft/tokenized`."""
    base = os.environ.get("CMFT_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "cmft") / "tokenized"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """A hash of the tokenizer's full serialisation (vocabulary, merges, normalizer, added tokens)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def cache_key(
    config: CorpusConfig,
    tokenizer: PreTrainedTokenizerFast,
    lexicon: Lexicon,
    max_length: int,
    whole_word: str,
    shard_documents: int,
) -> str:
    """The name of the cache folder: a hash of everything the cached tokens depend on."""
    sources = []
    for source in config.sources:
        entry = source.model_dump(mode="json")
        entry["files"] = [
            [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns] for path in source_files(source)
        ]
        sources.append(entry)
    payload = {
        "format": FORMAT_VERSION,
        "cmft": __version__,  # bundled sources are code: a new release may read them differently
        "sources": sources,
        "holdout_fraction": config.holdout_fraction,
        "max_holdout_documents": config.max_holdout_documents,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "lexicon": hashlib.sha256("\n".join(sorted(lexicon.words)).encode("utf-8")).hexdigest(),
        "max_length": max_length,
        "whole_word": whole_word,
        "shard_documents": shard_documents,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:32]


@dataclass
class ShardCache:
    """A finished cache folder: its shards in stream order, the held-out texts and the corpus counts."""

    folder: Path
    shards: list[str]
    pieces_per_shard: list[int]
    train_documents: int
    train_tokens: int
    heldout: list[str]
    documents_per_source: dict[str, int] = field(default_factory=dict)
    reused: bool = False

    def corpus(self) -> Corpus:
        """A `Corpus` for the engine's evaluation and summary: the held-out texts (training texts stay on disk)."""
        return Corpus(train=[], heldout=list(self.heldout), documents_per_source=dict(self.documents_per_source))


def _write_shard(path: Path, documents: list[Document]) -> None:
    offsets = np.zeros(len(documents) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(d.ids) for d in documents])
    with open(path, "wb") as handle:
        np.savez(
            handle,
            ids=np.concatenate([d.ids for d in documents]).astype(np.int32),
            unit=np.concatenate([d.unit for d in documents]).astype(np.int32),
            medical=np.concatenate([d.medical for d in documents]).astype(bool),
            offsets=offsets,
        )


def read_shard(path: Path) -> list[Document]:
    """The documents of one shard file, in the order they were written."""
    with np.load(path) as shard:
        ids, unit, medical, offsets = shard["ids"], shard["unit"], shard["medical"], shard["offsets"]
    return [
        Document(ids=ids[start:end], unit=unit[start:end], medical=medical[start:end])
        for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)
    ]


def _write_json_atomically(path: Path, data: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(temporary, path)


def load_shard_cache(folder: Path) -> ShardCache | None:
    """The cache in `folder`, or None when it is missing or unfinished (no manifest)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT_VERSION:
        return None
    with open(folder / HELDOUT, encoding="utf-8") as handle:
        heldout = [json.loads(line) for line in handle]
    return ShardCache(
        folder=folder,
        shards=manifest["shards"],
        pieces_per_shard=manifest["pieces_per_shard"],
        train_documents=manifest["train_documents"],
        train_tokens=manifest["train_tokens"],
        heldout=heldout,
        documents_per_source=manifest["documents_per_source"],
        reused=True,
    )


def build_shard_cache(
    config: CorpusConfig,
    tokenizer: PreTrainedTokenizerFast,
    lexicon: Lexicon,
    max_length: int,
    whole_word: str = "medical",
    shard_documents: int = 2000,
    cache_root: Path | None = None,
) -> ShardCache:
    """Tokenize the training documents of the corpus into shards on disk, or reuse a finished cache of the same
    inputs. Memory holds one shard of texts and the held-out list, whatever the corpus size."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    folder = root / cache_key(config, tokenizer, lexicon, max_length, whole_word, shard_documents)
    cached = load_shard_cache(folder)
    if cached is not None:
        log.info("corpus: reusing %d tokenized shards in %s", len(cached.shards), folder)
        return cached
    if folder.exists():
        log.warning("corpus: %s is an unfinished cache (no manifest): rebuilding it", folder)
        shutil.rmtree(folder)
    partial = root / f"{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shards: list[str] = []
    pieces_per_shard: list[int] = []
    train_documents = train_tokens = 0
    heldout: list[str] = []
    pending: list[str] = []
    counts: dict[str, int] = {}

    def flush(texts: list[str]) -> None:
        nonlocal train_documents, train_tokens
        documents = tokenize_documents(texts, tokenizer, lexicon, max_length, whole_word)
        train_documents += len(texts)
        if not documents:
            return
        name = f"shard-{len(shards):06d}.npz"
        _write_shard(partial / name, documents)
        shards.append(name)
        pieces_per_shard.append(len(documents))
        train_tokens += sum(len(d.ids) for d in documents)

    for text, held in split_documents(config, counts):
        if held:
            heldout.append(text)
            continue
        pending.append(text)
        if len(pending) > shard_documents:  # keep one back: it may have to become the held-out text
            flush(pending[:shard_documents])
            del pending[:shard_documents]
    if not heldout and pending:  # as build_corpus: the last training text is held out when the hash chose none
        heldout.append(pending.pop())
    if pending:
        flush(pending)
    if not shards:
        shutil.rmtree(partial)
        raise CmftError("corpus: nothing left to train on after the held-out slice; add documents")
    with open(partial / HELDOUT, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(text) + "\n" for text in heldout)
    manifest = {
        "format": FORMAT_VERSION,
        "shards": shards,
        "pieces_per_shard": pieces_per_shard,
        "train_documents": train_documents,
        "train_tokens": train_tokens,
        "documents_per_source": counts,
        "max_length": max_length,
    }
    _write_json_atomically(partial / MANIFEST, manifest)
    try:
        os.replace(partial, folder)
    except OSError:  # another process finished the same cache first: use theirs
        shutil.rmtree(partial, ignore_errors=True)
    log.info("corpus: %d training documents tokenized into %d shards in %s", train_documents, len(shards), folder)
    built = load_shard_cache(folder)
    if built is None:
        raise CmftError(f"corpus cache {folder}: could not be written; check the disk or set CMFT_CACHE")
    built.reused = False
    return built


def training_sample(config: CorpusConfig, limit: int) -> Corpus:
    """The first `limit` training texts of the stream (for training or refining the tokenizer, which the cache
    key depends on) and the held-out texts met on the way."""
    sample = Corpus()
    for text, held in split_documents(config):
        (sample.heldout if held else sample.train).append(text)
        if len(sample.train) >= limit:
            break
    return sample


class StreamingPackedDataset(torch.utils.data.IterableDataset):
    """Packed rows made on the fly from a shard cache, with a bounded buffer of documents.

    Deterministic given `seed`: pass p shuffles the shard order and the documents of each shard with a generator
    seeded by (seed, p), packs each buffer first-fit-decreasing and yields its rows in a shuffled order.
    `passes=None` cycles for ever. Under several DataLoader workers each takes every n-th row."""

    def __init__(
        self,
        cache: ShardCache,
        max_length: int,
        buffer_documents: int = 10_000,
        seed: int = 0,
        passes: int | None = None,
    ):
        if buffer_documents < 1:
            raise CmftError("corpus.buffer_documents: must be at least 1")
        self.cache = cache
        self.max_length = max_length
        self.buffer_documents = buffer_documents
        self.seed = seed
        self.passes = passes

    def __iter__(self) -> Iterator[PackedRow]:
        worker = torch.utils.data.get_worker_info()
        workers, me = (1, 0) if worker is None else (worker.num_workers, worker.id)
        for row in self.rows():
            if row.dataset_index % workers == me:
                yield row

    def rows(self) -> Iterator[PackedRow]:
        """Every packed row of the stream, numbered from 0 across passes."""
        index = 0
        for pass_number in count() if self.passes is None else range(self.passes):
            rng = np.random.default_rng([self.seed, pass_number])
            for documents in self._buffers(rng):
                bins = pack_first_fit_decreasing([len(d.ids) for d in documents], self.max_length)
                for b in rng.permutation(len(bins)).tolist():
                    yield PackedRow([documents[i] for i in bins[b]], index)
                    index += 1

    def _buffers(self, rng: np.random.Generator) -> Iterator[list[Document]]:
        buffer: list[Document] = []
        for shard in rng.permutation(len(self.cache.shards)).tolist():
            documents = read_shard(self.cache.folder / self.cache.shards[shard])
            for i in rng.permutation(len(documents)).tolist():
                buffer.append(documents[i])
                if len(buffer) == self.buffer_documents:
                    yield buffer
                    buffer = []
            del documents
        if buffer:
            yield buffer
