"""Assertion status of a span: is a finding present, absent, possible, conditional, hypothetical, or someone else's?

The encoder reads the text with the span between two marker tokens (`[E]` … `[/E]`, added to the tokenizer as special
tokens and saved with it; the embeddings grow by two rows), and a head classifies the span from the markers' states.
A long text is read through a window of tokens centred on the span, which is never cut away.

Rows (jsonl): `{"text", "start", "end", "label"}` with character offsets of the span, or the span jsonl that NER reads
(`{"text", "entities": [{"start", "end", "label", "assertion"}]}`: one row per entity with an `assertion`). The labels
are the train data's; the usual scheme is i2b2/n2c2 2010's (I2B2_LABELS). `cmft predict` reads the same rows (text,
start, end), or texts with the span marked inline (`… denies [E]chest pain[/E] …`, what `cmft serve` takes).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import PositiveInt
from torch import nn
from transformers import AutoModel, DataCollatorWithPadding

from cmft.backends import TorchBackend, per_text, run_batches
from cmft.data.readers import iter_records
from cmft.errors import CmftError
from cmft.paths import resolve_path
from cmft.plots import confusion_plot
from cmft.recipe import DataConfig, FolderSplit, RecipeBase, TaskSection, TrainingConfig
from cmft.tasks.base import CARD_EXAMPLE, Task, Unit, load_pretrained
from cmft.tasks.head_model import HeadModel

HEAD_WEIGHTS = "assertion_head.safetensors"
HEAD_CONFIG = "assertion.json"
I2B2_LABELS = ("present", "absent", "possible", "conditional", "hypothetical", "associated_with_someone_else")
CARD_SPAN = "chest pain"  # the span of the card's example sentence (cmft.tasks.base.CARD_EXAMPLE)


class AssertionConfig(TaskSection):
    """The recipe's `assertion` section. The usual label scheme is i2b2/n2c2 2010's (present, absent, possible,
    conditional, hypothetical, associated_with_someone_else); the labels are whatever the train data holds."""

    start_marker: str = "[E]"
    end_marker: str = "[/E]"
    """Added to the tokenizer as special tokens around the span (saved with it); a text may also carry them inline."""
    window: PositiveInt | None = None
    """Tokens of context kept on each side of the span; null: as many as max_length allows, centred on the span."""
    normalise_case: bool = True
    """Lower-case the span, so that the model cannot learn its case (NegEx upper-cases its concepts) as a cue."""
    class_weights: Literal["none", "balanced", "sqrt"] = "sqrt"
    """Loss weights against label imbalance: inverse train frequency (balanced) or its square root."""

    def check(self, training: TrainingConfig, data: DataConfig) -> None:
        if training.max_length < 8:
            raise ValueError("training.max_length must be at least 8 for assertion (markers, span and context)")
        if not self.start_marker.strip() or not self.end_marker.strip() or self.start_marker == self.end_marker:
            raise ValueError("assertion.start_marker and assertion.end_marker must be two different non-blank strings")
        for split in ("train", "dev", "test"):
            if isinstance(getattr(data, split), FolderSplit) or (data.format == "csv" and getattr(data, split)):
                raise ValueError(f"data.{split}: assertion reads .jsonl rows ({{text, start, end, label}}, or NER "
                                 "span rows whose entities carry an `assertion`), not a folder or a csv")  # fmt: skip


# rows -------------------------------------------------------------------------------------------------------------
@dataclass
class SpanRow:
    text: str
    start: int
    end: int
    label: str | None = None


def check_span(text: Any, start: Any, end: Any, where: str) -> SpanRow:
    """A span that lies inside its text, or a one-line error naming `where` (file and line), never the text."""
    if not isinstance(text, str):
        raise CmftError(f"{where}: needs a string field `text`")
    for name, value in (("start", start), ("end", end)):
        if value is None:
            raise CmftError(f"{where}: needs `{name}` (the span's character offset in the text)")
        if isinstance(value, bool) or not isinstance(value, int):
            raise CmftError(f"{where}: `{name}` must be a whole number of characters, not {value!r}"[:200])
    if not 0 <= start < end:
        raise CmftError(f"{where}: the span must have 0 ≤ start < end (start {start}, end {end})")
    if end > len(text):
        raise CmftError(f"{where}: end {end} lies beyond the text ({len(text)} characters)")
    return SpanRow(text, start, end)


def read_rows(path: Path, text_field: str = "text", label_field: str = "label") -> tuple[list[SpanRow], int]:
    """Labelled spans of a jsonl file, in file order, and the count of NER entities without an `assertion` (skipped).
    A row whose span is missing, empty or outside its text is an error naming the line."""
    rows, unlabelled = [], 0
    for number, record in iter_records(path, "jsonl"):
        where = f"{path}: line {number}"
        if "entities" in record:  # the span jsonl NER reads
            entities = record["entities"]
            if not isinstance(entities, list) or not all(isinstance(e, dict) for e in entities):
                raise CmftError(f"{where}: `entities` must be a list of {{start, end, label, assertion}} objects")
            for entity in entities:
                if entity.get("assertion") is None:
                    unlabelled += 1
                    continue
                row = check_span(record.get(text_field), entity.get("start"), entity.get("end"), where)
                row.label = _label(entity["assertion"], f"{where}: entity `assertion`")
                rows.append(row)
            continue
        row = check_span(record.get(text_field), record.get("start"), record.get("end"), where)
        row.label = _label(record.get(label_field), f"{where}: `{label_field}`")
        rows.append(row)
    if not rows:
        raise CmftError(f"{path}: no labelled span (rows need text, start, end and {label_field})")
    return rows, unlabelled


def _label(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CmftError(f"{where} must be a non-empty label name")
    return value.strip()


def mark(text: str, start: int, end: int, markers: tuple[str, str] | list[str]) -> str:
    """The text with the span between the markers: the form `cmft predict` and `cmft serve` pass on."""
    return f"{text[:start]}{markers[0]}{text[start:end]}{markers[1]}{text[end:]}"


def unmark(text: str, markers: tuple[str, str] | list[str], where: str = "input") -> SpanRow:
    """(text without markers, start, end) from a text with the span marked once inline; an error otherwise."""
    opening, closing = markers
    start = text.find(opening)
    end = text.find(closing, start + len(opening)) if start >= 0 else -1
    if start < 0 or end < 0 or text.count(opening) != 1 or text.count(closing) != 1:
        raise CmftError(f"{where}: an assertion model needs one span per text: give `start` and `end` (character "
                        f"offsets) with the text, or mark the span inline once as {opening}…{closing}")  # fmt: skip
    plain = text[:start] + text[start + len(opening) : end] + text[end + len(closing) :]
    return check_span(plain, start, end - len(opening), where)


# encoding ---------------------------------------------------------------------------------------------------------
def span_ids(tokenizer: Any, row: SpanRow, settings: dict[str, Any]) -> tuple[list[int], bool, bool]:
    """[CLS] context [E] span [/E] context [SEP] within max_length, and whether context was left out (windowed) and
    whether the span itself was cut (only when the span alone is longer than max_length; both markers stay).

    The text is tokenized whole (the span's tokens are those that overlap it), so every token is the one the encoder
    saw in pretraining; the window keeps as much context on each side as fits, `window` tokens at most per side."""
    text = row.text
    if settings["normalise_case"]:
        lowered = text[row.start : row.end].lower()
        if len(lowered) == row.end - row.start:  # a few characters grow when lower-cased; those spans keep their case
            text = text[: row.start] + lowered + text[row.end :]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    before, inside, after = [], [], []
    for token, (first, last) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        if first < row.end and last > row.start:
            inside.append(token)
        else:
            (before if last <= row.start else after).append(token)
    room = settings["max_length"] - 2 - sum(i is not None for i in (settings["cls_id"], settings["sep_id"]))
    span_cut = len(inside) > room
    inside = inside[:room]
    budget = room - len(inside)
    limit = budget if settings["window"] is None else min(budget, settings["window"])
    left = min(len(before), limit, max(budget - min(len(after), limit), budget // 2))
    right = min(len(after), limit, budget - left)
    windowed = left < len(before) or right < len(after)
    start_id, end_id = settings["marker_ids"]
    ids = [*before[len(before) - left :], start_id, *inside, end_id, *after[:right]]
    ids = ([settings["cls_id"]] if settings["cls_id"] is not None else []) + ids
    return ids + ([settings["sep_id"]] if settings["sep_id"] is not None else []), windowed, span_cut


def add_markers(tokenizer: Any, markers: tuple[str, str] | list[str]) -> list[int]:
    """The markers as special tokens of the tokenizer (added once; saved with it) and their ids."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(markers)}, replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(list(markers))
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
        raise CmftError(f"assertion markers {list(markers)}: the tokenizer did not take them as tokens")
    return ids


# model ------------------------------------------------------------------------------------------------------------
class MarkerHead(nn.Module):
    """The states of the span's two marker tokens, concatenated → dense + tanh → dropout → one logit per label. A
    marker is found by its id in input_ids (no extra input: the exported graph keeps input_ids and attention_mask)."""

    def __init__(self, hidden_size: int, num_labels: int, marker_ids: list[int], dropout: float = 0.1):
        super().__init__()
        self.marker_ids = [int(i) for i in marker_ids]
        self.dense = nn.Linear(2 * hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        pooled = []
        for marker in self.marker_ids:
            where = (input_ids == marker).to(states.dtype)  # [B, T]; a row without the marker pools to zeros
            pooled.append(torch.einsum("bt,bth->bh", where, states) / where.sum(1, keepdim=True).clamp_min(1.0))
        hidden = torch.tanh(self.dense(torch.cat(pooled, dim=-1)))
        return self.classifier(self.dropout(hidden)).float()


class AssertionClassifier(HeadModel):
    """An encoder (embeddings grown by the two markers) plus the marker head; `model/` holds the encoder (AutoModel
    loads it), the head's weights and its settings.

    from cmft.tasks.assertion import AssertionClassifier
    classifier = AssertionClassifier.from_pretrained("runs/finetune/latest/model")
    classifier.predict([{"text": "No fever today.", "start": 3, "end": 8}])   # [{label, score, probabilities}]
    """

    HEAD_WEIGHTS, HEAD_CONFIG, KIND = HEAD_WEIGHTS, HEAD_CONFIG, "an assertion model"

    def build_head(self, hidden_size: int, settings: dict[str, Any]) -> nn.Module:
        return MarkerHead(hidden_size, len(settings["labels"]), settings["marker_ids"], settings.get("dropout", 0.1))

    def get_input_embeddings(self) -> nn.Module:  # peft finds the marker rows it trains under LoRA here
        return self.encoder.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Logits [B, labels] (and the unweighted loss when `labels` are given; training uses the task's loss)."""
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.head(states, input_ids)
        if labels is None:
            return {"logits": logits}
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    def predict(self, rows: list[dict[str, Any]], batch_size: int = 16) -> list[dict[str, Any]]:
        """Each row's {label, score, probabilities, start, end}, as `cmft predict` gives them."""
        meta = _meta(self.settings)
        texts = [AssertionTask.input_text(meta, row, "text", f"row {k + 1}") for k, row in enumerate(rows)]
        units = AssertionTask.encode(self.tokenizer, texts, meta)[0]
        pad_id = self.tokenizer.pad_token_id or 0
        outputs = run_batches(units, lambda batch: AssertionTask.collate(batch, pad_id, meta),
                              TorchBackend(LogitsModule(self)), batch_size)  # fmt: skip
        grouped = per_text(units, outputs, len(texts))
        return [AssertionTask.decode(meta, text, *group) for text, group in zip(texts, grouped, strict=True)]


class LogitsModule(nn.Module):
    """The exported signature: (input_ids, attention_mask) → logits [batch, labels]."""

    def __init__(self, classifier: AssertionClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(input_ids, attention_mask)["logits"]


# the task ---------------------------------------------------------------------------------------------------------
CARD_USAGE = """from cmft.tasks.assertion import AssertionClassifier

classifier = AssertionClassifier.from_pretrained(".")
text = "{example}"
start = text.index("chest pain")
status = classifier.predict([{{"text": text, "start": start, "end": start + len("chest pain")}}])[0]
label = status["label"]  # with its score and every label's probability"""
CARD_ADAPTER = """from peft import PeftModel
from transformers import AutoModel

from cmft.tasks.assertion import AssertionClassifier

merged = AssertionClassifier.from_pretrained(".")  # its settings (labels, markers) and tokenizer
base = AutoModel.from_pretrained("{base}")
base.resize_token_embeddings(len(merged.tokenizer))  # rows for the two markers; the adapter holds their values
unmerged = AssertionClassifier(base, merged.settings)
unmerged.tokenizer = merged.tokenizer
unmerged = PeftModel.from_pretrained(unmerged, "../adapter").eval()
text = "{example}"
start = text.index("chest pain")
same = unmerged.predict([{{"text": text, "start": start, "end": start + len("chest pain")}}])[0]  # the same label"""
ONNX_FEED = """text = "{example}"
start = text.index("{span}")
end = start + len("{span}")
text = text[:start] + text[start:end].lower() + text[end:]  # normalise_case: {normalise_case}
encoding = tokenizer.encode(text, add_special_tokens=False)
pieces = ([], [], [])  # the tokens before, inside and after the span
for token, (first, last) in zip(encoding.ids, encoding.offsets):
    pieces[1 if first < end and last > start else (0 if last <= start else 2)].append(token)
ids = [{cls}*pieces[0], {start_id}, *pieces[1], {end_id}, *pieces[2]{sep}]  # cmft predict: a window of {max_length}
feed = {{"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}}"""


class AssertionTask(Task):
    name = "assertion"
    metric_for_best = "macro_f1"
    section_name = "assertion"
    section = AssertionConfig
    output_meaning = "[batch, labels] logits of the marked span's status; softmax gives the probabilities (labels in " \
                     "the manifest)"  # fmt: skip
    description = ("Classifies the assertion status of a marked span of a text (is the finding present, absent, "
                   "possible, ...), reading a window of the text around it.")  # fmt: skip
    reads_spans = True
    library_name = "cmft"
    card_usage = {"cmft": CARD_USAGE}
    card_adapter = CARD_ADAPTER
    metrics_note = ("`per_label`: precision, recall, F1 and support of each label; `macro_f1` averages the F1 of the "
                    "labels that occur in the split (gold or predicted).")  # fmt: skip
    # Not swept for assertion yet: the tiny rate is cmft's default, the one the bundled recipe was timed and scored
    # with; the pretrained one is note classification's (one label per text, the closest measured task).
    learning_rates = {"tiny": {"full": 3e-4, "lora": 1e-3}, "pretrained": {"full": 2e-4, "lora": 1e-3}}

    def __init__(self, recipe: Any = None):
        super().__init__(recipe)
        self.options: AssertionConfig = self.section_of(recipe)
        self.marker_ids: list[int] = []
        self.special_ids: tuple[int | None, int | None] = (None, None)
        self.vocab_size = 0
        self.class_weights: torch.Tensor | None = None

    @property
    def settings(self) -> dict[str, Any]:
        o = self.options
        return {"labels": self.labels, "max_length": self.recipe.training.max_length, "window": o.window,
                "normalise_case": o.normalise_case, "markers": [o.start_marker, o.end_marker],
                "marker_ids": self.marker_ids, "cls_id": self.special_ids[0], "sep_id": self.special_ids[1],
                "dropout": 0.1}  # fmt: skip

    # data -------------------------------------------------------------------------------------------
    def prepare(
        self, tokenizer, splits: tuple[str, ...] = ("train", "dev", "test"), labels: list | None = None
    ) -> None:
        """Add the markers to the tokenizer, read and encode `splits`; labels from train (or a saved model's)."""
        self.marker_ids = add_markers(tokenizer, (self.options.start_marker, self.options.end_marker))
        self.special_ids = (_first_id(tokenizer, "cls", "bos"), _first_id(tokenizer, "sep", "eos"))
        self.vocab_size = len(tokenizer)
        data = self.recipe.data
        read: dict[str, list[SpanRow]] = {}
        for name in splits:
            source = getattr(data, name)
            if source is None:
                continue
            path = resolve_path(source)
            if not path.is_file():
                raise CmftError(f"data.{name}: {source}: file not found")
            read[name], unlabelled = read_rows(path, data.text_field, data.label_field)
            self.report[f"n_entities_without_assertion_{name}"] = unlabelled
        counts = Counter(row.label for row in read.get("train", []))
        labels = labels if labels is not None else (self.labels or None)
        self.labels = list(labels) if labels is not None else sorted(counts, key=_label_order)
        if len(self.labels) < 2:
            raise CmftError(f"data.train: {data.train}: needs at least 2 labels")
        index = {label: i for i, label in enumerate(self.labels)}
        settings = self.settings
        for name, rows in read.items():
            unknown = sorted({row.label for row in rows} - set(index))
            if unknown:
                raise CmftError(f"data.{name}: {getattr(data, name)}: {len(unknown)} label(s) not in the train labels, "
                                f"e.g. {unknown[0]!r}; add train examples or drop them")  # fmt: skip
            encoded = [span_ids(tokenizer, row, settings) for row in rows]
            self.report[f"n_windowed_{name}"] = sum(windowed for _, windowed, _ in encoded)
            self.report[f"n_span_cut_{name}"] = sum(cut for _, _, cut in encoded)
            self.datasets[name] = [{"input_ids": ids, "labels": index[row.label]}
                                   for (ids, _, _), row in zip(encoded, rows, strict=True)]  # fmt: skip
        frequency = np.array([counts[label] for label in self.labels], dtype=np.float64)
        mode = self.options.class_weights
        if mode != "none" and len(frequency) and frequency.min() > 0:
            weights = frequency.sum() / (len(frequency) * frequency)
            weights = np.sqrt(weights) if mode == "sqrt" else weights
            self.class_weights = torch.tensor(weights / weights.mean(), dtype=torch.float32)

    def collator(self, tokenizer):
        return DataCollatorWithPadding(tokenizer)

    def summary(self) -> str:
        sizes = ", ".join(f"{name} {len(rows)}" for name, rows in self.datasets.items())
        return f"{len(self.labels)} labels ({', '.join(self.labels)}); spans: {sizes}"

    # model ------------------------------------------------------------------------------------------
    def build_model(self, encoder: str, attention: str, trust_remote_code: bool) -> nn.Module:
        base = AutoModel.from_pretrained(encoder, attn_implementation=attention, trust_remote_code=trust_remote_code,
                                         use_safetensors=True)  # fmt: skip
        if base.get_input_embeddings().num_embeddings < self.vocab_size:  # rows for the markers (mean-initialised)
            base.resize_token_embeddings(self.vocab_size)
        return AssertionClassifier(base, self.settings)

    def load_model(self, folder: Path) -> nn.Module:
        return AssertionClassifier.from_pretrained(folder)

    def head_modules(self, model: nn.Module) -> list[str]:
        return ["head"]

    def wrap_lora(self, model: nn.Module, tuning: Any, heads: list[str]) -> nn.Module:
        """LoRA on the encoder, the head trained fully, and the two marker rows of the embeddings trained too (peft's
        trainable tokens): a new token's embedding is otherwise frozen at its initial value. The adapter saves
        them (their full values), so it goes back onto any base with room for the two tokens."""
        from peft import LoraConfig, get_peft_model

        from cmft.lora import target_modules

        embeddings = next(name for name, module in model.named_modules() if module is model.get_input_embeddings())
        config = LoraConfig(
            r=tuning.r, lora_alpha=tuning.alpha, lora_dropout=tuning.dropout,
            target_modules=target_modules(model.config.model_type, tuning),
            modules_to_save=sorted(set(heads) | set(tuning.modules_to_save or [])),
            trainable_token_indices={embeddings: list(self.marker_ids)},
        )  # fmt: skip
        try:
            return get_peft_model(model, config)
        except ValueError as exc:
            raise CmftError(f"tuning: LoRA could not wrap the encoder ({exc})") from None

    def loss(self, model: nn.Module, inputs: dict) -> tuple[torch.Tensor, Any]:
        labels = inputs.pop("labels")
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        weight = None if self.class_weights is None else self.class_weights.to(outputs["logits"].device)
        return nn.functional.cross_entropy(outputs["logits"], labels, weight=weight), outputs

    def inference_module(self, model: nn.Module) -> nn.Module:
        return LogitsModule(model)

    def save(self, model: nn.Module, tokenizer: Any, folder: Path) -> None:
        model.settings = self.settings
        super().save(model, tokenizer, folder)

    def meta(self) -> dict[str, Any]:
        return _meta(self.settings)

    # metrics ----------------------------------------------------------------------------------------
    def score(self, outputs: list[np.ndarray], split: str, tune: bool = False) -> dict[str, Any]:
        predicted = np.stack(outputs).argmax(-1)
        gold = np.array([row["labels"] for row in self.datasets[split]])
        return assertion_metrics(gold, predicted, self.labels)

    def save_extras(self, folder: Path, outputs: list[np.ndarray], split: str, plots: Path) -> None:
        (folder / "labels.json").write_text(json.dumps(self.labels, indent=2), encoding="utf-8")
        gold = np.array([row["labels"] for row in self.datasets[split]])
        predicted = np.stack(outputs).argmax(-1)
        confusion_plot(gold, predicted, self.labels, plots / "confusion_matrix.png", cell=0.6, fontsize=7)

    # inference --------------------------------------------------------------------------------------
    @classmethod
    def load_inference(cls, folder: Path, meta: dict[str, Any], attention: str) -> nn.Module:
        return LogitsModule(load_pretrained(AssertionClassifier, folder, attention)).eval()

    @classmethod
    def manifest_from_recipe(cls, folder: Path, recipe: RecipeBase) -> dict[str, Any]:
        if not (folder / HEAD_CONFIG).is_file():
            raise CmftError(f"{folder}: no {HEAD_CONFIG}; not an assertion model folder")
        return _meta(json.loads((folder / HEAD_CONFIG).read_text(encoding="utf-8")))

    @classmethod
    def input_text(cls, meta: dict[str, Any], record: dict[str, Any], text_field: str, where: str) -> str:
        """One input record as the text `encode` reads: with `start` and `end`, the text with its span marked;
        without, the text as given, which must carry the markers itself."""
        markers = meta["assertion"]["markers"]
        if "start" not in record and "end" not in record:
            text = record.get(text_field)
            unmark(text if isinstance(text, str) else "", markers, where)
            return text
        start, end = (_offset(record.get(key)) for key in ("start", "end"))
        row = check_span(record.get(text_field), start, end, where)
        return mark(row.text, row.start, row.end, markers)

    @classmethod
    def encode(cls, tokenizer: Any, texts: list[str], meta: dict[str, Any]) -> tuple[list[Unit], dict[str, int]]:
        """Texts with their span marked inline → one unit each: a window around the span (counted when context was
        left out; truncated only when the span alone is longer than max_length)."""
        settings = meta["assertion"]
        units, windowed = [], 0
        for index, text in enumerate(texts):
            row = unmark(text, settings["markers"], f"text {index + 1}")
            ids, cut_context, cut_span = span_ids(tokenizer, row, settings)
            windowed += cut_context
            units.append(Unit(index, ids, window={"start": row.start, "end": row.end}, truncated=cut_span))
        return units, {"n_truncated": sum(u.truncated for u in units), "n_windowed": windowed}

    @classmethod
    def unit(cls, index: int, ids: list[int], meta: dict[str, Any]) -> Unit:
        """A row of [CLS] … [SEP] with the markers put in (the export's parity samples: every real row has them)."""
        start_id, end_id = meta["assertion"]["marker_ids"]
        ids = list(ids)
        first, last = max(1, len(ids) // 3), max(2, 2 * len(ids) // 3)
        if first < len(ids) - 1:
            ids[first] = start_id
        if last < len(ids) - 1:
            ids[last] = end_id
        return Unit(index, ids)

    @classmethod
    def decode(cls, meta: dict[str, Any], text: str, outputs: list[np.ndarray], units: list[Unit]) -> dict[str, Any]:
        logits = outputs[0].astype(np.float64)
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        best = int(probabilities.argmax())
        labels = meta["labels"]
        return {"label": labels[best], "score": round(float(probabilities[best]), 6),
                "probabilities": {label: round(float(p), 6) for label, p in zip(labels, probabilities, strict=True)},
                **(units[0].window or {})}  # fmt: skip

    @classmethod
    def card_onnx_feed(cls, meta: dict[str, Any]) -> str:
        settings = meta["assertion"]
        return ONNX_FEED.format(
            example=CARD_EXAMPLE, span=CARD_SPAN, normalise_case=settings["normalise_case"],
            start_id=settings["marker_ids"][0], end_id=settings["marker_ids"][1], max_length=meta["max_length"],
            cls="" if settings["cls_id"] is None else f"{settings['cls_id']}, ",
            sep="" if settings["sep_id"] is None else f", {settings['sep_id']}",
        )  # fmt: skip


def assertion_metrics(gold: np.ndarray, predicted: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """accuracy, macro_f1 (over the labels in gold or predicted, as sklearn and note classification count it) and
    per_label {label: precision, recall, f1, support} for every label of the model."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(
        gold, predicted, labels=list(range(len(labels))), zero_division=0
    )
    per_label = {label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                         "support": int(support[i])} for i, label in enumerate(labels)}  # fmt: skip
    return {"accuracy": float(accuracy_score(gold, predicted)),
            "macro_f1": float(f1_score(gold, predicted, average="macro", zero_division=0)),
            "per_label": per_label}  # fmt: skip


def _meta(settings: dict[str, Any]) -> dict[str, Any]:
    return {"task": AssertionTask.name, "max_length": settings["max_length"], "labels": settings["labels"],
            "assertion": settings}  # fmt: skip


def _label_order(label: str) -> tuple[int, str]:
    """The i2b2 labels in their usual order, then any others alphabetically."""
    return (I2B2_LABELS.index(label), "") if label in I2B2_LABELS else (len(I2B2_LABELS), label)


def _first_id(tokenizer: Any, *kinds: str) -> int | None:
    for kind in kinds:
        found = getattr(tokenizer, f"{kind}_token_id", None)
        if found is not None:
            return int(found)
    return None


def _offset(value: Any) -> Any:
    """A csv cell's offset ("12") as a number; anything else as given, for check_span to judge."""
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value
