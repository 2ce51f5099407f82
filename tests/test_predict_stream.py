"""`cmft predict` over large inputs: csv and Parquet in, Parquet out, small buffers giving what one buffer gives, a
run killed mid-way resumed to the same bytes, two torchrun processes writing what one process writes, and how the
buffers are dealt out to processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cmft.predict import Shard
from tests.conftest import REPO, bundled_test_texts, run_inline, write_csv
from tests.test_distributed import run_torchrun


def _rows(n: int, task: str = "ner") -> list[dict]:
    """n rows cycling over the bundled test texts, with distinct ids, an empty text now and then and one id twice."""
    texts = bundled_test_texts(task)
    rows = [{"id": f"r{i}", "text": "" if i % 13 == 5 else texts[i % len(texts)]} for i in range(n)]
    rows[-1]["id"] = rows[0]["id"]  # ids need not be unique: rows are told apart by their place
    return rows


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows]}), path,
                   row_group_size=7)  # fmt: skip
    return path


def _predict(capsys, *args: str) -> str:
    code, _, stderr = run_inline(capsys, "predict", *args)
    assert code == 0, stderr[-3000:]
    return stderr


def test_buffers_are_dealt_out_in_turn_skipping_the_done_ones():
    assert [k for k in range(7) if Shard(10, (), 3, 1).owns(k)] == [1, 4]  # k mod N = r
    done = (0, 1, 4)
    owners = {k: [r for r in range(2) if Shard(10, done, 2, r).owns(k)] for k in range(9)}
    assert owners == {0: [], 1: [], 2: [0], 3: [1], 4: [], 5: [0], 6: [1], 7: [0], 8: [1]}
    assert Shard(10, done, 2, 0).rows_owned(75) == 10 + 10 + 5  # buffers 2, 5 and the last, 7 (rows 70-74)


@pytest.mark.slow
def test_csv_and_parquet_in_and_small_buffers_give_the_jsonl_output(runs, tmp_path, capsys):
    rows = _rows(60)
    reference = tmp_path / "reference.jsonl"
    stderr = _predict(capsys, str(runs["ner"]), str(_jsonl(tmp_path / "in.jsonl", rows)), "--output", str(reference))
    assert "predict: 55 texts in " in stderr and "5 empty, skipped" in stderr  # rows 5, 18, 31, 44, 57
    lines = reference.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == [r["id"] for r in rows if r["text"]]
    for source in (_parquet(tmp_path / "in.parquet", rows), write_csv(tmp_path / "in.csv", rows)):
        output = tmp_path / f"{source.suffix[1:]}.jsonl"
        _predict(capsys, str(runs["ner"]), str(source), "--output", str(output), "--buffer-rows", "4")
        assert output.read_bytes() == reference.read_bytes(), source
        assert not (tmp_path / f"{output.name}.parts").exists()
    notes = _rows(12, "icd_coding")
    whole, buffered = tmp_path / "whole.jsonl", tmp_path / "buffered.jsonl"
    _predict(capsys, str(runs["icd_coding"]), str(_jsonl(tmp_path / "notes.jsonl", notes)), "--evidence",
             "--output", str(whole))  # fmt: skip
    _predict(capsys, str(runs["icd_coding"]), str(_parquet(tmp_path / "notes.parquet", notes)), "--evidence",
             "--buffer-rows", "3", "--output", str(buffered))  # fmt: skip
    assert buffered.read_bytes() == whole.read_bytes()
    assert all("evidence" in code for line in whole.read_text().splitlines() for code in json.loads(line)["codes"])


@pytest.mark.slow
def test_parquet_output_has_one_typed_row_per_prediction(runs, tmp_path, capsys):
    rows = _rows(30, "note_classification")
    inputs = _jsonl(tmp_path / "in.jsonl", rows)
    lines, table = tmp_path / "out.jsonl", tmp_path / "out.parquet"
    _predict(capsys, str(runs["note_classification"]), str(inputs), "--output", str(lines))
    _predict(capsys, str(runs["note_classification"]), str(inputs), "--output", str(table), "--buffer-rows", "8")
    read = pq.read_table(table)
    assert read.schema.names == ["id", "label", "score", "scores"]
    assert [str(t) for t in read.schema.types] == ["string", "string", "double", "string"]
    expected = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [{**row, "scores": json.loads(row["scores"])} for row in read.to_pylist()] == expected
    assert pq.ParquetFile(table).metadata.num_row_groups == 4  # one per buffer (of 8, 8, 8 and 6 rows)


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_parts_to_the_same_bytes(runs, tmp_path, capsys):
    rows = _rows(800)
    inputs = _jsonl(tmp_path / "in.jsonl", rows)
    reference, output = tmp_path / "reference.jsonl", tmp_path / "out.jsonl"
    _predict(capsys, str(runs["ner"]), str(inputs), "--output", str(reference), "--buffer-rows", "16")
    parts = tmp_path / "out.jsonl.parts"
    process = subprocess.Popen([sys.executable, "-m", "cmft", "predict", str(runs["ner"]), str(inputs), "--output",
                                str(output), "--buffer-rows", "16"], cwd=REPO, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (parts / "part-000001.jsonl").exists():  # killed while it works on a later buffer
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()[-3000:]
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert not output.exists()
    finished = sorted(parts.glob("part-*.jsonl"))
    assert 2 <= len(finished) < 800 // 16
    expected = reference.read_text(encoding="utf-8").splitlines(keepends=True)
    written = [line for part in finished for line in part.read_text(encoding="utf-8").splitlines(keepends=True)]
    assert written == expected[: len(written)]  # whole parts, whole lines: no half row
    code, _, stderr = run_inline(capsys, "predict", str(runs["ner"]), str(inputs), "--output", str(output))
    assert code == 2 and "parts of an unfinished run" in stderr  # never silently started over
    code, _, stderr = run_inline(capsys, "predict", str(runs["ner"]), str(inputs), "--output", str(output),
                                 "--buffer-rows", "32", "--resume")  # fmt: skip
    assert code == 2 and "settings.buffer_rows: 16 then, 32 now" in stderr
    stderr = _predict(capsys, str(runs["ner"]), str(inputs), "--output", str(output), "--buffer-rows", "16",
                      "--resume")  # fmt: skip
    assert output.read_bytes() == reference.read_bytes()
    assert f"{len(written)} from earlier parts" in stderr and not parts.exists()


@pytest.mark.slow
def test_two_torchrun_processes_write_what_one_process_writes(runs, tmp_path, capsys):
    rows = _rows(150)
    inputs = _parquet(tmp_path / "in.parquet", rows)
    one, two = tmp_path / "one.parquet", tmp_path / "two.parquet"
    _predict(capsys, str(runs["ner"]), str(inputs), "--output", str(one), "--buffer-rows", "16")
    result = run_torchrun("predict", str(runs["ner"]), str(inputs), "--output", str(two), "--buffer-rows", "16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert two.read_bytes() == one.read_bytes()
    summary = [line for line in result.stderr.splitlines() if " texts in " in line]
    texts = [sum(1 for row in rows[k * 16 : k * 16 + 16] if row["text"]) for k in range(10)]  # per buffer
    shares = f"2 processes ({sum(texts[0::2])} + {sum(texts[1::2])} texts)"  # buffer k to process k mod 2
    assert len(summary) == 1 and summary[0].startswith(f"predict: {sum(texts)} texts in ") and shares in summary[0]


@pytest.mark.slow
def test_parts_outlive_a_failed_assembly_and_merge_later(runs, tmp_path, capsys):
    inputs = _jsonl(tmp_path / "in.jsonl", _rows(20))
    reference, output = tmp_path / "reference.jsonl", tmp_path / "out.jsonl"
    _predict(capsys, str(runs["ner"]), str(inputs), "--output", str(reference))
    (tmp_path / ".out.jsonl.partial").mkdir()  # where OUT is assembled: a folder, so the assembly fails
    code, _, stderr = run_inline(capsys, "predict", str(runs["ner"]), str(inputs), "--output", str(output),
                                 "--buffer-rows", "6")  # fmt: skip
    assert code == 2 and "cannot write" in stderr and not output.exists()
    assert len(list((tmp_path / "out.jsonl.parts").glob("part-*.jsonl"))) == 4
    (tmp_path / ".out.jsonl.partial").rmdir()
    stderr = _predict(capsys, "--merge", str(output))
    assert output.read_bytes() == reference.read_bytes() and "merged 18 texts" in stderr


def test_each_torchrun_process_takes_its_own_gpu_or_its_share_of_the_cores(monkeypatch):
    import os

    import torch

    from cmft import distributed, predict

    for name, value in {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "RANK": "3", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)  # two machines, two processes each: this is the second on its machine
    monkeypatch.setattr(distributed, "start", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert predict._share_machine() == (None, 1)  # onnxruntime's device_id: the process's own GPU

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    threads = torch.get_num_threads()
    try:
        assert predict._share_machine() == (8, None)  # the machine's 16 cores between its 2 processes
        assert torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert predict._share_machine() == (None, None)  # one process: torch's and onnxruntime's own defaults
