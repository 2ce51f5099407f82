"""Load test of `cmft serve`: dynamic batching against the same service with batching off, and `cmft predict`.

The service runs on loopback as `cmft serve` (1 worker, 2 torch threads); the load client runs in its own process
(this script with --client) and sends a bounded, seeded stream of real test texts, one text per request, at each
concurrency with httpx's async client. Per setting: requests/s, texts/s, p50/p95/p99 latency and errors. Heads:
ICD coding on CodiEsp test notes (the goals), NER on NCBI-disease test sentences and the int8 ONNX ICD model
(reported). Baselines measured in the same run: the same service with `--no-batching` (one request per forward
pass) and `cmft predict`'s batch inference over the same texts (batch 16, length-sorted: the batch ceiling). Both
services are up at once and each gets the same warm-up; at each concurrency they take turns, the order alternating
from round to round (AB BA …, `--rounds`), and so do `cmft predict`'s batch 16 and batch 1; each figure is the
median round with the spread (max - min) of all rounds. Last, a soak of --soak requests to the NER service:
resident memory after request 1,000 and after the last.

    python benchmarks/serve_load.py [--encoder runs/pretrain/latest/model] [--requests 256] [--soak 10000]
        [--run icd_coding=DIR] [--run ner=DIR] [--rounds 2] [--results FILE] [--quick]

Prints one JSON line last with `speedup_vs_unbatched_c32`, `ratio_vs_predict_c32`, `p99_over_p50_c32` (ICD),
`errors` and `soak_rss_growth`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 8, 32)
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PYTHONPATH": str(ROOT / "src")}


# the load client (its own process) ------------------------------------------------------------------------------
async def _load(url: str, texts: list[str], concurrency: int) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    queue = list(enumerate(texts))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            nonlocal errors
            while queue:
                _, text = queue.pop()
                started = time.perf_counter()
                try:
                    response = await client.post("/predict", json={"text": text})
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - started)
                errors += not ok

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1)

    return {"concurrency": concurrency, "requests": len(texts), "seconds": round(seconds, 2),
            "requests_per_s": round(len(texts) / seconds, 1), "texts_per_s": round(len(texts) / seconds, 1),
            "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99), "errors": errors}  # fmt: skip


def client_main(url: str, texts_file: Path, concurrency: int) -> None:
    texts = json.loads(texts_file.read_text())
    print(json.dumps(asyncio.run(_load(url, texts, concurrency))))


# the orchestration ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    def __init__(self, source: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "cmft", "serve", str(source), "--port", str(self.port), *args]
        self.process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in self.process.stdout:  # the log: wait for uvicorn to listen
            if "Uvicorn running on" in line:
                break
        else:
            raise SystemExit(f"cmft serve {source} {' '.join(args)} did not start")
        self.drain = subprocess.Popen(["cat"], stdin=self.process.stdout, stdout=subprocess.DEVNULL)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(120)
        self.drain.wait(10)
        return code


def load(service: Service, texts_file: Path, concurrency: int) -> dict:
    result = subprocess.run([sys.executable, __file__, "--client", service.url, "--texts", str(texts_file),
                             "--concurrency", str(concurrency)], env=ENV, capture_output=True, text=True,
                            check=True)  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def predict_ceiling(source: Path, texts_file: Path, onnx: bool, int8: bool, rounds: int) -> dict:
    """`cmft predict`'s inference (batch 16, length-sorted) over the same texts, timed after loading; and at
    batch 1, which shows what batching can gain on this machine. The two alternate (16, 1, 1, 16, …)."""
    code = f"""
import json, statistics, time, torch
torch.set_num_threads(2)
from cmft.inference import open_source, predict_texts
loaded, backend = open_source({str(source)!r}, {onnx}, {int8})
texts = json.load(open({str(texts_file)!r}))
predict_texts(loaded, backend, texts[:8], 16)
rates = {{16: [], 1: []}}
for turn in range({rounds}):
    for batch in ((16, 1) if turn % 2 == 0 else (1, 16)):
        started = time.perf_counter()
        predict_texts(loaded, backend, texts, batch)
        rates[batch].append(len(texts) / (time.perf_counter() - started))
print(json.dumps({{"texts_per_s": round(statistics.median(rates[16]), 1), "batch_size": 16,
                  "spread": round(max(rates[16]) - min(rates[16]), 1),
                  "texts_per_s_batch_1": round(statistics.median(rates[1]), 1),
                  "spread_batch_1": round(max(rates[1]) - min(rates[1]), 1), "rounds": {rounds}}}))
