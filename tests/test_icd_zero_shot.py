"""Codes never seen in train: descriptions from the user's file, zero-shot codes scored from them after training (each
note's candidates in full, as the dense head scores them), their own threshold, and a model folder that carries all of
it (predict never reads the descriptions file), ONNX export included."""

from __future__ import annotations

import gzip
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from cmft.backends import OnnxBackend, TorchBackend
from cmft.errors import CmftError
from cmft.evaluation import evaluate_run
from cmft.export import export_run
from cmft.finetuning.run import finetune, load_recipe
from cmft.heads import NOT_A_CANDIDATE, candidate_scores
from cmft.inference import load_export, load_run, open_source, predict_texts
from cmft.tasks import get_task
from cmft.tasks.icd_batches import IcdModule
from cmft.tasks.icd_coding import IcdCoder, IcdCodingTask
from cmft.tasks.icd_descriptions import description_queries, read_descriptions, scaled
from cmft.tasks.icd_labels import normalize_code
from cmft.tasks.icd_metrics import code_thresholds
from cmft.tasks.icd_zero_shot import choose_zero_shot_threshold, zero_shot_codes
from tests.conftest import REPO

K = 3  # icd_coding.label_space.zero_shot_candidates of the zero-shot run: fewer than its zero-shot codes
QUICK = ["training.max_steps=2", "training.eval_every=2", "training.max_length=64", "training.threads=2",
         "training.learning_rate=0.01", "icd_coding.attention_dim=16",
         "icd_coding.label_space.min_train_count=2"]  # fmt: skip
INVENTED = "ZZZ unlisted test code, in no ICD-10-CM table"


def _rows(split: str, n: int) -> list[dict]:
    lines = (REPO / f"data/codiesp/{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line) for line in lines]


def _bundled() -> dict[str, str]:
    return read_descriptions("bundled:data/icd_codes/icd10cm_2024_codes.tsv.gz")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    """CodiEsp slices and a user's descriptions file: the label space's codes but one, bundled siblings of the first two
    trained codes and of a test gold code, an invented sibling of the first, and a code of an untrained category."""
    root = tmp_path_factory.mktemp("zero_shot_data")
    files = {}
    for split, n in (("train", 40), ("dev", 20), ("test", 20)):
        files[split] = root / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in _rows(split, n)), encoding="utf-8")
    counts = Counter(normalize_code(c) for row in _rows("train", 40) for c in set(row["codes"]))
    trained = sorted(code for code, n in counts.items() if n >= 2)
    bundled = _bundled()
    described = [code for code in trained if code in bundled][1:]  # the first described code left out
    first, second = (normalize_code(code, "category") for code in described[:2])
    siblings = [c for c in bundled if normalize_code(c, "category") in (first, second) and c not in trained][:4]
    categories = {normalize_code(code, "category") for code in trained}
    test_gold = [normalize_code(c) for row in _rows("test", 20) for c in row["codes"]]
    siblings.append(next(c for c in test_gold if normalize_code(c, "category") in categories and c in bundled
                         and c not in trained and c not in siblings))  # so that coverage can show it  # fmt: skip
    invented = f"{first}.ZZ"
    outsider = next(c for c in bundled if normalize_code(c, "category") not in categories)
    lines = ["code\tdescription"] + [f"{c}\t{bundled[c]}" for c in [*described, *siblings, outsider]]
    lines.append(f"{invented.replace('.', '')}\t{INVENTED}")
    files["descriptions"] = root / "my_codes.tsv"
    files["descriptions"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"files": files, "trained": trained, "zero_shot": sorted([*siblings, invented]),
            "undescribed": len(trained) - len(described)}  # fmt: skip


def _overrides(small: dict, encoder: Path, zero_shot: bool) -> list[str]:
    files = small["files"]
    return [f"model.encoder={encoder}", f"data.train={files['train']}", f"data.dev={files['dev']}",
            f"data.test={files['test']}", f"icd_coding.descriptions={files['descriptions']}",
            f"icd_coding.label_space.zero_shot={str(zero_shot).lower()}",
            f"icd_coding.label_space.zero_shot_candidates={K}", *QUICK]  # fmt: skip


@pytest.fixture(scope="module")
def zero_shot_run(small, tiny_encoder, tmp_path_factory) -> Path:
    return finetune("icd_coding", _overrides(small, tiny_encoder, True),
                    output_dir=tmp_path_factory.mktemp("zero_shot") / "run")  # fmt: skip


