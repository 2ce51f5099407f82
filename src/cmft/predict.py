"""`cmft predict`: batch inference with torch or onnxruntime over an input of any size, one JSON line (or Parquet row)
per input text, in input order.

The input is read lazily (cmft.predicting.inputs) in buffers of `buffer_rows` consecutive rows; within a buffer the
texts are sorted by length into batches (little padding) and written back in input order, so memory stays that of
one buffer whatever the input's size. Texts longer than the model's limit are windowed (NER) or truncated (the
others), empty ones skipped, and all are counted in the summary on stderr.

Without --output, lines go to stdout as each buffer finishes. With --output OUT each buffer becomes a part file in
OUT.parts/ (cmft.predicting.parts) and OUT is assembled from them at the end, so a killed run continues with
--resume. Under torchrun the processes take turns over the buffers (whole buffers: every batch is the one a single
process runs, so the output is the same byte for byte), and rank 0 assembles OUT once every process is done.
"""

from __future__ import annotations

import bisect
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from cmft import distributed
from cmft.chaining import Chain, check_first, open_chain
from cmft.errors import CmftError
from cmft.inference import Loaded, embed_corpus, embed_texts, open_source, predict_texts, top_hits
from cmft.predicting.inputs import Inputs, Row
from cmft.predicting.outputs import assemble, check_output, field_kinds
from cmft.predicting.parts import Parts, file_identity
from cmft.predicting.progress import RowProgress
from cmft.tasks.base import EVIDENCE_K

BUFFER_ROWS = 10_000
WAIT_FOR_ALL = timedelta(days=7)  # processes finish their shares up to a buffer apart, and a buffer may take hours
COUNTS = ("n_inputs", "n_empty_skipped", "n_truncated", "n_windowed")
Predictor = Callable[[list[str], Callable[[int, int], None]], tuple[list[dict[str, Any]], dict[str, int]]]


