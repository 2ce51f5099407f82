"""NER chained with assertion (cmft.chaining): `cmft predict NER --assertion RUN` and `cmft serve NER --assertion RUN`
give each entity the status the assertion model alone gives its (text, start, end) row, with torch or ONNX.

Two tiny runs (a few steps each) on the suite's tiny encoder; the NER run's learning rate is high so that its few
steps already tag some words (the chain needs entities to classify, not good ones)."""

from __future__ import annotations

import json
import socket
from collections import Counter
from pathlib import Path

import pytest

from cmft.finetuning.run import finetune
from tests.conftest import REPO, bundled_test_texts, run_inline

QUICK = ["training.max_length=128", "training.threads=2", "training.batch_size=16", "training.eval_batch_size=64"]
N_TEXTS = 24


def _slice(source: Path, target: Path, per_label: int) -> Path:
    kept, seen = [], Counter()
    for line in source.read_text(encoding="utf-8").splitlines():
        label = json.loads(line)["label"]
        if label in ("present", "absent") and seen[label] < per_label:
            kept.append(line)
            seen[label] += 1
    target.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return target


def _sentences(source: Path, target: Path, lines: int) -> Path:
    """The first sentences of a CoNLL file, about `lines` tokens (whole sentences)."""
    kept = source.read_text(encoding="utf-8").splitlines()
    end = next(i for i in range(min(lines, len(kept) - 1), len(kept)) if not kept[i].strip())
    target.write_text("\n".join(kept[:end]) + "\n", encoding="utf-8")
    return target


