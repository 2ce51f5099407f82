"""The one interface every task implements (`Task`), the manifest a saved model folder carries, and the pieces most
tasks share. A task owns all that depends on what it predicts; the engine, `cmft evaluate`, `cmft predict`,
`cmft export`, `cmft serve` and the benchmarks only call it.

The contract. A task is one module in cmft/tasks/ with one `Task` subclass, registered by one line in
cmft/tasks/__init__.py. It must set `name` (the recipe's `task`), `metric_for_best`, `section_name` and `section` (its
recipe section: a `TaskSection` model defined in the same module) and implement the abstract methods: `prepare`,
`collator`, `loss`, `score` and `decode`. Everything else has a default for a transformers AutoModelFor<Task> head
(`auto_class`) that a task overrides where it differs.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from cmft.backends import Backend, Unit, pad_rows, run_batches
from cmft.lora import wrap_lora
from cmft.recipe import RecipeBase, TaskSection, TuningConfig

SPLITS = ("train", "dev", "test")
TASK_MANIFEST = "cmft_task.json"
"""In every saved model/ folder: what inference needs (`Task.meta()`: task, labels, max_length, decode settings)."""


def write_manifest(folder: Path, meta: dict[str, Any]) -> None:
    """Save a model folder's manifest (TASK_MANIFEST) beside its weights."""
    (folder / TASK_MANIFEST).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """A model folder's manifest; None for a folder saved before it was written (its run's recipe.yaml says it)."""
    from cmft.errors import CmftError

    path = folder / TASK_MANIFEST
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CmftError(f"{path}: not a readable manifest; fine-tune again or delete it to read recipe.yaml") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("task"), str):
        raise CmftError(f"{path}: a manifest needs a `task`; fine-tune again or delete it to read recipe.yaml")
    return meta


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


