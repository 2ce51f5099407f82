"""Loading runs and exports, and the inference back ends shared by predict, evaluate, export and the benchmarks: a
back end maps a padded batch (input_ids, attention_mask) to the task's output in torch or onnxruntime, so the two
share everything but the forward pass and their predictions can be compared."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from cmft.config import read_yaml
from cmft.errors import CmftError
from cmft.tasks import BARE_ENCODER, task_class
from cmft.tasks.base import Unit

MANIFEST = "cmft_export.json"
Backend = Callable[[np.ndarray, np.ndarray], np.ndarray]
Progress = Callable[[int, int], None]  # told (units done, units in all) after every batch


@dataclass
class Loaded:
    task: type  # the task class: encoding, collating and decoding for this model
    tokenizer: Any
    meta: dict[str, Any]  # the manifest: labels, threshold, max_length, ...: everything decoding needs
    module: nn.Module | None = None
    recipe: Any = None
    run_dir: Path | None = None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0


# loading ------------------------------------------------------------------------------------------------------
def run_kind(run_dir: Path) -> str:
    """`finetune`, `pretrain` or `export` for a folder; a one-line error for anything else."""
    if (run_dir / MANIFEST).is_file():
        return "export"
    if not run_dir.is_dir():
        raise CmftError(f"{run_dir}: no such run or export folder")
    if not (run_dir / "model" / "config.json").is_file():
        raise CmftError(f"{run_dir}: no model/ with config.json here; pass a finished run folder (runs/…) or export")
    if (run_dir / "recipe.yaml").is_file() and "task" in (read_yaml(run_dir / "recipe.yaml") or {}):
        return "finetune"
    return "pretrain"


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
    recipe = None
    if kind == "finetune":
        from cmft.config import build_config
        from cmft.finetuning.config import RecipeConfig

        recipe = build_config(RecipeConfig, read_yaml(run_dir / "recipe.yaml"), str(run_dir / "recipe.yaml"))
    task = task_class(recipe.task if recipe is not None else BARE_ENCODER)
    if attention is None:
        from cmft.modeling import choose_inference, model_type_of

        attention = choose_inference(model_type_of(str(model_dir)), parity).implementation
    module, meta = task.load_inference(model_dir, recipe, attention)
    return Loaded(task, tokenizer, meta, module, recipe=recipe, run_dir=run_dir)


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


# back ends ----------------------------------------------------------------------------------------------------
def attention_of(module: nn.Module) -> str | None:
    """The attention implementation of the (first) transformers model inside `module`, wrappers included."""
    for part in module.modules():
        implementation = getattr(getattr(part, "config", None), "_attn_implementation", None)
        if isinstance(implementation, str):
            return implementation
    return None


class TorchBackend:
    """Runs a module on the GPU when there is one, in the dtype its attention works in (cmft.modeling
    .inference_dtype): fp32, or bf16/fp16 autocast under flash-attention 2, which has no fp32 kernels. Autocast, not
    a cast of the weights: a fine-tuning run's final metrics use the in-memory model that is saved afterwards in
    fp32, and bf16 autocast is how the Trainer evaluated it on dev while choosing the checkpoint."""

    name = "torch"
    provider = "torch-cpu"

    def __init__(self, module: nn.Module, dtype: Any = None):
        import torch

        from cmft.modeling import inference_dtype

        self.module = module
        self.torch = torch
        self.attention = attention_of(module)
        self.dtype = inference_dtype(self.attention) if dtype is None else dtype
        if self.attention == "flash_attention_2" and self.dtype == torch.float32:
            raise CmftError("flash_attention_2 has no fp32 kernels: run it in bf16 or fp16 (or load the model with "
                            "banded or sdpa attention)")  # fmt: skip
        if torch.cuda.is_available():
            self.module = module.cuda()
            self.provider = "torch-cuda"

    def ran(self) -> dict[str, str]:
        """What the forward pass ran, for metrics.json: the attention implementation and the dtype."""
        from cmft.modeling import DTYPE_NAMES

        dtype = DTYPE_NAMES.get(self.dtype, str(self.dtype))
        return {"inference_attention": self.attention or "unknown", "inference_dtype": dtype}

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.outputs(input_ids, attention_mask)[0]

    def outputs(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, ...]:
        """Every output of the module (one tensor or a tuple), as fp32 arrays."""
        torch = self.torch
        device = next(self.module.parameters()).device
        half = torch.autocast(device.type, dtype=self.dtype) if self.dtype != torch.float32 else nullcontext()
        with torch.inference_mode(), half:
            output = self.module(torch.from_numpy(input_ids).to(device), torch.from_numpy(attention_mask).to(device))
        return tuple(part.float().cpu().numpy() for part in (output if isinstance(output, tuple) else (output,)))


def onnx_providers(device_id: int | None = None) -> list[Any]:
    """CUDAExecutionProvider first when onnxruntime-gpu sees a GPU (GPU `device_id` when given), else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers: list[Any] = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    if device_id is not None and providers[0] == "CUDAExecutionProvider":
        providers[0] = ("CUDAExecutionProvider", {"device_id": device_id})
    return providers


class OnnxBackend:
    name = "onnx"

    def __init__(self, path: Path, threads: int | None = None, device_id: int | None = None):
        import onnxruntime as ort

        self.path = path
        if not path.is_file():
            raise CmftError(f"{path}: file not found; run `cmft export RUN_DIR --onnx` first")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=onnx_providers(device_id))
        except Exception as exc:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, …) for a bad file
            raise CmftError(f"{path}: not a loadable ONNX model ({type(exc).__name__}); export it again") from None
        self.provider = self.session.get_providers()[0]
        self.output_names = [output.name for output in self.session.get_outputs()]

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The task's output only: a further output (ICD label attention) is not copied out unless asked for."""
        return self.session.run(self.output_names[:1], {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    def outputs(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self.session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask}))


# running ------------------------------------------------------------------------------------------------------
def run_units(loaded: Loaded, backend: Backend, units: list[Unit], batch_size: int,
              progress: bool | Progress = False, pad_id: int | None = None) -> list[np.ndarray]:  # fmt: skip
    """Outputs per unit, computed in length-sorted batches (little padding) and returned in unit order. `progress`:
    True for a bar on a terminal, or a function told how far it got after every batch."""
    pad_id = loaded.pad_id if pad_id is None else pad_id
    order = sorted(range(len(units)), key=lambda i: units[i].length)
    outputs: list[Any] = [None] * len(units)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    bar = _progress(len(batches)) if progress is True else None
    done = 0
    for batch in batches:
        ids, mask = loaded.task.collate([units[i] for i in batch], pad_id, loaded.meta)
        result = backend(ids, mask)
        for row, index in enumerate(batch):
            outputs[index] = result[row]
        done += len(batch)
        if bar is not None:
            bar[0].advance(bar[1])
        elif callable(progress):
            progress(done, len(units))
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
                  progress: bool | Progress = False) -> tuple[list[dict[str, Any]], dict[str, int]]:  # fmt: skip
    """One prediction per text, and the counts of truncated / windowed texts."""
    units, counts = loaded.task.encode(loaded.tokenizer, texts, loaded.meta)
    outputs = run_units(loaded, backend, units, batch_size, progress) if units else []
    by_text: dict[int, list[int]] = {}
    for k, unit in enumerate(units):
        by_text.setdefault(unit.text, []).append(k)
    results = []
    for index, text in enumerate(texts):
        keys = by_text.get(index, [])
        results.append(loaded.task.decode(loaded.meta, text, [outputs[k] for k in keys], [units[k] for k in keys]))
    return results, counts


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
