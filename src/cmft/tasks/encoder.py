"""A `cmft pretrain` run's bare encoder: no head and no training here, but it exports and embeds like the tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cmft.errors import CmftError
from cmft.tasks.base import Task, Unit, load_pretrained


class EncoderModule(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()


class EncoderTask(Task):
    name = "encoder"
    output = "last_hidden_state"
    output_meaning = "[batch, sequence, hidden] the encoder's last hidden state"
    token_level = True
    predicts = False

    @classmethod
    def load_inference(cls, folder: Path, recipe: Any, attention: str) -> tuple[nn.Module, dict[str, Any]]:
        from transformers import AutoModel

        encoder = load_pretrained(AutoModel, folder, attention)
        meta = {"task": cls.name, "max_length": int(encoder.config.max_position_embeddings)}
        return EncoderModule(encoder).eval(), meta

    @classmethod
    def decode(cls, meta: dict[str, Any], text: str, outputs: list[np.ndarray], units: list[Unit]) -> dict[str, Any]:
        raise CmftError("predict: a pretrained encoder has no task head; fine-tune it first (cmft finetune RECIPE)")