class Task(ABC):
    """One fine-tuning task. Training: `prepare` fills `datasets[split]` (rows with `input_ids`, and `labels` for the
    trainer); `build_model`, `collator`, `loss`, `make_trainer` train; `score` turns the inference module's outputs on
    a split into metrics; `save` writes model/, and the engine writes `meta()` beside it (TASK_MANIFEST). Inference,
    from that manifest alone, so an export folder needs no recipe: `load_inference` (the torch module ONNX traces),
    `encode`, `unit`, `collate`, `decode` (the JSON of predict)."""

    # required -----------------------------------------------------------------------------------------------------
    name: ClassVar[str]  # the recipe's `task`
    metric_for_best: ClassVar[str]  # picks the best checkpoint, measures the int8 cost, ranks benchmarks
    section_name: ClassVar[str]  # the recipe key of the task's own settings ("" for one a recipe cannot name)
    section: ClassVar[type[TaskSection] | None]  # their schema, defined in the task's module (None: no recipe)
    # optional -----------------------------------------------------------------------------------------------------
    output: ClassVar[str] = "logits"  # the exported graph's output, and what it holds (for the export README)
    output_meaning: ClassVar[str] = ""
    token_level: ClassVar[bool] = False  # outputs per token: parity is checked on real positions only
    predicts: ClassVar[bool] = True  # False for a bare encoder: nothing to decode
    searches: ClassVar[bool] = False  # a bi-encoder: `cmft predict --corpus` ranks documents with it
    windowed: ClassVar[bool] = False  # long texts become several windows (units), each predicted
    gives_spans: ClassVar[bool] = False  # its predictions hold character spans (`spans`): `--assertion` reads them
    reads_spans: ClassVar[bool] = False  # classifies one span of a text (`input_text` of text, start, end)
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

    def __init__(self, recipe: RecipeBase | None = None):
        self.recipe: Any = recipe  # a cmft.finetuning.config.RecipeConfig: its own section is `section_of(recipe)`
        self.labels: list[str] = []
        self.report: dict[str, Any] = {}
        self.datasets: dict[str, list[dict]] = {}

    @classmethod
    def section_of(cls, recipe: RecipeBase | None) -> Any:
        """The task's own section of `recipe` (None without a recipe)."""
        return getattr(recipe, cls.section_name) if recipe is not None and cls.section_name else None

    # the core every task implements -------------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, tokenizer: Any, splits: tuple[str, ...] = SPLITS) -> None:
        """Read and tokenize the recipe's `splits` into `datasets` (labels from train, or from `restore`)."""

    @abstractmethod
    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """The trainer's batches from `datasets` rows: padded tensors, with `labels`."""

    @abstractmethod
    def loss(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """(loss, model outputs) of one training batch from `collator`."""

    @abstractmethod
    def score(self, outputs: list[np.ndarray], split: str, tune: bool = False) -> dict[str, Any]:
        """metrics.json's figures from the inference module's outputs on a prepared split (`tune`: choose settings)."""

    @classmethod
    @abstractmethod
    def decode(cls, meta: dict[str, Any], text: str, outputs: list[np.ndarray], units: list[Unit]) -> dict[str, Any]:
        """The JSON `cmft predict` writes for one text, from its units' outputs and the manifest."""

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
        """The manifest inference needs: saved in model/ as TASK_MANIFEST (and in an export as cmft_export.json)."""
        return {"task": self.name, "max_length": self.recipe.training.max_length, "labels": self.labels,
                **self.settings_meta(self.recipe)}  # fmt: skip

    @classmethod
    def settings_meta(cls, recipe: RecipeBase) -> dict[str, Any]:
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

    def wrap_lora(self, model: nn.Module, tuning: TuningConfig, heads: list[str]) -> nn.Module:
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
        """The trainer: cmft's FinetuneTrainer (cmft.training) over this task's datasets, `collator`, `loss` and dev
        `score`; the engine has set the schedule, checkpoints, evaluation and best-checkpoint arguments. A task that
        trains on a library's own trainer (retrieval: sentence-transformers) overrides this."""
        from cmft.training import FinetuneTrainer

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
        return None

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
        return None

    def summary(self) -> str:  # `cmft validate`'s line about the data
        sizes = ", ".join(f"{name} {len(rows)}" for name, rows in self.datasets.items())
        return f"{len(self.labels)} labels; examples: {sizes}"

    # evaluation: the one loop (training's final metrics, `cmft evaluate`, the int8 check, the benchmarks) -----------
    def split_outputs(self, backend: Backend, split: str, batch_size: int, pad_id: int) -> list[np.ndarray]:
        """The back end's output for every prepared row of `split`, in row order."""
        units = [Unit(index, row["input_ids"]) for index, row in enumerate(self.datasets[split])]
        meta = self.meta()

        def collate(batch: list[Unit]) -> tuple[np.ndarray, np.ndarray]:
            return self.collate(batch, pad_id, meta)

        return run_batches(units, collate, backend, batch_size)

    def evaluate(self, backend: Backend, split: str, batch_size: int, pad_id: int, tune: bool = False
                 ) -> dict[str, Any]:  # fmt: skip
        """The metrics on a prepared split (`tune`: choose settings on it, e.g. the ICD threshold on dev)."""
        return self.score(self.split_outputs(backend, split, batch_size, pad_id), split, tune)

    # inference --------------------------------------------------------------------------------------------------
    @classmethod
    def load_inference(cls, folder: Path, meta: dict[str, Any], attention: str) -> nn.Module:
        """A saved model folder's inference module (fp32, eval), given its manifest."""
        return OutputModule(load_pretrained(cls.auto_class, folder, attention)).eval()

    @classmethod
    def manifest_from_recipe(cls, folder: Path, recipe: RecipeBase) -> dict[str, Any]:
        """The manifest of a model folder saved before TASK_MANIFEST was written, from its run's recipe."""
        from transformers import AutoConfig

        id2label = AutoConfig.from_pretrained(folder).id2label
        return {"task": cls.name, "max_length": recipe.training.max_length,
                "labels": [id2label[i] for i in range(len(id2label))], **cls.settings_meta(recipe)}  # fmt: skip

    @classmethod
    def unit(cls, index: int, ids: list[int], meta: dict[str, Any]) -> Unit:  # a row from one text's [CLS] … [SEP]
        return Unit(index, ids)

    @classmethod
    def input_text(cls, meta: dict[str, Any], record: dict[str, Any], text_field: str, where: str) -> str:
        """One record of a jsonl/csv input as the text `encode` reads (`where`: "file: line N" for errors); the text
        field as it is, unless a task reads more of the record (assertion: the span of `start`/`end` marked)."""
        return record[text_field]

    @classmethod
    def spans(cls, prediction: dict[str, Any]) -> list[dict[str, Any]]:
        """The span dicts ({start, end, ...}, character offsets) of one decoded prediction, when `gives_spans`: the
        very dicts of the prediction, so that a chained model (cmft.chaining) adds its fields to them."""
        return []

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
    def parity_view(cls, names: list[str], expected: list[np.ndarray], got: list[np.ndarray]
                    ) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, int]]:  # fmt: skip
        """The graph's outputs (`names`) from PyTorch (`expected`) and the export (`got`) as the parity check compares
        them, with counts for parity.json: as they are, unless the task knows where the two may rightly differ."""
        return expected, got, {}

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
