"""A `cmft pretrain` run's bare encoder: no head and no training here, but it exports and embeds like the tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from cmft.errors import CmftError
from cmft.tasks.base import OutputModule, Task, Unit, load_pretrained


class EncoderTask(Task):
    name = "encoder"
    output = "last_hidden_state"
    output_meaning = "[batch, sequence, hidden] the encoder's last hidden state"
    token_level = True
    predicts = False
    description = "A masked-language-model encoder pretrained by `cmft pretrain`, to fine-tune with `cmft finetune`."
    pipeline_tag = "fill-mask"
    card_usage = {
        "transformers": """from transformers import pipeline

fill = pipeline("fill-mask", model=".")
best = fill("{example}".replace("neuropathy", fill.tokenizer.mask_token))[0]["token_str"]"""
    }
    card_adapter = None

    @classmethod
    def load_inference(cls, folder: Path, recipe: Any, attention: str) -> tuple[nn.Module, dict[str, Any]]:
        from transformers import AutoModel

        encoder = load_pretrained(AutoModel, folder, attention)
        meta = {"task": cls.name, "max_length": int(encoder.config.max_position_embeddings)}
        return OutputModule(encoder, "last_hidden_state").eval(), meta

    @classmethod
    def decode(cls, meta: dict[str, Any], text: str, outputs: list[np.ndarray], units: list[Unit]) -> dict[str, Any]:
        raise CmftError("predict: a pretrained encoder has no task head; fine-tune it first (cmft finetune RECIPE)")
