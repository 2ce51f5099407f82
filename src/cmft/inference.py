"""Loading runs and exports for predict, evaluate, export, serve and the benchmarks, and running texts through them.

A model folder says what it is in its manifest (model/cmft_task.json, cmft.tasks.base.TASK_MANIFEST; an export
folder's cmft_export.json): task, labels, max_length and decoding settings. Run folders saved before the manifest
existed are read through their recipe.yaml. The back ends (torch, onnxruntime) and the batching loop are
cmft.backends'; they are importable from here too."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from cmft.backends import Backend, OnnxBackend, Progress, TorchBackend, Unit, per_text, run_batches
from cmft.config import read_yaml
from cmft.errors import CmftError
from cmft.tasks import BARE_ENCODER, task_class
from cmft.tasks.base import Task, read_manifest

__all__ = ["MANIFEST", "Backend", "Loaded", "OnnxBackend", "TorchBackend", "embed_corpus", "embed_texts",
           "load_export", "load_run", "open_source", "predict_texts", "run_kind", "run_units", "search",
           "top_hits"]  # fmt: skip
MANIFEST = "cmft_export.json"


@dataclass
class Loaded:
    task: type[Task]  # the task class: encoding, collating and decoding for this model
    tokenizer: Any
    meta: dict[str, Any]  # the manifest: labels, threshold, max_length, ...: everything decoding needs
    module: nn.Module | None = None
    run_dir: Path | None = None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @cached_property
    def recipe(self) -> Any:
        """The run's recipe (a RecipeConfig), read on first use: only evaluation needs it (its data and settings),
        never inference. None for an export or a pretraining run."""
        if self.run_dir is None or run_kind(self.run_dir) != "finetune":
            return None
        return run_recipe(self.run_dir)


# loading ------------------------------------------------------------------------------------------------------
def run_kind(run_dir: Path) -> str:
    """`finetune`, `pretrain` or `export` for a folder; a one-line error for anything else."""
    if (run_dir / MANIFEST).is_file():
        return "export"
    if not run_dir.is_dir():
        raise CmftError(f"{run_dir}: no such run or export folder")
    if not (run_dir / "model" / "config.json").is_file():
        raise CmftError(f"{run_dir}: no model/ with config.json here; pass a finished run folder (runs/…) or export")
    meta = read_manifest(run_dir / "model")
    if meta is not None:  # a bare encoder predicts nothing: a pretraining run's
        return "finetune" if task_class(meta["task"]).predicts else "pretrain"
    if (run_dir / "recipe.yaml").is_file() and "task" in (read_yaml(run_dir / "recipe.yaml") or {}):
        return "finetune"
    return "pretrain"


def run_recipe(run_dir: Path) -> Any:
    """A fine-tuning run's recipe.yaml, validated (a RecipeConfig)."""
    from cmft.config import build_config
    from cmft.finetuning.config import RecipeConfig

    return build_config(RecipeConfig, read_yaml(run_dir / "recipe.yaml"), str(run_dir / "recipe.yaml"))


def run_manifest(run_dir: Path) -> dict[str, Any]:
    """model/'s manifest; for a folder saved before manifests, the one its recipe.yaml gives (as then)."""
    meta = read_manifest(run_dir / "model")
    if meta is not None:
        return meta
    if run_kind(run_dir) == "finetune":
        recipe = run_recipe(run_dir)
        return task_class(recipe.task).manifest_from_recipe(run_dir / "model", recipe)
    return task_class(BARE_ENCODER).manifest_from_recipe(run_dir / "model", None)


def load_run(run_dir: str | Path, attention: str | None = None, parity: bool = False) -> Loaded:
    """The torch inference module of a finished fine-tuning or pretraining run, on CPU in eval mode (fp32 weights).

    `attention`: None picks by cmft.modeling.choose_inference's rule for this machine (flash-attention 2 on an
    Ampere-or-newer GPU with flash-attn, which TorchBackend runs in bf16; else banded for ModernBERT: exact, and
    long notes cost O(length × window); sdpa for other encoders); `parity`: the export's fp32 reference (never
    flash-attention). cmft.export passes the form it traces as `attention`."""
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    kind = run_kind(run_dir)
    if kind == "export":
        raise CmftError(f"{run_dir}: an export folder; torch inference needs the run folder (or use --onnx)")
    model_dir = run_dir / "model"
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise CmftError(f"{model_dir}: the tokenizer does not load ({type(exc).__name__})") from None
    meta = run_manifest(run_dir)
    task = task_class(meta["task"])
    if attention is None:
        from cmft.modeling import choose_inference, model_type_of

        attention = choose_inference(model_type_of(str(model_dir)), parity).implementation
    return Loaded(task, tokenizer, meta, task.load_inference(model_dir, meta, attention), run_dir=run_dir)


