"""`cmft export --onnx`: one self-contained folder per run, parity-checked against PyTorch, optional int8.

The graph is `torch.onnx.export` of the run's inference module (cmft.inference) traced on CPU (never
flash-attention) with dynamic batch and sequence axes. ModernBERT encoders are traced with cmft's banded attention
(cmft.attention: local layers compute only their ±window band, exactly; global layers as onnxruntime's fused
`com.microsoft.MultiHeadAttention`, recorded in parity.json's `fused_ops`), other encoders with eager attention
(sdpa exports with NaN guards that cost onnxruntime 1.5x on long notes). Parity is checked against the PyTorch
model that `cmft predict` runs on CPU (fp32, banded attention for ModernBERT, sdpa for others, on any device:
never flash-attention), named in parity.json's `reference`, on every output of the graph (an ICD model with label
attention has two: `probabilities`, then `label_attention`, which `cmft predict --evidence` reads; parity.json's
`per_output`). The folder holds model.onnx
(+ model.int8.onnx), the tokenizer, cmft_export.json (the run's manifest, model/cmft_task.json: task, labels, ICD
threshold, pooling, max_length; plus the graph's outputs and opset), README.md (the model card, cmft.cards) and
parity.json.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, PositiveFloat, PositiveInt

from cmft.backends import OnnxBackend, TorchBackend
from cmft.cards import write_export_card
from cmft.config import StrictModel, load_config
from cmft.errors import CmftError
from cmft.inference import MANIFEST, Loaded, load_run
from cmft.onnx_forms import export_forms
from cmft.paths import bundled_file


class ParityError(CmftError):
    """The exported graph disagrees with PyTorch beyond the tolerance: exit status 1 (a failure, not bad input)."""

    exit_code = 1


class ExportConfig(StrictModel):
    opset: int = Field(18, ge=14, le=21)
    trace_length: PositiveInt = 64
    check_lengths: list[PositiveInt] = [17, 96, 200, 700]
    check_batch: PositiveInt = 3
    tolerance: PositiveFloat = 1e-4
    check_model: bool = True


def load_export_config(overrides: list[str] | None = None) -> ExportConfig:
    """The bundled export profile (always the package's copy) with the command line's key=value overrides."""
    return load_config(ExportConfig, bundled_file("export/onnx.yaml"), overrides)


def export_run(run_dir: str | Path | None = None, output_dir: str | Path | None = None, quantize: str | None = None,
               overrides: list[str] | None = None) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    """Export, check parity (and int8), and return (folder, parity report). Parity failure: ParityError (exit 1),
    with the folder kept and marked FAILED for inspection."""
    if quantize not in (None, "int8"):
        raise CmftError(f"--quantize {quantize}: only int8 is supported")
    config = load_export_config(overrides)
    run_dir = Path(run_dir or "runs/finetune/latest")
    attention = traced_attention(run_dir)
    loaded = load_run(run_dir, attention=attention)
    final = Path(output_dir) if output_dir else Path("export") / run_dir.resolve().name
    work = final.with_name(final.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir(parents=True)
    except OSError as exc:
        raise CmftError(f"--output-dir: {final}: cannot create it ({exc.strerror})") from None
    try:
        report = _export_into(loaded, work, config, quantize, run_dir, attention)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    work.rename(final)
    if not report["passed"]:
        (final / "FAILED").write_text("parity check failed: see parity.json\n", encoding="utf-8")
        raise ParityError(
            f"{final}: ONNX output differs from PyTorch by {report['max_abs_diff']:.2e} "
            f"(tolerance {report['tolerance']:.0e}); the folder is marked FAILED"
        )
    return final, report


def traced_attention(run_dir: Path) -> str:
    """cmft's banded attention for ModernBERT (exact, and far cheaper on long notes); eager for other encoders."""
    try:
        model_type = json.loads((run_dir / "model" / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        model_type = None  # load_run names the problem
    if model_type == "modernbert":
        from cmft.attention import EXPORT_IMPLEMENTATION, register

        register()
        return EXPORT_IMPLEMENTATION
    return "eager"


def _export_into(loaded: Loaded, work: Path, config: ExportConfig, quantize: str | None, run_dir: Path,
                 attention: str) -> dict:  # fmt: skip
    task = loaded.task
    model_path = work / "model.onnx"
    started = time.monotonic()
    _trace(loaded, model_path, config)
    if config.check_model:
        import onnx

        onnx.checker.check_model(str(model_path))
    loaded.tokenizer.save_pretrained(work)
    backend = OnnxBackend(model_path)
    meta = {**loaded.meta, "output": task.output, "outputs": backend.output_names, "opset": config.opset,
            "source_run": str(run_dir.resolve())}  # fmt: skip
    (work / MANIFEST).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    report: dict[str, Any] = {"task": task.name, "provider": backend.provider, "tolerance": config.tolerance,
                              "export_seconds": round(time.monotonic() - started, 1), "traced_attention": attention,
                              "fused_ops": _fused_ops(model_path)}  # fmt: skip
    reference = load_run(run_dir, parity=True)  # what `cmft predict` runs on CPU: banded or sdpa, fp32
    reference_backend = TorchBackend(task.exported(reference.module, reference.meta)[0])
    ran = reference_backend.ran()
    report["reference"] = f"pytorch {ran['inference_attention']} {ran['inference_dtype']}"
    per_length, per_output, counts = _parity(reference, reference_backend, backend, config)
    report |= {"max_abs_diff": max(per_length.values()), "per_length": per_length, "per_output": per_output, **counts}
    report["passed"] = report["max_abs_diff"] <= config.tolerance
    if quantize == "int8":
        report["int8"] = _quantize(reference, work, config, run_dir, backend)
    (work / "parity.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    write_export_card(work, run_dir, meta, report)
    return report


def _fused_ops(path: Path) -> dict[str, int]:
    """The onnxruntime contrib ops (com.microsoft) the graph uses, counted: what the export applied beyond ONNX."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.domain == "com.microsoft":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _sample(loaded: Loaded, length: int, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random real-vocabulary ids between [CLS] and [SEP]; row r keeps about length/(r+1) tokens (padding)."""
    tokenizer, meta = loaded.tokenizer, loaded.meta
    generator = np.random.default_rng(seed)
    special = set(tokenizer.all_special_ids)
    vocabulary = np.array([i for i in range(len(tokenizer)) if i not in special])
    cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    rows = []
    for row in range(batch):
        size = max(3, length // (row + 1))
        rows.append([cls_id, *generator.choice(vocabulary, size - 2).tolist(), sep_id])
    units = [loaded.task.unit(i, row, meta) for i, row in enumerate(rows)]
    return loaded.task.collate(units, tokenizer.pad_token_id or 0, meta)


def _trace(loaded: Loaded, path: Path, config: ExportConfig) -> None:
    ids, mask = _sample(loaded, config.trace_length, 2, seed=0)
    axes = {0: "batch", 1: "chunks", 2: "sequence"} if ids.ndim == 3 else {0: "batch", 1: "sequence"}
    module, outputs = loaded.task.exported(loaded.module, loaded.meta)  # the task's output first
    with warnings.catch_warnings(), torch.no_grad(), export_forms(module):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (torch.from_numpy(ids), torch.from_numpy(mask)), str(path),
            input_names=["input_ids", "attention_mask"], output_names=list(outputs),
            dynamic_axes={"input_ids": axes, "attention_mask": axes, **outputs},
            opset_version=config.opset, dynamo=False, custom_opsets={"com.microsoft": 1},
        )  # fmt: skip


def _parity(loaded: Loaded, torch_backend: TorchBackend, backend: OnnxBackend, config: ExportConfig
            ) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:  # fmt: skip
    """Worst |onnx − torch| per checked length and per graph output (every output: the ICD label attention too),
    over real (unpadded) positions for token outputs, as the task's parity_view shows them; its counts summed."""
    per_length, per_output, counts = {}, dict.fromkeys(backend.output_names, 0.0), {}
    for length in config.check_lengths:
        ids, mask = _sample(loaded, length, config.check_batch, seed=length)
        expected, got, seen = loaded.task.parity_view(backend.output_names, torch_backend.outputs(ids, mask),
                                                      backend.outputs(ids, mask))  # fmt: skip
        counts = {name: counts.get(name, 0) + value for name, value in seen.items()}
        worst = 0.0
        for name, want, have in zip(backend.output_names, expected, got, strict=True):
            difference = np.abs(want.astype(np.float64) - have.astype(np.float64))
            if loaded.task.token_level:
                difference = difference[mask.astype(bool)]
            per_output[name] = max(per_output[name], float(difference.max()))
            worst = max(worst, float(difference.max()))
        per_length[str(length)] = worst
    return per_length, per_output, counts


def _quantize(loaded: Loaded, work: Path, config: ExportConfig, run_dir: Path, fp32: OnnxBackend) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = work / "model.int8.onnx"
    root = logging.getLogger()
    level, root.level = root.level, logging.WARNING  # the quantizer logs every node it skips at INFO
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(work / "model.onnx"), str(path), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    int8 = OnnxBackend(path)
    report: dict[str, Any] = {"size_mb_fp32": round((work / "model.onnx").stat().st_size / 2**20, 2),
                              "size_mb_int8": round(path.stat().st_size / 2**20, 2)}  # fmt: skip
    ids, mask = _sample(loaded, max(config.check_lengths), config.check_batch, seed=1)
    report["max_abs_diff_vs_fp32"] = float(np.abs(fp32(ids, mask) - int8(ids, mask)).max())
    if loaded.recipe is not None and loaded.recipe.data.dev is not None:
        from cmft.evaluation import evaluate_loaded

        metric = loaded.task.metric_for_best
        before, after = evaluate_loaded(loaded, fp32, "dev")[metric], evaluate_loaded(loaded, int8, "dev")[metric]
        report |= {"metric": metric, "split": "dev", "fp32": before, "int8": after, "loss": before - after}
    return report
