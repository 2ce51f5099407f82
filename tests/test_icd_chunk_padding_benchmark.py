"""benchmarks/icd_chunk_padding.py is not run in CI, but its code paths are: two timed steps on a tiny encoder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_icd_chunk_padding_benchmark_reports_less_padding_after(tiny_encoder):
    result = subprocess.run(
        [sys.executable, "benchmarks/icd_chunk_padding.py", "--encoder", str(tiny_encoder), "--chunk-size", "128",
         "--max-chunks", "8", "--steps", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["benchmark"] == "icd_chunk_padding" and report["notes"] == 500 and report["steps_timed"] == 2
    computed, real = report["positions_per_epoch"], report["real_tokens_per_epoch"]
    assert real < computed["after"] < computed["before"]
    assert computed["before"] % 128 == 0  # every chunk at full width
    assert 0 < report["padding_share"]["after"] < report["padding_share"]["before"] < 1
    assert all(seconds > 0 for seconds in report["seconds_per_step"].values())