"""
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_round(results: list[dict]) -> dict:
    """The round with the median texts/s (the lower one of an even count), with every round's rate and the spread."""
    ordered = sorted(results, key=lambda r: r["texts_per_s"])
    rates = [r["texts_per_s"] for r in results]
    return {**ordered[(len(ordered) - 1) // 2], "texts_per_s_rounds": rates,
            "spread": round(max(rates) - min(rates), 1), "errors": sum(r["errors"] for r in results)}  # fmt: skip


def head_runs(encoder: str, given: dict[str, Path], work: Path, steps: int) -> dict[str, Path]:
    """A briefly fine-tuned run per head (serving speed does not depend on how well it was trained)."""
    sys.path.insert(0, str(ROOT / "src"))
    from cmft.export import export_run
    from cmft.finetuning.run import finetune

    runs = {}
    for task in ("icd_coding", "ner"):
        overrides = [f"model.encoder={encoder}", f"training.max_steps={steps}", f"training.eval_every={steps}"]
        runs[task] = given.get(task) or finetune(task, overrides, output_dir=work / task)
    runs["icd_int8"], _ = export_run(runs["icd_coding"], work / "icd_export", quantize="int8")
    return runs


def texts_for(task: str, n: int, seed: int) -> list[str]:
    if task == "ner":
        sys.path.insert(0, str(ROOT / "src"))
        from cmft.data.ner import read_conll

        sentences, _ = read_conll(ROOT / "data/ncbi_disease/test.tsv")
        pool = [" ".join(words) for words, _ in sentences]
    else:
        pool = [json.loads(line)["text"] for line in (ROOT / "data/codiesp/test.jsonl").read_text().splitlines()]
    generator = random.Random(seed)
    return [generator.choice(pool) for _ in range(n)]


def measure_head(name: str, source: Path, texts: list[str], work: Path, serve_args: list[str], rounds: int) -> dict:
    texts_file = work / f"{name}_texts.json"
    texts_file.write_text(json.dumps(texts))
    onnx = name == "icd_int8"
    extra = ["--onnx", "--int8"] if onnx else []
    report: dict = {"texts": len(texts), "serve_args": serve_args, "rounds": rounds}
    services = {"batched": Service(source, *extra, *serve_args), "unbatched": Service(source, *extra, "--no-batching")}
    for service in services.values():
        load(service, texts_file, 8)  # the same warm-up: first calls, allocator, thread pools
    measured: dict[str, dict[int, list[dict]]] = {mode: {c: [] for c in CONCURRENCY} for mode in services}
    for concurrency in CONCURRENCY:
        for round_ in range(rounds):
            order = ("batched", "unbatched") if round_ % 2 == 0 else ("unbatched", "batched")
            for mode in order:
                measured[mode][concurrency].append(load(services[mode], texts_file, concurrency))
    for mode, service in services.items():
        report[mode] = {f"c{c}": median_round(measured[mode][c]) for c in CONCURRENCY}
        report[mode]["exit_code"] = service.stop()
        print(name, mode, json.dumps(report[mode]), file=sys.stderr)
    report["predict"] = predict_ceiling(source, texts_file, onnx, onnx, rounds)
    c32, unbatched = report["batched"]["c32"], report["unbatched"]["c32"]
    report["speedup_vs_unbatched_c32"] = round(c32["texts_per_s"] / unbatched["texts_per_s"], 2)
    report["ratio_vs_predict_c32"] = round(c32["texts_per_s"] / report["predict"]["texts_per_s"], 2)
    report["p99_over_p50_c32"] = round(c32["p99_ms"] / c32["p50_ms"], 2)
    report["errors"] = sum(r["errors"] for mode in ("batched", "unbatched") for r in report[mode].values()
                           if isinstance(r, dict))  # fmt: skip
    return report


def soak(source: Path, n: int, work: Path, serve_args: list[str]) -> dict:
    """`n` NER requests at concurrency 8: the service's resident memory after request 1,000 and after the last."""
    first, rest = texts_for("ner", 1000, 7), texts_for("ner", n - 1000, 8)
    (work / "soak1.json").write_text(json.dumps(first))
    (work / "soak2.json").write_text(json.dumps(rest))
    service = Service(source, *serve_args)
    one = load(service, work / "soak1.json", 8)
    rss_1000 = service.rss_mb()
    two = load(service, work / "soak2.json", 8)
    rss_end = service.rss_mb()
    code = service.stop()
    return {"requests": n, "rss_mb_at_1000": round(rss_1000, 1), "rss_mb_at_end": round(rss_end, 1),
            "soak_rss_growth": round(rss_end / rss_1000 - 1, 4), "errors": one["errors"] + two["errors"],
            "requests_per_s": round(n / (one["seconds"] + two["seconds"]), 1), "exit_code": code}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--client")
    parser.add_argument("--texts", type=Path)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--encoder", default=str(ROOT / "runs/pretrain/latest/model"))
    parser.add_argument("--run", action="append", default=[], help="TASK=DIR: an existing run (icd_coding, ner)")
    parser.add_argument("--requests", type=int, default=256, help="requests per head and setting")
    parser.add_argument("--soak", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--serve-args", default="", help="extra `cmft serve` options for the batched service")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per setting (AB, BA, …)")
    parser.add_argument("--results", help="also write the record, with its provenance, to this file")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests, a short soak")
    args = parser.parse_args()
    if args.client:
        client_main(args.client, args.texts, args.concurrency)
        return
    if args.quick:
        args.requests, args.soak, args.steps = 24, 1100, 2
    given = {key: Path(value) for key, value in (item.split("=", 1) for item in args.run)}
    serve_args = args.serve_args.split()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        runs = head_runs(args.encoder, given, work, args.steps)
        heads = {}
        for name, task in (("icd_coding", "icd_coding"), ("ner", "ner"), ("icd_int8", "icd_coding")):
            requests = args.requests * (4 if task == "ner" else 1)
            heads[name] = measure_head(name, runs[name], texts_for(task, requests, 42), work, serve_args,
                                       args.rounds)  # fmt: skip
        soaked = soak(runs["ner"], args.soak, work, serve_args)
    icd = heads["icd_coding"]
    result = {
        "speedup_vs_unbatched_c32": icd["speedup_vs_unbatched_c32"],
        "ratio_vs_predict_c32": icd["ratio_vs_predict_c32"],
        "p99_over_p50_c32": icd["p99_over_p50_c32"],
        "errors": sum(h["errors"] for h in heads.values()) + soaked["errors"],
        "soak_rss_growth": soaked["soak_rss_growth"],
        "heads": heads,
        "soak": soaked,
        "threads": 2,
        "median_p50_ms_c1": statistics.median(h["batched"]["c1"]["p50_ms"] for h in heads.values()),
    }
    if args.results:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from provenance import provenance, write_results

        write_results(args.results, {**provenance(), **result})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