def load_export(export_dir: str | Path) -> Loaded:
    from transformers import AutoTokenizer

    export_dir = Path(export_dir)
    if (export_dir / "FAILED").is_file():
        raise CmftError(f"{export_dir}: this export failed its parity check (see parity.json); export again")
    try:
        meta = json.loads((export_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise CmftError(f"{export_dir}: no readable {MANIFEST}; not a `cmft export` folder") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(export_dir)
    except (OSError, ValueError) as exc:
        raise CmftError(f"{export_dir}: the tokenizer does not load ({type(exc).__name__}); export again") from None
    return Loaded(task_class(meta["task"]), tokenizer, meta)


def open_source(source: str | Path, onnx: bool, int8: bool = False, threads: int | None = None,
                device_id: int | None = None) -> tuple[Loaded, Backend]:  # fmt: skip
    """A run folder (torch) or an export folder (onnxruntime); a run folder with --onnx uses export/<run name>.
    `threads` and `device_id` (the GPU) are onnxruntime's; torch takes the process's thread count and current GPU."""
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
    return loaded, OnnxBackend(export_dir / name, threads, device_id)


# running ------------------------------------------------------------------------------------------------------
def run_units(loaded: Loaded, backend: Backend, units: list[Unit], batch_size: int,
              progress: bool | Progress = False, pad_id: int | None = None) -> list[Any]:  # fmt: skip
    """Outputs per unit of a loaded model (cmft.backends.run_batches with its task's padding), in unit order."""
    pad_id = loaded.pad_id if pad_id is None else pad_id

    def collate(batch: list[Unit]) -> tuple[np.ndarray, np.ndarray]:
        return loaded.task.collate(batch, pad_id, loaded.meta)

    return run_batches(units, collate, backend, batch_size, progress)


def predict_texts(loaded: Loaded, backend: Backend, texts: list[str], batch_size: int = 16,
                  progress: bool | Progress = False) -> tuple[list[dict[str, Any]], dict[str, int]]:  # fmt: skip
    """One prediction per text, and the counts of truncated / windowed texts."""
    units, counts = loaded.task.encode(loaded.tokenizer, texts, loaded.meta)
    outputs = run_units(loaded, backend, units, batch_size, progress) if units else []
    grouped = per_text(units, outputs, len(texts))
    return [loaded.task.decode(loaded.meta, text, *rows) for text, rows in zip(texts, grouped, strict=True)], counts


def embed_texts(loaded: Loaded, backend: Backend, texts: list[str], batch_size: int,
                progress: bool | Progress = False) -> tuple[np.ndarray, dict[str, int]]:  # fmt: skip
    """[texts, dim] float32 outputs of a bi-encoder, kept as arrays (no JSON rounding) for ranking, and the
    truncation counts."""
    units, counts = loaded.task.encode(loaded.tokenizer, texts, loaded.meta)
    return np.stack(run_units(loaded, backend, units, batch_size, progress)).astype(np.float32), counts


def embed_corpus(loaded: Loaded, backend: Backend, corpus_path: Path, batch_size: int
                 ) -> tuple[list[str], np.ndarray]:  # fmt: skip
    """(document ids, [documents, dim] normalised embeddings) of a `--corpus` file (jsonl or text lines)."""
    from cmft.data.retrieval import corpus_file_texts

    if not corpus_path.is_file():
        raise CmftError(f"--corpus: {corpus_path}: file not found")
    documents = corpus_file_texts(corpus_path)
    if not documents:
        raise CmftError(f"--corpus: {corpus_path}: no document")
    embeddings, _ = embed_texts(loaded, backend, [text for _, text in documents], batch_size)
    return [name for name, _ in documents], embeddings


def top_hits(query: np.ndarray, corpus: tuple[list[str], np.ndarray], top_k: int) -> list[dict[str, Any]]:
    """The top-k documents per query embedding (cosine of the normalised embeddings), as predict writes them."""
    import torch

    from cmft.metrics import rank

    names, embeddings = corpus
    hits = rank(torch.from_numpy(np.asarray(query, dtype=np.float32)), torch.from_numpy(embeddings), names, top_k)
    return [{"hits": [{"id": d, "score": round(s, 6)} for d, s in row]} for row in hits]


def search(loaded: Loaded, backend: Backend, texts: list[str], corpus_path: Path, top_k: int,
           batch_size: int) -> tuple[list[dict[str, Any]], dict[str, int]]:  # fmt: skip
    """The top-k corpus documents of every query text, and the queries' truncation counts."""
    corpus = embed_corpus(loaded, backend, corpus_path, batch_size)
    query, counts = embed_texts(loaded, backend, texts, batch_size)
    return top_hits(query, corpus, top_k), counts
