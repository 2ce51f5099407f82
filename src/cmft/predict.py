"""`cmft predict`: batch inference over a jsonl or text file with torch or onnxruntime, one JSON line per input.

Inputs are sorted by length and batched (little padding), then written back in input order. Texts longer than the
model's limit are windowed (NER) or truncated (the others), and counted in the summary on stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cmft.data.readers import iter_records
from cmft.errors import CmftError
from cmft.inference import MANIFEST, Loaded, Unit, collate, decode, encode_texts, load_export, load_run, run_kind

Backend = Callable[[np.ndarray, np.ndarray], np.ndarray]


class TorchBackend:
    name = "torch"
    provider = "torch-cpu"

    def __init__(self, module):
        import torch

        self.module = module
        self.torch = torch
        if torch.cuda.is_available():
            self.module = module.cuda()
            self.provider = "torch-cuda"

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        torch = self.torch
        device = next(self.module.parameters()).device
        with torch.inference_mode():
            output = self.module(torch.from_numpy(input_ids).to(device), torch.from_numpy(attention_mask).to(device))
        return output.float().cpu().numpy()


def onnx_providers() -> list[str]:
    """CUDAExecutionProvider first when onnxruntime-gpu sees a GPU, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxBackend:
    name = "onnx"

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        if not path.is_file():
            raise CmftError(f"{path}: file not found; run `cmft export RUN_DIR --onnx` first")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=onnx_providers())
        except Exception as exc:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, …) for a bad file
            raise CmftError(f"{path}: not a loadable ONNX model ({type(exc).__name__}); export it again") from None
        self.provider = self.session.get_providers()[0]

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]


def run_units(backend: Backend, units: list[Unit], pad_id: int, meta: dict[str, Any], batch_size: int,
              progress: bool = False) -> list[np.ndarray]:  # fmt: skip
    """Outputs per unit, computed in length-sorted batches and returned in unit order."""
    order = sorted(range(len(units)), key=lambda i: units[i].length)
    outputs: list[Any] = [None] * len(units)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    bar = _progress(len(batches)) if progress else None
    for batch in batches:
        ids, mask = collate([units[i] for i in batch], pad_id, meta)
        result = backend(ids, mask)
        for row, index in enumerate(batch):
            outputs[index] = result[row]
        if bar is not None:
            bar[0].advance(bar[1])
    if bar is not None:
        bar[0].stop()
    return outputs


