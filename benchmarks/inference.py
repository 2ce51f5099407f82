"""Inference speed per head: PyTorch (eager, sdpa) vs onnxruntime fp32 vs onnxruntime int8, on CPU.

For each head (note classification, NER, ICD coding, retrieval) a run is fine-tuned briefly from the encoder
(or taken from --run TASK=DIR), exported with `cmft export --onnx --quantize int8`, and timed on a batch of
8 × 256 tokens and on one 2,048-token note (median over five rounds in which each engine warms up and runs
several times in a row; same thread count for both). The int8 metric loss is the dev metric before and after
quantisation, from the export's parity.json. Each shape also gets onnxruntime's own profile of the fp32 and
int8 graphs: the milliseconds spent in matrix-multiply kernels, in everything else and per op type, and the
speed-up over torch that would remain if only the matrix multiplies ran (`batch8x256_matmul_bound`: the lowest over
heads). `ort_fused` times the fp32 graph after onnxruntime's transformer optimizer (BERT fusions, exact GELU), with
the fusions it found and its difference from the plain graph; `ort_static_int8` a static int8 graph calibrated on
the run's dev split, with its dev metric; `ort_fp32_unfused` and `ort_int8_unfused` the graphs exported without
the fused global attention (`cmft.attention.FUSED_GLOBAL_ATTENTION`), the before of each before/after.

    python benchmarks/inference.py [--encoder runs/pretrain/latest/model] [--steps 60] [--threads 2]
        [--run note_classification=runs/finetune/...] [--repeats 12] [--results benchmarks/results/inference.json]

onnxruntime's speed-up over torch depends on the CPU (its vector extensions: AVX2, AVX-512, VNNI, AMX): the results
file records the CPU model and its extensions beside the figures.

Prints one JSON line last: {"min_speedup_fp32", "min_speedup_int8", "max_int8_metric_loss",
"batch8x256_matmul_bound", "heads": {...}}.
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
from cmft.inference import OnnxBackend, TorchBackend, load_run  # noqa: E402

RECIPES = {"note_classification": [], "ner": [], "icd_coding": [], "retrieval": []}
SHAPES = {"batch8x256": (8, 256), "note2048": (1, 2048)}


def inputs(vocabulary: int, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(0)
    ids = generator.integers(5, vocabulary, size=(batch, length), dtype=np.int64)
    return ids, np.ones_like(ids)


def timed(engines: dict, ids: np.ndarray, mask: np.ndarray, repeats: int, rounds: int = 5) -> dict[str, float]:
    """Median latency per engine over `rounds` rounds; in each round every engine runs a warm-up and then
    `repeats` times in a row. Rounds spread a slow spell on a shared machine over all engines; runs within a round
    stay consecutive because each engine's idle worker threads spin for a while after a call and would slow the
    next engine down if engines alternated call by call."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            for _ in range(2):
                engine(ids, mask)
            for _ in range(max(1, repeats // rounds)):
                started = time.perf_counter()
                engine(ids, mask)
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


MATMUL_OPS = {"MatMul", "FusedMatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


def matmul_floor(path: Path, threads: int, ids: np.ndarray, mask: np.ndarray, runs: int = 5) -> dict:
    """onnxruntime's own profile of one model: milliseconds per run spent in matrix-multiply kernels, in
    everything else, and per op type. The matmul time is a floor for this graph on this CPU: no rewrite of the other
    ops can make a run faster than it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = threads, 3
    options.enable_profiling = True
    options.profile_file_prefix = str(path.parent / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, {"input_ids": ids, "attention_mask": mask})
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    spent = {"matmul": 0.0, "other": 0.0}
    by_op: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op, ms = event["args"]["op_name"], event["dur"] / 1000 / runs
            spent["matmul" if op in MATMUL_OPS else "other"] += ms
            by_op[op] = by_op.get(op, 0.0) + ms
    ops = {op: round(ms, 2) for op, ms in sorted(by_op.items(), key=lambda item: -item[1])}
    return {**{f"{kind}_ms": round(value, 1) for kind, value in spent.items()}, "ms_per_op_type": ops}


def transformer_fusions(folder: Path) -> tuple[Path, dict[str, int]]:
    """onnxruntime's transformer optimizer (BERT fusions, exact GELU kept) on the fp32 graph: which fusions
    ModernBERT's pattern allows, as a graph to time beside the plain export."""
    import logging

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    options = FusionOptions("bert")
    options.enable_gelu_approximation = False  # FastGelu's tanh form is not exact
    model = optimize_model(str(folder / "model.onnx"), model_type="bert", num_heads=0, hidden_size=0,
                           optimization_options=options, opt_level=0)  # fmt: skip
    path = folder / "model.fused.onnx"
    model.save_model_to_file(str(path))
    return path, {op: n for op, n in model.get_fused_operator_statistics().items() if n}


def static_int8(loaded, folder: Path, rows: int = 64) -> Path:
    """Static (calibrated) int8 of the fp32 graph: activation scales fixed once from the first `rows` rows of the
    run's dev split (QDQ format, per-channel int8 weights, uint8 activations, matrix multiplies only)."""
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from cmft.tasks import get_task
    from cmft.tasks.base import Unit

    task = get_task(loaded.recipe)
    task.restore(loaded.meta)
    task.prepare(loaded.tokenizer, splits=("dev",))
    units = sorted((Unit(i, row["input_ids"]) for i, row in enumerate(task.datasets["dev"][:rows])),
                   key=lambda unit: unit.length)  # fmt: skip
    feeds = []
    for start in range(0, len(units), 8):
        ids, mask = loaded.task.collate(units[start : start + 8], loaded.pad_id, loaded.meta)
        feeds.append({"input_ids": ids, "attention_mask": mask})

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    path = folder / "model.static.onnx"
    level, logging.getLogger().level = logging.getLogger().level, logging.ERROR
    try:
        quantize_static(str(folder / "model.onnx"), str(path), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        op_types_to_quantize=["MatMul"])  # fmt: skip
    finally:
        logging.getLogger().setLevel(level)
    return path


def bench_head(task: str, run: Path, root: Path, args: argparse.Namespace) -> dict:
    import cmft.attention

    cmft.attention.FUSED_GLOBAL_ATTENTION = False  # the graph as exported before the fused global attention
    before, _ = export_run(run, root / f"export-{task}-unfused", quantize="int8")
    cmft.attention.FUSED_GLOBAL_ATTENTION = True
    folder, report = export_run(run, root / f"export-{task}", quantize="int8")
    loaded = load_run(run)
    fused_path, fused = transformer_fusions(folder)
    static_path = static_int8(loaded, folder)
    engines = {
        "torch": TorchBackend(loaded.module),
        "ort_fp32": OnnxBackend(folder / "model.onnx", threads=args.threads),
        "ort_int8": OnnxBackend(folder / "model.int8.onnx", threads=args.threads),
        "ort_fused": OnnxBackend(fused_path, threads=args.threads),
        "ort_static_int8": OnnxBackend(static_path, threads=args.threads),
        "ort_fp32_unfused": OnnxBackend(before / "model.onnx", threads=args.threads),
        "ort_int8_unfused": OnnxBackend(before / "model.int8.onnx", threads=args.threads),
    }
    result: dict = {"parity_max_abs_diff": report["max_abs_diff"], "transformer_fusions": fused}
    for shape, (batch, length) in SHAPES.items():
        ids, mask = inputs(len(loaded.tokenizer), batch, length)
        latencies = timed(engines, ids, mask, args.repeats if length <= 256 else max(3, args.repeats // 2))
        result[shape] = {
            **{f"{name}_ms": round(1000 * value, 2) for name, value in latencies.items()},
            **{f"{name}_tokens_per_s": round(batch * length / value) for name, value in latencies.items()},
            "speedup_fp32": round(latencies["torch"] / latencies["ort_fp32"], 2),
            "speedup_int8": round(latencies["torch"] / latencies["ort_int8"], 2),
            "speedup_fused": round(latencies["torch"] / latencies["ort_fused"], 2),
            "speedup_static_int8": round(latencies["torch"] / latencies["ort_static_int8"], 2),
            "speedup_fp32_unfused": round(latencies["torch"] / latencies["ort_fp32_unfused"], 2),
            "speedup_int8_unfused": round(latencies["torch"] / latencies["ort_int8_unfused"], 2),
            "fused_max_abs_diff": float(np.abs(engines["ort_fp32"](ids, mask) - engines["ort_fused"](ids, mask)).max()),
        }
        floors = {name: matmul_floor(where / f"{file}.onnx", args.threads, ids, mask)
                  for name, where, file in (("ort_fp32", folder, "model"), ("ort_int8", folder, "model.int8"),
                                            ("ort_fp32_unfused", before, "model"),
                                            ("ort_int8_unfused", before, "model.int8"))}  # fmt: skip
        result[shape]["ort_profile"] = {
            name: {**spent, "max_speedup_if_only_matmuls_ran": round(1000 * latencies["torch"] / spent["matmul_ms"], 2)}
            for name, spent in floors.items()
        }  # fmt: skip
    q = report["int8"]
    if q.get("metric"):
        from cmft.evaluation import evaluate_loaded

        static = evaluate_loaded(loaded, engines["ort_static_int8"], "dev")[q["metric"]]
        result |= {"dev_static_int8": static, "static_int8_metric_loss": q["fp32"] - static}
    result |= {"metric": q.get("metric"), "dev_fp32": q.get("fp32"), "dev_int8": q.get("int8"),
               "int8_metric_loss": q.get("loss"), "size_mb_fp32": q["size_mb_fp32"],
               "size_mb_int8": q["size_mb_int8"]}  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="runs/pretrain/latest/model")
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps per head when no --run is given")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--run", action="append", default=[], help="TASK=RUN_DIR: use this finished run")
    parser.add_argument("--results", help="also write the record, with its provenance, to this file")
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
    floor = {name: min(h["batch8x256"]["ort_profile"][name]["max_speedup_if_only_matmuls_ran"] for h in heads.values())
             for name in ("ort_fp32", "ort_int8")}  # fmt: skip
    result = {"benchmark": "inference", "threads": args.threads, "min_speedup_fp32": min(speedups),
              "min_speedup_int8": min(speedups_int8), "max_int8_metric_loss": max(losses) if losses else None,
              "batch8x256_matmul_bound": floor, "heads": heads}  # fmt: skip
    if args.results:
        sys.path.insert(0, str(Path(__file__).parent))
        from provenance import provenance, write_results

        write_results(args.results, {**provenance(), **result})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
