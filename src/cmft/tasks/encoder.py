"""A `cmft pretrain` run's bare encoder: no head and no training here, but it exports and embeds like the tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from cmft.errors import CmftError
from cmft.recipe import RecipeBase
from cmft.tasks.base import SPLITS, OutputModule, Task, Unit, load_pretrained

NO_HEAD = "a pretrained encoder has no task head; fine-tune it first (cmft finetune RECIPE)"


class EncoderTask(Task):
    """Not a recipe's task (no section): `prepare`, `collator`, `loss`, `score` and `decode` say so."""

    name = "encoder"
    section_name = ""
    section = None
    metric_for_best = "mlm_top1"
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

    def prepare(self, tokenizer: Any, splits: tuple[str, ...] = SPLITS) -> None:
        raise CmftError(f"finetune: {NO_HEAD}")

    def collator(self, tokenizer: Any) -> Any:
        raise CmftError(f"finetune: {NO_HEAD}")

    def loss(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        raise CmftError(f"finetune: {NO_HEAD}")

    def score(self, outputs: list[np.ndarray], split: str, tune: bool = False) -> dict[str, Any]:
        raise CmftError(f"evaluate: {NO_HEAD}")

    @classmethod
    def load_inference(cls, folder: Path, meta: dict[str, Any], attention: str) -> nn.Module:
        from transformers import AutoModel

        return OutputModule(load_pretrained(AutoModel, folder, attention), "last_hidden_state").eval()

    @classmethod
    def manifest_from_recipe(cls, folder: Path, recipe: RecipeBase | None) -> dict[str, Any]:
        """A `cmft pretrain` run's encoder reads texts up to its position table."""
        from transformers import AutoConfig

        return {"task": cls.name, "max_length": int(AutoConfig.from_pretrained(folder).max_position_embeddings)}

    @classmethod
    def decode(cls, meta: dict[str, Any], text: str, outputs: list[np.ndarray], units: list[Unit]) -> dict[str, Any]:
        raise CmftError(f"predict: {NO_HEAD}")
