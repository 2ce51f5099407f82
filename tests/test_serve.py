"""`cmft serve`: the real server in a subprocess on a free loopback port, called over HTTP like a client would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest

from cmft.export import export_run
from cmft.inference import OnnxBackend, TorchBackend, load_export, load_run, predict_texts, search
from tests.conftest import REPO, bundled_test_texts

MARKER = "ZQXNOTE4412"  # stands for note text: it must never come back in an error or reach the log
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`cmft serve ARGS` (or a wrapper script) on a free port; its output (the log) is kept for the checks."""

    def __init__(self, *args: str, script: str | None = None, cwd: Path | None = None):
        self.port = free_port()
        command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "cmft"]
        self.process = subprocess.Popen([*command, "serve", *args, "--port", str(self.port)], cwd=cwd or REPO,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        self.lines: list[str] = []
        started = threading.Event()

        def read() -> None:
            for line in self.process.stdout:
                self.lines.append(line)
                if "Uvicorn running on" in line:
                    started.set()
            started.set()  # the process ended

        threading.Thread(target=read, daemon=True).start()
        started.wait(180)
        assert self.process.poll() is None, "".join(self.lines)[-3000:]
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120)
        assert self.client.get("/ready").json() == {"status": "ready"}

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def texts_of(run: Path, n: int = 24) -> list[str]:
    """Real texts of the bundled test split of a run's task, of mixed lengths."""
    return bundled_test_texts(load_run(run).task.name)[:n]


def post_concurrently(server: Server, texts: list[str], per_request: int = 2, **options) -> list[dict]:
    """Requests of `per_request` texts sent 8 at a time (so the service batches them); predictions in text order."""
    groups = [texts[i : i + per_request] for i in range(0, len(texts), per_request)]

    def send(group: list[str]) -> list[dict]:
        response = server.client.post("/predict", json={"text": group, **options})
        assert response.status_code == 200, response.text
        return response.json()["predictions"]

    with ThreadPoolExecutor(8) as pool:
        return [p for predictions in pool.map(send, groups) for p in predictions]


def compare(task: str, served: list[dict], expected: list[dict], threshold: float | None = None) -> None:
    """Served predictions against `cmft predict`'s: fp32 scores within 1e-5; labels, entities, codes equal (ICD:
    except codes within 1e-4 of the threshold)."""
    assert len(served) == len(expected)
    for got, want in zip(served, expected, strict=True):
        if task == "note_classification":
            assert got["label"] == want["label"] and abs(got["score"] - want["score"]) <= 1e-5
            for label in got["scores"].keys() & want["scores"].keys():
                assert abs(got["scores"][label] - want["scores"][label]) <= 1e-5
        elif task == "ner":
            assert got["entities"] == want["entities"]
        elif task == "icd_coding":
            g = {c["code"]: c["probability"] for c in got["codes"]}
            w = {c["code"]: c["probability"] for c in want["codes"]}
            for code in g.keys() ^ w.keys():
                assert abs(g.get(code, w.get(code)) - threshold) <= 1e-4, code
            for code in g.keys() & w.keys():
                assert abs(g[code] - w[code]) <= 1e-5
        else:
            assert np.abs(np.array(got["embedding"]) - np.array(want["embedding"])).max() <= 1e-5


def flags(loaded, texts: list[str]) -> list[dict]:
    units, _ = loaded.task.encode(loaded.tokenizer, texts, loaded.meta)
    found = [{"truncated": False, "windows": 0} for _ in texts]
    for unit in units:
        found[unit.text]["truncated"] |= unit.truncated
        found[unit.text]["windows"] += 1
    return found


@pytest.mark.parametrize("name", ["note_classification", "ner", "icd_chunked"])
def test_served_predictions_agree_with_cmft_predict(runs, name):
    """Torch back end, batching on: concurrent requests of real test texts give what `cmft predict` gives, with
    `truncated` per text (and `windows` for NER); /info, /health and /metrics describe the service."""
    run = runs[name]
    loaded = load_run(run)
    texts = texts_of(run)
    expected, _ = predict_texts(loaded, TorchBackend(loaded.module), texts, batch_size=16)
    with Server(str(run), "--max-batch-tokens", "2048", "--max-wait-ms", "20") as server:
        served = post_concurrently(server, texts)
        info = server.client.get("/info").json()
        metrics = server.client.get("/metrics").text
        assert server.client.get("/health").json() == {"status": "ok"}
    task = loaded.task.name
    compare(task, served, expected, loaded.meta.get("threshold"))
    for got, want in zip(served, flags(loaded, texts), strict=True):
        assert got["truncated"] == want["truncated"]
        assert got.get("windows", want["windows"]) == want["windows"] and ("windows" in got) == (task == "ner")
    assert any(w["truncated"] or w["windows"] > 1 for w in flags(loaded, texts))  # the case is exercised
    assert info["task"] == task and info["labels"] == loaded.meta["labels"] and info["backend"] == "torch"
    assert info["max_length"] == loaded.meta["max_length"]
    rows = [line for line in metrics.splitlines() if line.startswith("cmft_batch_rows_count")]
    forwards = float(rows[0].split()[-1])
    assert 0 < forwards < len(texts) / 2  # requests were batched together
    assert 'cmft_requests_total{endpoint="/predict",status="200"} 12.0' in metrics
    assert "cmft_queue_depth" in metrics and "cmft_request_seconds_bucket" in metrics


