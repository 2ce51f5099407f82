"""Inference speed per head: PyTorch (eager, sdpa) vs onnxruntime fp32 vs onnxruntime int8, on CPU.

For each head (note classification, NER, ICD coding, retrieval) a run is fine-tuned briefly from the encoder
(or taken from --run TASK=DIR), exported with `cmft export --onnx --quantize int8`, and timed on a batch of
8 × 256 tokens and on one 2,048-token note (median of repeated runs after warm-up, same thread count for both
engines). The int8 metric loss is the dev metric before and after quantisation, from the export's parity.json.

    python benchmarks/inference.py [--encoder runs/pretrain/latest/model] [--steps 60] [--threads 2]
        [--run note_classification=runs/finetune/...] [--repeats 10]

Prints one JSON line last: {"min_speedup_fp32", "min_speedup_int8", "max_int8_metric_loss", "heads": {...}}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cmft.export import export_run  # noqa: E402
from cmft.finetuning.run import finetune  # noqa: E402
from cmft.inference import load_run  # noqa: E402
from cmft.predict import OnnxBackend, TorchBackend  # noqa: E402

RECIPES = {"note_classification": [], "ner": [], "icd_coding": [], "retrieval": []}
SHAPES = {"batch8x256": (8, 256), "note2048": (1, 2048)}


def inputs(vocabulary: int, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(0)
    ids = generator.integers(5, vocabulary, size=(batch, length), dtype=np.int64)
    return ids, np.ones_like(ids)


def timed(backend, ids: np.ndarray, mask: np.ndarray, repeats: int) -> float:
    for _ in range(2):
        backend(ids, mask)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        backend(ids, mask)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_head(task: str, run: Path, root: Path, args: argparse.Namespace) -> dict:
    folder, report = export_run(run, root / f"export-{task}", quantize="int8")
    loaded = load_run(run)
    engines = {
        "torch": TorchBackend(loaded.module),
        "ort_fp32": OnnxBackend(folder / "model.onnx", threads=args.threads),
        "ort_int8": OnnxBackend(folder / "model.int8.onnx", threads=args.threads),
    }
    result: dict = {"parity_max_abs_diff": report["max_abs_diff"]}
    for shape, (batch, length) in SHAPES.items():
        ids, mask = inputs(len(loaded.tokenizer), batch, length)
        latencies = {name: timed(engine, ids, mask, args.repeats if length <= 256 else max(3, args.repeats // 2))
                     for name, engine in engines.items()}  # fmt: skip
        result[shape] = {
            **{f"{name}_ms": round(1000 * value, 2) for name, value in latencies.items()},
            **{f"{name}_tokens_per_s": round(batch * length / value) for name, value in latencies.items()},
            "speedup_fp32": round(latencies["torch"] / latencies["ort_fp32"], 2),
            "speedup_int8": round(latencies["torch"] / latencies["ort_int8"], 2),
        }
    q = report["int8"]
    result |= {"metric": q.get("metric"), "dev_fp32": q.get("fp32"), "dev_int8": q.get("int8"),
               "int8_metric_loss": q.get("loss"), "size_mb_fp32": q["size_mb_fp32"],
               "size_mb_int8": q["size_mb_int8"]}  # fmt: skip
    return result


def gemm_floor(encoder: str, torch_ms: float, batch: int, length: int) -> dict:
    """How fast any engine could be at batch × length on this CPU: the encoder's linear layers alone (the bulk of
    the work at 256 tokens) at the matrix-multiply rate torch reaches on the same shapes."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(encoder)
    h, i, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    tokens = batch * length
    shapes = [(h, 3 * h), (h, h), (h, 2 * i), (i, h)]  # Wqkv, Wo, Wi (gated: 2 × intermediate), mlp Wo
    flops = 2 * tokens * layers * sum(a * b for a, b in shapes)
    seconds = 0.0
    for a, b in shapes:  # each shape's best time over repeats, as one layer computes it
        x, w = torch.randn(tokens, a), torch.randn(a, b)
        for _ in range(3):
            x @ w
        seconds += layers * min(timed_call(lambda x=x, w=w: x @ w) for _ in range(10))
    floor_ms = 1000 * seconds
    return {"linear_gflop": round(flops / 1e9, 2), "matmul_gflops_per_s": round(flops / seconds / 1e9, 1),
            "linear_floor_ms": round(floor_ms, 1), "torch_ms": torch_ms,
            "max_speedup_if_only_linear_layers_ran": round(torch_ms / floor_ms, 2)}  # fmt: skip


def timed_call(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="runs/pretrain/latest/model")
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps per head when no --run is given")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--run", action="append", default=[], help="TASK=RUN_DIR: use this finished run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    given = dict(item.split("=", 1) for item in args.run)
    heads = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for task in RECIPES:
            run = Path(given[task]) if task in given else finetune(
                task, [f"model.encoder={Path(args.encoder).resolve()}", f"training.max_steps={args.steps}",
                       f"training.threads={args.threads}"], output_dir=root / task,
            )  # fmt: skip
            heads[task] = bench_head(task, run, root, args)
            print(task, json.dumps(heads[task]), flush=True)
    speedups = [h[s]["speedup_fp32"] for h in heads.values() for s in SHAPES]
    speedups_int8 = [h[s]["speedup_int8"] for h in heads.values() for s in SHAPES]
    losses = [h["int8_metric_loss"] for h in heads.values() if h["int8_metric_loss"] is not None]
    batch, length = SHAPES["batch8x256"]
    torch_ms = min(h["batch8x256"]["torch_ms"] for h in heads.values())
    floor = gemm_floor(str(Path(args.encoder).resolve()), torch_ms, batch, length)
    print(json.dumps({"benchmark": "inference", "threads": args.threads, "min_speedup_fp32": min(speedups),
                      "min_speedup_int8": min(speedups_int8), "max_int8_metric_loss": max(losses) if losses else None,
                      "batch8x256_floor": floor, "heads": heads}))  # fmt: skip


if __name__ == "__main__":
    main()
