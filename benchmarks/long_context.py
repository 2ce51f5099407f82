"""Long notes on CPU: transformers' sdpa as shipped, flex attention, and cmft's chosen path (banded attention).

Part 1, the encoder alone. ModernBERT-base geometry (22 layers, hidden 768, 12 heads, intermediate 1152, a 128-token
local window on two layers of three), random weights (seed 0), batch 1, 2 threads, at 1,024 / 2,048 / 4,096 / 8,192
tokens: forward (no grad) and forward+backward, for
- `sdpa`: transformers' ModernBERT with attn_implementation="sdpa" (local layers get a masked [L × L] score matrix);
- `flex`: transformers' flex_attention path (block-sparse masks, torch.compile; forward only — torch 2.13 has no
  CPU backward for it); the first call's extra time is reported as compile time;
- `cmft`: what `model.attention: auto` picks on this machine (cmft.modeling.choose_attention): banded attention.
Forward+backward at 8,192 also runs with gradient checkpointing for sdpa and cmft. Each setting runs in its own
process, so its peak resident memory (ru_maxrss, weights and interpreter included) is its own, and one that runs
out of memory is reported as `oom`. Time: every setting gets the same warm-up, one untimed call (at the same
length: flex compiles per shape, and the first call of the others allocates their buffers), then the same number
of timed calls (`--repeats`, default 3), reported as the median with the spread (max - min).
`max_abs_diff`: cmft's and flex's last hidden states against sdpa's, every length.

Part 2, whole-note ICD coding on the long-note set (benchmarks/make_long_notes.py: CodiEsp case reports joined into
constructed notes of 2,048-8,192 tokens) with the tiny encoder at training.max_length 4,096: `icd_coding.mode` whole
vs chunked (PLM-ICD segments of 256), the same recipe otherwise; test micro F1 and train/test examples/s.

Part 3, whole-note ICD coding at 8,192 tokens with a ModernBERT-base-geometry encoder (random weights, the tiny
encoder's tokenizer): a few steps at batch 1, then test predictions; time and peak memory.

    python benchmarks/long_context.py [--quick] [--encoder runs/pretrain/latest/model] [--skip-icd]
        [--lengths 1024 2048 4096 8192] [--repeats 3] [--skip-checkpointing]
        [--results benchmarks/results/long_context.json]
    python benchmarks/long_context.py --short     # the rule's short end: batch 8 at 128 / 256 / 512 tokens
    python benchmarks/long_context.py --memory    # peak memory at 8,192 tokens with glibc's mmap threshold fixed

`--quick` (the suite's smoke test): a small geometry at 256 / 1,024 tokens in one process, no flex, two ICD
steps. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

BASE = {"hidden_size": 768, "num_hidden_layers": 22, "num_attention_heads": 12, "intermediate_size": 1152,
        "local_attention": 128, "global_attn_every_n_layers": 3, "vocab_size": 50368}  # fmt: skip
SMALL = {**BASE, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 96,
         "vocab_size": 1000}  # fmt: skip
THREADS = 2


def child(spec: dict) -> dict:
    """One setting in this process: build the model, time it, report peak memory (and the diff against sdpa)."""
    import numpy as np
    import torch
    from transformers import ModernBertConfig, ModernBertModel

    from cmft.memory import enable_checkpointing
    from cmft.modeling import choose_attention

    torch.set_num_threads(THREADS)
    implementation = spec["path"]
    if implementation == "cmft":
        implementation = choose_attention("auto", "modernbert", training=spec["mode"] == "train").implementation
    elif implementation == "flex":
        implementation = "flex_attention"
    torch.manual_seed(0)
    config = ModernBertConfig(**spec["geometry"], max_position_embeddings=8192, pad_token_id=0)
    config._attn_implementation = implementation
    model = ModernBertModel(config)
    ids = torch.randint(5, config.vocab_size, (spec.get("batch", 1), spec["length"]),
                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    mask = torch.ones_like(ids)
    train = spec["mode"] == "train"
    if train and spec["checkpointing"]:
        enable_checkpointing(model)
    model.train(train)

    def once() -> tuple[float, torch.Tensor]:
        started = time.perf_counter()
        if train:
            states = model(input_ids=ids, attention_mask=mask).last_hidden_state
            states.float().square().mean().backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                states = model(input_ids=ids, attention_mask=mask).last_hidden_state
        return time.perf_counter() - started, states.detach()

    first, states = once()  # the warm-up, the same for every setting
    times = []
    for _ in range(spec.get("repeats", 3)):
        seconds, states = once()
        times.append(seconds)
    seconds = statistics.median(times)
    result = {"seconds": round(seconds, 3), "runs": len(times), "spread_s": round(max(times) - min(times), 3),
              "warmup_s": round(first, 3), "implementation": implementation}  # fmt: skip
    if spec["path"] == "flex":
        result["compile_s"] = round(first - seconds, 1)
    reference = Path(spec["reference"]) if spec.get("reference") else None
    if reference is None or train:
        pass
    elif spec["path"] == "sdpa":
        np.save(reference, states[0].numpy())
    elif reference.is_file():
        result["max_abs_diff"] = float(np.abs(np.load(reference) - states[0].numpy()).max())
    result["peak_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 2)
    return result


def run_setting(spec: dict, in_process: bool = False) -> dict:
    """Run one setting in a fresh process; a process killed for memory (or failing to allocate) is `oom`.
    `in_process` (quick mode): here, without the interpreter start-up, peak memory then being the process's."""
    row = {key: spec[key] for key in ("path", "mode", "length", "checkpointing")}
    if in_process:
        return row | child(spec)
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONPATH": str(ROOT / "src")}
    if spec.get("exact_memory"):  # glibc keeps freed blocks under its (rising) mmap threshold: peak RSS then
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)  # depends on timing; fixed at 1 MiB it follows live memory
    if spec["path"] == "flex":  # a cold compile every time: inductor's on-disk cache would hide it on a rerun
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    process = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                             env=env)  # fmt: skip
    lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
    if process.returncode == 0 and lines:
        row |= json.loads(lines[-1])
    elif (
        process.returncode in (-9, 137) or "out of memory" in process.stderr.lower() or "MemoryError" in process.stderr
    ):
        row["oom"] = True
    else:
        row["error"] = (process.stderr.strip().splitlines() or [f"exit {process.returncode}"])[-1][:300]
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def encoder_benchmark(geometry: dict, lengths: list[int], quick: bool, folder: Path, repeats: int,
                      checkpointing_rows: bool = True) -> list[dict]:  # fmt: skip
    rows = []
    longest = max(lengths)
    for length in lengths:
        reference = str(folder / f"sdpa_{length}.npy")
        plan = [("sdpa", "forward", False), ("cmft", "forward", False)]
        if not quick:
            plan.append(("flex", "forward", False))
        if not quick or length == longest:
            plan += [("sdpa", "train", False), ("cmft", "train", False)]
        if length == longest and checkpointing_rows:
            plan += [("sdpa", "train", True), ("cmft", "train", True)]
        for path, mode, checkpointing in plan:
            rows.append(run_setting({"path": path, "mode": mode, "length": length, "checkpointing": checkpointing,
                                     "geometry": geometry, "reference": reference, "repeats": repeats},
                                    in_process=quick))  # fmt: skip
    return rows


