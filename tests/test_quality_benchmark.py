"""benchmarks/quality.py is not run in CI, but its code paths are: the smoke mode on one task, every row."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_quality_benchmark_smoke_mode(tiny_encoder, tmp_path):
    chart = tmp_path / "quality.png"
    result = subprocess.run(
        [sys.executable, "benchmarks/quality.py", "--smoke", "--tasks", "note_classification",
         "--encoder", str(tiny_encoder), "--chart", str(chart)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["benchmark"] == "quality" and report["smoke"] and report["seeds"] == [42]
    rows = report["tasks"]["note_classification"]["rows"]
    assert list(rows) == ["tiny_random", "tiny_pretrained", "minilm_cmft_full", "minilm_cmft_lora", "minilm_hf"]
    for row in rows.values():
        assert row["metric"] == "macro_f1" and 0.0 <= row["mean"] <= 1.0 and row["seconds"] > 0
        assert len(row["values"]) == 1 and row["spread"] == 0.0
    assert chart.is_file() and chart.stat().st_size > 1000
