"""Named-entity recognition: IOB2 tagging with word alignment, overlapping windows and strict scoring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn
from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

from cmft.data.ner import read_conll, read_span_jsonl, word_spans
from cmft.errors import CmftError
from cmft.metrics import entity_metrics
from cmft.paths import resolve_path
from cmft.recipe import DataConfig, FolderSplit, RecipeBase, TaskSection, TrainingConfig
from cmft.tasks.base import SPLITS, Task, Unit


class NerConfig(TaskSection):
    """The recipe's `ner` section."""

    token_column: int = 0
    tag_column: int = -1
    stride: int = Field(32, ge=0)
    """Sub-tokens shared by consecutive windows when a sentence is longer than max_length."""
    label_all_subtokens: bool = False
    """Train on every sub-token (default: only a word's first sub-token carries its tag)."""

    def check(self, training: TrainingConfig, data: DataConfig) -> None:
        if self.stride >= training.max_length - 2:
            raise ValueError("ner.stride must be smaller than training.max_length - 2")
        for split in ("train", "dev", "test"):
            if isinstance(getattr(data, split), FolderSplit):  # tags are per word; a folder gives labels per note
                raise ValueError(
                    f"data.{split}: NER reads a CoNLL/IOB file (token and tag columns) or a .jsonl file with "
                    "character-offset entity spans, not a {texts, labels} folder of notes"
                )


def to_iob2(tags: list[str]) -> list[str]:
    """IOB1 → IOB2 (an entity may start with I-); IOB2 input is unchanged."""
    fixed = []
    for i, tag in enumerate(tags):
        if tag.startswith("I-") and (i == 0 or fixed[-1] == "O" or fixed[-1][2:] != tag[2:]):
            tag = "B-" + tag[2:]
        fixed.append(tag)
    return fixed


repair_tags = to_iob2  # decoding repair: an I- after O (or after another type) opens a new entity


def align_windows(words: list[str], tokenizer, max_length: int, stride: int) -> list[dict[str, Any]]:
    """Sub-tokens of the words, cut into overlapping windows of ≤ max_length (with [CLS]/[SEP]).

    Words are joined with spaces and mapped back through character offsets, which works the same for
    WordPiece and byte-level BPE (no `is_split_into_words` / add_prefix_space pitfalls)."""
    starts, text = [], ""
    for word in words:
        starts.append(len(text) + (1 if text else 0))
        text = f"{text} {word}" if text else word
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    bounds = np.array(starts + [len(text) + 1])
    token_word = [int(np.searchsorted(bounds, max(end - 1, start), side="right") - 1)
                  for start, end in encoded["offset_mapping"]]  # fmt: skip
    ids = encoded["input_ids"]
    word_start = [i == 0 or token_word[i] != token_word[i - 1] for i in range(len(ids))]
    room = max_length - 2
    step = max(1, room - stride)
    windows = []
    for first in range(0, max(len(ids), 1), step):
        piece = slice(first, first + room)
        windows.append({
            "input_ids": [tokenizer.cls_token_id, *ids[piece], tokenizer.sep_token_id],
            "word": [-1, *token_word[piece], -1],
            "first": [False, *word_start[piece], False],  # only a word's true first sub-token carries its label
        })  # fmt: skip
        if first + room >= len(ids):
            break
    return windows


def merge_windows(windows: list[dict], window_logits: list[np.ndarray], n_words: int) -> np.ndarray:
    """Per-word logits: each word from the window where its first sub-token has the most context."""
    best = np.full(n_words, -1.0)
    merged = np.zeros((n_words, window_logits[0].shape[-1]), dtype=np.float32)
    for window, logits in zip(windows, window_logits, strict=True):
        length = len(window["input_ids"])
        for position, (word, first) in enumerate(zip(window["word"], window["first"], strict=True)):
            if first and word >= 0:
                context = min(position, length - 1 - position)
                if context > best[word]:
                    best[word] = context
                    merged[word] = logits[position]
    return merged