def predict(source: str | Path, input_path: str | Path, output: str | Path | None = None, onnx: bool = False,
            batch_size: int = 16, corpus: str | Path | None = None, top_k: int = 10, int8: bool = False,
            text_field: str = "text", evidence: bool = False, evidence_k: int | None = None,
            evidence_method: str | None = None, buffer_rows: int = BUFFER_ROWS,
            resume: bool = False, assertion: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Predict every text of `input_path` to `output` (.jsonl, or .parquet) or stdout; the summary's counts cover
    every process. With `evidence`, each prediction that has any (ICD codes) carries its `evidence_k` heaviest
    spans of the text. With `assertion` (an assertion run or export), each NER entity carries its span's status
    (cmft.chaining). `resume` continues a killed run with the same --output from its parts."""
    if min(batch_size, top_k, buffer_rows, evidence_k or 1) < 1:
        raise CmftError("--batch-size, --buffer-rows, --top-k and --evidence-k must be at least 1")
    if not evidence and (evidence_k is not None or evidence_method is not None):
        raise CmftError("--evidence-k and --evidence-method need --evidence")
    if output is None and (resume or distributed.launched()):
        needs = "--resume" if resume else "torchrun"
        raise CmftError(f"{needs} needs --output FILE: the finished buffers are kept beside it, in FILE.parts/")
    if assertion is not None and (corpus is not None or evidence):
        raise CmftError(f"--assertion chains an assertion model after NER; it takes no "
                        f"{'--corpus' if corpus is not None else '--evidence'}")  # fmt: skip
    inputs = Inputs(Path(input_path), text_field)
    if output is not None:
        output = Path(output)
        check_output(output)
    threads, device = _share_machine()
    loaded, backend = open_source(source, onnx, int8, threads, device)
    if assertion is not None:
        check_first(loaded, source)  # before the second model loads
    inputs.row_text = lambda record, field, where: loaded.task.input_text(loaded.meta, record, field, where)
    state = {"input": file_identity(inputs.path), "model": _model_identity(loaded, backend),
             "settings": {"buffer_rows": buffer_rows, "batch_size": batch_size, "text_field": text_field,
                          "evidence": None, "corpus": None}}  # fmt: skip
    if evidence:
        settings = {"k": evidence_k or EVIDENCE_K, "method": evidence_method or "attention"}
        loaded = replace(loaded, meta={**loaded.meta, "evidence": settings})
        backend = loaded.task.evidence_backend(loaded, backend, settings["method"])
        state["settings"]["evidence"] = settings
    if corpus is not None and not loaded.task.searches:
        raise CmftError(f"--corpus: searching needs a retrieval model; this one is {loaded.task.name}")
    if not loaded.task.predicts:
        raise CmftError(f"{source}: a pretrained encoder has no task head; fine-tune it first (cmft finetune RECIPE)")
    if corpus is not None:
        corpus = Path(corpus)
        predictor = _searcher(loaded, backend, corpus, top_k, batch_size)
        state["settings"]["corpus"] = {**file_identity(corpus), "top_k": top_k}
    else:
        predictor = _predictor(loaded, backend, batch_size)
    if assertion is not None:
        chain = open_chain(loaded, source, assertion, onnx, int8, threads, device, batch_size)
        predictor = _chained(loaded, predictor, chain)
        state["settings"]["assertion"] = _model_identity(chain.loaded, chain.backend)  # only when chained: older
        # parts folders stay resumable
    started = time.perf_counter()
    if output is None:
        totals = _to_stdout(inputs, buffer_rows, predictor)
    else:
        totals = _to_parts(inputs, Parts(output), Shard.of(buffer_rows), predictor, state, resume)
    seconds = time.perf_counter() - started
    return {**totals, "seconds": round(seconds, 3), "rows_per_s": round(totals["n_predicted"] / max(seconds, 1e-9), 2),
            "processes": distributed.world_size(), "backend": backend.name, "provider": backend.provider,
            "task": loaded.task.name}  # fmt: skip


def merge(output: str | Path) -> dict[str, Any]:
    """`cmft predict --merge OUT`: assemble OUT from a finished run's parts (when its processes could not)."""
    output = Path(output)
    check_output(output)
    parts = Parts(output)
    return _assemble(parts, parts.all_counts(), set())


# the model's side ---------------------------------------------------------------------------------------------
def _share_machine() -> tuple[int | None, int | None]:
    """Under torchrun: this process's onnxruntime threads and GPU. One GPU per process where there are GPUs (torch
    uses the one cmft.distributed.start makes current), else the machine's cores split between its processes."""
    if not distributed.launched():
        return None, None
    import torch

    distributed.start()
    if torch.cuda.is_available():
        return None, distributed.local_rank()
    threads = distributed.threads_per_process()
    torch.set_num_threads(threads)
    return threads, None


def _model_identity(loaded: Loaded, backend: Any) -> dict[str, Any]:
    """What resuming compares of the model: its weights and where it runs (a part made on a GPU may differ in the
    last digit from one made on a CPU)."""
    path = getattr(backend, "path", None)
    weights = [path] if path is not None else sorted((loaded.run_dir / "model").glob("*.safetensors"))
    return {"backend": backend.name, "provider": backend.provider, "weights": [file_identity(p) for p in weights]}


def _predictor(loaded: Loaded, backend: Any, batch_size: int) -> Predictor:
    def predict_buffer(texts: list[str], progress: Callable[[int, int], None]) -> tuple[list[dict], dict[str, int]]:
        return predict_texts(loaded, backend, texts, batch_size, progress)

    return predict_buffer


def _chained(loaded: Loaded, predictor: Predictor, chain: Chain) -> Predictor:
    """`predictor`, then the status of every span of the buffer from the chained model, in batches over the buffer."""

    def predict_buffer(texts: list[str], progress: Callable[[int, int], None]) -> tuple[list[dict], dict[str, int]]:
        results, counts = predictor(texts, progress)
        return chain.add(loaded, texts, results), counts

    return predict_buffer


def _searcher(loaded: Loaded, backend: Any, corpus: Path, top_k: int, batch_size: int) -> Predictor:
    """The top-k hits of each query in a corpus embedded once (in memory; the queries stream like any input)."""
    documents = embed_corpus(loaded, backend, corpus, batch_size)

    def search_buffer(texts: list[str], progress: Callable[[int, int], None]) -> tuple[list[dict], dict[str, int]]:
        query, counts = embed_texts(loaded, backend, texts, batch_size, progress)
        return top_hits(query, documents, top_k), counts

    return search_buffer


# buffers ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """Which buffers this process predicts: those not done yet, dealt out in turn (the j-th to process j mod N;
    without earlier parts, buffer k goes to process k mod N), so a resumed run is shared out evenly too."""

    buffer_rows: int
    done: tuple[int, ...] = ()
    processes: int = 1
    index: int = 0

    @classmethod
    def of(cls, buffer_rows: int) -> Shard:
        return cls(buffer_rows, (), distributed.world_size(), distributed.rank())

    def owns(self, k: int) -> bool:
        earlier = bisect.bisect_left(self.done, k)  # buffers done before k
        if earlier < len(self.done) and self.done[earlier] == k:
            return False
        return (k - earlier) % self.processes == self.index

    def rows_owned(self, total: int | None) -> int | None:
        """This process's share of `total` rows, blank ones included."""
        if total is None:
            return None
        buffers = math.ceil(total / self.buffer_rows)
        return sum(min(self.buffer_rows, total - k * self.buffer_rows) for k in range(buffers) if self.owns(k))