def test_icd_with_an_api_key_and_per_request_options(runs, tmp_path):
    """ICD coding behind an API key (401 without it, constant-time compare), with the tuned threshold or the
    request's own threshold and top_k."""
    run = runs["icd_coding"]
    loaded = load_run(run)
    texts = texts_of(run, 12)
    key = tmp_path / "key"
    key.write_text("s3cret-key\n")
    with Server(str(run), "--api-key-file", str(key)) as server:
        assert server.client.post("/predict", json={"text": "x"}).status_code == 401
        wrong = server.client.post("/predict", json={"text": "x"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert server.client.get("/info").status_code == 401 and server.client.get("/metrics").status_code == 401
        assert server.client.get("/health").status_code == 200  # probes stay open
        bad = server.client.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 401  # the key is checked before the body is read
        server.client.headers["Authorization"] = "Bearer s3cret-key"
        served = post_concurrently(server, texts, per_request=3)
        low = post_concurrently(server, texts, per_request=3, threshold=0.01, top_k=3)
    expected, _ = predict_texts(loaded, TorchBackend(loaded.module), texts)
    compare("icd_coding", served, expected, loaded.meta["threshold"])
    options = replace(loaded, meta={**loaded.meta, "threshold": 0.01, "top_k": 3})
    lowered, _ = predict_texts(options, TorchBackend(loaded.module), texts)
    compare("icd_coding", low, lowered, 0.01)
    assert all(len(got["codes"]) == 3 for got in low)  # the low threshold leaves more than top_k


def test_retrieval_onnx_with_a_corpus_and_int8_icd_without_batching(runs, exports, tmp_path):
    """The ONNX export of the bi-encoder: /predict embeddings and /search hits agree with `cmft predict` (and its
    --corpus search); the int8 ICD model, batching off, agrees with `cmft predict --int8` one text at a time."""
    run, folder = runs["retrieval"], exports["retrieval"]
    corpus = tmp_path / "corpus.jsonl"
    documents = texts_of(run, 40)[20:]
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(documents)))
    queries = texts_of(run, 12)
    loaded, backend = load_export(folder), OnnxBackend(folder / "model.onnx")
    expected, _ = predict_texts(loaded, backend, queries)
    hits, _ = search(loaded, backend, queries, corpus, 5, 16)
    with Server(str(folder), "--corpus", str(corpus)) as server:
        served = post_concurrently(server, queries)
        found = server.client.post("/search", json={"text": queries, "top_k": 5}).json()["results"]
        assert server.client.get("/info").json()["search"] is True
    compare("retrieval", served, expected)
    for got, want in zip(found, hits, strict=True):
        assert [h["id"] for h in got["hits"]] == [h["id"] for h in want["hits"]]
        assert max(abs(g["score"] - w["score"]) for g, w in zip(got["hits"], want["hits"], strict=True)) <= 1e-5
    icd, _ = export_run(runs["icd_coding"], tmp_path / "icd8", quantize="int8")
    loaded, int8 = load_export(icd), OnnxBackend(icd / "model.int8.onnx")
    texts = texts_of(runs["icd_coding"], 8)
    expected = [predict_texts(loaded, int8, [text])[0][0] for text in texts]
    with Server(str(icd), "--onnx", "--int8", "--no-batching") as server:
        served = post_concurrently(server, texts, per_request=1)
        assert server.client.get("/info").json()["batching"]["batching"] is False
    compare("icd_coding", served, expected, loaded.meta["threshold"])


