"""The pretraining config (`pretrain/*.yaml`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from cmft.config import AttentionChoice, StrictModel, TrainingBase

BUNDLED_SOURCES = ("pubmedqa", "mts_dialog_train", "codiesp_train", "icd10cm", "icd9cm")


class ArchitectureConfig(StrictModel):
    """ModernBERT geometry for a model built from config (ignored when continuing a checkpoint)."""

    hidden_size: PositiveInt = 256
    num_hidden_layers: PositiveInt = 4
    num_attention_heads: PositiveInt = 4
    intermediate_size: PositiveInt = 384
    max_position_embeddings: PositiveInt = 8192
    local_attention: PositiveInt = 128
    global_attn_every_n_layers: PositiveInt = 3
    global_rope_theta: PositiveFloat = 160_000.0
    local_rope_theta: PositiveFloat = 10_000.0
    hidden_dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ArchitectureConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        return self


class ModelConfig(StrictModel):
    init_from: str | None = None
    """A local model folder or a hub id to continue from; null builds a new model from `architecture`."""
    attention: AttentionChoice = "auto"
    """`auto`: flash_attention_2 on an Ampere-or-newer GPU with flash-attn, else `banded` for ModernBERT (exact; local
    layers cost O(length × window)), else sdpa. recipe.yaml records what `auto` chose."""
    architecture: ArchitectureConfig = ArchitectureConfig()


class RefineConfig(StrictModel):
    """Adding frequent clinical words that an existing tokenizer splits into many pieces."""

    enabled: bool = True
    max_new_tokens: int = Field(1000, ge=0)
    min_frequency: PositiveInt = 20
    min_pieces: PositiveInt = 3


class TokenizerConfig(StrictModel):
    vocab_size: PositiveInt = 8192
    """Size of a tokenizer trained on the corpus (from-scratch configs)."""
    train_documents: PositiveInt = 100_000
    """With corpus.streaming: the tokenizer is trained (or refined) on the first this many training documents."""
    lowercase: bool = False
    min_frequency: PositiveInt = 2
    refine: RefineConfig = RefineConfig()
    """Used when continuing a checkpoint: its tokenizer is refined instead of replaced."""


class SourceConfig(StrictModel):
    """One corpus source: a bundled set by name, or the user's own files."""

    bundled: Literal[BUNDLED_SOURCES] | None = None  # type: ignore[valid-type]
    path: str | None = None
    """A text or jsonl file, a folder, or a glob."""
    format: Literal["auto", "text", "jsonl"] = "auto"
    text_field: str = "text"
    sample_by: Literal["line", "paragraph", "document"] = "line"
    """For text files: one document per line, per blank-line paragraph, or per file."""
    max_documents: PositiveInt | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> SourceConfig:
        if (self.bundled is None) == (self.path is None):
            raise ValueError("give exactly one of `bundled` (a bundled set name) or `path` (your own files)")
        return self


class CorpusConfig(StrictModel):
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(bundled=name) for name in BUNDLED_SOURCES], min_length=1
    )
    holdout_fraction: float = Field(0.02, gt=0, lt=0.5)
    """Share of documents kept out of training for evaluation (chosen by a hash of the text: stable)."""
    max_holdout_documents: PositiveInt = 1000
    streaming: bool = False
    """Read the sources as a stream, tokenize them once into an on-disk shard cache and pack rows on the fly:
    memory stays flat however large the corpus. Needs training.max_steps."""
    buffer_documents: PositiveInt = 10_000
    """With streaming: documents packed together at a time (more: fuller rows and more mixing, more memory)."""
    shard_documents: PositiveInt = 2000
    """With streaming: documents tokenized and cached per shard file."""
    cache_dir: str | None = None
    """With streaming: where tokenized shards are kept (null: $CMFT_CACHE/tokenized, else ~/.cache/cmft/tokenized)."""


class MaskingConfig(StrictModel):
    start_rate: float = Field(0.30, gt=0, lt=1)
    end_rate: float = Field(0.15, gt=0, lt=1)
    schedule: Literal["linear", "cosine"] = "linear"
    medical_weight: float = Field(2.0, ge=1.0)
    """How much more likely a medical word is to be chosen than another word (1 = uniform masking)."""
    whole_word: Literal["medical", "all", "none"] = "medical"
    lexicon: list[str] = Field(
        default_factory=lambda: ["bundled:pretrain/lexicon/drugs.txt", "bundled:pretrain/lexicon/icd_terms.txt"]
    )
    mask_token_fraction: float = Field(0.8, ge=0, le=1)
    random_token_fraction: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _fractions(self) -> MaskingConfig:
        if self.mask_token_fraction + self.random_token_fraction > 1:
            raise ValueError("mask_token_fraction + random_token_fraction must be at most 1")
        return self


class TrainingConfig(TrainingBase):
    """Pretraining's `training` section: the shared keys (cmft.config.TrainingBase) and these."""

    epochs: PositiveFloat = 1.0
    batch_size: PositiveInt = 8
    learning_rate: PositiveFloat = 1e-3
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: PositiveFloat = 1.0
    save_every: PositiveInt = 200


class LongContextConfig(StrictModel):
    """Optional second stage: continue at a longer length with a raised global RoPE theta."""

    max_length: PositiveInt = 8192
    global_rope_theta: PositiveFloat = 160_000.0
    max_steps: PositiveInt = 100
    batch_size: PositiveInt = 1
    learning_rate: PositiveFloat = 3e-4


class EvaluationConfig(StrictModel):
    rate: float = Field(0.15, gt=0, lt=1)
    seed: int = 1234
    batch_size: PositiveInt = 16


class PretrainConfig(StrictModel):
    name: str = "clinical"
    seed: int = 42
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    corpus: CorpusConfig = CorpusConfig()
    masking: MaskingConfig = MaskingConfig()
    training: TrainingConfig = TrainingConfig()
    long_context: LongContextConfig | None = None
    evaluation: EvaluationConfig = EvaluationConfig()

    @property
    def run_name(self) -> str:
        return self.name

    @model_validator(mode="after")
    def _lengths_fit(self) -> PretrainConfig:
        if self.model.init_from is None:
            limit = self.model.architecture.max_position_embeddings
            if self.training.max_length > limit:
                raise ValueError(
                    f"training.max_length {self.training.max_length} is above "
                    f"model.architecture.max_position_embeddings ({limit})"
                )
            if self.long_context is not None and self.long_context.max_length > limit:
                raise ValueError(
                    f"long_context.max_length {self.long_context.max_length} is above "
                    f"model.architecture.max_position_embeddings ({limit})"
                )
        return self
