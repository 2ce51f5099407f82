"""Note classification: one label per note (MTS-Dialog section text → one of 20 section headers)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from cmft.data.readers import Split, read_split
from cmft.errors import CmftError
from cmft.metrics import classification_metrics
from cmft.plots import confusion_plot
from cmft.recipe import RecipeBase, TaskSection
from cmft.tasks.base import SPLITS, Task, cut_to


class ClassificationConfig(TaskSection):
    """The recipe's `classification` section."""

    class_weights: Literal["none", "balanced", "sqrt"] = "sqrt"
    """Loss weights against class imbalance: inverse frequency (balanced) or its square root."""


class ClassificationTask(Task):
    name = "note_classification"
    section_name = "classification"
    section = ClassificationConfig
    metric_for_best = "macro_f1"
    output_meaning = "[batch, labels] logits; softmax gives the class probabilities (labels in the manifest)"
    auto_class = AutoModelForSequenceClassification
    description = "Assigns each note (or note section) one class."
    card_decode = "label = model.config.id2label[int(logits.argmax(-1)[0])]"
    learning_rates = {"tiny": {"full": 4e-4, "lora": 1e-3}, "pretrained": {"full": 2e-4, "lora": 1e-3}}

    def __init__(self, recipe: RecipeBase | None = None):
        super().__init__(recipe)
        self.options: ClassificationConfig = self.section_of(recipe)
        self.splits: dict[str, Split] = {}
        self.class_weights: torch.Tensor | None = None

    # data -------------------------------------------------------------------------------------------
    def prepare(self, tokenizer: Any, splits: tuple[str, ...] = SPLITS) -> None:
        """Read and tokenize `splits`; the label set comes from train, or is a saved model's (`restore`)."""
        for name in splits:
            split = read_split(self.recipe.data, name, multi_label=False)
            if split is not None:
                self.splits[name] = split
        counts = Counter(e.label for e in self.splits["train"].examples) if "train" in self.splits else Counter()
        self.labels = list(self.labels) if self.labels else sorted(counts)
        if len(self.labels) < 2:
            raise CmftError(f"data.train: {self.recipe.data.train}: needs at least 2 classes")
        index = {label: i for i, label in enumerate(self.labels)}
        for name, split in self.splits.items():
            unknown = sorted({e.label for e in split.examples} - set(index))
            if unknown:
                raise CmftError(
                    f"data.{name}: {split.source}: {len(unknown)} label(s) not in the train labels, "
                    f"e.g. {unknown[0]!r}; add train examples or drop them"
                )
            encoded = tokenizer([e.text for e in split.examples], truncation=False)["input_ids"]
            limit = self.recipe.training.max_length
            self.report[f"n_truncated_{name}"] = sum(len(ids) > limit for ids in encoded)
            self.report[f"n_empty_skipped_{name}"] = split.skipped_empty
            self.datasets[name] = [
                {"input_ids": cut_to(ids, limit), "labels": index[e.label]}
                for ids, e in zip(encoded, split.examples, strict=True)
            ]
        frequency = np.array([counts[label] for label in self.labels], dtype=np.float64)
        mode = self.options.class_weights
        if mode != "none" and frequency.min() > 0:
            weights = frequency.sum() / (len(frequency) * frequency)
            weights = np.sqrt(weights) if mode == "sqrt" else weights
            self.class_weights = torch.tensor(weights / weights.mean(), dtype=torch.float32)

    def collator(self, tokenizer: Any) -> DataCollatorWithPadding:
        return DataCollatorWithPadding(tokenizer)

    # model ------------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, inputs: dict) -> tuple[torch.Tensor, Any]:
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        weight = None if self.class_weights is None else self.class_weights.to(outputs.logits.device)
        return nn.functional.cross_entropy(outputs.logits.float(), labels, weight=weight), outputs

    # metrics ----------------------------------------------------------------------------------------
    def score(self, outputs: list[np.ndarray], split: str, tune: bool = False) -> dict[str, Any]:
        predictions = np.stack(outputs).argmax(-1)
        labels = [row["labels"] for row in self.datasets[split]]
        return classification_metrics(labels, predictions.tolist(), len(self.labels))

    def save_extras(self, folder: Path, outputs: list[np.ndarray], split: str, plots: Path) -> None:
        (folder / "labels.json").write_text(json.dumps(self.labels, indent=2), encoding="utf-8")
        labels = np.array([row["labels"] for row in self.datasets[split]])
        confusion_plot(labels, np.stack(outputs).argmax(-1), self.labels, plots / "confusion_matrix.png")

    # inference --------------------------------------------------------------------------------------
    @classmethod
    def decode(cls, meta: dict[str, Any], text: str, outputs: list[np.ndarray], units: list) -> dict[str, Any]:
        logits = outputs[0].astype(np.float64)
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        order = np.argsort(-probabilities)
        labels = meta["labels"]
        return {"label": labels[order[0]], "score": round(float(probabilities[order[0]]), 6),
                "scores": {labels[j]: round(float(probabilities[j]), 6) for j in order[:5]}}  # fmt: skip
