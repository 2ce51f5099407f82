"""Multilabel ICD coding over long notes: label space, whole/chunked encoding, label-wise attention, metrics."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, PositiveInt
from torch import nn
from transformers import AutoModel, AutoTokenizer

from cmft.backends import TorchBackend, run_batches
from cmft.data.readers import Split, read_split
from cmft.errors import CmftError
from cmft.heads import LabelAttentionHead, PooledHead
from cmft.metrics import multilabel_metrics, per_label_precision_recall, tune_threshold
from cmft.recipe import DataConfig, RecipeBase, TaskSection, TrainingConfig
from cmft.tasks import icd_evidence
from cmft.tasks.base import SPLITS, Task, Unit, load_pretrained, write_manifest
from cmft.tasks.head_model import HeadModel
from cmft.tasks.icd_batches import IcdModule, collate_notes, encode_chunks, encode_note, pad_notes
from cmft.tasks.icd_card import CARD_ADAPTER, CARD_CHUNKED_FEED, CARD_USAGE, METRICS_NOTE
from cmft.tasks.icd_descriptions import init_queries_from_descriptions, read_descriptions, undescribed
from cmft.tasks.icd_labels import LabelSpaceConfig, normalize_code, per_label_plot
from cmft.tasks.icd_metrics import all_code_metrics, code_thresholds, tune_code_thresholds
from cmft.tasks.icd_zero_shot import add_zero_shot_codes, zero_shot_scores

HEAD_WEIGHTS = "icd_head.safetensors"
HEAD_CONFIG = "icd_coding.json"


class IcdCodingConfig(TaskSection):
    """The recipe's `icd_coding` section."""

    label_space: LabelSpaceConfig = LabelSpaceConfig()
    mode: Literal["whole", "chunked"] = "whole"
    """`whole`: the note in one pass (up to max_length ≤ 8192); `chunked`: PLM-ICD-style segments."""
    chunk_size: int = Field(256, ge=128, le=512)
    max_chunks: PositiveInt = 8
    head: Literal["label_attention", "pooled"] = "label_attention"
    attention_dim: PositiveInt = 256
    init_from_descriptions: bool = False
    """Start each label query from the encoder's embedding of its description (`descriptions`)."""
    descriptions: str = "bundled:data/icd_codes/icd10cm_2024_codes.tsv.gz"
    """code<TAB>description rows (a header row optional; .gz read as gzip): ICD-10-CM 2024 by default; bring your own
    for other code sets (ICD-9-CM codes written as the data writes them). Read for training only: the model keeps what
    it needs."""
    thresholds: Literal["global", "per_code"] = "global"
    """`global`: one threshold tuned on dev; `per_code`: codes with at least `per_code_min_positives` dev notes get
    their own (tuned on dev), the others the global one."""
    per_code_min_positives: PositiveInt = 5
    rare_code_weight: bool = False
    """Weight each code's positive notes by sqrt(negatives / positives) in train (capped at 30), so that rare codes
    count in the loss."""

    def check(self, training: TrainingConfig, data: DataConfig) -> None:
        if training.max_length > 8192:
            raise ValueError("training.max_length must be at most 8192")
        if self.label_space.zero_shot and self.head != "label_attention":
            raise ValueError("icd_coding.label_space.zero_shot needs icd_coding.head: label_attention (the pooled head "
                             "has no label queries for a description to fill)")  # fmt: skip
        if self.label_space.zero_shot and self.label_space.level != "code":
            raise ValueError("icd_coding.label_space.zero_shot needs label_space.level: code (zero-shot codes are the "
                             "other codes of a trained code's category)")  # fmt: skip


