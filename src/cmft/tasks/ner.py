"""Named-entity recognition: IOB2 tagging with word alignment, overlapping windows and strict scoring."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

from cmft.errors import CmftError
from cmft.metrics import PRIMARY_METRIC
from cmft.paths import resolve_path
from cmft.tasks.common import head_modules, saved_labels

WORD = re.compile(r"\w+|[^\w\s]")


def read_conll(path: Path, token_column: int = 0, tag_column: int = -1) -> tuple[list[tuple[list, list]], int]:
    """Sentences of (words, tags) from a CoNLL / IOB tsv (blank line between sentences); and the count of
    empty sentences skipped. A line with the wrong number of columns is an error naming the line."""
    sentences: list[tuple[list, list]] = []
    words: list[str] = []
    tags: list[str] = []
    columns = None
    empty = 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CmftError(f"{path}: not a UTF-8 text file") from None
    for number, line in enumerate([*lines, ""], 1):
        if not line.strip() or line.startswith("-DOCSTART-"):
            if words:
                sentences.append((words, tags))
            elif number <= len(lines) and sentences and not line.startswith("-DOCSTART-"):
                empty += 1
            words, tags = [], []
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        columns = columns or len(parts)
        if len(parts) != columns or len(parts) < 2:
            raise CmftError(f"{path}: line {number}: expected {columns or 2} columns, found {len(parts)}")
        words.append(parts[token_column])
        tags.append(parts[tag_column])
    return sentences, empty


def read_span_jsonl(path: Path) -> list[tuple[list, list]]:
    """{"text", "entities": [{"start", "end", "label"}]} → words (\\w+ or punctuation) with IOB2 tags."""
    sentences = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text, entities = record["text"], record.get("entities", [])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CmftError(f"{path}: line {number}: expected JSON with text and entities") from None
        matches = list(WORD.finditer(text))
        tags = ["O"] * len(matches)
        for entity in entities:
            inside = [i for i, m in enumerate(matches) if m.start() < entity["end"] and m.end() > entity["start"]]
            for position, i in enumerate(inside):
                tags[i] = ("B-" if position == 0 else "I-") + entity["label"]
        if matches:
            sentences.append(([m.group() for m in matches], tags))
    return sentences


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


class NerTask:
    metric_for_best = PRIMARY_METRIC["ner"]

    def __init__(self, recipe: Any):
        self.recipe = recipe
        self.options = recipe.ner
        self.labels: list[str] = []
        self.report: dict[str, Any] = {}
        self.sentences: dict[str, list[tuple[list, list]]] = {}
        self.windows: dict[str, list[list[dict]]] = {}
        self.datasets: dict[str, list[dict]] = {}

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

    def prepare(
        self, tokenizer, splits: tuple[str, ...] = ("train", "dev", "test"), labels: list | None = None
    ) -> None:
        for name in splits:
            sentences = self._read(name)
            if sentences is not None:
                self.sentences[name] = sentences
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

    def collator(self, tokenizer):
        return DataCollatorForTokenClassification(tokenizer)

    def build_model(self, encoder: str, attention: str, trust_remote_code: bool) -> nn.Module:
        return AutoModelForTokenClassification.from_pretrained(
            encoder, num_labels=len(self.labels), id2label=dict(enumerate(self.labels)),
            label2id={t: i for i, t in enumerate(self.labels)}, attn_implementation=attention,
            trust_remote_code=trust_remote_code, use_safetensors=True,
        )  # fmt: skip

    def loss(self, model: nn.Module, inputs: dict) -> tuple[torch.Tensor, Any]:
        outputs = model(**inputs)
        return outputs.loss, outputs

    def head_modules(self, model: nn.Module) -> list[str]:
        return head_modules(model)

    def load_model(self, folder: Path) -> nn.Module:
        return AutoModelForTokenClassification.from_pretrained(folder, use_safetensors=True).eval()

    def saved_labels(self, folder: Path) -> list[str]:
        return saved_labels(folder)

    def word_predictions(self, logits: np.ndarray, split: str) -> list[list[str]]:
        predictions, cursor = [], 0
        for (words, _), windows in zip(self.sentences[split], self.windows[split], strict=True):
            window_logits = [logits[cursor + i] for i in range(len(windows))]
            cursor += len(windows)
            merged = merge_windows(windows, window_logits, len(words))
            predictions.append(repair_tags([self.labels[i] for i in merged.argmax(-1)]))
        return predictions

    def metrics(self, logits: np.ndarray, labels: np.ndarray, split: str = "test", tune: bool = False) -> dict:
        from cmft.metrics import entity_metrics

        gold = [tags for _, tags in self.sentences[split]]
        return entity_metrics(gold, self.word_predictions(np.asarray(logits), split))

    def save_extras(self, folder: Path, logits: np.ndarray, labels: np.ndarray, plots: Path) -> None:
        (folder / "labels.json").write_text(json.dumps(self.labels, indent=2), encoding="utf-8")