def pick(rows: list[dict], path: str, mode: str, length: int, checkpointing: bool = False) -> dict:
    for row in rows:
        if (row["path"], row["mode"], row["length"], row["checkpointing"]) == (path, mode, length, checkpointing):
            return row
    return {}


def ratio(a: dict, b: dict, key: str = "seconds") -> float | None:
    return round(a[key] / b[key], 3) if key in a and key in b and b[key] else None


def summarise(rows: list[dict], lengths: list[int]) -> dict:
    top, second = lengths[-1], lengths[-3] if len(lengths) >= 3 else lengths[0]
    cmft_top, sdpa_top = pick(rows, "cmft", "forward", top), pick(rows, "sdpa", "forward", top)

    def memory(path: str, checkpointing: bool) -> float | str | None:
        row = pick(rows, path, "train", top, checkpointing)
        return "oom" if row.get("oom") else row.get("peak_gb")

    diffs = [row["max_abs_diff"] for row in rows if "max_abs_diff" in row and row["path"] == "cmft"]
    return {
        f"ratio_{top}_over_{second}": ratio(cmft_top, pick(rows, "cmft", "forward", second)),
        f"ratio_{top}_over_{second}_sdpa": ratio(sdpa_top, pick(rows, "sdpa", "forward", second)),
        f"ratio_{top}_over_{second}_train": ratio(pick(rows, "cmft", "train", top),
                                                  pick(rows, "cmft", "train", second)),
        f"speedup_vs_sdpa_{top}_forward": ratio(sdpa_top, cmft_top),
        f"speedup_vs_sdpa_{top}_train": ratio(pick(rows, "sdpa", "train", top), pick(rows, "cmft", "train", top)),
        f"speedup_vs_flex_{top}_forward": ratio(pick(rows, "flex", "forward", top), cmft_top),
        f"peak_gb_train_{top}": {"cmft_checkpointing": memory("cmft", True), "cmft": memory("cmft", False),
                                 "sdpa_checkpointing": memory("sdpa", True), "sdpa": memory("sdpa", False)},
        "max_abs_diff": max(diffs) if diffs else None,
        "max_abs_diff_flex": max((r["max_abs_diff"] for r in rows if "max_abs_diff" in r and r["path"] == "flex"),
                                 default=None),
        "flex_compile_s": {r["length"]: r["compile_s"] for r in rows if "compile_s" in r},
    }  # fmt: skip


