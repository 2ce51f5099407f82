"""Model rows and the back ends that run them: a `Unit` is one input row (a text, or one window of a long NER text); a
back end maps a padded batch (input_ids, attention_mask) to the model's output in torch or onnxruntime, so the two
share everything but the forward pass and their outputs can be compared; `run_batches` is the one batching loop.

Below every task and every command: tasks run their own modules through it (ICD evidence, retrieval's dev
evaluation), and cmft.inference, cmft.evaluation and the fine-tuning engine run tasks through it. It imports no task.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from cmft.errors import CmftError

Backend = Callable[[np.ndarray, np.ndarray], Any]
"""A padded batch (int64 input_ids, attention_mask) → the output per row (an array, or rows of a task's own)."""
Progress = Callable[[int, int], None]  # told (units done, units in all) after every batch
Collate = Callable[[list["Unit"]], tuple[np.ndarray, np.ndarray]]


def token_count(input_ids: list) -> int:
    """Tokens in one input row: a list of ids, or (chunked ICD notes) a list of chunks."""
    return sum(len(chunk) for chunk in input_ids) if input_ids and isinstance(input_ids[0], list) else len(input_ids)


@dataclass
class Unit:
    """One model input row: a whole text, or one window of a long NER text."""

    text: int
    input_ids: Any
    """A list of ids, or (chunked ICD notes) a list of chunks."""
    window: dict | None = None
    truncated: bool = False
    """The text was cut to fit the model (never set for NER windows, which keep everything)."""
    offsets: list | None = None
    """(start, end) in the text of each of its tokens, when evidence is asked for (ICD coding)."""

    @property
    def length(self) -> int:
        return token_count(self.input_ids)


def pad_rows(units: list[Unit], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, T] int64 input_ids and attention_mask, right-padded to the longest row."""
    length = max(len(u.input_ids) for u in units)
    ids = np.full((len(units), length), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, unit in enumerate(units):
        ids[row, : len(unit.input_ids)] = unit.input_ids
        mask[row, : len(unit.input_ids)] = 1
    return ids, mask


def per_text(units: list[Unit], outputs: list[Any], n_texts: int) -> list[tuple[list[Any], list[Unit]]]:
    """Each text's (outputs, units), in unit order: what a task's `decode` takes for one text (several NER windows)."""
    grouped: list[tuple[list[Any], list[Unit]]] = [([], []) for _ in range(n_texts)]
    for unit, output in zip(units, outputs, strict=True):
        grouped[unit.text][0].append(output)
        grouped[unit.text][1].append(unit)
    return grouped


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
def run_batches(units: list[Unit], collate: Collate, backend: Backend, batch_size: int,
                progress: bool | Progress = False) -> list[Any]:  # fmt: skip
    """Outputs per unit, computed in length-sorted batches (little padding) and returned in unit order. `collate`
    pads a batch of units (the task's `collate`); `progress`: True for a bar on a terminal, or a function told how far
    it got after every batch."""
    order = sorted(range(len(units)), key=lambda i: units[i].length)
    outputs: list[Any] = [None] * len(units)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    bar = _progress(len(batches)) if progress is True else None
    done = 0
    for batch in batches:
        ids, mask = collate([units[i] for i in batch])
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


def _progress(total: int) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        return None
    progress = Progress(TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, transient=True)  # fmt: skip
    progress.start()
    return progress, progress.add_task("predict", total=total)
