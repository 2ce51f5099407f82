"""GPU throughput of ModernBERT-base geometry: pretraining tokens/s and model FLOPs utilisation (MFU), and
inference tokens/s, flash-attention 2 against sdpa, bf16.

Geometry: hidden 768, 22 layers, 12 heads, intermediate 1152, local window 128, a global layer every 3,
vocabulary 50,368. Pretraining steps use cmft's own path (documents of random lengths packed first-fit-decreasing,
per-document attention: cu_seq_lens under flash-attention, per-document masks under sdpa; 30% masking, MLM head
on masked tokens only, AdamW) at each --lengths row length with --tokens-per-step tokens per optimizer step.
Inference: the encoder alone, fixed-length batches and length-sorted variable-length batches (padding + mask).
MFU = model FLOPs per second (6 × non-embedding parameters per token + attention 12 × layers' attended keys ×
hidden) over the GPU's dense bf16 peak (--peak-tflops, default from the device name).

    python benchmarks/gpu_throughput.py [--lengths 1024 8192] [--steps 10] [--warmup 3]

Needs a CUDA GPU (exits 2 with one line otherwise) and flash-attn for the flash rows. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

GEOMETRY = {
    "hidden_size": 768,
    "num_hidden_layers": 22,
    "num_attention_heads": 12,
    "intermediate_size": 1152,
    "local_attention": 128,
    "global_attn_every_n_layers": 3,
    "vocab_size": 50368,
    "max_position_embeddings": 8192,
}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
MASK_RATE = 0.30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192], help="packed row lengths")
    parser.add_argument("--tokens-per-step", type=int, default=32768, help="tokens per optimizer step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--inference-batches", type=int, default=20, help="timed inference batches")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: by GPU name)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def peak_tflops(name: str, given: float | None) -> float | None:
    if given is not None:
        return given
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)


def flops_per_token(model, documents) -> float:
    """Training FLOPs per real token: 6 × non-embedding parameters, plus attention scores and values (fwd + bwd:
    12 × hidden × attended keys per layer; global layers see the whole document, local ones the window)."""
    config = model.config
    embedding = model.model.embeddings.tok_embeddings.weight.numel()
    dense = 6 * (sum(p.numel() for p in model.parameters()) - embedding)
    tokens = sum(len(d.ids) for d in documents)
    keys = 0.0
    for layer in range(config.num_hidden_layers):
        is_global = layer % config.global_attn_every_n_layers == 0
        for d in documents:
            n = len(d.ids)
            keys += n * (n if is_global else min(n, config.local_attention + 1))
    return dense + 12 * config.hidden_size * keys / tokens


def synthetic_documents(length: int, tokens: int, rng: random.Random, vocab: int):
    """Documents of random lengths (64 to the row length) with random token ids, every token maskable."""
    import numpy as np

    from cmft.pretraining.packing import Document

    documents, total = [], 0
    while total < tokens:
        n = rng.randint(64, length)
        ids = np.asarray([rng.randrange(5, vocab) for _ in range(n)], dtype=np.int32)
        documents.append(Document(ids=ids, unit=np.arange(n, dtype=np.int32), medical=np.zeros(n, dtype=bool)))
        total += n
    return documents


def build_model(attention: str, masked_lm: bool = True):
    import torch
    from transformers import ModernBertConfig, ModernBertForMaskedLM, ModernBertModel

    config = ModernBertConfig(**GEOMETRY, sparse_prediction=True)
    config._attn_implementation = attention
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(config) if masked_lm else ModernBertModel(config)
    return model.cuda()


def pretraining(attention: str, length: int, args: argparse.Namespace) -> dict:
    import torch

    from cmft.pretraining.masking import Masker
    from cmft.pretraining.packing import PackedDataset, collate_packed, model_inputs

    model = build_model(attention).train()
    rows_per_step = max(1, args.tokens_per_step // length)
    rng = random.Random(args.seed)
    needed = (args.warmup + args.steps) * rows_per_step * length
    documents = synthetic_documents(length, needed, rng, GEOMETRY["vocab_size"])
    dataset = PackedDataset(documents, length)
    masker = Masker(4, GEOMETRY["vocab_size"], [0, 1, 2, 3, 4])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    generator = torch.Generator().manual_seed(args.seed)
    torch.cuda.reset_peak_memory_stats()
    tokens, started, used = 0, 0.0, []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            tokens, started, used = 0, time.perf_counter(), []
        rows = [dataset[(step * rows_per_step + r) % len(dataset)] for r in range(rows_per_step)]
        used.extend(d for row in rows for d in row)
        batch, _ = masker(collate_packed(rows, 0), MASK_RATE, generator)
        inputs = model_inputs({k: v.cuda() for k, v in batch.items()}, attention, GEOMETRY["local_attention"])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int((batch["document"] >= 0).sum())
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    per_token = flops_per_token(model, used)
    return {
        "tokens_per_s": round(tokens / seconds, 1),
        "tflops": round(per_token * tokens / seconds / 1e12, 2),
        "flops_per_token": per_token,
        "rows_per_step": rows_per_step,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "pack_fill": round(dataset.fill_ratio(length), 3),
    }


def inference(attention: str, lengths: list[int], batch_size: int, batches: int) -> dict:
    """Encoder forward tokens/s (real tokens) over batches of the given lengths, padded to each batch's longest."""
    import torch

    model = build_model(attention, masked_lm=False).eval().to(torch.bfloat16)
    tokens, seconds = 0, 0.0
    with torch.inference_mode():
        for index in range(batches + 2):
            chunk = lengths[(index * batch_size) % len(lengths) :][:batch_size] or lengths[:batch_size]
            longest = max(chunk)
            ids = torch.randint(5, GEOMETRY["vocab_size"], (len(chunk), longest), device="cuda")
            mask = (torch.arange(longest, device="cuda")[None] < torch.tensor(chunk, device="cuda")[:, None]).long()
            torch.cuda.synchronize()
            started = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            torch.cuda.synchronize()
            if index >= 2:  # the first two warm up kernels and the allocator
                seconds += time.perf_counter() - started
                tokens += sum(chunk)
    return {"tokens_per_s": round(tokens / seconds, 1), "batch_size": batch_size}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_throughput: no CUDA GPU here; run it on a machine with one (nothing measured)", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    peak = peak_tflops(device, args.peak_tflops)
    backends = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
    results: dict = {"device": device, "peak_bf16_tflops": peak, "geometry": GEOMETRY, "pretraining": {},
                     "inference": {}, "torch": torch.__version__}  # fmt: skip
    rng = random.Random(args.seed)
    variable = sorted(rng.randint(32, 1024) for _ in range(32 * args.inference_batches))
    for attention in backends:
        for length in args.lengths:
            try:
                row = pretraining(attention, length, args)
                row["mfu"] = round(row["tflops"] / peak, 4) if peak else None
            except torch.OutOfMemoryError:
                row = {"error": f"out of memory at {args.tokens_per_step} tokens per step; lower --tokens-per-step"}
            results["pretraining"][f"{attention}@{length}"] = row
            print(f"pretrain {attention} {length}: {row}", file=sys.stderr)
            torch.cuda.empty_cache()
        batches = args.inference_batches
        results["inference"][f"{attention}@fixed512"] = inference(attention, [512] * 32, 32, batches)
        results["inference"][f"{attention}@variable32-1024"] = inference(attention, variable, 32, batches)
    if "flash_attention_2" not in backends:
        results["note"] = "flash-attn not installed (pip install .[flash]): sdpa only"
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
