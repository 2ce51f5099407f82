"""Streaming pretraining data: the shard cache, packed rows on the fly, flat memory, and exact resume."""

from __future__ import annotations

import gc
import itertools
import json
import os
import re
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
import torch
from accelerate import skip_first_batches
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, Trainer, TrainingArguments

from cmft.pretraining import streaming
from cmft.pretraining.config import CorpusConfig, SourceConfig
from cmft.pretraining.corpus import build_corpus, iter_source
from cmft.pretraining.lexicon import Lexicon
from cmft.pretraining.packing import collate_packed, tokenize_documents
from cmft.pretraining.streaming import (
    MANIFEST,
    StreamingPackedDataset,
    build_shard_cache,
    default_cache_root,
    training_sample,
)
from cmft.pretraining.vocab import save_tokenizer, train_tokenizer

MAX_LENGTH = 128
SMALL_CORPUS = CorpusConfig(
    sources=[
        SourceConfig(bundled="pubmedqa", max_documents=30),
        SourceConfig(bundled="mts_dialog_train", max_documents=60),
        SourceConfig(bundled="codiesp_train", max_documents=4),  # long notes: split into max_length pieces
        SourceConfig(bundled="icd10cm", max_documents=300),
    ],
    holdout_fraction=0.05,
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(build_corpus(SMALL_CORPUS).train, 600)


@pytest.fixture(scope="module")
def lexicon():
    return Lexicon.from_files(["pretrain/lexicon/drugs.txt", "pretrain/lexicon/icd_terms.txt"])


def _key(document) -> tuple:
    return (tuple(document.ids.tolist()), tuple(document.unit.tolist()), tuple(document.medical.tolist()))


def _sentences() -> list[str]:
    text = " ".join(iter_source(SourceConfig(bundled="pubmedqa", max_documents=200)))
    return [s for s in re.split(r"(?<=\.) ", text) if 20 < len(s) < 160]


def _user_file(path: Path, documents: int) -> Path:
    """Real sentences, varied so that every line is a distinct document of 1-2 sentences."""
    sentences = _sentences()
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(documents):
            picked = [sentences[(i * 7 + k * 131) % len(sentences)] for k in range(1 + i % 2)]
            handle.write(f"Note {i}: {' '.join(picked)}\n")
    return path


def test_stream_packs_every_training_document_once_per_pass(tokenizer, lexicon, tmp_path):
    corpus = build_corpus(SMALL_CORPUS)
    expected = Counter(_key(d) for d in tokenize_documents(corpus.train, tokenizer, lexicon, MAX_LENGTH))
    cache = build_shard_cache(SMALL_CORPUS, tokenizer, lexicon, MAX_LENGTH, shard_documents=64, cache_root=tmp_path)
    assert cache.heldout == corpus.heldout
    assert cache.train_documents == len(corpus.train)
    assert cache.documents_per_source == corpus.documents_per_source
    assert cache.train_tokens == sum(len(ids) for ids, _, _ in expected.elements())
    assert any(len(ids) == MAX_LENGTH for ids, _, _ in expected)  # long notes were split, as in memory

    rows = list(StreamingPackedDataset(cache, MAX_LENGTH, buffer_documents=50, seed=3, passes=2))
    assert all(sum(len(d.ids) for d in row) <= MAX_LENGTH for row in rows)
    assert [row.dataset_index for row in rows] == list(range(len(rows)))
    per_pass = sum(1 for _ in StreamingPackedDataset(cache, MAX_LENGTH, buffer_documents=50, seed=3, passes=1))
    first, second = rows[:per_pass], rows[per_pass:]
    assert Counter(_key(d) for row in first for d in row) == expected
    assert Counter(_key(d) for row in second for d in row) == expected
    assert [[_key(d) for d in row] for row in first] != [[_key(d) for d in row] for row in second]  # reshuffled
    fill = cache.train_tokens / (per_pass * MAX_LENGTH)
    print(f"streaming fill {fill:.3f} ({per_pass} rows, buffer 50)")
    assert fill > 0.8, fill
    # rows collate exactly as in-memory PackedDataset rows do
    batch = collate_packed(rows[:4], tokenizer.pad_token_id)
    assert batch["row"].tolist() == [0, 1, 2, 3]
    assert int((batch["document"] >= 0).sum()) == sum(len(d.ids) for row in rows[:4] for d in row)
    # the tokenizer's sample is the head of the same stream
    assert training_sample(SMALL_CORPUS, 25).train == corpus.train[:25]


def test_same_seed_same_stream_other_seed_other_order(tokenizer, lexicon, tmp_path):
    cache = build_shard_cache(SMALL_CORPUS, tokenizer, lexicon, MAX_LENGTH, shard_documents=64, cache_root=tmp_path)

    def stream(seed: int) -> list:
        return [[_key(d) for d in row] for row in StreamingPackedDataset(cache, MAX_LENGTH, 50, seed, passes=1)]

    assert stream(1) == stream(1)
    assert stream(1) != stream(2)


def _peak_while_streaming(cache, buffer_documents: int) -> tuple[int, int]:
    gc.collect()
    tracemalloc.start()
    rows = 0
    for _ in StreamingPackedDataset(cache, MAX_LENGTH, buffer_documents, seed=0, passes=1):
        rows += 1
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, rows


def test_memory_stays_flat_as_the_corpus_grows(tokenizer, lexicon, tmp_path):
    figures = {}
    for name, documents in (("1x", 2500), ("4x", 10000)):
        config = CorpusConfig(sources=[SourceConfig(path=str(_user_file(tmp_path / f"{name}.txt", documents)))])
        cache = build_shard_cache(config, tokenizer, lexicon, MAX_LENGTH, shard_documents=250, cache_root=tmp_path)
        peak, rows = _peak_while_streaming(cache, buffer_documents=200)
        # what the in-memory path would hold: the arrays alone (ids, unit int32 + medical bool), no overhead
        in_memory = cache.train_tokens * 9
        figures[name] = {
            "documents": cache.train_documents,
            "rows": rows,
            "stream_peak": peak,
            "in_memory_arrays": in_memory,
        }
    print("streaming memory (bytes, tracemalloc):", json.dumps(figures))
    small, large = figures["1x"], figures["4x"]
    assert large["rows"] > 3.5 * small["rows"]
    assert large["stream_peak"] < 1.5 * small["stream_peak"]
    assert large["stream_peak"] < large["in_memory_arrays"] / 4


def _batches(dataset, count: int, skip: int = 0) -> list[dict]:
    loader = DataLoader(dataset, batch_size=3, collate_fn=lambda rows: collate_packed(rows, 0))
    if skip:
        loader = skip_first_batches(loader, skip)
    return list(itertools.islice(loader, count))


def test_skipping_k_batches_continues_the_uninterrupted_stream(tokenizer, lexicon, tmp_path):
    cache = build_shard_cache(SMALL_CORPUS, tokenizer, lexicon, MAX_LENGTH, shard_documents=64, cache_root=tmp_path)
    rows_per_pass = sum(1 for _ in StreamingPackedDataset(cache, MAX_LENGTH, 50, seed=5, passes=1))
    k = rows_per_pass // 3 - 2  # the continuation crosses into the second pass
    uninterrupted = _batches(StreamingPackedDataset(cache, MAX_LENGTH, 50, seed=5), k + 6)
    resumed = _batches(StreamingPackedDataset(cache, MAX_LENGTH, 50, seed=5), 6, skip=k)
    assert len(resumed) == 6
    for expected, got in zip(uninterrupted[k:], resumed, strict=True):
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert resumed[-1]["row"].max() >= rows_per_pass


class _Probe(torch.nn.Module):
    """The smallest trainable model: enough for the Trainer to take steps and save checkpoints."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, input_ids, **_) -> dict:
        return {"loss": (self.weight * input_ids.float().mean()).sum() * 0}


class _RecordingTrainer(Trainer):
    def __init__(self, *args, seen: list, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = seen

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append((self.state.global_step, inputs["row"].tolist()))
        return super().training_step(model, inputs, num_items_in_batch)


def _train(cache, output: Path, resume: str | None = None) -> list:
    args = TrainingArguments(
        output_dir=str(output),
        max_steps=6,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        save_steps=3,
        logging_steps=100,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=11,
    )
    seen: list = []
    trainer = _RecordingTrainer(
        model=_Probe(),
        args=args,
        train_dataset=StreamingPackedDataset(cache, MAX_LENGTH, buffer_documents=20, seed=11),
        data_collator=lambda rows: collate_packed(rows, 0),
        seen=seen,
    )
    trainer.train(resume_from_checkpoint=resume)
    return seen


def test_trainer_resume_sees_the_rows_an_uninterrupted_run_sees(tokenizer, lexicon, tmp_path):
    small = CorpusConfig(sources=[SourceConfig(bundled="icd10cm", max_documents=80)])
    cache = build_shard_cache(small, tokenizer, lexicon, MAX_LENGTH, shard_documents=8, cache_root=tmp_path)
    rows_per_pass = sum(1 for _ in StreamingPackedDataset(cache, MAX_LENGTH, 20, seed=11, passes=1))
    assert rows_per_pass < 24  # 6 steps × 2 micro-batches × 2 rows: the run wraps into a second pass
    uninterrupted = _train(cache, tmp_path / "a")
    resumed = _train(cache, tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert [step for step, _ in resumed] == [3, 3, 4, 4, 5, 5]
    assert resumed == uninterrupted[6:]


def test_cache_is_reused_keyed_and_never_used_half_built(tokenizer, lexicon, tmp_path, monkeypatch):
    calls = []
    real = streaming.tokenize_documents

    def counting(texts, *args, **kwargs):
        calls.append(len(texts))
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(streaming, "tokenize_documents", counting)
    notes = _user_file(tmp_path / "notes.txt", 300)
    config = CorpusConfig(sources=[SourceConfig(path=str(notes)), SourceConfig(bundled="icd10cm", max_documents=50)])
    root = tmp_path / "cache"

    def build(tok=tokenizer):
        return build_shard_cache(config, tok, lexicon, MAX_LENGTH, shard_documents=100, cache_root=root)

    first = build()
    assert calls and not first.reused
    manifest_time = (first.folder / MANIFEST).stat().st_mtime_ns
    calls.clear()
    second = build()
    assert second.reused and second.folder == first.folder and calls == []
    assert (second.folder / MANIFEST).stat().st_mtime_ns == manifest_time
    assert second.heldout == first.heldout and second.shards == first.shards

    save_tokenizer(tokenizer, tmp_path / "tokenizer")  # --resume reloads the run's tokenizer: same key
    assert build(AutoTokenizer.from_pretrained(tmp_path / "tokenizer")).reused
    other_tokenizer = train_tokenizer(_sentences(), 500)
    assert build(other_tokenizer).folder != first.folder
    other_lexicon = Lexicon(["aspirin"])
    key = streaming.cache_key
    assert key(config, tokenizer, other_lexicon, MAX_LENGTH, "medical", 100) != first.folder.name
    assert key(config, tokenizer, lexicon, 256, "medical", 100) != first.folder.name
    assert key(config, tokenizer, lexicon, MAX_LENGTH, "all", 100) != first.folder.name

    notes.write_text(notes.read_text(encoding="utf-8").replace("Note 1:", "Note one:"), encoding="utf-8")
    changed = build()
    assert changed.folder != first.folder and not changed.reused

    # an interrupted build (no manifest) is rebuilt, not used
    (changed.folder / MANIFEST).unlink()
    calls.clear()
    rebuilt = build()
    assert calls and not rebuilt.reused and (rebuilt.folder / MANIFEST).is_file()
    assert sorted(p.name for p in root.iterdir() if ".partial-" in p.name) == []


def test_default_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("CMFT_CACHE", str(tmp_path))
    assert default_cache_root() == tmp_path / "tokenized"
    monkeypatch.delenv("CMFT_CACHE")
    assert default_cache_root() == Path(os.path.expanduser("~")) / ".cache" / "cmft" / "tokenized"


@pytest.mark.slow
def test_cmft_pretrain_streams_and_resumes_after_sigkill_bitwise(tmp_path, monkeypatch):
    """`cmft pretrain` with corpus.streaming=true end to end: a real process killed mid-run and resumed ends with
    the same weights as an uninterrupted streaming run (the cache is reused, the stream continues in place)."""
    import signal

    import yaml
    from safetensors.torch import load_file

    from cmft.pretraining.run import pretrain
    from tests.conftest import SMALL_PRETRAIN, run_cmft
    from tests.test_crash_resume import _kill_at_step

    monkeypatch.setenv("CMFT_CACHE", str(tmp_path / "cache"))
    data = yaml.safe_load(yaml.safe_dump(SMALL_PRETRAIN))
    data["corpus"] |= {"streaming": True, "buffer_documents": 64, "shard_documents": 200}
    data["training"] |= {"max_steps": 8, "save_every": 2, "log_every": 1}
    config = tmp_path / "stream.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    reference = pretrain(config, output_dir=tmp_path / "reference")
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["streaming"] is True and summary["tokenized_shards"] >= 2 and summary["train_documents"] > 0
    os.environ["CMFT_CACHE"] = str(tmp_path / "cache")  # the subprocesses inherit it
    out = tmp_path / "killed"
    code = _kill_at_step(["pretrain", str(config), "--output-dir", str(out)], out.with_name("killed.partial"), 5)
    assert code == -signal.SIGKILL
    result = run_cmft("pretrain", "--resume", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = load_file(reference / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_streaming_needs_max_steps(tmp_path, capsys):
    import yaml

    from tests.conftest import SMALL_PRETRAIN, run_inline

    data = yaml.safe_load(yaml.safe_dump(SMALL_PRETRAIN))
    data["corpus"]["streaming"] = True
    data["training"].pop("max_steps")
    config = tmp_path / "stream.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    code, _, err = run_inline(capsys, "pretrain", str(config), "--output-dir", str(tmp_path / "out"))
    assert code == 2 and "training.max_steps: required with corpus.streaming=true" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
