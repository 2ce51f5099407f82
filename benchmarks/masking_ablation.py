"""Masking ablation: does medical-token emphasis earn its place? Same compute, two pretraining runs.

Both arms run the default `cmft pretrain` (pretrain/clinical_tiny.yaml: same corpus, tokenizer, seed, steps and
30% → 15% schedule) and differ only in how masked positions are chosen:

    emphasis   masking.medical_weight=2.0, masking.whole_word=medical   (the default)
    uniform    masking.medical_weight=1.0, masking.whole_word=none      (plain BERT-style masking)

Reported per arm: held-out masked-token top-1 overall, on medical tokens and on other tokens (evaluated with
uniform masking, so both arms are scored on the same kind of task), then downstream NER strict F1 (NCBI-disease
test) and ICD micro F1 (CodiEsp test) from the shipped recipes fine-tuned on each encoder with the same seeds.

    python benchmarks/masking_ablation.py [--steps 300] [--seeds 1] [--icd-epochs 3] [--ner-epochs 5]

Prints one JSON line last: {"arms": {arm: {...}}, "delta": {metric: emphasis − uniform}}.
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

from cmft.finetuning.run import finetune  # noqa: E402
from cmft.pretraining.run import pretrain  # noqa: E402

ARMS = {
    "emphasis": ["masking.medical_weight=2.0", "masking.whole_word=medical"],
    "uniform": ["masking.medical_weight=1.0", "masking.whole_word=none"],
}
MLM = ("mlm_top1", "mlm_top5", "mlm_top1_medical", "mlm_top1_other")


def run_arm(name: str, root: Path, args: argparse.Namespace) -> dict:
    started = time.monotonic()
    overrides = [*ARMS[name], f"training.max_steps={args.steps}", f"training.threads={args.threads}"]
    run = pretrain(None, overrides, output_dir=root / f"pretrain-{name}")
    metrics = json.loads((run / "metrics.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    result: dict = {k: round(metrics[k], 4) for k in MLM}
    result |= {"medical_share_of_masked": round(summary["main_medical_share_of_masked"], 4),
               "pretrain_seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    encoder = str((run / "model").resolve())
    for task, metric, epochs in (("ner", "f1", args.ner_epochs), ("icd_coding", "micro_f1", args.icd_epochs)):
        values = []
        for seed in range(args.seeds):
            overrides = [f"model.encoder={encoder}", f"seed={seed}", f"training.epochs={epochs}",
                         f"training.threads={args.threads}"]  # fmt: skip
            out = finetune(task, overrides, output_dir=root / f"{task}-{name}-{seed}")
            values.append(json.loads((out / "metrics.json").read_text())[metric])
        result[f"{task}_{metric}"] = round(statistics.mean(values), 4)
        result[f"{task}_{metric}_values"] = [round(v, 4) for v in values]
    print(name, json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps per arm (the default config's)")
    parser.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds per task and arm")
    parser.add_argument("--ner-epochs", type=float, default=5)
    parser.add_argument("--icd-epochs", type=float, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        arms = {name: run_arm(name, Path(tmp), args) for name in ARMS}
    keys = [k for k, v in arms["emphasis"].items() if isinstance(v, float) and not k.endswith("seconds")]
    delta = {k: round(arms["emphasis"][k] - arms["uniform"][k], 4) for k in keys}
    print(json.dumps({"benchmark": "masking_ablation", "steps": args.steps, "seeds": args.seeds, "arms": arms,
                      "delta": delta}))  # fmt: skip


if __name__ == "__main__":
    main()