@dataclass
class Totals:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))

    def add(self, counts: dict[str, Any]) -> None:
        for key in COUNTS:
            self.counts[key] += counts.get(key, 0)


def _buffers(inputs: Inputs, shard: Shard) -> Iterator[tuple[int, list[Row]]]:
    """(k, rows) of every buffer the shard owns, in input order."""
    current, rows = -1, []
    for row in inputs.rows(lambda index: shard.owns(index // shard.buffer_rows)):
        k = row[0] // shard.buffer_rows
        if k != current and rows:
            yield current, rows
            rows = []
        current = k
        rows.append(row)
    if rows:
        yield current, rows


def _predict_buffer(rows: list[Row], predictor: Predictor, progress: RowProgress) -> tuple[list[str], dict]:
    """One buffer's JSON lines (its non-empty texts, in input order) and counts."""
    kept = [(identifier, text) for _, identifier, text in rows if text.strip()]
    base = progress.done
    results, counts = predictor([text for _, text in kept], lambda done, units: progress.update(
        base + len(rows) * done / units)) if kept else ([], {})  # fmt: skip
    progress.update(base + len(rows))
    lines = [json.dumps({"id": identifier, **result}, ensure_ascii=False)
             for (identifier, _), result in zip(kept, results, strict=True)]  # fmt: skip
    return lines, {"rows": len(rows), "n_inputs": len(kept), "n_empty_skipped": len(rows) - len(kept),
                   "n_truncated": counts.get("n_truncated", 0), "n_windowed": counts.get("n_windowed", 0),
                   "kinds": field_kinds(results)}  # fmt: skip


def _to_stdout(inputs: Inputs, buffer_rows: int, predictor: Predictor) -> dict[str, int]:
    totals, progress = Totals(), RowProgress(inputs.count())
    try:
        for _, rows in _buffers(inputs, Shard(buffer_rows)):
            lines, counts = _predict_buffer(rows, predictor, progress)
            sys.stdout.write("".join(line + "\n" for line in lines))
            sys.stdout.flush()
            totals.add(counts)
    finally:
        progress.close()
    if not totals.counts["n_inputs"]:
        raise CmftError(f"{inputs.path}: no non-empty input text")
    return {**totals.counts, "n_predicted": totals.counts["n_inputs"], "n_reused": 0}


def _to_parts(inputs: Inputs, parts: Parts, shard: Shard, predictor: Predictor, state: dict[str, Any],
              resume: bool) -> dict[str, int]:  # fmt: skip
    """This process's buffers into parts; then, on rank 0 once every process is done, OUT from all the parts."""
    done = distributed.agree(lambda: parts.prepare(state, resume))
    shard = replace(shard, done=tuple(sorted(done)))
    totals = Totals()
    progress = RowProgress(shard.rows_owned(inputs.count()) if distributed.is_main() else None, distributed.is_main())
    try:
        for k, rows in _buffers(inputs, shard):
            lines, counts = _predict_buffer(rows, predictor, progress)
            parts.write(k, lines, {**counts, "process": shard.index})
            totals.add(counts)
    finally:
        progress.close()
    if distributed.is_main():
        parts.write_end(inputs.n_rows, math.ceil(inputs.n_rows / shard.buffer_rows))
    distributed.wait_for_all(WAIT_FOR_ALL)
    if not distributed.is_main():
        return {**totals.counts, "n_predicted": totals.counts["n_inputs"], "n_reused": 0}
    return _assemble(parts, parts.all_counts(), done, inputs.path)


def _assemble(parts: Parts, counts: list[dict[str, Any]], reused: set[int], source: Path | None = None
              ) -> dict[str, int]:  # fmt: skip
    """OUT from every part, the parts folder removed; the counts of all parts, and of those reused."""
    totals = Totals()
    for part in counts:
        totals.add(part)
    if not totals.counts["n_inputs"]:
        parts.remove()
        raise CmftError(f"{source or parts.output}: no non-empty input text")
    assemble(parts, counts)
    parts.remove()
    n_reused = sum(counts[k]["n_inputs"] for k in reused if k < len(counts))
    by_process: dict[int, int] = {}  # texts each process predicted in this run
    for k, part in enumerate(counts):
        if k not in reused:
            by_process[part["process"]] = by_process.get(part["process"], 0) + part["n_inputs"]
    return {**totals.counts, "n_predicted": totals.counts["n_inputs"] - n_reused, "n_reused": n_reused,
            "per_process": [by_process.get(index, 0) for index in range(max(by_process, default=-1) + 1)]}  # fmt: skip