class IcdCoder(HeadModel):
    """An encoder plus an ICD head; `model/` holds the encoder (AutoModel loads it) and the head files.

    from cmft import IcdCoder
    coder = IcdCoder.from_pretrained("runs/finetune/latest/model")
    coder.predict(["Patient with type 2 diabetes ..."])   # [{code: probability}, ...] above threshold
    """

    HEAD_WEIGHTS, HEAD_CONFIG, KIND = HEAD_WEIGHTS, HEAD_CONFIG, "an ICD coding model"

    def build_head(self, hidden_size: int, settings: dict[str, Any]) -> nn.Module:
        labels = len(settings["labels"])
        if settings["head"] == "label_attention":
            zero_shot, candidates = len(settings.get("zero_shot_labels") or ()), settings.get("zero_shot_candidates")
            return LabelAttentionHead(hidden_size, labels, settings["attention_dim"], zero_shot, candidates)
        return PooledHead(hidden_size, labels)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states and mask (chunked input: cmft.tasks.icd_batches.encode_chunks)."""
        return encode_chunks(self.encoder, input_ids, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        states, mask = self.encode(input_ids, attention_mask)
        logits = self.head(states, mask)
        loss = None
        if labels is not None:
            weight = getattr(self, "positive_weight", None)  # rare_code_weight: a buffer set for training only
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=weight)
        return {"loss": loss, "logits": logits} if loss is not None else {"logits": logits}

    def save_pretrained(self, folder: str | Path, **kwargs: Any) -> None:
        super().save_pretrained(folder, **kwargs)
        write_manifest(Path(folder), _meta(self.settings["max_length"], self.settings))  # what predict reads

    def predict_proba(self, texts: list[str], batch_size: int = 8) -> np.ndarray:
        """[texts, codes] probabilities, computed as `cmft predict` computes them."""
        meta = _meta(self.settings["max_length"], self.settings)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        units, _ = IcdCodingTask.encode(self.tokenizer, texts, meta)

        def collate(batch: list[Unit]) -> tuple[np.ndarray, np.ndarray]:
            return IcdCodingTask.collate(batch, pad_id, meta)

        return np.stack(run_batches(units, collate, TorchBackend(IcdModule(self)), batch_size))

    def predict(self, texts: list[str]) -> list[dict[str, float]]:
        probabilities = self.predict_proba(texts)
        labels, threshold = self.settings["labels"], code_thresholds(self.settings)
        return [
            {labels[j]: round(float(row[j]), 4) for j in np.argsort(-row) if row[j] >= threshold[j]}
            for row in probabilities
        ]


class IcdCodingTask(Task):
    name = "icd_coding"
    section_name = "icd_coding"
    section = IcdCodingConfig
    metric_for_best = "micro_f1"
    output = "probabilities"
    output_meaning = icd_evidence.OUTPUT_MEANING
    learning_rates = {"tiny": {"full": 3e-4, "lora": 1e-3}, "pretrained": {"full": 5e-5, "lora": 1e-3}}
    decode_options = {"threshold": float, "top_k": int}  # a request may set its own (cmft serve)
    exported = classmethod(icd_evidence.exported_with_attention)  # and the label attention, for evidence
    evidence_backend = classmethod(icd_evidence.evidence_backend)
    parity_view = classmethod(icd_evidence.parity_view)  # zero-shot candidates: near-ties at the K-th place
    description = "Assigns each note its ICD codes (multi-label), those at or above a threshold tuned on dev."
    library_name = "cmft"
    card_usage = {"cmft": CARD_USAGE}
    card_adapter = CARD_ADAPTER
    metrics_note = METRICS_NOTE

    def __init__(self, recipe: RecipeBase | None = None):
        super().__init__(recipe)
        self.options: IcdCodingConfig = self.section_of(recipe)
        self.splits: dict[str, Split] = {}
        self.threshold = 0.5
        self.code_thresholds: dict[str, float] = {}  # icd_coding.thresholds: per_code
        self.label_frequency: np.ndarray | None = None
        self.train_counts: dict[str, int] | None = None  # code → train documents, every train code
        self.descriptions: dict[str, str] = {}  # code → description (icd_coding.descriptions), read for training only
        self.zero_shot_labels: list[str] = []  # the last labels: scored from descriptions, added after training
        self.zero_shot_threshold: float | None = None
        self.zero_shot_candidates: int | None = None  # zero-shot codes scored in full per note (None: all)

    @property
    def settings(self) -> dict[str, Any]:
        o = self.options
        return {
            "labels": self.labels, "threshold": self.threshold, "mode": o.mode, "head": o.head,
            "attention_dim": o.attention_dim, "chunk_size": o.chunk_size, "max_chunks": o.max_chunks,
            "max_length": self.recipe.training.max_length, "level": o.label_space.level,
            "code_thresholds": self.code_thresholds, "train_code_counts": self.train_counts,
            "zero_shot_labels": self.zero_shot_labels, "zero_shot_threshold": self.zero_shot_threshold,
            "zero_shot_candidates": self.zero_shot_candidates,
        }  # fmt: skip

    def tokens_per_pass(self) -> tuple[int, str]:
        if self.options.mode == "chunked":
            return self.options.chunk_size, "icd_coding.chunk_size"
        return super().tokens_per_pass()

    def pass_shape(self, rows: int) -> tuple[int, int]:
        if self.options.mode == "chunked":
            return rows * self.options.max_chunks, self.options.chunk_size
        return super().pass_shape(rows)

    def position_way_out(self, limit: int) -> str:
        if self.options.mode == "chunked":
            return ""
        return f", or read the note in segments: icd_coding.mode=chunked icd_coding.chunk_size={min(512, limit)}"

    def prepare(self, tokenizer: Any, splits: tuple[str, ...] = SPLITS) -> None:
        """Read and tokenize `splits`; the label space comes from train, or is a saved model's (`restore`)."""
        level = self.options.label_space.level
        for name in splits:
            split = read_split(self.recipe.data, name, multi_label=True)
            if split is not None:
                for example in split.examples:
                    example.label = sorted({normalize_code(c, level) for c in example.label})
                self.splits[name] = split
        train = self.splits["train"].examples if "train" in self.splits else []
        counts = Counter(code for example in train for code in example.label)
        if "train" in self.splits:
            self.train_counts = dict(sorted(counts.items()))
        minimum = self.options.label_space.min_train_count
        labels = self.labels or None
        if labels is None:  # a new label space, from train (a bad descriptions file fails here, before training)
            labels = sorted(c for c, n in counts.items() if n >= minimum)
            self.descriptions = read_descriptions(self.options.descriptions)
            self.report["n_labels_without_description"] = undescribed(self.descriptions, labels)
        self.labels = list(labels)
        if not self.labels:
            raise CmftError(
                f"icd_coding.label_space: no code has ≥ {self.options.label_space.min_train_count} train documents; "
                "lower min_train_count or use level: category"
            )
        trained = self.labels[: len(self.labels) - len(self.zero_shot_labels)]  # the label space: the targets
        index = {code: i for i, code in enumerate(trained)}
        self.label_frequency = np.array([counts[c] / max(len(train), 1) for c in trained])
        self.report["n_labels"] = len(index)
        for name, split in self.splits.items():
            outside = sum(1 for e in split.examples for c in e.label if c not in index)
            self.report[f"n_codes_outside_label_space_{name}"] = outside
            self.report[f"n_empty_skipped_{name}"] = split.skipped_empty
            rows, cut = [], 0
            for example in split.examples:
                ids, was_cut = encode_note(tokenizer, example.text, self.settings)
                cut += was_cut
                target = np.zeros(len(index), dtype=np.float32)
                target[[index[c] for c in example.label if c in index]] = 1.0
                rows.append({"input_ids": ids, "labels": target})
            self.report[f"n_truncated_{name}"] = cut
            self.datasets[name] = rows

    def collator(self, tokenizer: Any) -> Any:
        settings = self.settings
        return lambda features: collate_notes(features, tokenizer.pad_token_id, settings)

    def build_model(self, encoder: str, attention: str, trust_remote_code: bool) -> nn.Module:
        base = AutoModel.from_pretrained(encoder, attn_implementation=attention, trust_remote_code=trust_remote_code,
                                         use_safetensors=True)  # fmt: skip
        coder = IcdCoder(base, self.settings)
        # Sparse labels: a zero bias starts every code at p = 0.5 and barely moves; start at the train prior.
        prior = np.clip(self.label_frequency, 1e-4, 1 - 1e-4)
        with torch.no_grad():
            coder.head.output_bias.copy_(torch.tensor(np.log(prior / (1 - prior)), dtype=torch.float32))
        if self.options.rare_code_weight:
            weight = np.clip(np.sqrt((1 - prior) / prior), 1.0, 30.0)
            coder.register_buffer("positive_weight", torch.tensor(weight, dtype=torch.float32), persistent=False)
        if self.options.init_from_descriptions and self.options.head == "label_attention":
            tokenizer = AutoTokenizer.from_pretrained(encoder)
            init_queries_from_descriptions(coder, tokenizer, self.labels, self.descriptions)
        return coder

    def finish_model(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        if self.options.label_space.zero_shot:
            add_zero_shot_codes(self, model, tokenizer)  # from the fine-tuned encoder
        return model

    def loss(self, model: nn.Module, inputs: dict) -> tuple[torch.Tensor, Any]:
        outputs = model(**inputs)
        return outputs["loss"], outputs

    def head_modules(self, model: nn.Module) -> list[str]:
        return ["head"]

    def checkpoint_state(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "code_thresholds": self.code_thresholds}  # tuned on dev so far

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.threshold = state.get("threshold", self.threshold)
        self.code_thresholds = state.get("code_thresholds", self.code_thresholds)

    def restore(self, meta: dict[str, Any]) -> None:
        super().restore(meta)
        self.threshold = meta["threshold"]
        self.train_counts = meta["icd"].get("train_code_counts")  # None in models saved before it was kept
        self.code_thresholds = meta["icd"].get("code_thresholds") or {}
        self.zero_shot_labels = list(meta["icd"].get("zero_shot_labels", []))
        self.zero_shot_threshold = meta["icd"].get("zero_shot_threshold")
        self.zero_shot_candidates = meta["icd"].get("zero_shot_candidates")  # None in models saved before it existed

    def load_model(self, folder: Path) -> nn.Module:
        coder = IcdCoder.from_pretrained(folder)
        self.threshold, self.code_thresholds = coder.settings["threshold"], coder.settings.get("code_thresholds", {})
        return coder

    def inference_module(self, model: nn.Module) -> nn.Module:
        return IcdModule(model)

    def save(self, model: nn.Module, tokenizer, folder: Path) -> None:
        model.settings = self.settings  # the tuned threshold travels with the model
        super().save(model, tokenizer, folder)

    def meta(self) -> dict[str, Any]:
        return _meta(self.recipe.training.max_length, self.settings)

    def outputs_of(self, predictions: Any) -> list[np.ndarray]:
        logits = np.asarray(predictions[0] if isinstance(predictions, tuple) else predictions, dtype=np.float64)
        return list(1 / (1 + np.exp(-logits)))

    def score(self, outputs: list[np.ndarray], split: str, tune: bool = False) -> dict[str, Any]:
        probabilities = np.stack(outputs).astype(np.float64)
        labels = np.stack([row["labels"] for row in self.datasets[split]])
        trained = probabilities[:, : labels.shape[1]]  # the label space; zero-shot codes are the last columns
        if tune:  # chosen on dev, saved with the model, applied to test: a global threshold, per code if asked
            self.threshold, _ = tune_threshold(labels, trained)
            if self.options.thresholds == "per_code":
                own = tune_code_thresholds(labels, trained, self.threshold, self.options.per_code_min_positives)
                self.code_thresholds = {self.labels[j]: t for j, t in own.items()}
        zero_shot = zero_shot_scores(self, split, probabilities, tune)  # their threshold, chosen on dev
        thresholds = code_thresholds(self.settings)
        gold = [set(example.label) for example in self.splits[split].examples]
        predicted = [{self.labels[j] for j in np.flatnonzero(row >= thresholds)} for row in probabilities]
        return {**multilabel_metrics(labels, trained, thresholds[: labels.shape[1]]), "threshold": self.threshold,
                "n_codes_own_threshold": len(self.code_thresholds), **zero_shot,
                **all_code_metrics(gold, predicted, self.labels, self.train_counts)}  # fmt: skip

    def save_extras(self, folder: Path, outputs: list[np.ndarray], split: str, plots: Path) -> None:
        labels = np.stack([row["labels"] for row in self.datasets[split]])
        trained = np.stack(outputs)[:, : labels.shape[1]].astype(np.float64)  # the label space's columns
        per_label_plot(
            per_label_precision_recall(labels, trained, code_thresholds(self.settings)[: labels.shape[1]]),
            plots / "per_label_precision_recall.png",
        )

    # inference --------------------------------------------------------------------------------------
    @classmethod
    def load_inference(cls, folder: Path, meta: dict[str, Any], attention: str) -> nn.Module:
        return IcdModule(load_pretrained(IcdCoder, folder, attention)).eval()

    @classmethod
    def manifest_from_recipe(cls, folder: Path, recipe: RecipeBase) -> dict[str, Any]:
        """The settings the model keeps (HEAD_CONFIG: labels, threshold, head, chunking)."""
        return _meta(recipe.training.max_length, IcdCoder.read_settings(folder))

    @classmethod
    def unit(cls, index: int, ids: list[int], meta: dict[str, Any]) -> Unit:
        if meta["icd"]["mode"] != "chunked":
            return Unit(index, ids)
        size = meta["icd"]["chunk_size"]
        return Unit(index, [ids[start : start + size] for start in range(0, len(ids), size)])

    @classmethod
    def encode(cls, tokenizer: Any, texts: list[str], meta: dict[str, Any]) -> tuple[list[Unit], dict[str, int]]:
        units, truncated = [], 0
        for index, text in enumerate(texts):
            ids, cut = encode_note(tokenizer, text, meta["icd"])
            truncated += cut
            units.append(Unit(index, ids, truncated=cut, offsets=icd_evidence.note_offsets(tokenizer, text, meta)))
        return units, {"n_truncated": truncated, "n_windowed": 0}

    @classmethod
    def collate(cls, units: list[Unit], pad_id: int, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """[B, T], or [B, C, chunk_size] for chunked notes."""
        return pad_notes(units, pad_id, meta["icd"])

    @classmethod
    def input_shape(cls, meta: dict[str, Any]) -> str:
        return (
            "[batch, sequence] ([batch, chunks, chunk_size] for chunked ICD notes)"
            if meta["icd"]["mode"] == "chunked"
            else super().input_shape(meta)
        )

    @classmethod
    def card_onnx_feed(cls, meta: dict[str, Any]) -> str:
        return CARD_CHUNKED_FEED.format(**meta) if meta["icd"]["mode"] == "chunked" else super().card_onnx_feed(meta)

    @classmethod
    def decode(cls, meta: dict[str, Any], text: str, outputs: list[np.ndarray], units: list[Unit]) -> dict[str, Any]:
        probabilities, weights = outputs[0] if "evidence" in meta else (outputs[0], None)  # weights: evidence rows
        first_zero_shot = len(meta["labels"]) - len(meta["icd"].get("zero_shot_labels") or ())
        codes = [{"code": meta["labels"][j], "probability": round(float(probabilities[j]), 6)}
                 | ({"zero_shot": True} if j >= first_zero_shot else {})
                 for j in icd_evidence.predicted_codes(probabilities, meta)]  # fmt: skip
        return {"codes": icd_evidence.with_evidence(codes, weights, text, units[0], meta) if weights else codes}


def _meta(max_length: int, settings: dict[str, Any]) -> dict[str, Any]:
    return {"task": IcdCodingTask.name, "max_length": max_length, "labels": settings["labels"],
            "threshold": settings["threshold"], "icd": settings}  # fmt: skip
