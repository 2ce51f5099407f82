"""ICD coding on CodiEsp: the whole note in one long-context pass against PLM-ICD-style chunking.

Same encoder, recipe (recipes/icd_coding.yaml), epochs, learning rates, seed and label space; only
`icd_coding.mode` differs: `whole` (one pass up to max_length) vs `chunked` (segments of chunk_size
encoded independently, token states concatenated). Reports test micro/macro F1 and examples/s.

    python benchmarks/icd_long_context.py [--encoder runs/pretrain/latest/model] [--max-length 1024]
        [--chunk-size 256] [extra key=value overrides...]

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cmft.finetuning.run import finetune  # noqa: E402


def run_mode(mode: str, args: argparse.Namespace, root: Path) -> dict:
    overrides = [
        f"model.encoder={args.encoder}",
        f"icd_coding.mode={mode}",
        f"icd_coding.chunk_size={args.chunk_size}",
        f"icd_coding.max_chunks={-(-args.max_length // args.chunk_size)}",
        f"training.max_length={args.max_length}",
        *args.overrides,
    ]
    run = finetune("icd_coding", overrides, output_dir=root / mode)
    metrics = json.loads((run / "metrics.json").read_text())
    return {
        "micro_f1": metrics["micro_f1"],
        "macro_f1": metrics["macro_f1"],
        "precision_at_5": metrics["precision_at_5"],
        "train_examples_per_s": metrics["train_examples_per_s"],
        "test_examples_per_s": metrics["test_examples_per_s"],
        "n_truncated_test": metrics["n_truncated_test"],
        "train_seconds": metrics["train_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="runs/pretrain/latest/model")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides, e.g. training.epochs=2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = {mode: run_mode(mode, args, Path(folder)) for mode in ("whole", "chunked")}
    for mode, figures in results.items():
        print(f"{mode:>8}: micro_f1 {figures['micro_f1']:.4f}  macro_f1 {figures['macro_f1']:.4f}  "
              f"train {figures['train_examples_per_s']:.1f} ex/s  test {figures['test_examples_per_s']:.1f} ex/s",
              file=sys.stderr)  # fmt: skip
    summary = {
        "encoder": args.encoder,
        "max_length": args.max_length,
        "chunk_size": args.chunk_size,
        "overrides": args.overrides,
        **{f"{mode}_{k}": v for mode, r in results.items() for k, v in r.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
