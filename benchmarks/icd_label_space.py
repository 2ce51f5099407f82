"""ICD coding's label space: every train code, and what helps the rare ones, chosen on dev.

Trains the bundled ICD recipe as it ships (epochs, max_length, rates) with each variant below, on the same encoder and
seeds, and records per run the training seconds, the test split's prediction rate, and dev and test metrics over all
gold codes (`micro_f1_all_codes`, `macro_f1_all_codes`, `label_space_coverage`, `f1_by_train_frequency`, …):

    shipped       label_space.min_train_count 5 (247 codes)
    all_codes     min_train_count 1 (every train code: 1,767)
    descriptions  all_codes + init_from_descriptions (label queries from the ICD-10-CM descriptions)
    rare_weight   all_codes + rare_code_weight (rare codes' positives weighted in the loss)
    zero_shot     all_codes + label_space.zero_shot (codes of a trained code's category, from their descriptions)

Per-code thresholds need no retraining: for each run, dev is cut in two halves; the global threshold and the per-code
thresholds (codes with ≥ --half-min-positives positives in the tuning half) are tuned on one half and judged on the
other, both ways, and the held-out micro-F1 over all gold codes is averaged. Everything chosen here is chosen on dev.

    python benchmarks/icd_label_space.py [--variants shipped,all_codes,descriptions,rare_weight] [--seeds 42]
        [--encoder runs/pretrain/latest/model] [--results benchmarks/results/icd_label_space.jsonl]

Every finished (variant, seed) is appended to --results, so a cut-off run resumes. Prints one JSON line last:
{"variants": {name: {"dev": {...}, "test": {...}, "train_seconds", "test_notes_per_s", "thresholds_cv": {...}}}}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import provenance  # noqa: E402

VARIANTS = {
    "shipped": [],
    "all_codes": ["icd_coding.label_space.min_train_count=1"],
    "descriptions": ["icd_coding.label_space.min_train_count=1", "icd_coding.init_from_descriptions=true"],
    "rare_weight": ["icd_coding.label_space.min_train_count=1", "icd_coding.rare_code_weight=true"],
    "zero_shot": ["icd_coding.label_space.min_train_count=1", "icd_coding.label_space.zero_shot=true"],
}
KEYS = ("micro_f1", "micro_f1_all_codes", "macro_f1_all_codes", "precision_all_codes", "recall_all_codes",
        "label_space_coverage", "micro_f1_category", "n_codes_never_predicted", "n_labels", "n_zero_shot_labels",
        "threshold")  # fmt: skip


def thresholds_cv(run: Path, half_min_positives: int, seed: int = 0) -> dict[str, float]:
    """Held-out micro-F1 over all gold codes on dev halves: one global threshold against per-code thresholds."""
    from cmft.evaluation import split_outputs
    from cmft.inference import TorchBackend, load_run
    from cmft.metrics import tune_threshold
    from cmft.tasks import get_task
    from cmft.tasks.icd_metrics import all_code_metrics, tune_code_thresholds

    loaded = load_run(run)
    task = get_task(loaded.recipe)
    task.restore(loaded.meta)
    task.prepare(loaded.tokenizer, splits=("dev",))
    probs = np.stack(split_outputs(task, TorchBackend(loaded.module), "dev", 16, loaded.pad_id)).astype(np.float64)
    y = np.stack([row["labels"] for row in task.datasets["dev"]]).astype(bool)
    probs, labels = probs[:, : y.shape[1]], task.labels[: y.shape[1]]  # the trained codes (zero-shot ones follow)
    gold = [set(example.label) for example in task.splits["dev"].examples]
    order = np.random.default_rng(seed).permutation(len(gold))
    halves = (order[: len(order) // 2], order[len(order) // 2 :])
    scores: dict[str, list[float]] = {"global": [], "per_code": [], "n_codes_own_threshold": []}
    for tune, judge in (halves, halves[::-1]):
        threshold, _ = tune_threshold(y[tune], probs[tune])
        own = tune_code_thresholds(y[tune], probs[tune], threshold, half_min_positives)
        per_code = np.full(len(labels), threshold)
        per_code[list(own)] = list(own.values())
        for name, cut in (("global", threshold), ("per_code", per_code)):
            predicted = [{labels[j] for j in np.flatnonzero(row >= cut)} for row in probs[judge]]
            metrics = all_code_metrics([gold[i] for i in judge], predicted, labels, task.train_counts)
            scores[name].append(metrics["micro_f1_all_codes"])
        scores["n_codes_own_threshold"].append(len(own))
    return {name: statistics.fmean(values) for name, values in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--encoder", default="runs/pretrain/latest/model")
    parser.add_argument("--half-min-positives", type=int, default=3,
                        help="positives in the tuning half for a code's own threshold (≈ 5 in all of dev)")  # fmt: skip
    parser.add_argument("--extra", nargs="*", default=[], help="recipe overrides for every variant (key=value)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "icd_label_space.jsonl"))
    args = parser.parse_args()
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS):
        parser.error(f"unknown variant {sorted(set(variants) - set(VARIANTS))[0]}; choose from {', '.join(VARIANTS)}")
    encoder = Path(args.encoder).resolve()
    if not (encoder / "config.json").is_file():
        parser.error(f"--encoder {args.encoder}: no encoder there; run `cmft pretrain` first")
    from cmft.finetuning.run import finetune

    results = Path(args.results)
    done = {}
    if results.is_file():
        done = {json.loads(line)["key"]: json.loads(line) for line in results.read_text().splitlines() if line.strip()}
    summary: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in variants:
            records = []
            for seed in args.seeds:
                key = json.dumps([name, seed, VARIANTS[name], args.extra, args.half_min_positives, args.encoder])
                record = done.get(key)
                if record is None:
                    started = time.monotonic()
                    run = finetune("icd_coding", [f"model.encoder={encoder}", f"seed={seed}", *VARIANTS[name],
                                                  *args.extra], output_dir=Path(tmp) / f"{name}-{seed}")  # fmt: skip
                    seconds = time.monotonic() - started
                    metrics = json.loads((run / "metrics.json").read_text())
                    record = {
                        "key": key, **provenance(), "variant": name, "seed": seed, "overrides": VARIANTS[name],
                        "train_seconds": seconds, "test_notes_per_s": metrics.get("test_examples_per_s"),
                        "test": {k: metrics.get(k) for k in (*KEYS, "f1_by_train_frequency")},
                        "dev": {k: metrics.get(f"dev_{k}") for k in (*KEYS, "f1_by_train_frequency")},
                        "thresholds_cv": thresholds_cv(run, args.half_min_positives),
                    }  # fmt: skip
                    results.parent.mkdir(parents=True, exist_ok=True)
                    with results.open("a") as handle:
                        handle.write(json.dumps(record) + "\n")
                records.append(record)
                cv = record["thresholds_cv"]
                print(f"{name} seed {seed}: dev micro_f1_all_codes {record['dev']['micro_f1_all_codes']:.4f}, "
                      f"per-code thresholds (dev halves) {cv['per_code']:.4f} against {cv['global']:.4f}, "
                      f"{record['train_seconds']:.0f} s", flush=True)  # fmt: skip
            summary[name] = {
                "seeds": [r["seed"] for r in records],
                "train_seconds": statistics.fmean(r["train_seconds"] for r in records),
                "test_notes_per_s": statistics.fmean(r["test_notes_per_s"] or 0 for r in records),
                **{split: {k: statistics.fmean(r[split][k] for r in records) for k in KEYS
                           if all(isinstance(r[split][k], (int, float)) for r in records)}
                   for split in ("dev", "test")},
                "thresholds_cv": {k: statistics.fmean(r["thresholds_cv"][k] for r in records)
                                  for k in records[0]["thresholds_cv"]},
            }  # fmt: skip
    print(json.dumps({"benchmark": "icd_label_space", "variants": summary}))


if __name__ == "__main__":
    main()
