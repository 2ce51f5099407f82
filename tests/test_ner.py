"""NER: word alignment, windows over long sentences, strict IOB2 scoring, and the recipe end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoModelForTokenClassification, AutoTokenizer

from cmft.data.ner import read_conll, read_span_jsonl
from cmft.errors import CmftError
from cmft.finetuning.run import finetune
from cmft.metrics import entity_metrics
from cmft.tasks.ner import align_windows, merge_windows, repair_tags, to_iob2
from tests.conftest import REPO, run_cmft


@pytest.fixture(scope="module")
def tokenizer(tiny_encoder):
    return AutoTokenizer.from_pretrained(tiny_encoder)


def test_first_subtoken_carries_the_word(tokenizer):
    words = ["Familial", "adenomatous", "polyposis", "(", "FAP", ")", "is", "rare", "."]
    (window,) = align_windows(words, tokenizer, 128, 8)
    body = list(zip(window["word"][1:-1], window["first"][1:-1], strict=True))
    assert [w for w, first in body if first] == list(range(len(words)))  # one first sub-token per word, in order
    assert sorted({w for w, _ in body}) == list(range(len(words)))
    pieces = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    assert window["input_ids"][1:-1] == pieces and len(pieces) > len(words)  # some words split into pieces


def test_long_sentence_windows_overlap_and_merge_back_per_word(tokenizer):
    words = ["hereditary", "nonpolyposis", "colorectal", "cancer", "and", "breast", "ovarian", "syndromes"] * 12
    windows = align_windows(words, tokenizer, 32, 8)
    assert len(windows) > 3 and all(len(w["input_ids"]) <= 32 for w in windows)
    # some window starts inside a word: that word's first sub-token lies only in an earlier window
    assert any(not w["first"][1] for w in windows[1:])
    # fake logits: the class of a token = its window index, so we can see which window each word came from
    logits = []
    for index, window in enumerate(windows):
        row = np.zeros((len(window["input_ids"]), len(windows)), dtype=np.float32)
        row[:, index] = 1.0
        logits.append(row)
    merged = merge_windows(windows, logits, len(words))
    chosen = merged.argmax(-1)
    assert merged.shape == (len(words), len(windows))
    for word, window_index in enumerate(chosen):  # every word, taken from a window holding its first sub-token
        window = windows[window_index]
        assert any(w == word and f for w, f in zip(window["word"], window["first"], strict=True))
    assert len(set(chosen.tolist())) == len(windows)  # each window contributes the words it sees best


def test_strict_iob2_scoring_and_repair():
    gold = [["B-Disease", "I-Disease", "O", "B-Disease"]]
    assert entity_metrics(gold, gold)["f1"] == 1.0
    # a wrong boundary is a miss in strict mode: 1 of 2 predicted right, 1 of 2 gold found
    partial = entity_metrics(gold, [["B-Disease", "O", "O", "B-Disease"]])
    assert (partial["precision"], partial["recall"]) == (0.5, 0.5)
    # an entity opened with I- is illegal in IOB2: strict scoring ignores it ...
    illegal = [["I-Disease", "I-Disease", "O", "B-Disease"]]
    assert entity_metrics(gold, illegal)["recall"] == 0.5
    # ... and cmft's decoding repairs it into a proper entity
    assert repair_tags(illegal[0]) == gold[0]
    assert entity_metrics(gold, [repair_tags(illegal[0])])["f1"] == 1.0
    assert to_iob2(["O", "I-Chem", "I-Disease"]) == ["O", "B-Chem", "B-Disease"]
    assert entity_metrics(gold, gold)["per_type"]["Disease"]["support"] == 2


def test_readers(tmp_path):
    sentences, empty = read_conll(__import__("pathlib").Path("data/ncbi_disease/devel.tsv"))
    assert len(sentences) == 923 and empty == 0
    assert sum(t.startswith("B-") for _, tags in sentences for t in tags) == 787
    bad = tmp_path / "bad.tsv"
    bad.write_text("Familial\tB-Disease\npolyposis\tI-Disease\textra\n", encoding="utf-8")
    with pytest.raises(CmftError, match="line 2: expected 2 columns, found 3"):
        read_conll(bad)
    spans = tmp_path / "spans.jsonl"
    text = "Patients with cystic fibrosis and asthma."
    spans.write_text(
        json.dumps(
            {
                "text": text,
                "entities": [
                    {"start": 14, "end": 29, "label": "Disease"},
                    {"start": 34, "end": 40, "label": "Disease"},
                ],
            }
        )
        + "\n"
    )
    ((words, tags),) = read_span_jsonl(spans)
    assert words == ["Patients", "with", "cystic", "fibrosis", "and", "asthma", "."]
    assert tags == ["O", "O", "B-Disease", "I-Disease", "O", "B-Disease", "O"]


@pytest.mark.slow
def test_ner_recipe_end_to_end(tiny_encoder, tmp_path):
    run = finetune("ner", [f"model.encoder={tiny_encoder}", "training.max_steps=4", "training.eval_every=2",
                           "training.max_length=64"], output_dir=tmp_path / "ner")  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("precision", "recall", "f1"):
        assert 0 <= metrics[key] <= 1
    assert metrics["per_type"]["Disease"]["support"] == 960  # NCBI-disease test mentions
    assert metrics["n_windowed_test"] > 0  # max_length 64: long sentences were windowed, not truncated
    model = AutoModelForTokenClassification.from_pretrained(run / "model")
    assert model.config.id2label == {0: "O", 1: "B-Disease", 2: "I-Disease"}
    # predictions come back in dataset order (windows are merged per sentence by position): `cmft evaluate`,
    # which predicts sentence by sentence, must give the same scores as the training run
    from cmft.evaluation import evaluate_run

    again = evaluate_run(run, "test")
    for key in ("precision", "recall", "f1"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-9), key
    _raw_text_predictions_are_what_evaluation_scored(run, tmp_path)


def _as_written(words: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """A tokenised sentence as a person writes it: no spaces around hyphens and apostrophes ("X-linked",
    "Alzheimer's"), and each word's character span."""
    text, spans = "", []
    for i, word in enumerate(words):
        if i and word not in "-'" and words[i - 1] not in "-'":
            text += " "
        spans.append((len(text), len(text) + len(word)))
        text += word
    return text, spans


