"""Masking ablation: does medical-token emphasis earn its place? Same compute, two pretraining runs.

Both arms run the default `cmft pretrain` (pretrain/clinical_tiny.yaml: same corpus, tokenizer, seed, steps and
30% → 15% schedule) and differ only in how masked positions are chosen:

    emphasis   masking.medical_weight=2.0, masking.whole_word=medical   (the default)
    uniform    masking.medical_weight=1.0, masking.whole_word=none      (plain BERT-style masking)

Reported per arm: held-out masked-token top-1 overall, on medical tokens and on other tokens (evaluated with
uniform masking, so both arms are scored on the same kind of task), then downstream NER strict F1 (NCBI-disease
test) and ICD micro F1 (CodiEsp test) from the shipped recipes fine-tuned on each encoder with the same seeds:
mean, spread (population standard deviation over seeds) and the paired difference per seed.

    python benchmarks/masking_ablation.py [--steps 300] [--seeds 3] [--icd-epochs 3] [--ner-epochs 5]
        [--pretrain-seed N] [--work runs/ablation] [--results benchmarks/results/masking_ablation.jsonl] [--fresh]

Re-running a pair at the same seed and code reproduced it to the last digit (the README's run C), so an
independent pair needs another `--pretrain-seed` (model initialisation, data order and masking draws); its runs are
kept beside the config seed's.

With several seeds this is about an hour and a half on 2 CPU cores, so it resumes: each arm's pretraining run is
kept under --work (a finished one is reused, an interrupted one continued) and each finished fine-tuning is
appended to --results, keyed by arm, task, seed, epochs and the encoder's weights. Seeds run in order, both arms
and both tasks per seed, so a stopped run leaves complete pairs.
Prints one JSON line last: {"arms": {arm: {...}}, "delta": {metric: emphasis − uniform}, "paired": {...}}.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import ResultStore, encoder_key  # noqa: E402

from cmft.config import load_config  # noqa: E402
from cmft.finetuning.run import finetune  # noqa: E402
from cmft.pretraining.config import PretrainConfig  # noqa: E402
from cmft.pretraining.run import pretrain, resolve_pretrain_config  # noqa: E402
from cmft.runs import partial_of  # noqa: E402

ARMS = {
    "emphasis": ["masking.medical_weight=2.0", "masking.whole_word=medical"],
    "uniform": ["masking.medical_weight=1.0", "masking.whole_word=none"],
}
MLM = ("mlm_top1", "mlm_top5", "mlm_top1_medical", "mlm_top1_other")
TASKS = (("ner", "f1"), ("icd_coding", "micro_f1"))


def config_seed() -> int:
    """The default pretraining config's seed: the pair whose runs carry no seed in their folder name."""
    return load_config(PretrainConfig, resolve_pretrain_config(None), []).seed


def pretrain_arm(name: str, work: Path, steps: int, threads: int, seed: int | None = None) -> tuple[Path, dict]:
    """The arm's finished pretraining run (reused when already under `work`) and its masked-token figures. `seed`:
    another pretraining seed than the config's (None), whose run is kept beside the config seed's."""
    final = work / (f"pretrain-{name}-{steps}" + ("" if seed is None else f"-seed{seed}"))
    started = time.monotonic()
    if not (final / "metrics.json").is_file():
        overrides = [*ARMS[name], f"training.max_steps={steps}", f"training.threads={threads}"]
        overrides += [] if seed is None else [f"seed={seed}"]
        pretrain(None, overrides, output_dir=final, resume=partial_of(final).is_dir())
    metrics = json.loads((final / "metrics.json").read_text())
    summary = json.loads((final / "summary.json").read_text())
    result: dict = {k: round(metrics[k], 4) for k in MLM}
    result["medical_share_of_masked"] = round(summary["main_medical_share_of_masked"], 4)
    result["pretrain_seconds"] = round(summary.get("main_seconds", time.monotonic() - started), 1)
    print(name, json.dumps(result), flush=True)
    return final / "model", result


