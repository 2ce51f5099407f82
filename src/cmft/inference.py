"""Inference shared by `cmft predict` and `cmft export`.

For every run there is one torch module computing exactly what the ONNX graph computes (NER and
note-classification logits, ICD-coding probabilities, normalised retrieval embeddings, or an encoder's last
hidden state), the tokenisation of raw texts into its inputs, and the decoding of its outputs per task. The torch
and onnxruntime back ends then share everything but the forward pass, so their predictions can be compared.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cmft.config import read_yaml
from cmft.errors import CmftError

MANIFEST = "cmft_export.json"
WORD = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]")
"""NER on raw text: words and punctuation marks as separate tokens, as in the CoNLL-style training data."""


# torch modules with the exported signature (input_ids, attention_mask) -> one tensor ---------------------------
class LogitsModule(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()


class IcdModule(nn.Module):
    """Probabilities of every code. Chunked input [B, C, S] encodes every chunk (no data-dependent skipping, so it
    traces) and zeroes the states of padding chunks, which the label attention masks out anyway."""

    def __init__(self, coder: nn.Module):
        super().__init__()
        self.coder = coder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() == 2:
            states = self.coder.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask
        else:
            batch, chunks, size = input_ids.shape
            flat_mask = attention_mask.reshape(-1, size)
            states = self.coder.encoder(input_ids=input_ids.reshape(-1, size), attention_mask=flat_mask)
            states = states.last_hidden_state
            states = torch.where(flat_mask[..., None].bool(), states, torch.zeros_like(states))
            states, mask = states.reshape(batch, chunks * size, -1), attention_mask.reshape(batch, chunks * size)
        return torch.sigmoid(self.coder.head(states, mask))


class EmbeddingModule(nn.Module):
    """Mean (or CLS) pooling then L2 normalisation: what the saved SentenceTransformer computes."""

    def __init__(self, encoder: nn.Module, pooling: str):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        if self.pooling == "cls":
            pooled = states[:, 0]
        else:
            weights = attention_mask[..., None].float()
            pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, dim=-1)


class EncoderModule(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()


# loading ------------------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    task: str
    """note_classification | icd_coding | ner | retrieval | encoder (a pretrain run)."""
    tokenizer: Any
    meta: dict[str, Any]
    """labels, threshold, icd settings, pooling, max_length, stride: everything decoding needs (the manifest)."""
    module: nn.Module | None = None
    recipe: Any = None
    run_dir: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def run_kind(run_dir: Path) -> str:
    """`finetune`, `pretrain` or `export` for a folder; a one-line error for anything else."""
    if (run_dir / MANIFEST).is_file():
        return "export"
    if not run_dir.is_dir():
        raise CmftError(f"{run_dir}: no such run or export folder")
    if not (run_dir / "model" / "config.json").is_file():
        raise CmftError(f"{run_dir}: no model/ with config.json here; pass a finished run folder (runs/…) or export")
    if (run_dir / "recipe.yaml").is_file() and "task" in (read_yaml(run_dir / "recipe.yaml") or {}):
        return "finetune"
    return "pretrain"


def load_run(run_dir: str | Path, attention: str = "sdpa") -> Loaded:
    """The torch inference module of a finished fine-tuning or pretraining run, on CPU in eval mode.

    `attention="eager"` is for tracing to ONNX: the exported sdpa graph guards fully-masked rows with
    IsNaN/Where over the whole score matrix, which made onnxruntime 1.5× slower on long notes (profiled)."""
    from transformers import AutoModel, AutoTokenizer

    run_dir = Path(run_dir)
    kind = run_kind(run_dir)
    if kind == "export":
        raise CmftError(f"{run_dir}: an export folder; torch inference needs the run folder (or use --onnx)")
    model_dir = run_dir / "model"
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise CmftError(f"{model_dir}: the tokenizer does not load ({type(exc).__name__})") from None
    if kind == "pretrain":
        encoder = _load(AutoModel, model_dir, attention)
        meta = {"task": "encoder", "max_length": int(encoder.config.max_position_embeddings)}
        return Loaded("encoder", tokenizer, meta, EncoderModule(encoder).eval(), run_dir=run_dir)

    from cmft.config import build_config
    from cmft.finetuning.config import RecipeConfig

    recipe = build_config(RecipeConfig, read_yaml(run_dir / "recipe.yaml"), str(run_dir / "recipe.yaml"))
    meta: dict[str, Any] = {"task": recipe.task, "max_length": recipe.training.max_length}
    if recipe.task == "retrieval":
        pooling = recipe.retrieval.pooling
        module = EmbeddingModule(_load(AutoModel, model_dir, attention), pooling)
        meta |= {"pooling": pooling, "normalized": True}
    elif recipe.task == "icd_coding":
        from cmft.tasks.icd_coding import IcdCoder

        coder = _load(IcdCoder, model_dir, attention)
        module = IcdModule(coder)
        meta |= {"labels": coder.settings["labels"], "threshold": coder.settings["threshold"],
                 "icd": coder.settings}  # fmt: skip
    else:
        from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

        auto = AutoModelForTokenClassification if recipe.task == "ner" else AutoModelForSequenceClassification
        model = _load(auto, model_dir, attention)
        meta["labels"] = [model.config.id2label[i] for i in range(len(model.config.id2label))]
        if recipe.task == "ner":
            meta["stride"] = recipe.ner.stride
        module = LogitsModule(model)
    return Loaded(recipe.task, tokenizer, meta, module.eval(), recipe=recipe, run_dir=run_dir)


def _load(cls, model_dir: Path, attention: str):
    from cmft.modeling import check_model_folder

    check_model_folder(model_dir, "run")  # safetensors only, intact, tokenizer fits the model
    try:
        model = cls.from_pretrained(model_dir, attn_implementation=attention, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CmftError(f"{model_dir}: the model does not load ({type(exc).__name__}: {str(exc)[:120]})") from None
    return model.float().eval()


def load_export(export_dir: str | Path) -> Loaded:
    from transformers import AutoTokenizer

    export_dir = Path(export_dir)
    if (export_dir / "FAILED").is_file():
        raise CmftError(f"{export_dir}: this export failed its parity check (see parity.json); export again")
    try:
        meta = json.loads((export_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise CmftError(f"{export_dir}: no readable {MANIFEST}; not a `cmft export` folder") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(export_dir)
    except (OSError, ValueError) as exc:
        raise CmftError(f"{export_dir}: the tokenizer does not load ({type(exc).__name__}); export again") from None
    return Loaded(meta["task"], tokenizer, meta)


# texts → model inputs -----------------------------------------------------------------------------------------
@dataclass
class Unit:
    """One model input row: a whole text, or one window of a long NER text."""

    text: int
    input_ids: Any
    """A list of ids, or (ICD chunked) a list of chunks."""
    window: dict | None = None

    @property
    def length(self) -> int:
        return (
            sum(len(c) for c in self.input_ids)
            if self.input_ids and isinstance(self.input_ids[0], list)
            else len(self.input_ids)
        )


def words_of(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in WORD.finditer(text)]


def encode_texts(loaded: Loaded, texts: list[str]) -> tuple[list[Unit], dict[str, int]]:
    """Model input rows for raw texts, and counts of what was truncated or windowed (never silently)."""
    tokenizer, meta = loaded.tokenizer, loaded.meta
    limit = int(meta["max_length"])
    counts = {"n_truncated": 0, "n_windowed": 0}
    units: list[Unit] = []
    if loaded.task == "icd_coding":
        from cmft.tasks.icd_coding import encode_note

        for index, text in enumerate(texts):
            ids, cut = encode_note(tokenizer, text, meta["icd"])
            counts["n_truncated"] += cut
            units.append(Unit(index, ids))
    elif loaded.task == "ner":
        from cmft.tasks.ner import align_windows

        for index, text in enumerate(texts):
            words = [text[s:e] for s, e in words_of(text)]
            windows = align_windows(words, tokenizer, limit, int(meta["stride"]))
            counts["n_windowed"] += len(windows) > 1
            units.extend(Unit(index, w["input_ids"], w) for w in windows)
    else:
        encoded = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        for index, ids in enumerate(encoded):
            if len(ids) > limit:
                counts["n_truncated"] += 1
                ids = [*ids[: limit - 1], ids[-1]]  # keep the closing special token
            units.append(Unit(index, ids))
    return units, counts


def collate(units: list[Unit], pad_id: int, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Pad a batch: [B, T], or [B, C, S] for chunked ICD notes. Returns int64 input_ids and attention_mask."""
    if meta.get("task") == "icd_coding" and meta["icd"]["mode"] == "chunked":
        size = meta["icd"]["chunk_size"]
        chunks = max(len(u.input_ids) for u in units)
        ids = np.full((len(units), chunks, size), pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, unit in enumerate(units):
            for c, chunk in enumerate(unit.input_ids):
                ids[row, c, : len(chunk)] = chunk
                mask[row, c, : len(chunk)] = 1
        return ids, mask
    length = max(len(u.input_ids) for u in units)
    ids = np.full((len(units), length), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, unit in enumerate(units):
        ids[row, : len(unit.input_ids)] = unit.input_ids
        mask[row, : len(unit.input_ids)] = 1
    return ids, mask


# model outputs → predictions ----------------------------------------------------------------------------------
def decode(loaded: Loaded, text: str, outputs: list[np.ndarray], units: list[Unit]) -> dict[str, Any]:
    """One text's prediction from the outputs of its units (several windows for long NER texts)."""
    meta = loaded.meta
    if loaded.task == "note_classification":
        logits = outputs[0].astype(np.float64)
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        order = np.argsort(-probabilities)
        labels = meta["labels"]
        return {"label": labels[order[0]], "score": round(float(probabilities[order[0]]), 6),
                "scores": {labels[j]: round(float(probabilities[j]), 6) for j in order[:5]}}  # fmt: skip
    if loaded.task == "icd_coding":
        probabilities = outputs[0]
        order = np.argsort(-probabilities, kind="stable")
        codes = [{"code": meta["labels"][j], "probability": round(float(probabilities[j]), 6)}
                 for j in order if probabilities[j] >= meta["threshold"]]  # fmt: skip
        return {"codes": codes}
    if loaded.task == "ner":
        return {"entities": ner_entities(loaded, text, outputs, units)}
    if loaded.task == "retrieval":
        return {"embedding": [round(float(v), 6) for v in outputs[0]]}
    raise CmftError("predict: a pretrained encoder has no task head; fine-tune it first (cmft finetune RECIPE)")


def ner_entities(loaded: Loaded, text: str, outputs: list[np.ndarray], units: list[Unit]) -> list[dict[str, Any]]:
    from cmft.tasks.ner import merge_windows, repair_tags

    spans = words_of(text)
    if not spans:
        return []
    windows = [u.window for u in units]
    merged = merge_windows(windows, [o[: len(w["input_ids"])] for o, w in zip(outputs, windows, strict=True)],
                           len(spans))  # fmt: skip
    tags = repair_tags([loaded.meta["labels"][i] for i in merged.argmax(-1)])
    entities: list[dict[str, Any]] = []
    for (start, end), tag in zip(spans, tags, strict=True):
        if tag.startswith("B-"):
            entities.append({"start": start, "end": end, "label": tag[2:]})
        elif tag.startswith("I-") and entities:
            entities[-1]["end"] = end
    for entity in entities:
        entity["text"] = text[entity["start"] : entity["end"]]
    return entities