def _entity_spans(spans: list[tuple[int, int]], tags: list[str]) -> list[tuple[int, int, str]]:
    found: list[list] = []
    for (start, end), tag in zip(spans, tags, strict=True):
        if tag.startswith("B-"):
            found.append([start, end, tag[2:]])
        elif tag.startswith("I-") and found:
            found[-1][1] = end
    return [tuple(entity) for entity in found]


def _raw_text_predictions_are_what_evaluation_scored(run, tmp_path):
    """`cmft predict` on raw text splits words as training and evaluation do (the bug: "X-linked" was one word at
    prediction, three in training), so it returns exactly the entities evaluation scored — checked on the test
    sentences with hyphens or apostrophes, with the trained model and with logits that depend on each token (so
    that entities are found whatever a 4-step model predicts)."""
    from cmft.evaluation import split_outputs
    from cmft.inference import TorchBackend, load_run, predict_texts
    from cmft.tasks import get_task

    sentences, _ = read_conll(REPO / "data/ncbi_disease/test.tsv")
    chosen = [(words, tags) for words, tags in sentences if {"-", "'"} & set(words)]
    assert len(chosen) == 383  # of NCBI-disease's 940 test sentences
    test = tmp_path / "hyphens.tsv"
    test.write_text("\n\n".join("\n".join(map("\t".join, zip(*pair, strict=True))) for pair in chosen) + "\n")
    loaded = load_run(run)
    loaded.recipe.data.test = str(test)
    task = get_task(loaded.recipe)
    task.restore(loaded.meta)
    task.prepare(loaded.tokenizer, splits=("test",))
    written = [_as_written(words) for words, _ in chosen]
    labels = len(loaded.meta["labels"])

    def by_token(ids, mask):
        logits = np.zeros((*ids.shape, labels), dtype=np.float32)
        np.put_along_axis(logits, (ids % labels)[..., None], 1.0, axis=-1)
        return logits

    for backend in (TorchBackend(loaded.module), by_token):
        tags = task.word_predictions(split_outputs(task, backend, "test", 64, loaded.pad_id), "test")
        expected = [
            _entity_spans(spans, sentence_tags) for (_, spans), sentence_tags in zip(written, tags, strict=True)
        ]
        results, counts = predict_texts(loaded, backend, [text for text, _ in written], batch_size=64)
        assert counts["n_truncated"] == 0
        assert [[(e["start"], e["end"], e["label"]) for e in r["entities"]] for r in results] == expected
    assert sum(map(len, expected)) > 100


@pytest.mark.slow
def test_unknown_test_tag_and_malformed_lines_exit_2(tiny_encoder, tmp_path):
    lines = __import__("pathlib").Path("data/ncbi_disease/test.tsv").read_text(encoding="utf-8").splitlines()
    lines[0] = lines[0].split("\t")[0] + "\tB-Chemical"
    unknown = tmp_path / "test.tsv"
    unknown.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_cmft("finetune", "ner", f"model.encoder={tiny_encoder}", f"data.test={unknown}",
                      "--output-dir", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 2 and "B-Chemical" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