def icd_whole_vs_chunked(encoder: str, folder: Path, quick: bool) -> dict:
    from make_long_notes import build

    from cmft.finetuning.run import finetune

    data = build(folder / "long_notes", tokenizer=encoder, max_notes=4 if quick else None)
    length = 1024 if quick else 4096
    # the set's files lie in a temporary folder: the result names them by file name only
    results = {"data": {key: Path(value).name if key in ("train", "dev", "test", "few") else value
                        for key, value in data.items()}, "max_length": length}  # fmt: skip
    for mode in ("whole", "chunked"):
        overrides = [
            f"model.encoder={encoder}",
            f"icd_coding.mode={mode}",
            "icd_coding.chunk_size=256",
            f"icd_coding.max_chunks={length // 256}",
            f"training.max_length={length}",
            f"data.train={data['train']}",
            f"data.dev={data['dev']}",
            f"data.test={data['test']}",
            "icd_coding.label_space.min_train_count=2",
            "training.batch_size=4",
            "training.eval_batch_size=4",
            "training.max_steps=2" if quick else "training.epochs=10",
            "training.early_stopping_patience=null",
        ]
        run = finetune("icd_coding", overrides, output_dir=folder / mode)
        metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
        results[mode] = {
            key: metrics.get(key)
            for key in (
                "micro_f1",
                "macro_f1",
                "precision_at_5",
                "n_examples",
                "n_labels",
                "train_examples_per_s",
                "test_examples_per_s",
            )
        }
    return results  # fmt: skip


