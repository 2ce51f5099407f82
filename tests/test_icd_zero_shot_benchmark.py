"""benchmarks/icd_zero_shot.py is not run in CI, but its code paths are: --quick --big --onnx on a tiny ICD run
fine-tuned here on a few CodiEsp notes, with one K below the zero-shot codes and one above (which must give the dense
figures)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cmft.finetuning.run import finetune
from cmft.tasks.icd_descriptions import read_descriptions
from cmft.tasks.icd_zero_shot import zero_shot_codes
from tests.conftest import REPO

QUICK = ["training.max_steps=2", "training.eval_every=2", "training.max_length=64", "training.threads=1",
         "icd_coding.attention_dim=16", "icd_coding.label_space.min_train_count=2"]  # fmt: skip
SMALL, ALL = 4, 1_000_000  # candidates: fewer than the zero-shot codes, and more


@pytest.mark.slow
def test_icd_zero_shot_benchmark_runs_and_its_figures_hold(tiny_encoder, tmp_path):
    overrides = []
    for split, count in (("train", 40), ("dev", 20), ("test", 8)):
        lines = (REPO / f"data/codiesp/{split}.jsonl").read_text(encoding="utf-8").splitlines()[:count]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        overrides.append(f"data.{split}={tmp_path / f'{split}.jsonl'}")
    run = finetune("icd_coding", [f"model.encoder={tiny_encoder}", *overrides, *QUICK], output_dir=tmp_path / "run")
    results = tmp_path / "zero_shot.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/icd_zero_shot.py", "--run", str(run), "--quick", "--ks", f"{SMALL},{ALL}",
         "--big", "--onnx", "--onnx-ks", str(SMALL), "--results", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["benchmark"] == "icd_zero_shot" and report["quick"] and report["threads"] == 1

    trained = json.loads((run / "model" / "icd_coding.json").read_text(encoding="utf-8"))["labels"]
    codes = zero_shot_codes(read_descriptions("bundled:data/icd_codes/icd10cm_2024_codes.tsv.gz"), trained)
    candidates = report["codiesp"]["candidates"]
    assert candidates["zero_shot_codes"] == len(codes) > SMALL and candidates["trained_codes"] == len(trained)
    assert candidates["notes"] == 16 and candidates["gold_zero_shot_codes"] > 0
    few, every = candidates["by_k"][str(SMALL)], candidates["by_k"][str(ALL)]
    assert few["candidates_per_note"] == SMALL and every["candidates_per_note"] == len(codes)
    assert few["gold_share_random"] == round(SMALL / len(codes), 4) and every["gold_share_random"] == 1.0
    assert 0 <= few["gold_share_candidates"] <= every["gold_share_candidates"] == 1.0
    assert 0 <= few["gold_share_dense_top_k"] <= every["gold_share_dense_top_k"] == 1.0
    assert 0 < few["dense_top10_kept"] <= SMALL / 10 and every["dense_top10_kept"] == every["dense_top50_kept"] == 1.0
    assert every["average_precision"] == pytest.approx(candidates["average_precision_dense"], abs=1e-4)

    for case in (report["codiesp"], report["big"]):
        for timing in (case["timing"], case["onnx"]):
            names = list(timing["variants"])
            assert names[0] == "none" and timing["orders"] == [names, names[::-1]]  # each side first once
            for variant in timing["variants"].values():
                assert len(variant["seconds"]) == 2 and variant["min_s"] <= variant["median_s"] <= variant["max_s"]
            assert timing["variants"]["none"]["ratio_to_none"] == 1.0
    assert list(report["codiesp"]["timing"]["variants"]) == ["none", "dense", f"K={SMALL}", f"K={ALL}"]
    assert list(report["codiesp"]["onnx"]["exports"]) == ["none", "dense", f"K={SMALL}"]
    assert list(report["big"]["onnx"]["exports"]) == ["none", f"K={SMALL}"]  # no dense export at that size
    for case in ("codiesp", "big"):  # an export that fails its parity check is recorded, not timed
        exports = report[case]["onnx"]["exports"]
        assert exports["none"]["passed"] and exports["none"]["max_abs_diff"] < 1e-4
        assert list(report[case]["onnx"]["variants"]) == [name for name, export in exports.items() if export["passed"]]
        assert all(export["passed"] or "differs from PyTorch" in export["error"] for export in exports.values())

    big = report["big"]
    assert "synthetic" in big["synthetic"] and big["candidates"]["zero_shot_codes"] > len(codes)
    assert big["timing"]["trained_codes"] == len(trained) + big["timing"]["synthetic_trained_rows"]
    assert big["timing"]["synthetic_trained_rows"] > 0 and big["timing"]["zero_shot_codes"] > len(codes)

    text = results.read_text(encoding="utf-8")
    record = json.loads(text)
    assert record["commit"] and record["machine"]["cores"] and record["load_average_at_start"]
    assert str(tmp_path) not in text and not record["run"].startswith("/")
    assert record["command"].startswith("python benchmarks/icd_zero_shot.py --run run --quick")
