"""The one interface every task implements (`Task`), and the pieces most tasks share. A task owns all that depends
on what it predicts; the engine, `cmft evaluate`, `cmft predict`, `cmft export` and the benchmarks only call it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn


@dataclass
class Unit:
    """One model input row: a whole text, or one window of a long NER text."""

    text: int
    input_ids: Any
    """A list of ids, or (chunked ICD notes) a list of chunks."""
    window: dict | None = None
    truncated: bool = False
    """The text was cut to fit the model (never set for NER windows, which keep everything)."""
    offsets: list | None = None
    """(start, end) in the text of each of its tokens, when evidence is asked for (ICD coding)."""

    @property
    def length(self) -> int:
        from cmft.finetuning.trainer import token_count

        return token_count(self.input_ids)


def pad_rows(units: list[Unit], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, T] int64 input_ids and attention_mask, right-padded to the longest row."""
    length = max(len(u.input_ids) for u in units)
    ids = np.full((len(units), length), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, unit in enumerate(units):
        ids[row, : len(unit.input_ids)] = unit.input_ids
        mask[row, : len(unit.input_ids)] = 1
    return ids, mask


def cut_to(ids: list[int], limit: int) -> list[int]:
    """At most `limit` ids, keeping the closing special token ([SEP]) so the model sees a well-formed sequence."""
    return ids if len(ids) <= limit else [*ids[: limit - 1], ids[-1]]


class OutputModule(nn.Module):
    """One output of a model (`logits`, `last_hidden_state`) with the exported signature: (input_ids,
    attention_mask) -> one fp32 tensor."""

    def __init__(self, model: nn.Module, output: str = "logits"):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask), self.output).float()