def _attend_before(head: nn.Module, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LabelAttentionHead.attend as it was before zero-shot candidates: every row densely, with its own weight."""
    hidden = torch.tanh(head.project(states))
    scores = head.label_queries(hidden).transpose(1, 2).float()
    scores = scores.masked_fill(~mask[:, None, :].bool(), torch.finfo(torch.float32).min)
    weights = scores.softmax(dim=-1)
    label_states = weights @ states.float()
    return (label_states * head.output_weight.float()).sum(-1) + head.output_bias.float(), weights


def _states(coder: nn.Module, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The token states and mask that the head of `coder` sees for `texts`, padded into one batch as predict pads."""
    meta = {"icd": coder.settings}
    ids, mask = IcdCodingTask.collate(IcdCodingTask.encode(coder.tokenizer, texts, meta)[0], 0, meta)
    with torch.no_grad():
        return IcdModule(coder).states(torch.from_numpy(ids), torch.from_numpy(mask))


def test_descriptions_file_header_optional_gzip_and_codes_normalised(tmp_path):
    plain = tmp_path / "codes.tsv"
    plain.write_text("E119\tType 2 diabetes\n\ne11.9\tlater rows of a code are ignored\n4019\tHypertension\n")
    assert read_descriptions(str(plain)) == {"E11.9": "Type 2 diabetes", "4019": "Hypertension"}
    packed = tmp_path / "codes.tsv.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as handle:
        handle.write("icd9_code\tlong_title\n4019\tHypertension\n")
    assert read_descriptions(str(packed)) == {"4019": "Hypertension"}  # the header row is skipped
    assert len(_bundled()) == 74044
    with pytest.raises(CmftError, match="missing.tsv: file not found"):
        read_descriptions(str(tmp_path / "missing.tsv"))
    plain.rename(tmp_path / "plain.gz")
    with pytest.raises(CmftError, match="plain.gz: not a readable gzip file"):
        read_descriptions(str(tmp_path / "plain.gz"))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("E11.9 Type 2 diabetes\n", "line 1: 1 tab-separated columns; expected code<TAB>description"),
        ("code\tdescription\nE11.9\tdiabetes\textra\n", "line 2: 3 tab-separated columns"),
        ("E11.9\t \n", "line 1: an empty column"),
        ("\n\n", "no code<TAB>description rows"),
        ("code\tdescription\n", "no code<TAB>description rows"),
        (b"\xff\xfe\x00E11", "not a UTF-8 text file"),
    ],
)  # fmt: skip
def test_bad_descriptions_file_is_one_clear_error(tmp_path, content, expected):
    path = tmp_path / "bad.tsv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CmftError) as raised:
        read_descriptions(str(path))
    assert str(raised.value).startswith(f"icd_coding.descriptions: {path}: ") and expected in str(raised.value)


def test_zero_shot_codes_are_the_other_codes_of_trained_categories():
    table = {"E11.9": "", "E11.65": "", "E10.9": "", "I10": "", "I11.9": "", "A00.0": ""}
    assert zero_shot_codes(table, ["E11.9", "I10"]) == ["E11.65"]
    assert zero_shot_codes(table, ["E11.8", "I11.0"]) == ["E11.65", "E11.9", "I11.9"]


def test_zero_shot_threshold_is_chosen_for_all_gold_codes():
    targets, predicted = np.array([[True], [False]]), np.array([[True], [False]])  # one trained hit
    gold = np.array([[True, False], [False, False]])
    helpful = np.array([[0.003, 0.001], [0.001, 0.001]])  # the gold zero-shot code on top, below the whole grid
    assert choose_zero_shot_threshold(targets, predicted, gold, helpful, 0.5, n_gold=3) == pytest.approx(0.003)
    useless = np.array([[0.0, 0.2], [0.2, 0.2]])  # the gold zero-shot code below every other: none helps
    assert choose_zero_shot_threshold(targets, predicted, gold, useless, 0.5, n_gold=3) == 1.0
    settings = {"labels": ["A", "B", "Z"], "threshold": 0.5, "code_thresholds": {"B": 0.3}, "zero_shot_labels": ["Z"],
                "zero_shot_threshold": 0.2}  # fmt: skip
    assert code_thresholds(settings).tolist() == [0.5, 0.3, 0.2]
    meta = {"labels": settings["labels"], "threshold": 0.5, "icd": settings}
    found = IcdCodingTask.decode(meta, "", [np.array([0.6, 0.25, 0.25])], [])["codes"]
    assert found == [{"code": "A", "probability": 0.6}, {"code": "Z", "probability": 0.25, "zero_shot": True}]
    found = IcdCodingTask.decode({**meta, "threshold": 0.1}, "", [np.array([0.6, 0.25, 0.25])], [])["codes"]
    assert [c["code"] for c in found] == ["A", "B", "Z"]  # a request's threshold holds for every code