def _progress(total: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        return None
    progress = Progress(TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, transient=True)  # fmt: skip
    progress.start()
    return progress, progress.add_task("predict", total=total)


def predict_texts(loaded: Loaded, backend: Backend, texts: list[str], batch_size: int = 16,
                  progress: bool = False) -> tuple[list[dict[str, Any]], dict[str, int]]:  # fmt: skip
    """One prediction per text, and the counts of truncated / windowed texts."""
    units, counts = encode_texts(loaded, texts)
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    outputs = run_units(backend, units, pad_id, loaded.meta, batch_size, progress) if units else []
    by_text: dict[int, list[int]] = {}
    for k, unit in enumerate(units):
        by_text.setdefault(unit.text, []).append(k)
    results = []
    for index, text in enumerate(texts):
        keys = by_text.get(index, [])
        results.append(decode(loaded, text, [outputs[k] for k in keys], [units[k] for k in keys]))
    return results, counts


def read_inputs(path: Path, text_field: str = "text", id_field: str = "id") -> tuple[list[tuple[str, str]], int]:
    """(id, text) pairs from a .jsonl (`text`, optional `id`) or a text file (one text per line), and the number
    of empty texts skipped."""
    if not path.is_file():
        raise CmftError(f"{path}: input file not found")
    rows: list[tuple[str, str]] = []
    empty = 0
    if path.suffix.lower() in {".jsonl", ".json", ".ndjson"}:
        for number, record in iter_records(path, "jsonl"):
            text = record.get(text_field)
            if not isinstance(text, str):
                raise CmftError(f"{path}: line {number}: needs a string field {text_field!r}")
            identifier = str(record.get(id_field, number))
            if text.strip():
                rows.append((identifier, text))
            else:
                empty += 1
    else:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise CmftError(f"{path}: not a UTF-8 text file") from None
        for number, line in enumerate(lines, 1):
            if line.strip():
                rows.append((str(number), line))
            else:
                empty += 1
    if not rows:
        raise CmftError(f"{path}: no non-empty input text")
    return rows, empty


def open_source(source: str | Path, onnx: bool, int8: bool = False) -> tuple[Loaded, Backend]:
    """A run folder (torch) or an export folder (onnxruntime); a run folder with --onnx uses export/<run name>."""
    source = Path(source)
    kind = run_kind(source)
    if kind != "export" and not onnx:
        from cmft.modeling import check_model_folder

        check_model_folder(source / "model", "run")  # safetensors only, intact, tokenizer fits the model
        loaded = load_run(source)
        return loaded, TorchBackend(loaded.module)
    export_dir = source if kind == "export" else Path("export") / source.resolve().name
    if not (export_dir / MANIFEST).is_file():
        raise CmftError(f"{source}: no ONNX export at {export_dir}; run `cmft export {source} --onnx` first")
    loaded = load_export(export_dir)
    name = "model.int8.onnx" if int8 else "model.onnx"
    return loaded, OnnxBackend(export_dir / name)


def predict(source: str | Path, input_path: str | Path, output: str | Path | None = None, onnx: bool = False,
            batch_size: int = 16, corpus: str | Path | None = None, top_k: int = 10, int8: bool = False,
            text_field: str = "text") -> dict[str, Any]:  # fmt: skip
    """Predict every text of `input_path`; JSON lines to `output` (written whole, then renamed) or stdout."""
    if batch_size < 1 or top_k < 1:
        raise CmftError("--batch-size and --top-k must be at least 1")
    rows, empty = read_inputs(Path(input_path), text_field)
    loaded, backend = open_source(source, onnx, int8)
    if corpus is not None and loaded.task != "retrieval":
        raise CmftError(f"--corpus: searching needs a retrieval model; this one is {loaded.task}")
    if loaded.task == "encoder":
        raise CmftError(f"{source}: a pretrained encoder has no task head; fine-tune it first (cmft finetune RECIPE)")
    ids, texts = [r[0] for r in rows], [r[1] for r in rows]
    if corpus is not None:
        results, counts = search(loaded, backend, texts, Path(corpus), top_k, batch_size)
    else:
        results, counts = predict_texts(loaded, backend, texts, batch_size, progress=True)
    lines = [json.dumps({"id": identifier, **result}, ensure_ascii=False) for identifier, result in zip(ids, results,
             strict=True)]  # fmt: skip
    _write(lines, output)
    return {"n_inputs": len(rows), "n_empty_skipped": empty, **counts, "backend": backend.name,
            "provider": backend.provider, "task": loaded.task}  # fmt: skip


def embed_texts(loaded: Loaded, backend: Backend, texts: list[str], batch_size: int
                ) -> tuple[np.ndarray, dict[str, int]]:  # fmt: skip
    """[texts, dim] float32 embeddings of a retrieval model, kept as arrays (no JSON rounding) for ranking, and
    the truncation counts."""
    units, counts = encode_texts(loaded, texts)
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    outputs = run_units(backend, units, pad_id, loaded.meta, batch_size)
    return np.stack([np.asarray(outputs[k], dtype=np.float32) for k in range(len(units))]), counts


def search(loaded: Loaded, backend: Backend, texts: list[str], corpus_path: Path, top_k: int,
           batch_size: int) -> tuple[list[dict[str, Any]], dict[str, int]]:  # fmt: skip
    """The top-k corpus documents of every query text (cosine similarity of the normalised embeddings), and the
    queries' truncation counts."""
    import torch

    from cmft.data.retrieval import corpus_file_texts
    from cmft.tasks.retrieval import rank

    if not corpus_path.is_file():
        raise CmftError(f"--corpus: {corpus_path}: file not found")
    documents = corpus_file_texts(corpus_path)
    if not documents:
        raise CmftError(f"--corpus: {corpus_path}: no document")
    corpus, _ = embed_texts(loaded, backend, [text for _, text in documents], batch_size)
    query, counts = embed_texts(loaded, backend, texts, batch_size)
    hits = rank(torch.from_numpy(query), torch.from_numpy(corpus), [d for d, _ in documents], top_k)
    return [{"hits": [{"id": d, "score": round(s, 6)} for d, s in row]} for row in hits], counts


def _write(lines: list[str], output: str | Path | None) -> None:
    if output is None:
        sys.stdout.write("".join(line + "\n" for line in lines))
        return
    output = Path(output)
    if output.is_dir():
        raise CmftError(f"--output: {output} is a folder; name a file")
    temporary = output.with_name(f".{output.name}.partial")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.writelines(line + "\n" for line in lines)
        os.replace(temporary, output)
    except OSError as exc:
        with contextlib.suppress(OSError):  # e.g. its parent is a file: nothing was written
            temporary.unlink(missing_ok=True)
        reason = "a folder on its path is a file" if isinstance(exc, (FileExistsError, NotADirectoryError)) else None
        raise CmftError(f"--output: {output}: cannot write ({reason or exc.strerror})") from None
