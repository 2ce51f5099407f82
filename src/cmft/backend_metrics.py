"""A run's task metrics computed through any inference back end (torch or onnxruntime, fp32 or int8).

Used by `cmft export --quantize int8` (what int8 costs on dev), the inference benchmark and the tests that
compare torch and ONNX. Rows are the task's own prepared dataset, so figures match `cmft evaluate`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cmft.inference import Loaded, Unit
from cmft.predict import Backend, predict_texts, run_units


def split_metrics(loaded: Loaded, backend: Backend, split: str = "dev", batch_size: int = 16) -> dict[str, Any]:
    """Metrics of `backend` on a split of the run's recipe (loaded from a run folder: it carries the recipe)."""
    recipe = loaded.recipe
    if loaded.task == "retrieval":
        return _retrieval(loaded, backend, split, batch_size)
    from cmft.tasks import get_task

    task = get_task(recipe)
    task.prepare(loaded.tokenizer, splits=(split,), labels=list(loaded.meta["labels"]))
    if loaded.task == "icd_coding":
        task.threshold = loaded.meta["threshold"]
    rows = task.datasets[split]
    units = [Unit(i, row["input_ids"]) for i, row in enumerate(rows)]
    pad_id = loaded.tokenizer.pad_token_id or 0
    outputs = run_units(backend, units, pad_id, loaded.meta, batch_size)
    if loaded.task == "ner":
        width = max(len(o) for o in outputs)
        logits = np.zeros((len(outputs), width, outputs[0].shape[-1]), dtype=np.float32)
        for i, output in enumerate(outputs):
            logits[i, : len(output)] = output
        return task.metrics(logits, None, split)
    stacked = np.stack(outputs).astype(np.float64)
    labels = np.stack([np.asarray(row["labels"]) for row in rows])
    if loaded.task == "icd_coding":  # the graph gives probabilities; the task's metrics take logits
        clipped = np.clip(stacked, 1e-12, 1 - 1e-12)
        stacked = np.log(clipped) - np.log1p(-clipped)
    return task.metrics(stacked, labels, split)


def _retrieval(loaded: Loaded, backend: Backend, split: str, batch_size: int) -> dict[str, Any]:
    import torch

    from cmft.data.retrieval import read_retrieval_split
    from cmft.metrics import retrieval_metrics
    from cmft.tasks.retrieval import rank

    data = read_retrieval_split(loaded.recipe.data, split, loaded.recipe.retrieval)
    query_ids, corpus_ids = data.evaluated_queries, list(data.corpus)
    queries, _ = predict_texts(loaded, backend, [data.queries[q] for q in query_ids], batch_size)
    corpus, _ = predict_texts(loaded, backend, [data.corpus[c] for c in corpus_ids], batch_size)
    hits = rank(torch.tensor([q["embedding"] for q in queries]), torch.tensor([c["embedding"] for c in corpus]),
                corpus_ids, max(loaded.recipe.retrieval.top_k, 100))  # fmt: skip
    return retrieval_metrics([[d for d, _ in h] for h in hits], [data.relevant[q] for q in query_ids])