def load_pretrained(cls: Any, folder: Path, attention: str) -> nn.Module:
    """A saved model for inference: safetensors only, fp32, eval mode; a one-line error when it does not load."""
    from cmft.errors import CmftError
    from cmft.modeling import check_model_folder

    check_model_folder(folder, "run")  # safetensors only, intact, tokenizer fits the model
    try:
        model = cls.from_pretrained(folder, attn_implementation=attention, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CmftError(f"{folder}: the model does not load ({type(exc).__name__}: {str(exc)[:120]})") from None
    return model.float().eval()


EVIDENCE_K = 3  # evidence spans per prediction unless asked otherwise (`cmft predict --evidence-k`, `evidence_k`)
CARD_EXAMPLE = "Type 2 diabetes mellitus with diabetic neuropathy; denies chest pain."  # made up, not a note
TRANSFORMERS_USAGE = """from transformers import AutoTokenizer, {auto_class}

tokenizer = AutoTokenizer.from_pretrained(".")
model = {auto_class}.from_pretrained(".").eval()
batch = tokenizer(["{example}"], return_tensors="pt")
logits = model(**batch).logits
{decode}"""
TRANSFORMERS_ADAPTER = """from peft import PeftModel
from transformers import AutoConfig, {auto_class}

base = {auto_class}.from_pretrained("{base}", config=AutoConfig.from_pretrained("."))
model = PeftModel.from_pretrained(base, "../adapter").eval()  # the adapter unmerged: the same outputs"""
ONNX_FEED = """ids = ids[:{max_length}]
feed = {{"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}}"""


class Task:
    """Defaults for a transformers AutoModelFor<Task> head (`auto_class`); a task overrides what it does differently.
    Training: `prepare` fills `datasets[split]` (rows with `input_ids`, and `labels` for the trainer); `build_model`,
    `collator`, `loss`, `make_trainer` train; `score` turns the inference module's outputs on a split into metrics;
    `save` writes model/. Inference, from the saved manifest (`meta`) alone, so an export folder needs no recipe:
    `load_inference` (the torch module ONNX traces), `encode`, `unit`, `collate`, `decode` (the JSON of predict)."""

    name: ClassVar[str]  # the recipe's `task`
    metric_for_best: ClassVar[str]  # picks the best checkpoint, measures the int8 cost, ranks benchmarks
    output: ClassVar[str] = "logits"  # the exported graph's output, and what it holds (for the export README)
    output_meaning: ClassVar[str] = ""
    token_level: ClassVar[bool] = False  # outputs per token: parity is checked on real positions only
    predicts: ClassVar[bool] = True  # False for a bare encoder: nothing to decode
    searches: ClassVar[bool] = False  # a bi-encoder: `cmft predict --corpus` ranks documents with it
    windowed: ClassVar[bool] = False  # long texts become several windows (units), each predicted
    decode_options: ClassVar[dict[str, type]] = {}  # per-request overrides `decode` reads from the manifest
    # `training.learning_rate: auto`: the encoder rate per encoder kind (`tiny`: the encoder `cmft pretrain` makes;
    # `pretrained`: any other) and tuning method, as measured in benchmarks/README.md, "Learning rates".
    learning_rates: ClassVar[dict[str, dict[str, float]]] = {"tiny": {"full": 3e-4, "lora": 1e-3},
                                                             "pretrained": {"full": 3e-4, "lora": 1e-3}}  # fmt: skip
    auto_class: ClassVar[Any] = None
    throughput_unit: ClassVar[str] = "examples"
    # the model card (cmft.cards): what the model does, its Hugging Face pipeline tag and library, and the Python
    # lines that load a run's model/ folder from inside it (library → lines) and put a LoRA run's ../adapter on its
    # base encoder; placeholders: {example}, {base}, {auto_class}, {decode} and the manifest's keys
    description: ClassVar[str] = ""
    pipeline_tag: ClassVar[str] = "text-classification"
    library_name: ClassVar[str] = "transformers"
    card_usage: ClassVar[dict[str, str]] = {"transformers": TRANSFORMERS_USAGE}
    card_adapter: ClassVar[str | None] = TRANSFORMERS_ADAPTER
    card_decode: ClassVar[str] = ""  # how the transformers lines turn logits into a prediction
    metrics_note: ClassVar[str] = ""  # the card's words on what its evaluation figures count ({n_labels})

    def __init__(self, recipe: Any = None):
        self.recipe = recipe
        self.labels: list[str] = []
        self.report: dict[str, Any] = {}
        self.datasets: dict[str, list[dict]] = {}

    # training ---------------------------------------------------------------------------------------------------
    def build_model(self, encoder: str, attention: str, trust_remote_code: bool) -> nn.Module:
        return self.auto_class.from_pretrained(
            encoder, num_labels=len(self.labels), id2label=dict(enumerate(self.labels)),
            label2id={label: i for i, label in enumerate(self.labels)}, attn_implementation=attention,
            trust_remote_code=trust_remote_code, use_safetensors=True,
        )  # fmt: skip

    def load_model(self, folder: Path) -> nn.Module:
        return self.auto_class.from_pretrained(folder, use_safetensors=True).eval()

    def finish_model(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        """The trained model as it is evaluated and saved (ICD coding adds its zero-shot codes here)."""
        return model

    def save(self, model: nn.Module, tokenizer: Any, folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    def meta(self) -> dict[str, Any]:
        """The manifest inference needs (saved in an export folder as cmft_export.json)."""
        return {"task": self.name, "max_length": self.recipe.training.max_length, "labels": self.labels,
                **self.settings_meta(self.recipe)}  # fmt: skip

    @classmethod
    def settings_meta(cls, recipe: Any) -> dict[str, Any]:
        """Recipe settings decoding needs besides labels and max_length."""
        return {}

    def tokens_per_pass(self) -> tuple[int, str]:
        """The longest token sequence one forward pass gets, and the recipe key that sets it."""
        return self.recipe.training.max_length, "training.max_length"

    def pass_shape(self, rows: int) -> tuple[int, int]:
        """(sequences, tokens each) that one training forward pass over `rows` examples encodes at most: what the
        activation memory (cmft.memory) scales with."""
        return rows, self.tokens_per_pass()[0]

    def encoder_config(self, model: nn.Module) -> Any:
        """The transformers config of the encoder inside the task's model (its geometry)."""
        from transformers import PreTrainedModel

        return next(m for m in model.modules() if isinstance(m, PreTrainedModel)).config

    def position_way_out(self, limit: int) -> str:
        """Besides a shorter max_length, how a text longer than an absolute position table can still be read."""
        return ""

    def head_modules(self, model: nn.Module) -> list[str]:
        """The model's own modules besides the encoder (the head): trained fully, and saved with LoRA."""
        base = getattr(model, "base_model_prefix", "model")
        children = model.named_children()
        return [name for name, child in children if name != base and next(child.parameters(), None) is not None]

    def wrap_lora(self, model: nn.Module, tuning: Any, heads: list[str]) -> nn.Module:
        from cmft.finetuning.lora import wrap_lora

        return wrap_lora(model, model.config.model_type, tuning, heads)

    def merge_lora(self, model: nn.Module, adapter: Path | None, tokenizer: Any) -> nn.Module:
        """Save the adapter (with the head) and the tokenizer to `adapter` when given; return the merged model."""
        if adapter is not None:
            model.save_pretrained(adapter)
            tokenizer.save_pretrained(adapter)
        return model.merge_and_unload()

    def check_recipe(self) -> None:  # refuse what this task cannot train (a CmftError), before anything heavy
        return None

    def batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self.datasets["train"]) / batch_size)

    def trainer_arguments(self) -> tuple[type, dict[str, Any]]:
        """The TrainingArguments class of this task's trainer, and extra keyword arguments for it."""
        from transformers import TrainingArguments

        return TrainingArguments, {}

    def make_trainer(self, model: nn.Module, args: Any, callbacks: list, tokenizer: Any, heads: list[str]) -> Any:
        """The trainer (cmft's SafeTrainerMixin on an HF Trainer): the engine has set the schedule, checkpoints,
        evaluation and best-checkpoint arguments; the task brings its data, collator, loss and dev metrics."""
        from cmft.finetuning.trainer import FinetuneTrainer

        args.train_sampling_strategy = "group_by_length"  # similar lengths per batch: far less padding

        def dev_metrics(predictions: Any) -> dict[str, Any]:
            return self.score(self.outputs_of(predictions.predictions), "dev", tune=True)

        return FinetuneTrainer(
            model=model, args=args, train_dataset=self.datasets["train"], eval_dataset=self.datasets.get("dev"),
            data_collator=self.collator(tokenizer), callbacks=callbacks, task=self, head_modules=heads,
            head_learning_rate=self.recipe.training.head_learning_rate,
            compute_metrics=dev_metrics if "dev" in self.datasets else None,
        )  # fmt: skip

    def outputs_of(self, predictions: Any) -> list[np.ndarray]:
        """The inference module's per-row outputs from the trainer's gathered predictions (model logits)."""
        logits = predictions[0] if isinstance(predictions, tuple) else predictions
        return list(np.asarray(logits))

    def checkpoint_state(self) -> dict[str, Any]:
        """Task state a resumed run needs besides the weights (ICD: the threshold tuned on dev so far)."""
        return {}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Take back what `checkpoint_state` kept."""

    def counts(self, split: str) -> dict[str, int]:  # what metrics.json says of an evaluated split's size
        return {"n_examples": len(self.datasets[split])}

    def restore(self, meta: dict[str, Any]) -> None:
        """Take a saved model's labels (and settings) from its manifest before `prepare`, for evaluation."""
        self.labels = list(meta.get("labels") or [])

    def inference_module(self, model: nn.Module) -> nn.Module:
        """The trained model with the exported signature (input_ids, attention_mask) -> the graph's output."""
        return OutputModule(model)

    def save_extras(self, folder: Path, outputs: list[np.ndarray], split: str, plots: Path) -> None:
        """Files besides the weights (labels.json) and the task's plots, from the final split's outputs."""

    def summary(self) -> str:  # `cmft validate`'s line about the data
        sizes = ", ".join(f"{name} {len(rows)}" for name, rows in self.datasets.items())
        return f"{len(self.labels)} labels; examples: {sizes}"

    # inference --------------------------------------------------------------------------------------------------
    @classmethod
    def load_inference(cls, folder: Path, recipe: Any, attention: str) -> tuple[nn.Module, dict[str, Any]]:
        """A saved model folder's inference module (fp32, eval) and manifest."""
        model = load_pretrained(cls.auto_class, folder, attention)
        labels = [model.config.id2label[i] for i in range(len(model.config.id2label))]
        meta = {"task": cls.name, "max_length": recipe.training.max_length, "labels": labels,
                **cls.settings_meta(recipe)}  # fmt: skip
        return OutputModule(model).eval(), meta

    @classmethod
    def unit(cls, index: int, ids: list[int], meta: dict[str, Any]) -> Unit:  # a row from one text's [CLS] … [SEP]
        return Unit(index, ids)

    @classmethod
    def encode(cls, tokenizer: Any, texts: list[str], meta: dict[str, Any]) -> tuple[list[Unit], dict[str, int]]:
        """Model input rows for raw texts, and counts of what was truncated or windowed (never silently)."""
        limit = int(meta["max_length"])
        encoded = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        units = [Unit(index, cut_to(ids, limit), truncated=len(ids) > limit) for index, ids in enumerate(encoded)]
        return units, {"n_truncated": sum(len(ids) > limit for ids in encoded), "n_windowed": 0}

    @classmethod
    def collate(cls, units: list[Unit], pad_id: int, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        return pad_rows(units, pad_id)  # a padded batch: int64 input_ids and attention_mask

    @classmethod
    def input_shape(cls, meta: dict[str, Any]) -> str:  # the graph's input shape, for the export card
        return "[batch, sequence]"

    @classmethod
    def exported(cls, module: nn.Module, meta: dict[str, Any]) -> tuple[nn.Module, dict[str, dict[int, str]]]:
        """The module `cmft export` traces and its outputs (name → dynamic axes), the task's output first."""
        return module, {cls.output: {0: "batch", 1: "sequence"} if cls.token_level else {0: "batch"}}

    @classmethod
    def evidence_backend(cls, loaded: Any, backend: Any, method: str) -> Any:
        """A back end whose rows carry what `decode` needs to give evidence (`meta["evidence"]`) for its
        predictions; a one-line error for a model that gives none."""
        from cmft.errors import CmftError

        raise CmftError(f"evidence: a {cls.name} model gives none; only ICD coding with label attention does")

    # model card -------------------------------------------------------------------------------------------------
    @classmethod
    def card_onnx_feed(cls, meta: dict[str, Any]) -> str:
        """Python lines that turn `ids` (one text's token ids) into the exported graph's `feed`."""
        return ONNX_FEED.format(**meta)
