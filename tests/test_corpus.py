"""The bundled corpus and user sources: real text, stable held-out slice, no fine-tuning test text."""

from __future__ import annotations

import json

import pytest

from cmft.errors import CmftError
from cmft.pretraining.config import CorpusConfig, SourceConfig
from cmft.pretraining.corpus import build_corpus, dotted_icd9, dotted_icd10, iter_source


def test_icd_lines_follow_the_model_card_template():
    lines = list(iter_source(SourceConfig(bundled="icd10cm")))
    assert len(lines) == 74044
    assert "ICD-10-CM code E11.9: Type 2 diabetes mellitus without complications" in lines
    icd9 = list(iter_source(SourceConfig(bundled="icd9cm", max_documents=20000)))
    assert len(icd9) == 14567
    assert any(line.startswith("ICD-9-CM code 250.00: ") for line in icd9)


def test_code_dotting():
    assert dotted_icd10("E119") == "E11.9" and dotted_icd10("R52") == "R52"
    assert dotted_icd9("25000") == "250.00" and dotted_icd9("E8889") == "E888.9" and dotted_icd9("V1046") == "V10.46"


def test_no_fine_tuning_dev_or_test_text_in_the_corpus():
    corpus = build_corpus(
        CorpusConfig(sources=[SourceConfig(bundled="codiesp_train"), SourceConfig(bundled="mts_dialog_train")])
    )
    seen = set(corpus.train) | set(corpus.heldout)
    from cmft.paths import bundled_folder

    for split in ("dev", "test"):
        with open(bundled_folder("data") / "codiesp" / f"{split}.jsonl", encoding="utf-8") as handle:
            texts = [json.loads(line)["text"].strip() for line in handle]
        assert not seen & set(texts)
    assert len(seen) > 2500


def test_heldout_slice_is_stable_and_disjoint():
    config = CorpusConfig(sources=[SourceConfig(bundled="icd9cm")], holdout_fraction=0.05)
    first, second = build_corpus(config), build_corpus(config)
    assert first.heldout == second.heldout
    assert 500 < len(first.heldout) < 1000
    assert not set(first.heldout) & set(first.train)


def test_user_sources_text_jsonl_folder_and_glob(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("Patient with asthma.\nUses albuterol.\n", encoding="utf-8")
    (tmp_path / "notes" / "b.txt").write_text("Second note.\n\nAnother paragraph.\n", encoding="utf-8")
    (tmp_path / "notes.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n', encoding="utf-8")
    lines = list(iter_source(SourceConfig(path=str(tmp_path / "notes" / "a.txt"))))
    assert lines == ["Patient with asthma.", "Uses albuterol."]
    whole = list(iter_source(SourceConfig(path=str(tmp_path / "notes"), sample_by="document")))
    assert len(whole) == 2 and whole[0].startswith("Patient with asthma.")
    globbed = list(iter_source(SourceConfig(path=str(tmp_path / "notes" / "*.txt"), sample_by="paragraph")))
    assert len(globbed) == 3
    records = list(iter_source(SourceConfig(path=str(tmp_path / "notes.jsonl"), text_field="body")))
    assert records == ["one", "two"]


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (b"caf\xe9 au lait\n", "latin1.txt", "not UTF-8"),
        (b'{"text": "fine"}\nnot json\n', "broken.jsonl", "line 2 is not valid JSON"),
        (b'{"body": "x"}\n', "nofield.jsonl", "no string field 'text'"),
    ],
)
def test_bad_user_files_give_one_line_errors(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CmftError, match=message):
        list(iter_source(SourceConfig(path=str(path))))


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(CmftError, match="file not found"):
        list(iter_source(SourceConfig(path=str(tmp_path / "nope.txt"))))
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(CmftError, match="no non-empty document"):
        build_corpus(CorpusConfig(sources=[SourceConfig(path=str(tmp_path / "empty.txt"))]))


@pytest.mark.parametrize("failure", [OSError("connection reset by peer"), ValueError("schema mismatch")])
def test_stream_failure_on_valid_json_says_what_failed(tmp_path, monkeypatch, failure):
    """A stream that fails on a well-formed file is reported as that failure, not as bad JSON."""
    import datasets

    path = tmp_path / "notes.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n', encoding="utf-8")

    def failing_stream(*args, **kwargs):
        yield {"text": "one"}
        raise failure

    monkeypatch.setattr(datasets, "load_dataset", failing_stream)
    with pytest.raises(CmftError) as raised:
        list(iter_source(SourceConfig(path=str(path))))
    message = str(raised.value)
    assert "notes.jsonl" in message and type(failure).__name__ in message and str(failure) in message
    assert "JSON" not in message and "\n" not in message


def test_stream_failure_on_bad_json_names_the_line(tmp_path, monkeypatch):
    import datasets

    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "one"}\n{"text": \n', encoding="utf-8")

    def failing_stream(*args, **kwargs):
        yield {"text": "one"}
        raise ValueError("JSON parse error: Missing a value")

    monkeypatch.setattr(datasets, "load_dataset", failing_stream)
    with pytest.raises(CmftError, match="broken.jsonl: line 2 is not valid JSON"):
        list(iter_source(SourceConfig(path=str(path))))


def test_stream_failure_of_a_text_file_is_one_line(tmp_path, monkeypatch):
    import datasets

    path = tmp_path / "notes.txt"
    path.write_text("one\ntwo\n", encoding="utf-8")

    def failing_stream(*args, **kwargs):
        raise OSError("input/output error")
        yield  # a generator, as datasets' stream

    monkeypatch.setattr(datasets, "load_dataset", failing_stream)
    with pytest.raises(CmftError, match=r"notes.txt: reading it as text failed \(OSError: input/output error\)"):
        list(iter_source(SourceConfig(path=str(path))))