def icd_base_geometry(encoder: str, folder: Path, quick: bool) -> dict:
    """Whole-note coding at 8,192 tokens with a ModernBERT-base-geometry encoder (random weights)."""
    import torch
    from transformers import AutoTokenizer, ModernBertConfig, ModernBertModel

    from cmft.finetuning.run import finetune
    from cmft.predict import predict

    tokenizer = AutoTokenizer.from_pretrained(encoder)
    geometry = SMALL if quick else BASE
    torch.manual_seed(0)
    config = ModernBertConfig(**{**geometry, "vocab_size": len(tokenizer)}, max_position_embeddings=8192,
                              pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    base = folder / "base_encoder"
    ModernBertModel(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = json.loads((folder / "long_notes" / "summary.json").read_text(encoding="utf-8"))
    length = 2048 if quick else 8192
    started = time.monotonic()
    run = finetune("icd_coding", [f"model.encoder={base}", f"training.max_length={length}", "training.max_steps=2",
                                  "training.batch_size=1", f"data.train={data['train']}", "data.dev=null",
                                  f"data.test={data['few']}", "icd_coding.label_space.min_train_count=2"],
                   output_dir=folder / "base_run")  # fmt: skip
    train_s = time.monotonic() - started
    recipe = (run / "recipe.yaml").read_text(encoding="utf-8")
    started = time.monotonic()
    predictions = predict(str(run), data["few"], folder / "predictions.jsonl")
    return {"max_length": length, "steps": 2, "batch_size": 1, "train_and_eval_s": round(train_s, 1),
            "predict_s": round(time.monotonic() - started, 1), "predicted_notes": predictions,
            "gradient_checkpointing": "gradient_checkpointing: true" in recipe,
            "attention": "attention: banded" in recipe and "banded",
            "peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 2)}  # fmt: skip


def short_lengths(lengths: list[int], batch: int) -> dict:
    """The rule's short end: batches of `batch` rows at short lengths, sdpa against cmft's path (forward and
    forward+backward), to show where banded attention stops paying and the kernel's one-call fallback takes over."""
    rows = []
    for length in lengths:
        for path in ("sdpa", "cmft"):
            for mode in ("forward", "train"):
                spec = {"path": path, "mode": mode, "length": length, "checkpointing": False, "batch": batch,
                        "geometry": BASE, "reference": None}  # fmt: skip
                rows.append(run_setting(spec))
    speedups = {f"{length}_{mode}": ratio(pick(rows, "sdpa", mode, length), pick(rows, "cmft", mode, length))
                for length in lengths for mode in ("forward", "train")}  # fmt: skip
    return {"benchmark": "long_context_short", "geometry": "modernbert-base", "threads": THREADS, "batch": batch,
            "settings": rows, "speedup_vs_sdpa": speedups, "global_layers_attention_s": global_attention()}  # fmt: skip


def memory_check(length: int = 8192) -> dict:
    """Peak memory of forward+backward at `length` for sdpa and cmft, with and without checkpointing, with glibc's
    mmap threshold fixed at 1 MiB so that freed blocks go back to the system and peak RSS follows live memory (with
    the default, the same setting measured 7.9-9.4 GB across runs)."""
    rows = [run_setting({"path": path, "mode": "train", "length": length, "checkpointing": checkpointing,
                         "geometry": BASE, "reference": None, "exact_memory": True})
            for checkpointing in (True, False) for path in ("sdpa", "cmft")]  # fmt: skip
    return {"benchmark": "long_context_memory", "geometry": "modernbert-base", "threads": THREADS, "batch": 1,
            "malloc": "MALLOC_MMAP_THRESHOLD_=1048576", "settings": rows,
            f"peak_gb_train_{length}": {("cmft" if p == "cmft" else "sdpa") + ("_checkpointing" if c else ""):
                                        pick(rows, p, "train", length, c).get("peak_gb")
                                        for p in ("cmft", "sdpa") for c in (True, False)}}  # fmt: skip


def global_attention(lengths: tuple[int, ...] = (2048, 8192)) -> dict:
    """What no local-window trick can remove: the 8 global layers' attention alone (fused sdpa, no mask, batch 1,
    12 heads of 64), forward, median of 3 — the floor under the ratio of 8,192 to 2,048 tokens."""
    import torch
    from torch.nn import functional as F

    torch.set_num_threads(THREADS)
    layers = -(-BASE["num_hidden_layers"] // BASE["global_attn_every_n_layers"])
    result = {}
    for length in lengths:
        q, k, v = (torch.randn(1, 12, length, 64) for _ in range(3))
        times = []
        for _ in range(3):
            started = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v)
            times.append(time.perf_counter() - started)
        result[str(length)] = round(layers * statistics.median(times), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--encoder", default="runs/pretrain/latest/model")
    parser.add_argument("--skip-icd", action="store_true")
    parser.add_argument("--short", action="store_true", help="only the short-length check (batch 8, 128-512 tokens)")
    parser.add_argument("--memory", action="store_true", help="only peak memory at 8,192 tokens, allocator pinned")
    parser.add_argument("--lengths", type=int, nargs="+", help="default 1024 2048 4096 8192 (quick: 256 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per setting, after one warm-up call")
    parser.add_argument("--skip-checkpointing", action="store_true", help="no checkpointed forward+backward rows")
    parser.add_argument("--results", help="also write the record, with its provenance, to this file")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.short:
        print(json.dumps(short_lengths([128, 256, 512], 8)))
        return
    if args.memory:
        print(json.dumps(memory_check()))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    started = time.monotonic()
    lengths = args.lengths or ([256, 1024] if args.quick else [1024, 2048, 4096, 8192])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = encoder_benchmark(SMALL if args.quick else BASE, lengths, args.quick, folder, args.repeats,
                                 not args.skip_checkpointing)  # fmt: skip
        report = {"benchmark": "long_context", "geometry": "small (quick)" if args.quick else "modernbert-base",
                  "threads": THREADS, "batch": 1, "lengths": lengths, "baselines": "transformers sdpa as shipped; "
                  "flex_attention (transformers, torch.compile, forward only)", "settings": rows}  # fmt: skip
        report |= summarise(rows, lengths)
        if not args.skip_icd:
            import torch

            torch.set_num_threads(THREADS)
            report["icd_long_notes"] = icd_whole_vs_chunked(args.encoder, folder, args.quick)
            report["icd_whole_8192_base_geometry"] = icd_base_geometry(args.encoder, folder, args.quick)
    report["wall_s"] = round(time.monotonic() - started, 1)
    if args.results:
        from provenance import provenance, write_results

        write_results(args.results, {**provenance(), **report})
    print(json.dumps(report))


if __name__ == "__main__":
    main()
