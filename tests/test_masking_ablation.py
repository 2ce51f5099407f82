"""benchmarks/masking_ablation.py resumes: finished pretraining arms and fine-tunings are reused, and the report pairs
the arms seed by seed. Training itself is replaced by stand-ins here (the real paths are covered by the pretraining
and fine-tuning tests); what is checked is the bookkeeping a 90-minute benchmark depends on."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO


class Stop(Exception):
    """Stands in for the rest of a pretraining run."""


def load_ablation():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("masking_ablation_bench", REPO / "benchmarks" / "masking_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(module, monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["masking_ablation.py", *args])
    module.main()
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_ablation_resumes_and_pairs_seeds(tmp_path, monkeypatch, capsys):
    ablation = load_ablation()
    pretrained, tuned = [], []

    def fake_pretrain(config, overrides, output_dir, resume):
        weight = 2.0 if "masking.medical_weight=2.0" in overrides else 1.0
        seed = next((o for o in overrides if o.startswith("seed=")), "the config's seed")
        pretrained.append((output_dir.name, resume))
        (output_dir / "model").mkdir(parents=True)
        (output_dir / "model" / "config.json").write_text(json.dumps({"model_type": "modernbert"}))
        (output_dir / "model" / "model.safetensors").write_bytes(f"weights {weight} {seed}".encode())
        top1 = {"mlm_top1": 0.40, "mlm_top5": 0.5, "mlm_top1_medical": 0.2 + 0.03 * weight, "mlm_top1_other": 0.45}
        (output_dir / "metrics.json").write_text(json.dumps(top1))
        (output_dir / "summary.json").write_text(json.dumps({"main_medical_share_of_masked": 0.2 * weight,
                                                             "main_seconds": 10.0}))  # fmt: skip
        return output_dir

    def fake_finetune(task, overrides, output_dir):
        seed = int(next(o for o in overrides if o.startswith("seed=")).split("=")[1])
        emphasis = "emphasis" in next(o for o in overrides if o.startswith("model.encoder="))
        tuned.append((task, seed, emphasis))
        output_dir.mkdir(parents=True)
        value = 0.5 + 0.01 * seed + (0.02 if emphasis else 0.0) - (0.03 if emphasis and seed == 1 else 0.0)
        (output_dir / "metrics.json").write_text(json.dumps({"f1": value, "micro_f1": value}))
        return output_dir

    monkeypatch.setattr(ablation, "pretrain", fake_pretrain)
    monkeypatch.setattr(ablation, "finetune", fake_finetune)
    args = ("--work", str(tmp_path / "work"), "--results", str(tmp_path / "ablation.jsonl"), "--steps", "7")
    report = run_main(ablation, monkeypatch, capsys, *args, "--seeds", "2")
    assert pretrained == [("pretrain-emphasis-7", False), ("pretrain-uniform-7", False)]
    assert len(tuned) == 8 and tuned[:2] == [("ner", 0, True), ("ner", 0, False)]
    paired = report["paired"]["ner_f1"]
    assert paired["values"] == [0.02, -0.01] and paired["emphasis_better_in"] == 1 and paired["seeds"] == 2
    assert report["arms"]["emphasis"]["ner_f1_values"] == [0.52, 0.5]
    assert report["delta"]["mlm_top1_medical"] == 0.03 and report["delta"]["ner_f1"] == 0.005
    # A rerun with one more seed reuses both pretraining runs and the four finished pairs.
    report = run_main(ablation, monkeypatch, capsys, *args, "--seeds", "3")
    assert len(pretrained) == 2 and len(tuned) == 12 and {t[1] for t in tuned[8:]} == {2}
    assert report["paired"]["icd_coding_micro_f1"]["seeds"] == 3 and report["pretrain_seed"] == 42
    # Another pretraining seed is an independent pair: new runs beside the first, none of their results reused.
    report = run_main(ablation, monkeypatch, capsys, *args, "--seeds", "1", "--pretrain-seed", "7")
    assert pretrained[2:] == [("pretrain-emphasis-7-seed7", False), ("pretrain-uniform-7-seed7", False)]
    assert len(tuned) == 16 and report["pretrain_seed"] == 7 and report["paired"]["ner_f1"]["seeds"] == 1


@pytest.mark.slow
def test_ablation_continues_an_interrupted_pretraining(tmp_path, monkeypatch, capsys):
    ablation = load_ablation()
    calls = []

    def fake_pretrain(config, overrides, output_dir, resume):
        calls.append(resume)
        raise Stop

    monkeypatch.setattr(ablation, "pretrain", fake_pretrain)
    (tmp_path / "work" / "pretrain-emphasis-300.partial").mkdir(parents=True)
    monkeypatch.setattr(sys, "argv", ["masking_ablation.py", "--work", str(tmp_path / "work"),
                                      "--results", str(tmp_path / "r.jsonl")])  # fmt: skip
    with pytest.raises(Stop):
        ablation.main()
    assert calls == [True]
