"""The fine-tuning recipe (`recipes/*.yaml`): one YAML per task, validated before anything heavy runs."""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from cmft.config import AttentionChoice, StrictModel, Tracker

TASK_SECTIONS = {"ner": "ner", "icd_coding": "icd_coding", "note_classification": "classification",
                 "retrieval": "retrieval", "assertion": "assertion"}  # fmt: skip
"""Each task (cmft.tasks) and the recipe section holding its settings."""
TASKS = tuple(TASK_SECTIONS)


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


class TrainingConfig(StrictModel):
    epochs: PositiveFloat = 3.0
    max_steps: PositiveInt | None = None
    """Overrides `epochs` when set (e.g. training.max_steps=5 for a smoke run)."""
    batch_size: PositiveInt = 16
    eval_batch_size: PositiveInt = 32
    gradient_accumulation: PositiveInt = 1
    learning_rate: PositiveFloat | Literal["auto"] = "auto"
    """The encoder's rate. `auto`: the rate measured for this task and tuning method with the tiny encoder `cmft
    pretrain` makes, or with a real pretrained encoder for any other (benchmarks/README.md, Learning rates)."""
    head_learning_rate: PositiveFloat | None = None
    """A separate (usually higher) rate for the task head; null uses learning_rate."""
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = "linear"
    max_length: PositiveInt = 512
    eval_every: PositiveInt | None = None
    """Evaluate on dev every N optimizer steps; null = once per epoch."""
    early_stopping_patience: PositiveInt | None = None
    log_every: PositiveInt = 10
    save_total_limit: PositiveInt = 2
    divergence_factor: PositiveFloat | None = 10.0
    """Stop when the smoothed loss exceeds this many times its lowest (NaN/inf always stops); null: off."""
    gradient_checkpointing: Literal["auto", True, False] = "auto"
    """Recompute each layer in the backward pass: far less activation memory for about a sixth more time. `auto`:
    on when a micro-batch's activations at max_length would take more than half the free memory."""
    report_to: Literal["none"] | Tracker | list[Tracker] = "none"
    """Experiment tracking through the Trainer's integrations; tensorboard writes into the run folder's tensorboard/."""
    bf16: Literal["auto", True, False] = "auto"
    threads: PositiveInt | None = None
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: ddp replicates the model on each process; fsdp shards it (CUDA GPUs only). batch_size
    stays the global micro-batch, divided across the processes."""


class StepSchedule(NamedTuple):
    max_steps: int
    steps_per_epoch: int
    eval_every: int
    """Evaluate (and checkpoint) every this many optimizer steps."""
    log_every: int


def step_schedule(t: TrainingConfig, batches_per_epoch: int) -> StepSchedule:
    """Optimizer steps from `batches_per_epoch` (global batches): `max_steps` or `epochs` passes; evaluation every
    `eval_every` steps or once per epoch; nothing beyond the last step."""
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / t.gradient_accumulation))
    max_steps = t.max_steps or max(1, math.ceil(t.epochs * batches_per_epoch / t.gradient_accumulation))
    return StepSchedule(max_steps, steps_per_epoch, min(t.eval_every or steps_per_epoch, max_steps),
                        min(t.log_every, max_steps))  # fmt: skip


class TaskSection(StrictModel):
    """A task's recipe section."""

    def check(self, training: TrainingConfig, data: DataConfig) -> None:
        """Settings that must agree with `training` and `data` (a ValueError says which)."""


class ClassificationConfig(TaskSection):
    class_weights: Literal["none", "balanced", "sqrt"] = "sqrt"
    """Loss weights against class imbalance: inverse frequency (balanced) or its square root."""


class LabelSpaceConfig(StrictModel):
    level: Literal["code", "category"] = "code"
    """`code`: full codes (E11.9); `category`: their 3-character categories (E11)."""
    min_train_count: PositiveInt = 5
    """Keep labels with at least this many train documents; the others are counted and reported."""
    zero_shot: bool = False
    """Also score codes never in the label space: each code of `descriptions` in the 3-character category of a trained
    code, from its description through the fine-tuned encoder, added after training (cmft.tasks.icd_zero_shot)."""


class IcdCodingConfig(TaskSection):
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


class NerConfig(TaskSection):
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


class RetrievalConfig(TaskSection):
    query_field: str = "query"
    """Pairs / triplets files (jsonl or csv): the query column."""
    document_field: str = "positive"
    """The relevant document's column."""
    negative_field: str = "negative"
    """Optional column of negative documents (a string or a list); used for training when present."""
    pooling: Literal["mean", "cls"] = "mean"
    loss: Literal["in_batch", "cached"] = "in_batch"
    """`in_batch`: MultipleNegativesRankingLoss; `cached`: its GradCache version, for large batches on small memory."""
    mini_batch_size: PositiveInt = 16
    """`cached` loss: examples embedded per forward pass (memory), while the batch stays training.batch_size."""
    group_by_length: bool = True
    """Batches of similar length (far less padding) with no text twice; false: sentence-transformers' sampler."""
    scale: PositiveFloat = 20.0
    """Similarity scale (inverse temperature) of the in-batch softmax."""
    hard_negatives: int = Field(0, ge=0, le=16)
    """Negatives mined per training query with the starting model (0 = in-batch negatives only)."""
    hard_negative_margin: float = Field(0.05, ge=0, lt=1)
    """A mined negative must score below (1 - margin) × the positive's score, to skip unlabelled positives."""
    top_k: PositiveInt = 100
    """Hits ranked per query for the metrics (recall@100, map@100 need 100)."""


class AssertionConfig(TaskSection):
    """cmft.tasks.assertion: the status of a marked span. The usual label scheme is i2b2/n2c2 2010's (present, absent,
    possible, conditional, hypothetical, associated_with_someone_else); the labels are whatever the train data holds."""

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


SECTION_TYPES: dict[str, type[TaskSection]] = {"classification": ClassificationConfig, "icd_coding": IcdCodingConfig,
                                               "ner": NerConfig, "retrieval": RetrievalConfig,
                                               "assertion": AssertionConfig}  # fmt: skip


class RecipeConfig(StrictModel):
    task: Literal[TASKS]  # type: ignore[valid-type]
    name: str | None = None
    seed: int = 42
    model: EncoderConfig = EncoderConfig()
    data: DataConfig
    tuning: TuningConfig = TuningConfig()
    training: TrainingConfig = TrainingConfig()
    classification: ClassificationConfig | None = None
    icd_coding: IcdCodingConfig | None = None
    ner: NerConfig | None = None
    retrieval: RetrievalConfig | None = None
    assertion: AssertionConfig | None = None

    @model_validator(mode="after")
    def _sections_match_task(self) -> RecipeConfig:
        own = TASK_SECTIONS[self.task]
        for task, section in TASK_SECTIONS.items():
            if section != own and getattr(self, section) is not None:
                raise ValueError(f"section `{section}` is for task {task}, but this recipe's task is {self.task}")
        if getattr(self, own) is None:
            setattr(self, own, SECTION_TYPES[own]())
        getattr(self, own).check(self.training, self.data)
        return self

    @property
    def run_name(self) -> str:
        return self.name or self.task.replace("_", "-")