def test_zero_shot_off_keeps_the_label_space_and_the_model(small, tiny_encoder):
    recipe = load_recipe("icd_coding", _overrides(small, tiny_encoder, False))
    task = get_task(recipe)
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    task.prepare(tokenizer)
    assert task.labels == small["trained"] and task.report["n_labels_without_description"] == small["undescribed"]
    model = task.build_model(str(tiny_encoder), "sdpa", False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert task.finish_model(model, tokenizer) is model and task.labels == small["trained"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert task.settings["zero_shot_labels"] == [] and "n_zero_shot_labels" not in task.report
    model.eval().tokenizer = tokenizer
    states, mask = _states(model, [row["text"] for row in _rows("test", 3)])
    expected, weights = _attend_before(model.head, states, mask)
    with torch.no_grad():  # the logits and attention of before, to the last bit
        got, got_weights = model.head.attend(states, mask)
        assert torch.equal(got, expected) and torch.equal(got_weights, weights)
        assert torch.equal(model.head(states, mask), expected)


def test_zero_shot_codes_from_the_users_file_are_in_the_saved_model(zero_shot_run, small, tiny_encoder):
    settings = json.loads((zero_shot_run / "model" / "icd_coding.json").read_text())
    trained, zero_shot = small["trained"], small["zero_shot"]
    assert settings["labels"] == trained + zero_shot and settings["zero_shot_labels"] == zero_shot
    metrics = json.loads((zero_shot_run / "metrics.json").read_text())
    assert metrics["n_labels"] == len(trained) and metrics["n_zero_shot_labels"] == len(zero_shot)
    assert metrics["n_labels_without_description"] == small["undescribed"] > 0
    assert settings["zero_shot_threshold"] == metrics["zero_shot_threshold"] == metrics["dev_zero_shot_threshold"]
    assert 0 < metrics["zero_shot_threshold"] <= 1
    gold = [normalize_code(c) for row in _rows("test", 20) for c in set(row["codes"])]
    outputtable = set(trained) | set(zero_shot)  # the all-codes metrics count zero-shot codes as outputtable
    assert metrics["label_space_coverage"] == pytest.approx(sum(c in outputtable for c in gold) / len(gold))
    assert metrics["label_space_coverage"] > sum(c in trained for c in gold) / len(gold)
    # queries come from the fine-tuned encoder (not the starting one), at the trained queries' mean norm
    coder = IcdCoder.from_pretrained(zero_shot_run / "model")
    head, texts = coder.head, [read_descriptions(str(small["files"]["descriptions"]))[c] for c in zero_shot]
    assert INVENTED in texts
    norm = head.label_queries.weight[: len(trained)].norm(dim=1).mean()
    saved = head.label_queries.weight[len(trained) :]
    assert torch.allclose(saved, scaled(description_queries(coder, coder.tokenizer, texts), norm), atol=1e-5)
    coder.encoder = AutoModel.from_pretrained(tiny_encoder)  # the encoder before fine-tuning
    assert not torch.allclose(saved, scaled(description_queries(coder, coder.tokenizer, texts), norm), atol=1e-3)
    # output weight: the trained codes' mean; bias: below the trained codes' mean by the train priors' log-odds
    expected = head.output_weight[: len(trained)].mean(0).expand(len(zero_shot), -1)
    assert torch.allclose(head.output_weight[len(trained) :], expected, atol=1e-6)
    assert (head.output_bias[len(trained) :] < head.output_bias[: len(trained)].mean()).all()


def test_predict_scores_zero_shot_codes_as_the_reloaded_model_does(zero_shot_run, small, tmp_path, monkeypatch):
    (small["files"]["descriptions"]).rename(tmp_path / "moved.tsv")  # predict and evaluate never read it
    try:
        monkeypatch.chdir(tmp_path)
        texts = [row["text"] for row in _rows("test", 3)]
        loaded, backend = open_source(zero_shot_run, onnx=False)
        loaded.meta = {**loaded.meta, "threshold": 0.0}  # as a request's threshold: every code, with its probability
        results, _ = predict_texts(loaded, backend, texts)
        reloaded = IcdCoder.from_pretrained(zero_shot_run / "model").predict_proba(texts)
        labels = loaded.meta["labels"]
        for result, row in zip(results, reloaded, strict=True):
            got = {c["code"]: c["probability"] for c in result["codes"]}
            assert set(got) == set(labels)
            assert {c["code"] for c in result["codes"] if c.get("zero_shot")} == set(small["zero_shot"])
            assert np.allclose([got[c] for c in labels], row, atol=1e-5)
        saved, again = json.loads((zero_shot_run / "metrics.json").read_text()), evaluate_run(zero_shot_run, "test")
        for key in ("micro_f1", "micro_f1_all_codes", "label_space_coverage", "zero_shot_threshold"):
            assert again[key] == pytest.approx(saved[key], abs=1e-6), key
    finally:
        (tmp_path / "moved.tsv").rename(small["files"]["descriptions"])


def test_lora_adapter_gets_the_zero_shot_rows(tiny_encoder, tmp_path):
    """Zero-shot rows are added to the merged model; refresh_adapter writes the grown head into adapter/, so the base
    encoder plus the adapter scores every code as model/ does."""
    from peft import PeftModel

    from cmft.finetuning.config import TuningConfig
    from cmft.lora import refresh_adapter, wrap_lora
    from cmft.tasks.icd_batches import collate_notes
    from cmft.tasks.icd_coding import encode_note
    from cmft.tasks.icd_zero_shot import _append_rows

    settings = {"labels": ["E11.9", "I10"], "threshold": 0.5, "mode": "whole", "head": "label_attention",
                "attention_dim": 16, "chunk_size": 128, "max_chunks": 2, "max_length": 64, "level": "code"}  # fmt: skip
    torch.manual_seed(0)
    wrapped = wrap_lora(IcdCoder(AutoModel.from_pretrained(tiny_encoder), settings), "modernbert", TuningConfig(),
                        ["head"])  # fmt: skip
    with torch.no_grad():
        for name, weight in wrapped.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.05)  # a trained adapter: not the identity
    wrapped.save_pretrained(tmp_path / "adapter")
    merged = wrapped.merge_and_unload()
    _append_rows(merged.head, torch.randn(3, 16), torch.randn(3, merged.config.hidden_size), torch.zeros(3))
    refresh_adapter(tmp_path / "adapter", merged)
    grown = {**settings, "labels": [*settings["labels"], "E11.65", "E11.8", "I11.9"]}
    adapted = PeftModel.from_pretrained(IcdCoder(AutoModel.from_pretrained(tiny_encoder), grown),
                                        tmp_path / "adapter").eval()  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    batch = collate_notes([{"input_ids": encode_note(tokenizer, "Type 2 diabetes with neuropathy.", grown)[0]}],
                          tokenizer.pad_token_id, grown)  # fmt: skip
    with torch.no_grad():
        expected, got = merged.eval()(**batch)["logits"], adapted(**batch)["logits"]
    assert got.shape == (1, 5) and torch.allclose(expected, got, atol=1e-5)


def test_candidates_are_scored_as_the_dense_head_scores_them(zero_shot_run, small):
    """Each note scores its K best zero-shot codes (candidate_scores) with the full attention, through the shared
    output weight: their logits and attention are the dense head's; the other zero-shot codes get probability 0 and
    no attention; the trained codes are scored as before. K ≥ the zero-shot codes: every code as the dense head."""
    coder = IcdCoder.from_pretrained(zero_shot_run / "model")
    head, trained, zero_shot = coder.head, len(small["trained"]), len(small["zero_shot"])
    assert (head.zero_shot, head.candidates) == (zero_shot, K) and zero_shot > K
    states, mask = _states(coder, [row["text"] for row in _rows("test", 3)])
    dense, dense_weights = _attend_before(head, states, mask)
    with torch.no_grad():
        logits, weights = head.attend(states, mask)
        assert torch.equal(head(states, mask), logits)
        assert torch.allclose(logits[:, :trained], dense[:, :trained], rtol=0, atol=1e-6)
        assert torch.allclose(weights[:, :trained], dense_weights[:, :trained], rtol=0, atol=1e-6)
        chosen = logits[:, trained:] > NOT_A_CANDIDATE
        assert chosen.sum(1).tolist() == [K] * 3
        hidden, evidence = torch.tanh(head.project(states)), states @ head.output_weight[trained]
        cheap = candidate_scores(hidden, evidence, mask.bool(), head.label_queries.weight[trained:],
                                 head.output_bias[trained:])  # fmt: skip
        assert torch.equal(chosen, torch.zeros_like(chosen).scatter(1, cheap.topk(K).indices, True))
        queries, bias = head.label_queries.weight[trained:], head.output_bias[trained:]
        errors = []  # the cheap score: b_z + u_z · Σ_t (s_t − s̄) z_t / T, the dense logit less s̄ to first order in u
        for row, real in enumerate(mask.bool()):
            z, s = hidden[row, real], evidence[row, real]
            assert torch.allclose(cheap[row], queries @ ((s - s.mean()) @ z / len(s)) + bias, rtol=0, atol=1e-5)
            for scale in (0.1, 0.01):
                exact = (scale * z @ queries.T).softmax(0).T @ s - s.mean()
                errors.append(float((exact - scale * queries @ ((s - s.mean()) @ z / len(s))).abs().max()))
        assert all(fine < coarse / 30 for coarse, fine in zip(errors[::2], errors[1::2], strict=True)), errors
        zero_shot_logits, zero_shot_weights = logits[:, trained:], weights[:, trained:]
        assert torch.allclose(zero_shot_logits[chosen], dense[:, trained:][chosen], rtol=0, atol=1e-5)
        assert torch.allclose(zero_shot_weights[chosen], dense_weights[:, trained:][chosen], rtol=0, atol=1e-6)
        assert (torch.sigmoid(zero_shot_logits[~chosen]) == 0).all() and (zero_shot_weights[~chosen] == 0).all()
        same, scored, codes = head.attend_rows(states, mask)  # the rows scored in full, as the export gives them
        assert torch.equal(same, logits) and codes.shape == (3, trained + K) and head.chooses
        assert torch.equal(codes[:, :trained], torch.arange(trained).expand(3, -1))
        assert (codes[:, trained:].diff(dim=1) > 0).all()  # in code order, whatever the order of their scores
        assert torch.equal(chosen, torch.zeros_like(chosen).scatter(1, codes[:, trained:] - trained, True))
        assert torch.equal(scored, weights.gather(1, codes[..., None].expand_as(scored)))
        for every in (zero_shot, 100):
            head.candidates = every
            logits, weights = head.attend(states, mask)
            assert torch.allclose(logits, dense, rtol=0, atol=1e-5) and (logits > NOT_A_CANDIDATE).all()
            assert torch.allclose(weights, dense_weights, rtol=0, atol=1e-6)
            assert not head.chooses and head.attend_rows(states, mask)[2] is None


def test_a_model_saved_before_candidates_scores_every_code(zero_shot_run, tmp_path):
    """A folder without zero_shot_candidates (saved before it existed) loads and scores every zero-shot code densely,
    as it did; evaluate reads it the same way."""
    old = tmp_path / "old"
    shutil.copytree(zero_shot_run, old, ignore=shutil.ignore_patterns("checkpoints"))
    for name in ("icd_coding.json", "cmft_task.json"):
        settings = json.loads((old / "model" / name).read_text())
        (settings.get("icd") or settings).pop("zero_shot_candidates")
        (old / "model" / name).write_text(json.dumps(settings))
    coder = IcdCoder.from_pretrained(old / "model")
    assert coder.head.candidates is None and coder.head.zero_shot > K
    states, mask = _states(coder, [row["text"] for row in _rows("test", 3)])
    with torch.no_grad():
        expected, weights = _attend_before(coder.head, states, mask)
        got, got_weights = coder.head.attend(states, mask)
        assert torch.equal(got, expected) and torch.equal(got_weights, weights)
    assert evaluate_run(old, "dev")["n_zero_shot_labels"] == coder.head.zero_shot


def test_onnx_export_with_zero_shot_candidates_keeps_parity_and_evidence(zero_shot_run, tmp_path):
    """The export traces the candidate choice (TopK, gathers, scatters) and passes the parity check on every output:
    the attention of the codes scored in full and their code indices, never a [batch, codes, positions] array. On
    real notes it gives PyTorch's probabilities and evidence: non-candidate zero-shot codes 0, without spans."""
    import onnx

    folder, parity = export_run(zero_shot_run, tmp_path / "export")
    assert parity["passed"] and list(parity["per_output"]) == ["probabilities", "label_attention",
                                                                "label_attention_codes"]  # fmt: skip
    assert "TopK" in {node.op_type for node in onnx.load(str(folder / "model.onnx")).graph.node}
    loaded = load_export(folder)
    ids, mask = IcdCodingTask.collate(IcdCodingTask.encode(loaded.tokenizer, ["Chest pain."], loaded.meta)[0], 0,
                                      loaded.meta)  # fmt: skip
    probabilities, weights, codes = OnnxBackend(folder / "model.onnx").outputs(ids, mask)
    trained = probabilities.shape[1] - len(loaded.meta["icd"]["zero_shot_labels"])
    assert weights.shape == (1, trained + K, ids.shape[1]) and codes.shape == (1, trained + K)
    texts, results = [row["text"] for row in _rows("test", 4)], {}
    for name, loaded in (("torch", load_run(zero_shot_run)), ("onnx", load_export(folder))):
        loaded.meta = {**loaded.meta, "threshold": 0.0, "evidence": {"k": 2, "method": "attention"}}  # every code
        backend = OnnxBackend(folder / "model.onnx") if name == "onnx" else TorchBackend(loaded.module)
        results[name], _ = predict_texts(loaded, loaded.task.evidence_backend(loaded, backend, "attention"), texts)
    for torch_result, onnx_result in zip(results["torch"], results["onnx"], strict=True):
        by_code = {code["code"]: code for code in onnx_result["codes"]}
        for code in torch_result["codes"]:
            assert abs(code["probability"] - by_code[code["code"]]["probability"]) <= 1e-4
            assert bool(code["evidence"]) == bool(by_code[code["code"]]["evidence"])
        zero_shot = [code for code in torch_result["codes"] if code.get("zero_shot")]
        candidates = [code for code in zero_shot if code["evidence"]]
        assert len(candidates) == K and all(code["probability"] == 0 for code in zero_shot if not code["evidence"])


def _candidate_outputs(codes: np.ndarray, trained: int = 2, positions: int = 4) -> list[np.ndarray]:
    """probabilities [B, L], label_attention [B, R, T] and label_attention_codes [B, R], each row's attention and
    each code's probability a function of its code, as two back ends that agree on every code they both score give."""
    rows, width = codes.shape
    probabilities = np.zeros((rows, 20), dtype=np.float32)
    attention = np.zeros((rows, width, positions), dtype=np.float32)
    for row in range(rows):
        probabilities[row, codes[row]] = 0.01 * codes[row] + 0.1
        attention[row] = (codes[row][:, None] + np.arange(positions)) / 100.0
    return [probabilities, attention, codes.copy()]


def test_parity_tolerates_a_near_tie_at_the_last_candidate_but_not_other_differences():
    names = ["probabilities", "label_attention", "label_attention_codes"]
    torch_codes = np.array([[0, 1, 5, 7, 9], [0, 1, 3, 4, 6]])
    onnx_codes = np.array([[0, 1, 5, 8, 9], [0, 1, 3, 4, 6]])  # row 0: code 7 (PyTorch) and 8 (onnxruntime) swap
    want, have = _candidate_outputs(torch_codes), _candidate_outputs(onnx_codes)
    shown_want, shown_have, counts = IcdCodingTask.parity_view(names, want, have)
    assert counts == {"candidate_swaps": 1}
    for a, b in zip(shown_want, shown_have, strict=True):  # the swapped codes left out, everything else equal
        np.testing.assert_array_equal(a, b)
    assert want[2][0, 3] == 7 and have[2][0, 3] == 8  # the outputs themselves untouched
    before = [np.abs(a.astype(np.float64) - b).max() for a, b in zip(want, have, strict=True)]
    assert min(before) > 1e-3 and max(before) >= 1  # compared as they are, the swap fails parity

    wholly_other = np.array([[0, 1, 10, 11, 12], [0, 1, 13, 14, 15]])  # not a near-tie: different candidates
    shown_want, shown_have, counts = IcdCodingTask.parity_view(names, want, _candidate_outputs(wholly_other))
    assert counts == {"candidate_swaps": 6}
    assert np.abs(shown_want[2] - shown_have[2]).max() > 0  # compared as they are: parity fails
    assert IcdCodingTask.parity_view(names[:2], want[:2], have[:2])[2] == {}  # no candidates: nothing to align