def finetune_arm(name: str, task: str, metric: str, encoder: Path, seed: int, epochs: float, threads: int,
                 store: ResultStore, scratch: Path) -> float:  # fmt: skip
    key = json.dumps(["masking_ablation", name, task, seed, epochs, encoder_key(str(encoder))])
    record = store.get(key)
    if record is None:
        overrides = [f"model.encoder={encoder.resolve()}", f"seed={seed}", f"training.epochs={epochs}",
                     f"training.threads={threads}"]  # fmt: skip
        started = time.monotonic()
        out = finetune(task, overrides, output_dir=scratch / f"{task}-{name}-{seed}")
        value = json.loads((out / "metrics.json").read_text())[metric]
        record = {"arm": name, "task": task, "seed": seed, "value": value, "seconds": time.monotonic() - started}
        store.add(key, record)
    print(f"{name} {task} seed {seed}: {metric} {record['value']:.4f} ({record['seconds']:.0f} s)", flush=True)
    return record["value"]


def summarise(arms: dict, values: dict) -> tuple[dict, dict]:
    """Per-arm mean/spread/values of each downstream metric, and emphasis − uniform paired by seed."""
    paired = {}
    for task, metric in TASKS:
        name = f"{task}_{metric}"
        for arm in arms:
            got = values[arm][name]
            arms[arm] |= {name: round(statistics.fmean(got), 4), f"{name}_spread": round(statistics.pstdev(got), 4),
                          f"{name}_values": [round(v, 4) for v in got]}  # fmt: skip
        diffs = [e - u for e, u in zip(values["emphasis"][name], values["uniform"][name], strict=True)]
        paired[name] = {"mean": round(statistics.fmean(diffs), 4), "values": [round(d, 4) for d in diffs],
                        "emphasis_better_in": sum(d > 0 for d in diffs), "seeds": len(diffs)}  # fmt: skip
    keys = [k for k, v in arms["emphasis"].items() if isinstance(v, float) and not k.endswith(("seconds", "spread"))]
    return {k: round(arms["emphasis"][k] - arms["uniform"][k], 4) for k in keys}, paired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps per arm (the default config's)")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per task and arm")
    parser.add_argument("--ner-epochs", type=float, default=5)
    parser.add_argument("--icd-epochs", type=float, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pretrain-seed", type=int, default=None,
                        help="both arms' pretraining seed (default: the config's)")  # fmt: skip
    parser.add_argument("--work", default="runs/ablation", help="where the arms' pretraining runs are kept")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "masking_ablation.jsonl"))
    parser.add_argument("--fresh", action="store_true", help="ignore finished fine-tuning results in --results")
    args = parser.parse_args()
    if args.steps < 1 or args.seeds < 1:
        parser.error("--steps and --seeds must be at least 1")
    store = ResultStore(Path(args.results), fresh=args.fresh)
    default_seed = config_seed()
    other_seed = None if args.pretrain_seed in (None, default_seed) else args.pretrain_seed
    arms, encoders = {}, {}
    for name in ARMS:
        encoders[name], arms[name] = pretrain_arm(name, Path(args.work), args.steps, args.threads, other_seed)
    values: dict = {arm: {f"{t}_{m}": [] for t, m in TASKS} for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for task, metric in TASKS:
                epochs = args.ner_epochs if task == "ner" else args.icd_epochs
                for name in ARMS:
                    value = finetune_arm(name, task, metric, encoders[name], seed, epochs, args.threads, store,
                                         Path(tmp))  # fmt: skip
                    values[name][f"{task}_{metric}"].append(value)
    delta, paired = summarise(arms, values)
    print(json.dumps({"benchmark": "masking_ablation", "steps": args.steps, "seeds": args.seeds,
                      "pretrain_seed": default_seed if other_seed is None else other_seed, "arms": arms,
                      "delta": delta, "paired": paired}))  # fmt: skip


if __name__ == "__main__":
    main()