@pytest.fixture(scope="module")
def chain_runs(tiny_encoder, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chain")
    train = _slice(REPO / "data/assertion/train.jsonl", root / "train.jsonl", 40)
    dev = _slice(REPO / "data/assertion/dev.jsonl", root / "dev.jsonl", 8)
    encoder = f"model.encoder={tiny_encoder}"
    ner_data = [
        f"data.train={_sentences(REPO / 'data/ncbi_disease/train.tsv', root / 'train.tsv', 3000)}",
        f"data.dev={_sentences(REPO / 'data/ncbi_disease/devel.tsv', root / 'dev.tsv', 600)}",
        "data.test=null",
    ]
    ner = finetune("ner", [encoder, *QUICK, *ner_data, "training.max_steps=6", "training.eval_every=6",
                           "training.learning_rate=0.005"], output_dir=root / "ner")  # fmt: skip
    assertion = finetune("assertion", [encoder, *QUICK, f"data.train={train}", f"data.dev={dev}", "data.test=null",
                                       "training.max_steps=3", "training.eval_every=3"],
                         output_dir=root / "assertion")  # fmt: skip
    return {"ner": ner, "assertion": assertion}


@pytest.fixture(scope="module")
def notes(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("notes") / "notes.jsonl"
    texts = bundled_test_texts("ner")[:N_TEXTS]
    path.write_text("".join(json.dumps({"id": f"n{i}", "text": t}) + "\n" for i, t in enumerate(texts)), "utf-8")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _predict(capsys, *args: str) -> list[dict]:
    code, out, err = run_inline(capsys, "predict", *args)
    assert code == 0, err[-2000:]
    return [json.loads(line) for line in out.splitlines()]


def _alone(capsys, assertion: Path, rows: list[dict], folder: Path, *extra: str) -> list[dict]:
    """What the assertion model alone predicts for (text, start, end) rows."""
    path = folder / "spans.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return _predict(capsys, str(assertion), str(path), *extra)


def _spans(predictions: list[dict], notes: Path) -> list[dict]:
    texts = {row["id"]: row["text"] for row in map(json.loads, notes.read_text("utf-8").splitlines())}
    return [{"text": texts[p["id"]], "start": e["start"], "end": e["end"]} for p in predictions for e in p["entities"]]


def test_predict_gives_every_entity_the_assertion_models_status(chain_runs, notes, tmp_path, capsys):
    ner, assertion = chain_runs["ner"], chain_runs["assertion"]
    got = _predict(capsys, str(ner), str(notes), "--assertion", str(assertion))
    plain = _predict(capsys, str(ner), str(notes))
    labels = json.loads((assertion / "model" / "cmft_task.json").read_text("utf-8"))["labels"]
    entities = [e for p in got for e in p["entities"]]
    assert entities, "the NER run found no entity to chain"
    assert [p["id"] for p in got] == [p["id"] for p in plain]
    for with_status, without in zip(got, plain, strict=True):  # the rest of each row as without --assertion
        assert [{k: v for k, v in e.items() if not k.startswith("assertion")} for e in with_status["entities"]] \
            == without["entities"]  # fmt: skip
    for entity in entities:
        assert entity["assertion"] in labels and 0 <= entity["assertion_score"] <= 1
    alone = _alone(capsys, assertion, _spans(got, notes), tmp_path)
    assert [(e["assertion"], e["assertion_score"]) for e in entities] == [(a["label"], a["score"]) for a in alone]


def test_the_onnx_chain_runs_both_exports_and_agrees_with_torch(chain_runs, notes, tmp_path, capsys, monkeypatch):
    from cmft.chaining import open_chain
    from cmft.export import export_run
    from cmft.inference import open_source

    ner, assertion = chain_runs["ner"], chain_runs["assertion"]
    monkeypatch.chdir(tmp_path)  # `--onnx` on a run folder opens export/<run name> under the working directory
    for run in (ner, assertion):
        export_run(run, tmp_path / "export" / run.name)
    torch_side = _predict(capsys, str(ner), str(notes), "--assertion", str(assertion))
    onnx_side = _predict(capsys, str(ner), str(notes), "--assertion", str(assertion), "--onnx")
    loaded, _ = open_source(ner, True)
    assert open_chain(loaded, ner, assertion, True).backend.name == "onnx"  # the assertion model's export too
    assert [e["assertion"] for p in onnx_side for e in p["entities"]] == \
        [e["assertion"] for p in torch_side for e in p["entities"]]  # fmt: skip
    for got, want in zip(onnx_side, torch_side, strict=True):
        for g, w in zip(got["entities"], want["entities"], strict=True):
            assert (g["start"], g["end"]) == (w["start"], w["end"])
            assert g["assertion_score"] == pytest.approx(w["assertion_score"], abs=1e-4)
    alone = _alone(capsys, assertion, _spans(onnx_side, notes), tmp_path, "--onnx")
    assert [e["assertion"] for p in onnx_side for e in p["entities"]] == [a["label"] for a in alone]


def test_resume_compares_the_assertion_model(chain_runs, notes, tmp_path, capsys, monkeypatch):
    from cmft.predicting.parts import Parts

    ner, assertion = chain_runs["ner"], chain_runs["assertion"]
    output = tmp_path / "out.jsonl"
    args = [str(ner), str(notes), "--output", str(output), "--buffer-rows", "10"]
    monkeypatch.setattr(Parts, "remove", lambda self: None)  # keep the parts, as a killed run would
    assert _predict(capsys, *args, "--assertion", str(assertion)) == []
    rows = [json.loads(line) for line in output.read_text("utf-8").splitlines()]
    assert len(rows) == N_TEXTS and all("assertion" in e for r in rows for e in r["entities"])
    state = json.loads((tmp_path / "out.jsonl.parts" / "state.json").read_text("utf-8"))
    assert state["settings"]["assertion"]["weights"][0]["path"].startswith(str(assertion.resolve()))
    code, _, err = run_inline(capsys, "predict", *args, "--resume")  # the same parts, without the assertion model
    assert code == 2 and len(err.strip().splitlines()) == 1 and "made otherwise" in err, err
    code, _, err = run_inline(capsys, "predict", *args, "--resume", "--assertion", str(assertion))
    assert code == 0 and f"{N_TEXTS} from earlier parts" in err, err
    assert [json.loads(line) for line in output.read_text("utf-8").splitlines()] == rows


def test_serve_gives_the_same_entities_and_statuses_as_predict(chain_runs, notes, capsys):
    from fastapi.testclient import TestClient

    from cmft.chaining import open_chain
    from cmft.inference import open_source
    from cmft.serving.app import Settings, build_app
    from cmft.serving.batcher import Limits

    ner, assertion = chain_runs["ner"], chain_runs["assertion"]
    expected = _predict(capsys, str(ner), str(notes), "--assertion", str(assertion))
    loaded, backend = open_source(ner, False)
    chain = open_chain(loaded, ner, assertion, False)
    app = build_app(loaded, backend, Settings(Limits(max_batch_size=4), assertion=chain))
    texts = [json.loads(line)["text"] for line in notes.read_text("utf-8").splitlines()]
    with TestClient(app) as client:
        served = []
        for start in range(0, len(texts), 5):
            response = client.post("/predict", json={"text": texts[start : start + 5]})
            assert response.status_code == 200, response.text
            served.extend(response.json()["predictions"])
        info = client.get("/info").json()
    assert info["assertion"]["task"] == "assertion" and info["assertion"]["source"] == assertion.name
    for got, want in zip(served, expected, strict=True):
        assert [(e["start"], e["end"], e["label"], e["assertion"]) for e in got["entities"]] == \
            [(e["start"], e["end"], e["label"], e["assertion"]) for e in want["entities"]]  # fmt: skip
        for g, w in zip(got["entities"], want["entities"], strict=True):
            assert g["assertion_score"] == pytest.approx(w["assertion_score"], abs=1e-5)


@pytest.mark.parametrize("case", ["first_not_ner", "second_not_assertion", "corpus", "evidence"])
def test_refusals_are_one_line_and_exit_2(case, chain_runs, notes, capsys):
    ner, assertion = str(chain_runs["ner"]), str(chain_runs["assertion"])
    args = {"first_not_ner": [assertion, str(notes), "--assertion", assertion],
            "second_not_assertion": [ner, str(notes), "--assertion", ner],
            "corpus": [ner, str(notes), "--assertion", assertion, "--corpus", str(notes)],
            "evidence": [ner, str(notes), "--assertion", assertion, "--evidence"]}[case]  # fmt: skip
    code, out, err = run_inline(capsys, "predict", *args)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "--assertion" in err


@pytest.mark.parametrize("case", ["first_not_ner", "second_not_assertion", "corpus"])
def test_serve_refusals_are_one_line_and_exit_2(case, chain_runs, notes, capsys):
    ner, assertion = str(chain_runs["ner"]), str(chain_runs["assertion"])
    args = {"first_not_ner": [assertion, "--assertion", assertion],
            "second_not_assertion": [ner, "--assertion", ner],
            "corpus": [ner, "--assertion", assertion, "--corpus", str(notes)]}[case]  # fmt: skip
    code, _, err = run_inline(capsys, "serve", *args, "--port", str(free_port()))
    assert code == 2 and "--assertion" in err and len(err.strip().splitlines()) == 1, err


def test_a_text_holding_a_marker_string_gets_no_status():
    from types import SimpleNamespace

    from cmft.chaining import Chain
    from cmft.tasks.assertion import AssertionTask
    from cmft.tasks.ner import NerTask

    meta = {"assertion": {"markers": ["[E]", "[/E]"]}}
    chain = Chain(SimpleNamespace(task=AssertionTask, meta=meta), None, Path("assertion"))
    texts = ["No fever today.", "See [E] above: no cough."]
    predictions = [{"entities": [{"start": 3, "end": 8, "label": "Disease"}]},
                   {"entities": [{"start": 17, "end": 22, "label": "Disease"}]}]  # fmt: skip
    spans, inputs = chain.marked(SimpleNamespace(task=NerTask), texts, predictions)
    assert spans == [predictions[0]["entities"][0]] and inputs == ["No [E]fever[/E] today."]
    skipped = predictions[1]["entities"][0]
    assert skipped["assertion"] is None and skipped["assertion_score"] is None
