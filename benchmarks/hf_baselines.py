"""Plain Hugging Face baselines, written the way transformers' example scripts (run_classification.py,
run_ner.py) and sentence-transformers' training scripts do it: Trainer with the standard collator and default
settings (lr 5e-5, batch 16, linear schedule, no class weights, no head learning rate, threshold 0.5).

Used by benchmarks/quality.py (row 4). Each function trains on the bundled train split, scores the bundled test
split with the same metric code as cmft, and returns {"metric": value, ..., "train_seconds": s}. `learning_rate`
(default the scripts' 5e-5) sets the one rate of encoder and head; `icd_coding(..., tune_threshold=True)` picks its
threshold on the dev split as cmft does, instead of 0.5 (the like-for-like row, `minilm_hf_matched`).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


SAVE_STEPS = 20  # a checkpoint every 20 steps (the last one kept), so a run cut off resumes where it was
ELAPSED = "elapsed.json"


DEFAULT_RATE = 5e-5  # the example scripts' default


def _args(out: Path, epochs: float, seed: int, max_steps: int | None, learning_rate: float) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out), num_train_epochs=epochs, max_steps=max_steps or -1, per_device_train_batch_size=16,
        per_device_eval_batch_size=32, learning_rate=learning_rate, seed=seed, save_strategy="steps",
        save_steps=SAVE_STEPS, save_total_limit=1, report_to=[], disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), logging_steps=50,
    )  # fmt: skip


class _Elapsed(TrainerCallback):
    """Records, beside each checkpoint, the training seconds spent up to it (over every resumed part)."""

    def __init__(self, out: Path, before: float) -> None:
        self.out, self.before, self.started = out, before, time.monotonic()

    def seconds(self) -> float:
        return self.before + time.monotonic() - self.started

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
        record = {"checkpoint": f"checkpoint-{state.global_step}", "seconds": self.seconds()}
        (self.out / ELAPSED).write_text(json.dumps(record))


def _train(trainer: Trainer, out: Path) -> tuple[float, float]:
    """Train, resuming from the last checkpoint under `out` when a previous run was cut off. Returns the training
    seconds of every part and those of the earlier parts (work lost after the last checkpoint is not counted: it is
    done again)."""
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    before = 0.0
    if last and (out / ELAPSED).is_file():
        record = json.loads((out / ELAPSED).read_text())
        before = record["seconds"] if record["checkpoint"] == Path(last).name else 0.0
    if last:
        print(f"resuming the baseline from {last} ({before:.0f} s of training before it)", flush=True)
    clock = _Elapsed(out, before)
    trainer.add_callback(clock)
    trainer.train(resume_from_checkpoint=last)
    return clock.seconds(), before


def _mts(split: str) -> list[dict]:
    with open(DATA / "mts_dialog" / f"{split}.csv", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def note_classification(encoder: str, out: Path, epochs: float, max_length: int, seed: int,
                        max_steps: int | None = None, learning_rate: float = DEFAULT_RATE) -> dict:  # fmt: skip
    from cmft.metrics import classification_metrics

    tokenizer = AutoTokenizer.from_pretrained(encoder)
    train, test = _mts("train"), _mts("test1")
    labels = sorted({r["section_header"] for r in train})
    index = {label: i for i, label in enumerate(labels)}
    test = [r for r in test if r["section_header"] in index]

    def encode(rows):
        return [{**tokenizer(r["section_text"], truncation=True, max_length=max_length),
                 "labels": index[r["section_header"]]} for r in rows]  # fmt: skip

    set_seed(seed)  # before the model, as the example scripts do: the new head's weights follow the seed
    model = AutoModelForSequenceClassification.from_pretrained(encoder, num_labels=len(labels))
    trainer = Trainer(model=model, args=_args(out, epochs, seed, max_steps, learning_rate), train_dataset=encode(train),
                      data_collator=DataCollatorWithPadding(tokenizer))  # fmt: skip
    seconds, earlier = _train(trainer, out)
    predictions = trainer.predict(encode(test))
    predicted = np.asarray(predictions.predictions).argmax(-1)
    gold = np.array([index[r["section_header"]] for r in test])
    return {
        **classification_metrics(gold, predicted, len(labels)),
        "train_seconds": round(seconds, 1),
        "earlier_seconds": earlier,
    }


def ner(encoder: str, out: Path, epochs: float, max_length: int, seed: int, max_steps: int | None = None,
        learning_rate: float = DEFAULT_RATE) -> dict:  # fmt: skip
    """run_ner.py: words pre-split, the first sub-token of each word labelled, truncation at max_length."""
    from cmft.data.ner import read_conll
    from cmft.metrics import entity_metrics
    from cmft.tasks.ner import to_iob2

    tokenizer = AutoTokenizer.from_pretrained(encoder, add_prefix_space=True) if _bpe(encoder) else (
        AutoTokenizer.from_pretrained(encoder))  # fmt: skip
    train, _ = read_conll(DATA / "ncbi_disease" / "train.tsv")
    test, _ = read_conll(DATA / "ncbi_disease" / "test.tsv")
    train = [(w, to_iob2(t)) for w, t in train]
    test = [(w, to_iob2(t)) for w, t in test]
    labels = ["O", *sorted({t for _, tags in train for t in tags} - {"O"})]
    index = {t: i for i, t in enumerate(labels)}

    def encode(sentences):
        rows, word_ids = [], []
        for words, tags in sentences:
            encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
            previous, row_labels = None, []
            for word in encoded.word_ids():
                row_labels.append(-100 if word is None or word == previous else index[tags[word]])
                previous = word
            rows.append({**encoded, "labels": row_labels})
            word_ids.append(encoded.word_ids())
        return rows, word_ids

    set_seed(seed)  # before the model, as the example scripts do: the new head's weights follow the seed
    model = AutoModelForTokenClassification.from_pretrained(encoder, num_labels=len(labels))
    trainer = Trainer(model=model, args=_args(out, epochs, seed, max_steps, learning_rate),
                      train_dataset=encode(train)[0],
                      data_collator=DataCollatorForTokenClassification(tokenizer))  # fmt: skip
    seconds, earlier = _train(trainer, out)
    rows, word_ids = encode(test)
    predictions = []
    for start in range(0, len(rows), 64):  # Trainer.predict pads each batch differently: predict per chunk
        output = trainer.predict(rows[start : start + 64])
        for offset, predicted in enumerate(np.asarray(output.predictions).argmax(-1)):
            words = test[start + offset][0]
            tags = ["O"] * len(words)  # words cut by truncation stay O, as in run_ner.py's evaluation
            previous = None
            for position, word in enumerate(word_ids[start + offset]):
                if word is not None and word != previous:
                    tags[word] = labels[predicted[position]]
                previous = word
            predictions.append(tags)
    scores = entity_metrics([tags for _, tags in test], predictions)
    return {
        **{k: v for k, v in scores.items() if k != "per_type"},
        "train_seconds": round(seconds, 1),
        "earlier_seconds": earlier,
    }


def _bpe(encoder: str) -> bool:
    config = (
        json.loads((Path(encoder) / "config.json").read_text()) if (Path(encoder) / "config.json").is_file() else {}
    )
    return config.get("model_type") in {"modernbert", "roberta"}


def icd_coding(encoder: str, out: Path, epochs: float, max_length: int, seed: int, max_steps: int | None = None,
               learning_rate: float = DEFAULT_RATE, tune_threshold: bool = False) -> dict:  # fmt: skip
    """Multi-label sequence classification (BCE), truncated notes, threshold 0.5: the plain route. With
    `tune_threshold` the one global threshold is the dev split's best micro-F1 (cmft.metrics.tune_threshold, the
    function cmft's recipe uses), and the dev figure is returned as `dev_micro_f1`."""
    from cmft.metrics import multilabel_metrics
    from cmft.metrics import tune_threshold as best_threshold
    from cmft.tasks.icd_coding import normalize_code

    tokenizer = AutoTokenizer.from_pretrained(encoder)
    max_length = min(max_length, tokenizer.model_max_length)  # as run_glue.py does: a BERT note is cut at 512

    def read(split):
        with open(DATA / "codiesp" / f"{split}.jsonl", encoding="utf-8") as handle:
            return [json.loads(line) for line in handle]

    train, test = read("train"), read("test")
    counts: dict[str, int] = {}
    for row in train:
        for code in {normalize_code(c) for c in row["codes"]}:
            counts[code] = counts.get(code, 0) + 1
    labels = sorted(c for c, n in counts.items() if n >= 5)
    index = {c: i for i, c in enumerate(labels)}

    def encode(rows):
        encoded = []
        for row in rows:
            target = np.zeros(len(labels), dtype=np.float32)
            for code in {normalize_code(c) for c in row["codes"]}:
                if code in index:
                    target[index[code]] = 1.0
            encoded.append({**tokenizer(row["text"], truncation=True, max_length=max_length), "labels": target})
        return encoded

    set_seed(seed)  # before the model, as the example scripts do: the new head's weights follow the seed
    model = AutoModelForSequenceClassification.from_pretrained(encoder, num_labels=len(labels),
                                                               problem_type="multi_label_classification")  # fmt: skip
    trainer = Trainer(model=model, args=_args(out, epochs, seed, max_steps, learning_rate), train_dataset=encode(train),
                      data_collator=DataCollatorWithPadding(tokenizer))  # fmt: skip
    seconds, earlier = _train(trainer, out)

    def scored(split_rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        rows = encode(split_rows)
        logits = np.asarray(trainer.predict(rows).predictions, dtype=np.float64)
        return np.stack([r["labels"] for r in rows]), 1 / (1 + np.exp(-logits))

    threshold, dev = 0.5, {}
    if tune_threshold:
        threshold, dev_f1 = best_threshold(*scored(read("dev")))
        dev = {"dev_micro_f1": dev_f1}
    return {
        **multilabel_metrics(*scored(test), threshold),
        **dev,
        "threshold": threshold,
        "train_seconds": round(seconds, 1),
        "earlier_seconds": earlier,
    }


def retrieval(encoder: str, out: Path, epochs: float, max_length: int, seed: int,
              max_steps: int | None = None, learning_rate: float = DEFAULT_RATE) -> dict:  # fmt: skip
    """sentence-transformers' training script: MultipleNegativesRankingLoss, no-duplicates batches, defaults."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import (
        BatchSamplers,
        SentenceTransformerTrainingArguments,
    )

    from cmft.data.retrieval import read_retrieval_split
    from cmft.finetuning.config import DataConfig
    from cmft.tasks.retrieval import RetrievalConfig, evaluate_split

    set_seed(seed)  # before the model, as the example scripts do: the new head's weights follow the seed
    model = SentenceTransformer(encoder, device="cuda" if torch.cuda.is_available() else "cpu")
    model.max_seq_length = max_length
    train = Dataset.from_list([{"anchor": r["dialogue"], "positive": r["section_text"]} for r in _mts("train")])
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out), num_train_epochs=epochs, max_steps=max_steps or -1, per_device_train_batch_size=16,
        learning_rate=learning_rate, seed=seed, save_strategy="steps", save_steps=SAVE_STEPS, save_total_limit=1,
        report_to=[], disable_tqdm=True, batch_sampler=BatchSamplers.NO_DUPLICATES,
        use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train,
                                         loss=MultipleNegativesRankingLoss(model))  # fmt: skip
    seconds, earlier = _train(trainer, out)
    settings = RetrievalConfig(query_field="dialogue", document_field="section_text")
    test = read_retrieval_split(DataConfig(train="unused", test=str(DATA / "mts_dialog" / "test1.csv")), "test",
                                settings)  # fmt: skip
    return {**evaluate_split(model, test, 100, 32), "train_seconds": round(seconds, 1), "earlier_seconds": earlier}


BASELINES = {"note_classification": note_classification, "ner": ner, "icd_coding": icd_coding,
             "retrieval": retrieval}  # fmt: skip