class NerTask(Task):
    name = "ner"
    section_name = "ner"
    section = NerConfig
    metric_for_best = "f1"
    # the tiny encoder's full-tuning rate chosen on dev over three seeds (benchmarks/README.md, Choosing on dev)
    learning_rates = {"tiny": {"full": 6e-4, "lora": 1e-3}, "pretrained": {"full": 3e-4, "lora": 1e-3}}
    output_meaning = "[batch, sequence, tags] logits per token; a word's tag is argmax at its first sub-token"
    token_level = True
    windowed = True
    gives_spans = True
    auto_class = AutoModelForTokenClassification
    description = "Tags entity mentions token by token (IOB2), reading long texts in overlapping windows."
    pipeline_tag = "token-classification"
    card_decode = "tags = [model.config.id2label[i] for i in logits.argmax(-1)[0].tolist()]  # one per sub-token"

    def __init__(self, recipe: RecipeBase | None = None):
        super().__init__(recipe)
        self.options: NerConfig = self.section_of(recipe)
        self.sentences: dict[str, list[tuple[list, list]]] = {}
        self.windows: dict[str, list[list[dict]]] = {}

    def _read(self, name: str) -> list[tuple[list, list]] | None:
        source = getattr(self.recipe.data, name)
        if source is None:
            return None
        path = resolve_path(source)
        if not path.is_file():
            raise CmftError(f"data.{name}: {source}: file not found")
        if path.suffix == ".jsonl":
            sentences, empty = read_span_jsonl(path), 0
        else:
            sentences, empty = read_conll(path, self.options.token_column, self.options.tag_column)
        if not sentences:
            raise CmftError(f"data.{name}: {source}: no sentence")
        self.report[f"n_empty_skipped_{name}"] = empty
        return [(words, to_iob2(tags)) for words, tags in sentences]

    def prepare(self, tokenizer: Any, splits: tuple[str, ...] = SPLITS) -> None:
        """Read and window `splits`; the tag set comes from train, or is a saved model's (`restore`)."""
        for name in splits:
            sentences = self._read(name)
            if sentences is not None:
                self.sentences[name] = sentences
        labels = self.labels or None
        if labels is None:
            found = {t for _, tags in self.sentences["train"] for t in tags}
            labels = ["O", *sorted(found - {"O"}, key=lambda t: (t[2:], t[:2]))]
        self.labels = list(labels)
        index = {tag: i for i, tag in enumerate(self.labels)}
        for name, sentences in self.sentences.items():
            unknown = sorted({t for _, tags in sentences for t in tags} - set(index))
            if unknown:
                raise CmftError(f"data.{name}: tag {unknown[0]!r} is not among the train tags {self.labels}")
            rows, windows_of = [], []
            for words, tags in sentences:
                windows = align_windows(words, tokenizer, self.recipe.training.max_length, self.options.stride)
                windows_of.append(windows)
                for window in windows:
                    labels_row = [
                        index[tags[w]] if w >= 0 and (first or self.options.label_all_subtokens) else -100
                        for w, first in zip(window["word"], window["first"], strict=True)
                    ]
                    rows.append({"input_ids": window["input_ids"], "labels": labels_row})
            self.report[f"n_windowed_{name}"] = sum(len(w) > 1 for w in windows_of)
            self.windows[name], self.datasets[name] = windows_of, rows

    def collator(self, tokenizer: Any) -> DataCollatorForTokenClassification:
        return DataCollatorForTokenClassification(tokenizer)

    def loss(self, model: nn.Module, inputs: dict) -> tuple[torch.Tensor, Any]:
        outputs = model(**inputs)
        return outputs.loss, outputs

    @classmethod
    def settings_meta(cls, recipe: RecipeBase) -> dict[str, Any]:
        return {"stride": cls.section_of(recipe).stride}

    def word_predictions(self, outputs: list[np.ndarray], split: str) -> list[list[str]]:
        """Each sentence's word tags, its windows' token logits merged per word (as prediction does)."""
        predictions, cursor = [], 0
        for (words, _), windows in zip(self.sentences[split], self.windows[split], strict=True):
            predictions.append(word_tags(self.labels, windows, outputs[cursor : cursor + len(windows)], len(words)))
            cursor += len(windows)
        return predictions

    def score(self, outputs: list[np.ndarray], split: str, tune: bool = False) -> dict[str, Any]:
        gold = [tags for _, tags in self.sentences[split]]
        return entity_metrics(gold, self.word_predictions(outputs, split))

    def save_extras(self, folder: Path, outputs: list[np.ndarray], split: str, plots: Path) -> None:
        (folder / "labels.json").write_text(json.dumps(self.labels, indent=2), encoding="utf-8")

    # inference --------------------------------------------------------------------------------------
    @classmethod
    def encode(cls, tokenizer: Any, texts: list[str], meta: dict[str, Any]) -> tuple[list[Unit], dict[str, int]]:
        """Words split as in training; a text longer than max_length becomes overlapping windows (not cut)."""
        units, windowed = [], 0
        for index, text in enumerate(texts):
            words = [text[start:end] for start, end in word_spans(text)]
            windows = align_windows(words, tokenizer, int(meta["max_length"]), int(meta["stride"]))
            windowed += len(windows) > 1
            units.extend(Unit(index, w["input_ids"], w) for w in windows)
        return units, {"n_truncated": 0, "n_windowed": windowed}

    @classmethod
    def decode(cls, meta: dict[str, Any], text: str, outputs: list[np.ndarray], units: list[Unit]) -> dict[str, Any]:
        return {"entities": entities(meta["labels"], text, outputs, units)}

    @classmethod
    def spans(cls, prediction: dict[str, Any]) -> list[dict[str, Any]]:
        return prediction["entities"]


def word_tags(labels: list[str], windows: list[dict], outputs: list[np.ndarray], n_words: int) -> list[str]:
    """Each word's tag from the token logits of its text's windows (padding beyond a window ignored)."""
    merged = merge_windows(windows, [o[: len(w["input_ids"])] for o, w in zip(outputs, windows, strict=True)], n_words)
    return repair_tags([labels[i] for i in merged.argmax(-1)])


def entities(labels: list[str], text: str, outputs: list[np.ndarray], units: list[Unit]) -> list[dict[str, Any]]:
    """Entities with character offsets in `text`, from the token logits of its windows."""
    spans = word_spans(text)
    if not spans:
        return []
    tags = word_tags(labels, [u.window for u in units], outputs, len(spans))
    found: list[dict[str, Any]] = []
    for (start, end), tag in zip(spans, tags, strict=True):
        if tag.startswith("B-"):
            found.append({"start": start, "end": end, "label": tag[2:]})
        elif tag.startswith("I-") and found:
            found[-1]["end"] = end
    for entity in found:
        entity["text"] = text[entity["start"] : entity["end"]]
    return found
