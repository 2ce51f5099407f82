"""Weight decay on biases and norms: the fine-tuning optimizer before and after it took the Trainer's own grouping.

Before, whenever `training.head_learning_rate` was set (every shipped recipe but retrieval), cmft built AdamW by hand
with weight decay on every parameter, biases and LayerNorm weights included. Now it takes the Trainer's grouping
(`get_decay_parameter_names`: no decay on biases and norms) with the head's rate as groups of its own. This runs one
bundled recipe with the tiny encoder, as the recipe ships, both ways for each seed (the order alternating from seed
to seed), and reports the recipe's metric on dev (what the choice is made on) and on test.

    python benchmarks/optimizer_groups.py [--task note_classification] [--seeds 42 43 44]
        [--encoder runs/pretrain/latest/model] [--results benchmarks/results/optimizer_groups.json]

Prints one JSON line last: {"task", "metric", "before": {...}, "after": {...}, "runs": [...]}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import provenance, write_results  # noqa: E402

from cmft.finetuning.run import finetune  # noqa: E402
from cmft.tasks import task_class  # noqa: E402
from cmft.training import FinetuneTrainer  # noqa: E402


def _hand_built_adamw(self, model=None):
    """The optimizer as cmft built it before: AdamW by hand, weight decay on every parameter."""
    import torch

    if self.optimizer is None and self.head_learning_rate is not None:
        head, body = [], []
        for name, parameter in self.model.named_parameters():
            if parameter.requires_grad:
                (head if self.head_modules & set(name.split(".")) else body).append(parameter)
        groups = [{"params": body, "lr": self.args.learning_rate}, {"params": head, "lr": self.head_learning_rate}]
        for group in groups:
            group["weight_decay"] = self.args.weight_decay
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.args.learning_rate)
    return super(FinetuneTrainer, self).create_optimizer()


@contextmanager
def optimizer(variant: str):
    shipped = FinetuneTrainer.create_optimizer
    if variant == "before":
        FinetuneTrainer.create_optimizer = _hand_built_adamw
    try:
        yield
    finally:
        FinetuneTrainer.create_optimizer = shipped


def summary(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 4), "spread": round(max(values) - min(values), 4),
            "values": [round(v, 4) for v in values]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="note_classification")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--encoder", default="runs/pretrain/latest/model")
    parser.add_argument("--results", default=str(ROOT / "benchmarks/results/optimizer_groups.json"))
    parser.add_argument("--overrides", nargs="*", default=[], help="extra key=value for both sides (smoke runs)")
    args = parser.parse_args()
    metric = task_class(args.task).metric_for_best
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, seed in enumerate(args.seeds):
            order = ("before", "after") if index % 2 == 0 else ("after", "before")
            for variant in order:
                started = time.monotonic()
                with optimizer(variant):
                    run = finetune(args.task, [f"model.encoder={args.encoder}", f"seed={seed}", *args.overrides],
                                   output_dir=Path(tmp) / f"{variant}-{seed}")  # fmt: skip
                metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
                runs.append({"variant": variant, "seed": seed, "dev": metrics[f"dev_{metric}"], "test": metrics[metric],
                             "seconds": round(time.monotonic() - started, 1)})  # fmt: skip
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    result = {"benchmark": "optimizer_groups", "task": args.task, "metric": metric, "encoder": "tiny (cmft pretrain)",
              "overrides": args.overrides}  # fmt: skip
    for variant in ("before", "after"):
        rows = [r for r in runs if r["variant"] == variant]
        result[variant] = {"dev": summary([r["dev"] for r in rows]), "test": summary([r["test"] for r in rows])}
    result["runs"] = runs
    if not args.overrides:
        write_results(args.results, {**provenance(), **result})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
