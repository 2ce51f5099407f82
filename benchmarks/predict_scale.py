"""`cmft predict` over an archive: memory against input size, a killed run resumed, torchrun against one process.

For NER (bundled NCBI-disease sentences repeated with distinct ids, default 20,000 and 60,000 rows) and ICD coding
(CodiEsp notes repeated, default 2,000), each `cmft predict` runs as its own process, as a user runs it:

1. the small and the large input, one process: the peak resident memory of each (the run's ru_maxrss, reported by
   a small interpreter that starts it) and rss_growth = large / small − 1 (goal ≤ 0.10: memory is that of a
   buffer, not of the input);
2. the large input again, SIGKILLed once about half of its buffers are written, then `--resume`d: the output must be
   byte-identical to the uninterrupted run's; resume_redone_rows = rows the resumed run predicted that the killed run
   had started (its buffer in flight: at most one buffer, `--buffer-rows`);
3. the large input under `torchrun --nproc_per_node 2`: byte-identical to one process.
Rows/s of each setting, from `cmft predict`'s own summary (predicting and assembling, not start-up). One process
uses torch's default threads (every core); each torchrun process takes cores / 2. On a machine busy with other work,
threads wait on each other and one process with every core can be far slower than two with half each
(`load_average_at_start` is recorded for that reason).

    python benchmarks/predict_scale.py --ner-run runs/finetune/<ner run> --icd-run runs/finetune/<icd run>
        [--rows 20000,60000] [--icd-rows 2000] [--buffer-rows 10000] [--icd-buffer-rows 200]
    python benchmarks/predict_scale.py --quick [--encoder runs/pretrain/latest/model]

`--quick` fine-tunes tiny NER and ICD models (a few steps) from the encoder made by `cmft pretrain` and runs small
inputs (900 and 2,700 NER rows in buffers of 150, 240 ICD notes in buffers of 20): a check that the script runs,
not a figure. Prints one JSON line last: {"rss_growth", "resume_identical", "resume_redone_rows",
"torchrun_identical", "rows_per_s": {"small", "large", "resumed", "torchrun_2"}, ... (NER), "icd": {the same}}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import provenance, shown, write_results  # noqa: E402

QUICK = ["training.max_steps=4", "training.eval_every=2", "training.max_length=128"]
SUMMARY = re.compile(r"predict: (\d+) texts in ([\d.]+) s \(([\d.]+) texts/s\)")


def texts_of(task: str) -> list[str]:
    from cmft.data.ner import read_conll

    if task == "ner":
        sentences, _ = read_conll(ROOT / "data/ncbi_disease/test.tsv")
        return [" ".join(words) for words, _ in sentences]
    lines = (ROOT / "data/codiesp/test.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


def write_input(path: Path, texts: list[str], rows: int) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(rows):
            handle.write(json.dumps({"id": f"d{i}", "text": texts[i % len(texts)]}) + "\n")
    return path


# running cmft ---------------------------------------------------------------------------------------------------
def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def cmft_predict(run: Path, inputs: Path, output: Path, buffer_rows: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cmft", "predict", str(run), str(inputs), "--output", str(output),
            "--buffer-rows", str(buffer_rows), *extra]  # fmt: skip


# A child's ru_maxrss counts the memory it had before exec, a copy of this (large) process: a small interpreter
# starts each run and reports the peak of its own child, the run.
PEAK = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); print('peak_rss_kb', "
    "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)"
)


def run(command: list[str], log: Path) -> dict:
    with open(log, "w", encoding="utf-8") as stderr:
        code = subprocess.call([sys.executable, "-c", PEAK, *command], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=stderr, env=environment())  # fmt: skip
    text = log.read_text(encoding="utf-8")
    if code != 0:
        sys.exit(f"{' '.join(command[2:5])} failed ({code}):\n{text[-3000:]}")
    found = SUMMARY.search(text)
    reused = re.search(r"(\d+) from earlier parts", text)
    return {"texts": int(found[1]), "seconds": float(found[2]), "rows_per_s": float(found[3]),
            "reused": int(reused[1]) if reused else 0,
            "peak_rss_mb": round(int(re.search(r"peak_rss_kb (\d+)", text)[1]) / 1024)}  # fmt: skip


def killed_at_half(command: list[str], parts: Path, buffers: int) -> int:
    """Start the run, SIGKILL it once half of its buffers are parts; the number of parts it left."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=environment())  # fmt: skip
    while len(list(parts.glob("part-*.jsonl"))) < (buffers + 1) // 2:
        if process.poll() is not None:
            sys.exit("the run finished before it could be killed at half; use more rows or smaller buffers")
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return len(list(parts.glob("part-*.jsonl")))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# one task ---------------------------------------------------------------------------------------------------------
def measure(task: str, run_dir: Path, small: int, large: int, buffer_rows: int, work: Path) -> dict:
    texts = texts_of(task)
    inputs = {n: write_input(work / f"{task}_{n}.jsonl", texts, n) for n in (small, large)}
    out = {name: work / f"{task}_{name}.jsonl" for name in ("small", "large", "resumed", "torchrun")}
    print(f"{task}: {small} and {large} rows, one process", file=sys.stderr, flush=True)
    runs = {n: run(cmft_predict(run_dir, inputs[n], out[name], buffer_rows), work / f"{task}_{name}.log")
            for n, name in ((small, "small"), (large, "large"))}  # fmt: skip
    print(f"{task}: killed at half, resumed", file=sys.stderr, flush=True)
    buffers = -(-large // buffer_rows)
    command = cmft_predict(run_dir, inputs[large], out["resumed"], buffer_rows)
    left = killed_at_half(command, work / f"{out['resumed'].name}.parts", buffers)
    resumed = run([*command, "--resume"], work / f"{task}_resumed.log")
    never_started = max(0, large - (left + 1) * buffer_rows)  # the killed run had started buffer `left` only
    print(f"{task}: torchrun --nproc_per_node 2", file=sys.stderr, flush=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(free_port()), *cmft_predict(run_dir, inputs[large],
                out["torchrun"], buffer_rows)[1:]]  # fmt: skip
    sharded = run(torchrun, work / f"{task}_torchrun.log")
    reference = out["large"].read_bytes()
    return {
        "rows": [small, large],
        "buffer_rows": buffer_rows,
        "peak_rss_mb": [runs[small]["peak_rss_mb"], runs[large]["peak_rss_mb"]],
        "rss_growth": round(runs[large]["peak_rss_mb"] / runs[small]["peak_rss_mb"] - 1, 4),
        "resume_identical": out["resumed"].read_bytes() == reference,
        "resume_parts_at_kill": left,
        "resume_redone_rows": resumed["texts"] - resumed["reused"] - never_started,
        "torchrun_identical": out["torchrun"].read_bytes() == reference,
        "rows_per_s": {
            "small": runs[small]["rows_per_s"],
            "large": runs[large]["rows_per_s"],
            "resumed": resumed["rows_per_s"],
            "torchrun_2": sharded["rows_per_s"],
        },
    }


def quick_runs(encoder: Path, root: Path) -> dict[str, Path]:
    from cmft.finetuning.run import finetune

    if not (encoder / "config.json").is_file():
        sys.exit(f"--encoder {encoder}: no model there; run `cmft pretrain` first or pass --encoder")
    return {task: finetune(recipe, [f"model.encoder={encoder}", *QUICK], output_dir=root / task)
            for task, recipe in (("ner", "ner"), ("icd", "icd_coding"))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ner-run", help="a fine-tuned NER run folder")
    parser.add_argument("--icd-run", help="a fine-tuned ICD coding run folder")
    parser.add_argument("--quick", action="store_true", help="fine-tune tiny models and run small inputs")
    parser.add_argument("--encoder", default="runs/pretrain/latest/model", help="--quick: the encoder to fine-tune")
    parser.add_argument("--rows", help="NER rows, small and large (default 20000,60000; --quick 900,2700)")
    parser.add_argument("--icd-rows", type=int, help="ICD notes (default 2000; --quick 240); the small input: a third")
    parser.add_argument("--buffer-rows", type=int, help="NER buffer (default 10000; --quick 150)")
    parser.add_argument("--icd-buffer-rows", type=int, help="ICD buffer (default 200; --quick 20)")
    parser.add_argument("--results", help="results file (default benchmarks/results/predict_scale[_quick].json)")
    args = parser.parse_args()
    if args.quick == bool(args.ner_run and args.icd_run):
        parser.error("pass --ner-run and --icd-run, or --quick")
    small, large = (int(n) for n in (args.rows or ("900,2700" if args.quick else "20000,60000")).split(","))
    icd_rows = args.icd_rows or (240 if args.quick else 2000)
    ner_buffer = args.buffer_rows or (150 if args.quick else 10_000)
    icd_buffer = args.icd_buffer_rows or (20 if args.quick else 200)
    started, load = time.monotonic(), [round(x, 2) for x in os.getloadavg()]  # other work slows the rates
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.quick:
            runs, models = quick_runs(Path(args.encoder), work), f"quick: {shown(args.encoder)} fine-tuned 4 steps"
        else:
            runs, models = {"ner": Path(args.ner_run), "icd": Path(args.icd_run)}, f"{shown(args.ner_run)}, " \
                f"{shown(args.icd_run)}"  # fmt: skip
        ner = measure("ner", runs["ner"], small, large, ner_buffer, work)
        icd = measure("icd", runs["icd"], icd_rows // 3, icd_rows, icd_buffer, work)
    result = {"benchmark": "predict_scale", "models": models, **ner, "icd": icd, "cores": os.cpu_count(),
              "load_average_at_start": load, "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    default = "benchmarks/results/predict_scale_quick.json" if args.quick else "benchmarks/results/predict_scale.json"
    write_results(args.results or ROOT / default, {**provenance(), **result})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
