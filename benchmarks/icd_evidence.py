"""Do ICD evidence spans mean something? ERASER's comprehensiveness and sufficiency (DeYoung et al. 2020) on the test
split of an ICD coding run (CodiEsp for the shipped recipe), for `attention` and `attention_x_gradient` evidence,
each against random spans of the same lengths.

For every predicted code of every note (the codes `cmft predict` gives) its evidence is the k spans that
`cmft predict --evidence --evidence-k k` gives, as model token positions:

    comprehensiveness = p(code | note) − p(code | note with the evidence masked)        higher: more faithful
    sufficiency       = p(code | note) − p(code | only the evidence left unmasked)      lower: more faithful

Masking replaces a token with the tokenizer's mask token ([MASK]; the padding token where there is none) at its place,
so the note keeps its length and positions (ERASER deletes tokens instead; a masked token is out of distribution for
evidence and random spans alike); [CLS] and [SEP] are kept. The random baseline draws, for each evidence span, a span
of the same number of tokens at a random place in the part of the note the model reads (`--draws` draws, seeded),
scored the same way. Each figure is the mean over the (note, predicted code) pairs.

    python benchmarks/icd_evidence.py --model runs/finetune/<run>/model [--k 3] [--notes N] [--draws 3]
        [--results benchmarks/results/icd_evidence.json]
    python benchmarks/icd_evidence.py --quick [--encoder runs/pretrain/latest/model]

`--quick` fine-tunes the encoder made by `cmft pretrain` for a few steps on a few CodiEsp notes (max_length 256) and
scores 12 test notes, in a few minutes on 2 CPU cores: a check that the script runs, not a figure.

Prints one JSON line last: {"methods": {"attention": {"comprehensiveness", "comprehensiveness_random",
"sufficiency", "sufficiency_random", "n_codes", "evidence_tokens"}, "attention_x_gradient": {...}}, "k", "masking",
"n_notes", ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import provenance, shown, write_results  # noqa: E402

from cmft.data.readers import read_split  # noqa: E402
from cmft.inference import Loaded, TorchBackend, load_run, run_units  # noqa: E402
from cmft.tasks.icd_evidence import METHODS, body_positions, note_words, spans_with_positions  # noqa: E402

QUICK = ["training.max_steps=40", "training.eval_every=20", "training.max_length=256", "training.batch_size=8",
         "icd_coding.label_space.min_train_count=3", "icd_coding.attention_dim=64"]  # fmt: skip


def variants(flat: np.ndarray, body: np.ndarray, evidence: np.ndarray, mask_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The note's ids with the evidence positions masked, and with every other body position masked."""
    without, alone = flat.copy(), flat.copy()
    without[evidence] = mask_id
    alone[np.setdiff1d(body, evidence)] = mask_id
    return without, alone