def test_bad_requests_get_their_status_and_never_echo_text(runs, tmp_path):
    with Server(str(runs["note_classification"]), "--max-texts", "4", "--max-body-mb", "0.01") as server:
        post = server.client.post
        cases = {
            "missing text": post("/predict", json={"txt": MARKER}),
            "wrong type": post("/predict", json={"text": 5}),
            "wrong item type": post("/predict", json={"text": [MARKER, 3]}),
            "empty list": post("/predict", json={"text": []}),
            "empty text": post("/predict", json={"text": ["   "]}),
            "bad json": post("/predict", content=f'{{"text": "{MARKER}', headers={"content-type": "application/json"}),
            "unknown option": post("/predict", json={"text": MARKER, "threshold": 0.3}),
        }
        for what, response in cases.items():
            assert response.status_code == 422, what
            body = response.json()
            assert body["error"] == "invalid request" and body["fields"], what
            assert MARKER not in response.text, what
        assert cases["missing text"].json()["fields"][0]["field"] == "text"
        assert cases["bad json"].json()["fields"] == [{"field": "body", "problem": "JSON decode error"}]
        too_many = post("/predict", json={"text": [MARKER] * 5})
        assert too_many.status_code == 413 and MARKER not in too_many.text
        too_big = post("/predict", json={"text": [MARKER * 1000]})
        assert too_big.status_code == 413 and MARKER not in too_big.text
        assert post("/search", json={"text": "x"}).status_code == 404  # no corpus here
        ok = post("/predict", json={"text": f"{MARKER} chest pain on exertion"})
        assert ok.status_code == 200 and "X-Request-ID" in ok.headers
        docs = server.client.get("/openapi.json").json()
        assert {"/predict", "/search", "/health", "/ready", "/info", "/metrics"} <= set(docs["paths"])
        code = server.stop()
    assert code == 0
    assert MARKER not in server.log and "POST /predict 413" in server.log and "texts=1" in server.log


FAULTS = """
import os, sys, time
from pathlib import Path
from cmft.serving import batcher
from cmft.tasks.classification import ClassificationTask

original_encode = ClassificationTask.encode.__func__
def encode(cls, tokenizer, texts, meta):
    units, counts = original_encode(cls, tokenizer, texts, meta)
    for unit in units:
        if "POISON" in texts[unit.text]:
            unit.input_ids = [*unit.input_ids, 10**9]  # an id outside the vocabulary: the forward pass fails
        unit.hold = "HOLD" in texts[unit.text]
    return units, counts
ClassificationTask.encode = classmethod(encode)

original_compute = batcher.Batcher._compute
def compute(self, jobs):
    if any(getattr(u, "hold", False) for job in jobs for u in job.units):
        folder = Path(os.environ["CMFT_TEST_FOLDER"])
        (folder / "entered").touch()
        while not (folder / "release").exists():
            time.sleep(0.01)
    original_compute(self, jobs)
batcher.Batcher._compute = compute

from cmft.cli import main
sys.argv = ["cmft", *sys.argv[1:]]
main()
"""


def test_a_failed_batch_fails_its_requests_only_and_sigterm_drains(runs, tmp_path, monkeypatch):
    """A forward pass that fails answers its request with 500 and the service keeps serving; SIGTERM lets the
    request in flight finish, then the process exits 0."""
    monkeypatch.setenv("CMFT_TEST_FOLDER", str(tmp_path))
    server = Server(str(runs["note_classification"]), "--max-batch-size", "1", script=FAULTS)
    post = server.client.post
    with ThreadPoolExecutor(4) as pool:
        poisoned = pool.submit(post, "/predict", json={"text": "POISON chest pain"})
        fine = [pool.submit(post, "/predict", json={"text": f"patient {i} has a cough"}) for i in range(6)]
        assert poisoned.result().status_code == 500
        assert all(f.result().status_code == 200 for f in fine)
    assert post("/predict", json={"text": "after the failure"}).status_code == 200
    assert 'cmft_errors_total{kind="batch_failed"} 1.0' in server.client.get("/metrics").text
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(post, "/predict", json={"text": "HOLD this request"})
        deadline = time.monotonic() + 60
        while not (tmp_path / "entered").exists():
            assert time.monotonic() < deadline and not held.done()
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        while "draining" not in server.log:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        (tmp_path / "release").touch()
        assert held.result().status_code == 200  # answered although SIGTERM came first
    assert server.process.wait(60) == 0
    assert "POISON" not in server.log and "HOLD" not in server.log
    server.client.close()


def test_serve_without_its_extra_or_with_bad_options_says_so(runs, tmp_path):
    run = str(runs["note_classification"])
    hidden = tmp_path / "hide"
    hidden.mkdir()
    (hidden / "fastapi.py").write_text("raise ImportError('not installed')\n")  # shadows the real one
    env = {**os.environ, "PYTHONPATH": f"{hidden}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "cmft", "serve", run], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=300)  # fmt: skip
    assert result.returncode == 2 and result.stderr.strip().endswith('pip install "cmft[serve]"')
    assert len(result.stderr.strip().splitlines()) == 1
    for args, said in ((["--int8"], "--int8 needs --onnx"), (["--max-batch-size", "0"], "at least 1"),
                       (["--api-key-file", str(tmp_path / "none")], "cannot read"),
                       (["--corpus", str(tmp_path / "c.jsonl")], "searching needs a retrieval model")):  # fmt: skip
        result = subprocess.run([sys.executable, "-m", "cmft", "serve", run, "--port", str(free_port()), *args],
                                capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
        assert result.returncode == 2 and said in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
