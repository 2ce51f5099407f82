"""The recipe's sections every task shares (model, data, tuning, training), the base of a task's own section
(`TaskSection`) and the base of the recipe itself (`RecipeBase`).

A task module defines its own section (`NerConfig` in cmft.tasks.ner, …) on `TaskSection`; cmft.finetuning.config
builds the recipe (`RecipeConfig`) from these and from the sections the registry in cmft.tasks names. Below every
task: a task module and the data readers import this, never the fine-tuning package.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt

from cmft.config import AttentionChoice, StrictModel, TrainingBase


class EncoderConfig(StrictModel):
    encoder: str = "latest"
    """`latest` (the newest `cmft pretrain` run), a local model folder, or a hub id."""
    attention: AttentionChoice = "auto"
    """`auto`: flash_attention_2 on an Ampere-or-newer GPU with flash-attn, else `banded` for ModernBERT (exact; local
    layers cost O(length × window)), else sdpa. recipe.yaml records what `auto` chose."""
    trust_remote_code: bool = False


class FolderSplit(StrictModel):
    """A folder of `<id>.txt` notes plus a tsv of `<id>\\t<label>` rows."""

    texts: str
    labels: str


class DataConfig(StrictModel):
    train: str | FolderSplit
    dev: str | FolderSplit | None = None
    test: str | FolderSplit | None = None
    format: Literal["auto", "jsonl", "csv"] = "auto"
    id_field: str = "id"
    text_field: str = "text"
    label_field: str = "label"
    """The class (note classification) or the list of codes (ICD coding)."""


class TuningConfig(StrictModel):
    method: Literal["full", "lora"] = "full"
    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = None
    """Defaults per architecture: ModernBERT Wqkv, Wo, Wi; BERT query, key, value, dense."""
    modules_to_save: list[str] | None = None
    """Fully trained (and saved with the adapter) besides LoRA; the task head is always included."""


class TrainingConfig(TrainingBase):
    """Fine-tuning's `training` section: the shared keys (cmft.config.TrainingBase) and these."""

    epochs: PositiveFloat = 3.0
    batch_size: PositiveInt = 16
    eval_batch_size: PositiveInt = 32
    learning_rate: PositiveFloat | Literal["auto"] = "auto"
    """The encoder's rate. `auto`: the rate measured for this task and tuning method with the tiny encoder `cmft
    pretrain` makes, or with a real pretrained encoder for any other (benchmarks/README.md, Learning rates)."""
    head_learning_rate: PositiveFloat | None = None
    """A separate (usually higher) rate for the task head; null uses learning_rate."""
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    eval_every: PositiveInt | None = None
    """Evaluate on dev every N optimizer steps; null = once per epoch."""
    early_stopping_patience: PositiveInt | None = None


class TaskSection(StrictModel):
    """A task's recipe section."""

    def check(self, training: TrainingConfig, data: DataConfig) -> None:
        """Settings that must agree with `training` and `data` (a ValueError says which)."""


class RecipeBase(StrictModel):
    """The keys of every recipe; cmft.finetuning.config.RecipeConfig narrows `task` to the registered tasks and adds
    one optional section per task."""

    task: str
    name: str | None = None
    seed: int = 42
    model: EncoderConfig = EncoderConfig()
    data: DataConfig
    tuning: TuningConfig = TuningConfig()
    training: TrainingConfig = TrainingConfig()

    @property
    def run_name(self) -> str:
        return self.name or self.task.replace("_", "-")