def random_like(spans: list[list[int]], body: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random contiguous runs of the body's positions, one per evidence span and as long (in tokens)."""
    runs = []
    for span in spans:
        start = rng.integers(0, len(body) - len(span) + 1)
        runs.append(body[start : start + len(span)])
    return np.unique(np.concatenate(runs))


def score_method(loaded: Loaded, texts: list[str], method: str, k: int, draws: int, seed: int, batch_size: int
                 ) -> dict:  # fmt: skip
    """Comprehensiveness and sufficiency of `method`'s evidence and of random spans, over the predicted codes."""
    task, tokenizer = loaded.task, loaded.tokenizer
    evidence_loaded = replace(loaded, meta={**loaded.meta, "evidence": {"k": k, "method": method}})
    backend = TorchBackend(loaded.module)
    units, _ = task.encode(tokenizer, texts, evidence_loaded.meta)  # with each note's token offsets
    rows = run_units(evidence_loaded, task.evidence_backend(evidence_loaded, backend, method), units, batch_size)
    mask_id = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else loaded.pad_id
    settings, rng = loaded.meta["icd"], np.random.default_rng(seed)
    drops: dict[str, list[float]] = {name: [] for name in ("comprehensiveness", "comprehensiveness_random",
                                                          "sufficiency", "sufficiency_random")}  # fmt: skip
    sizes = []
    for text, unit, (probabilities, weights) in zip(texts, units, rows, strict=True):
        ids, attention_mask = task.collate([unit], loaded.pad_id, loaded.meta)
        flat = ids.reshape(-1)
        body = body_positions(len(unit.offsets), settings)
        body = body[body >= 0]
        words = note_words(text, unit.offsets, settings)
        batch, plan = [], []  # plan: (code, number of variants: 2 evidence + 2 per draw)
        for code, row in weights.items():
            spans = [positions for *_, positions in spans_with_positions(row, words, k)]
            evidence = np.unique(np.concatenate(spans)).astype(np.int64)
            sizes.append(len(evidence))
            batch += variants(flat, body, evidence, mask_id)
            for _ in range(draws):
                batch += variants(flat, body, random_like(spans, body, rng), mask_id)
            plan.append(code)
        if not plan:
            continue
        stacked = np.stack(batch).reshape(len(batch), *ids.shape[1:])
        masks = np.repeat(attention_mask, len(batch), axis=0)
        changed = np.concatenate([backend(stacked[s : s + batch_size], masks[s : s + batch_size])
                                  for s in range(0, len(batch), batch_size)])  # fmt: skip
        per_code = 2 + 2 * draws
        for number, code in enumerate(plan):
            full, outcome = float(probabilities[code]), changed[number * per_code : (number + 1) * per_code, code]
            drops["comprehensiveness"].append(full - outcome[0])
            drops["sufficiency"].append(full - outcome[1])
            drops["comprehensiveness_random"].append(full - float(np.mean(outcome[2::2])))
            drops["sufficiency_random"].append(full - float(np.mean(outcome[3::2])))
    result = {name: round(float(np.mean(values)), 4) if values else None for name, values in drops.items()}
    return {**result, "n_codes": len(sizes), "evidence_tokens": round(float(np.mean(sizes)), 1) if sizes else None}


def quick_run(encoder: Path, root: Path) -> Path:
    """The tiny encoder fine-tuned for a few steps on 48 train and 16 dev CodiEsp notes."""
    from cmft.finetuning.run import finetune

    if not (encoder / "config.json").is_file():
        sys.exit(f"--encoder {encoder}: no model there; run `cmft pretrain` first or pass --encoder")
    overrides = []
    for split, count in (("train", 48), ("dev", 16), ("test", 12)):
        lines = (ROOT / f"data/codiesp/{split}.jsonl").read_text(encoding="utf-8").splitlines()[:count]
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        overrides.append(f"data.{split}={root / f'{split}.jsonl'}")
    return finetune("icd_coding", [f"model.encoder={encoder}", *overrides, *QUICK], output_dir=root / "run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a fine-tuned ICD coding model folder (runs/finetune/<run>/model)")
    parser.add_argument("--quick", action="store_true", help="fine-tune a small model on a few notes and use it")
    parser.add_argument("--encoder", default="runs/pretrain/latest/model", help="--quick: the encoder to fine-tune")
    parser.add_argument("--k", type=int, default=3, help="evidence spans per code")
    parser.add_argument("--notes", type=int, help="score the first N test notes only")
    parser.add_argument("--draws", type=int, default=3, help="random baselines per code")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--results", help="results file (default benchmarks/results/icd_evidence[_quick].json)")
    args = parser.parse_args()
    if bool(args.model) == args.quick:
        parser.error("pass --model or --quick")
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            run, model = quick_run(Path(args.encoder), Path(tmp)), f"quick: {shown(Path(args.encoder))} fine-tuned"
        else:
            given = Path(args.model)
            run, model = (given.parent if (given / "config.json").is_file() else given), shown(given)
        loaded = load_run(run)
        if loaded.recipe is None or loaded.task.name != "icd_coding":
            sys.exit(f"{args.model}: not an ICD coding run")
        texts = [example.text for example in read_split(loaded.recipe.data, "test", multi_label=True).examples]
        texts = texts[: args.notes] if args.notes else texts
        methods = {}
        for method in METHODS:
            methods[method] = score_method(loaded, texts, method, args.k, args.draws, args.seed, args.batch_size)
            print(method, json.dumps(methods[method]), file=sys.stderr, flush=True)
    result = {"benchmark": "icd_evidence", "model": model, "mode": loaded.meta["icd"]["mode"],
              "max_length": loaded.meta["icd"]["max_length"], "n_notes": len(texts), "k": args.k,
              "draws": args.draws, "seed": args.seed, "masking": "mask_token", "methods": methods,
              "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    default = "benchmarks/results/icd_evidence_quick.json" if args.quick else "benchmarks/results/icd_evidence.json"
    write_results(args.results or ROOT / default, {**provenance(), **result})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
