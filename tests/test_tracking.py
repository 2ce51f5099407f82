"""`training.report_to`: the Trainer's tracking integrations for pretraining and every task; TensorBoard writes its
event files into the run folder, and a tracker that is not installed is one line and exit status 2."""

from __future__ import annotations

import pytest

from tests.conftest import run_inline


def _events(folder) -> list:
    return sorted((folder / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_tensorboard_writes_event_files_into_the_finetuning_run(tiny_encoder, tmp_path):
    from tensorboardX.event_file_writer import EventFileWriter  # noqa: F401  (the writer the suite installs)

    from cmft.finetuning.run import finetune

    run = finetune(
        "ner",
        [
            f"model.encoder={tiny_encoder}",
            "training.max_steps=2",
            "training.log_every=1",
            "training.max_length=64",
            "training.report_to=tensorboard",
        ],
        output_dir=tmp_path / "run",
    )
    events = _events(run)
    assert events and events[0].stat().st_size > 100  # the logged loss and learning rate, not just a header
    assert "report_to: tensorboard" in (run / "recipe.yaml").read_text()


@pytest.mark.slow
def test_tensorboard_writes_event_files_into_the_pretraining_run(small_config, tmp_path):
    from cmft.pretraining.run import pretrain

    run = pretrain(
        small_config({"training": {"max_steps": 2, "report_to": ["tensorboard"]}}), output_dir=tmp_path / "p"
    )
    assert _events(run) and _events(run)[0].stat().st_size > 100


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_that_is_not_installed_is_one_line_and_exit_2(tracker, tiny_encoder, tmp_path, capsys, monkeypatch):
    import transformers.integrations as integrations

    monkeypatch.setattr(integrations, f"is_{tracker}_available", lambda: False)
    code, _, err = run_inline(capsys, "finetune", "ner", f"model.encoder={tiny_encoder}", "training.max_steps=1",
                              f"training.report_to={tracker}", "--output-dir", str(tmp_path / "run"))  # fmt: skip
    assert code == 2 and err.strip().count("\n") == 0, err
    assert f"training.report_to: {tracker} is not installed" in err and f"pip install {tracker}" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_report_to_rejects_an_unknown_tracker(tmp_path, capsys):
    code, _, err = run_inline(capsys, "validate", "ner", "training.report_to=neptune")
    assert code == 2 and "report_to" in err and "Traceback" not in err
