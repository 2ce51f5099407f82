"""The fine-tuning engine: encoder → task data → (LoRA) → HF Trainer → dev/test metrics → run folder."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoTokenizer, EarlyStoppingCallback, Trainer, set_seed
from transformers.trainer_pt_utils import LengthGroupedSampler

from cmft import distributed
from cmft.checkpointing import SafeTrainerMixin, resume_point
from cmft.config import dump_config
from cmft.errors import CmftError
from cmft.finetuning.config import RecipeConfig, step_schedule
from cmft.finetuning.lora import wrap_lora
from cmft.modeling import check_model_source, hub_error, resolve_attention
from cmft.runs import finish_run
from cmft.tasks import get_task
from cmft.training import (
    HistoryCallback,
    RichProgressCallback,
    plot_history,
    quiet_trainer,
    read_history,
    set_threads,
    training_arguments,
)

log = logging.getLogger("cmft")
LATEST_PRETRAIN = Path("runs/pretrain/latest/model")


def resolve_encoder(name: str) -> str:
    """`latest` → the newest `cmft pretrain` run's model; else a local folder or a hub id."""
    if name == "latest":
        if not (LATEST_PRETRAIN / "config.json").is_file():
            raise CmftError(
                "model.encoder: latest: no pretrained encoder in runs/pretrain/latest; run `cmft pretrain` first "
                "or set model.encoder to a model folder or hub id"
            )
        return str(LATEST_PRETRAIN.resolve())
    return check_model_source(name, "model.encoder")


def load_tokenizer(encoder: str, trust_remote_code: bool):
    try:
        return AutoTokenizer.from_pretrained(encoder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        if Path(encoder).is_dir():
            raise CmftError(
                f"model.encoder: {encoder}: no usable tokenizer files there ({type(exc).__name__})"
            ) from None
        raise hub_error(encoder, "model.encoder", exc) from None


def tokens_per_pass(recipe: RecipeConfig) -> tuple[int, str]:
    """The longest token sequence one forward pass gets, and the recipe key that sets it."""
    if recipe.task == "icd_coding" and recipe.icd_coding.mode == "chunked":
        return recipe.icd_coding.chunk_size, "icd_coding.chunk_size"
    return recipe.training.max_length, "training.max_length"


def rotary_positions(config: Any) -> bool:
    """Whether a model config places tokens by rotary embeddings (ModernBERT), not by an absolute position table."""
    return bool(getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None))


# Full-tuning encoder rate for a real pretrained encoder, where the recipe's (tuned on the tiny encoder that `cmft
# pretrain` makes) is too high for one, and what it was measured on (benchmarks/quality.py, MiniLM-L6). ICD coding:
# the tiny encoder needs the recipe's rate (seed 42: 0.506 at 3e-4, 0.416 at 5e-5).
PRETRAINED_ENCODER_ADVICE = {
    "icd_coding": (5e-5, "MiniLM-L6 on CodiEsp: micro F1 0.18-0.40 at 3e-4, 0.51-0.54 at 5e-5 over three seeds"),
    "retrieval": (
        5e-5,
        "MiniLM-L6 on MTS-Dialog: ndcg@10 0.875-0.884 at 2e-4 over three seeds, 0.890-0.900 at 5e-5 over three",
    ),
}
PRETRAINED_ENCODER_RATES = {task: rate for task, (rate, _) in PRETRAINED_ENCODER_ADVICE.items()}


def made_by_cmft_pretrain(encoder: str) -> bool:
    """Whether the encoder is the model folder of a `cmft pretrain` run (whose run folder keeps summary.json)."""
    run = Path(encoder).parent
    return (run / "summary.json").is_file() and (run / "recipe.yaml").is_file()


def learning_rate_advice(recipe: RecipeConfig, encoder: str) -> str | None:
    """A warning when full tuning runs a real pretrained encoder at a recipe rate measured to be too high for one."""
    if recipe.task not in PRETRAINED_ENCODER_ADVICE:
        return None
    advised, evidence = PRETRAINED_ENCODER_ADVICE[recipe.task]
    rate = recipe.training.learning_rate
    if recipe.tuning.method != "full" or rate < 2 * advised or made_by_cmft_pretrain(encoder):
        return None
    return (
        f"training.learning_rate {rate:g} suits the tiny encoder `cmft pretrain` makes; full tuning of a pretrained "
        f"encoder ({encoder}) on {recipe.task} is measured to train better at {advised:g} "
        f"({evidence}): set training.learning_rate={advised:g}"
    )


def check_positions(recipe: RecipeConfig, encoder: str) -> None:
    """An encoder with absolute position embeddings (BERT, RoBERTa) fails deep inside the model on a sequence
    longer than its position table (an index error on CPU, a device assert on GPU): say so before anything is
    trained, with the ways out (this load also checks that the config is readable). A rotary encoder (ModernBERT)
    runs past its configured length: only warn."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(encoder, trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        if Path(encoder).is_dir():
            raise CmftError(f"model.encoder: {encoder}: no usable config.json there ({type(exc).__name__})") from None
        raise hub_error(encoder, "model.encoder", exc) from None
    limit = getattr(config, "max_position_embeddings", None)
    length, key = tokens_per_pass(recipe)
    if limit is None or length <= limit:
        return
    if rotary_positions(config):
        log.warning("%s (%d) is longer than the encoder's max_position_embeddings (%d): rotary positions past the "
                    "trained length", key, length, limit)  # fmt: skip
        return
    way_out = f"set {key}={limit} or less"
    if recipe.task == "icd_coding" and key == "training.max_length":
        way_out += f", or read the note in segments: icd_coding.mode=chunked icd_coding.chunk_size={min(512, limit)}"
    raise CmftError(f"{key} ({length}) is longer than the encoder's max_position_embeddings ({limit}); {way_out}")


def check_encoder(recipe: RecipeConfig, encoder: str) -> None:
    """The checks `cmft validate` and every fine-tuning run make before loading weights: a warning when remote code
    will run, the position-table length check (raises CmftError) and the learning-rate advice."""
    if recipe.model.trust_remote_code:
        log.warning("model.trust_remote_code is on: code from %s will run on this machine", encoder)
    check_positions(recipe, encoder)
    if advice := learning_rate_advice(recipe, encoder):
        log.warning(advice)


def token_count(input_ids: list) -> int:
    """Tokens in one feature: a list of ids, or (chunked ICD notes) a list of chunks."""
    return sum(len(chunk) for chunk in input_ids) if input_ids and isinstance(input_ids[0], list) else len(input_ids)


class FinetuneTrainer(SafeTrainerMixin, Trainer):
    """HF Trainer with the task's loss, a separate learning rate for the head, and tokens/s in the log."""

    def __init__(self, *args, task: Any, head_modules: list[str], head_learning_rate: float | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.task = task
        self.head_modules = set(head_modules)
        self.head_learning_rate = head_learning_rate
        self.real_tokens = 0
        self.window_start = time.monotonic()

    def cmft_state(self) -> dict[str, Any]:
        state = super().cmft_state()
        if hasattr(self.task, "threshold"):
            state["threshold"] = self.task.threshold  # ICD: the threshold tuned on dev so far
        return state

    def load_cmft_state(self, state: dict[str, Any]) -> None:
        super().load_cmft_state(state)
        if "threshold" in state:
            self.task.threshold = state["threshold"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and "attention_mask" in inputs:
            self.real_tokens += int(inputs["attention_mask"].sum())
        loss, outputs = self.task.loss(model, dict(inputs))
        return (loss, outputs) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        # Trainer groups by len(input_ids); for chunked ICD notes that is the number of chunks, not of tokens, so
        # the part-filled last chunks of a batch differ widely in length and the encoder runs over their padding.
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not isinstance(dataset, list):
            return super()._get_train_sampler(train_dataset)
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return LengthGroupedSampler(batch, lengths=[token_count(f["input_ids"]) for f in dataset])

    def _get_eval_sampler(self, eval_dataset):
        # Length grouping is for training only: predictions must come back in dataset order (NER merges
        # windows per sentence by position).
        return torch.utils.data.SequentialSampler(eval_dataset)

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.head_learning_rate is not None:
            head, body = [], []
            for name, parameter in self.model.named_parameters():
                if parameter.requires_grad:
                    (head if self.head_modules & set(name.split(".")) else body).append(parameter)
            groups = [{"params": body, "lr": self.args.learning_rate}, {"params": head, "lr": self.head_learning_rate}]
            for group in groups:
                group["weight_decay"] = self.args.weight_decay
            self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.args.learning_rate)
        return super().create_optimizer()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["tokens_per_s"] = round(self.real_tokens / max(time.monotonic() - self.window_start, 1e-9), 1)
            self.real_tokens, self.window_start = 0, time.monotonic()
        super().log(logs, start_time)


def _predict(trainer: Trainer, dataset: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    output = trainer.predict(dataset)
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    return np.asarray(logits), np.asarray(output.label_ids)


def run_finetuning(recipe: RecipeConfig, final: Path, work: Path, resume: bool) -> Path:
    """Train in `work` (the `.partial` folder) and rename it to `final` when everything is written."""
    if recipe.task == "retrieval":  # sentence-transformers' own trainer and losses
        from cmft.finetuning.retrieval_engine import run_retrieval

        return run_retrieval(recipe, final, work, resume)
    if distributed.is_main():
        dump_config(recipe, work / "recipe.yaml")
    set_threads(recipe.training.threads)
    set_seed(recipe.seed)
    started = time.monotonic()
    encoder = resolve_encoder(recipe.model.encoder)
    attention = resolve_attention(recipe.model.attention)
    check_encoder(recipe, encoder)
    tokenizer = load_tokenizer(encoder, recipe.model.trust_remote_code)
    task = get_task(recipe)
    task.prepare(tokenizer)
    model = task.build_model(encoder, attention, recipe.model.trust_remote_code)
    head_modules = task.head_modules(model)
    model_type = model.config.model_type
    if recipe.tuning.method == "lora":
        if recipe.training.distributed == "fsdp":
            raise CmftError("training.distributed: fsdp with tuning.method lora is not supported; use ddp")
        model = wrap_lora(model, model_type, recipe.tuning, head_modules)
    trainer = _build_trainer(recipe, task, model, tokenizer, head_modules, work)
    output = trainer.train(resume_from_checkpoint=resume_point(work / "checkpoints", resume))
    report: dict[str, Any] = {
        "train_seconds": round(time.monotonic() - started, 1),  # everything up to here: data, model, training
        "train_examples_per_s": round(output.metrics.get("train_samples_per_second", 0.0), 2),
        "encoder": encoder,
        **distributed.split_batch(recipe.training.batch_size, recipe.training.gradient_accumulation).report(),
        **task.report,
    }
    trainer.compute_metrics = None  # final predictions: no metric hook (it would tune the ICD threshold on test)
    dev_metrics: dict[str, Any] = {}
    if "dev" in task.datasets:
        logits, labels = _predict(trainer, task.datasets["dev"])
        dev_metrics = task.metrics(logits, labels, "dev", tune=True)  # ICD: the threshold is tuned here
    split = "test" if "test" in task.datasets else "dev"
    predict_started = time.monotonic()
    logits, labels = _predict(trainer, task.datasets[split])
    report[f"{split}_examples_per_s"] = round(len(task.datasets[split]) / (time.monotonic() - predict_started), 2)
    metrics = task.metrics(logits, labels, split) if split == "test" else dict(dev_metrics)
    metrics |= {"split": split, "n_examples": len(task.datasets[split])}
    metrics |= {f"dev_{k}": v for k, v in dev_metrics.items() if isinstance(v, (int, float))}
    metrics |= {k: v for k, v in report.items() if isinstance(v, (int, float))}
    if trainer.is_fsdp_enabled:  # gathering the sharded weights is a collective: every process saves
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        if hasattr(unwrapped, "settings"):
            unwrapped.settings = task.settings  # ICD: the tuned threshold travels with the model
        trainer.save_model(str(work / "model"))
    if not distributed.is_main():  # predictions above were gathered from every process; rank 0 writes
        return finish_run(final)
    if trainer.is_fsdp_enabled:
        tokenizer.save_pretrained(work / "model")
    else:
        _save(recipe, task, trainer.model, tokenizer, work)
    task.save_extras(work / "model", logits, labels, work / "plots")
    (work / "metrics.json").write_text(json.dumps(_finite(metrics), indent=2), encoding="utf-8")
    plot_history(read_history(work / "history.jsonl"), work / "plots" / "loss.png", ("loss", "eval_loss", "lr"))
    log.info(
        "finetune %s: %s",
        recipe.task,
        ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and not k.startswith("dev_"))[
            :400
        ],
    )
    return finish_run(final)


def _build_trainer(recipe, task, model, tokenizer, head_modules, work: Path) -> FinetuneTrainer:
    t = recipe.training
    has_dev = "dev" in task.datasets
    max_steps, _, eval_every, log_every = step_schedule(t, math.ceil(len(task.datasets["train"]) / t.batch_size))
    args = training_arguments(
        work / "checkpoints", max_steps=max_steps, batch_size=t.batch_size,
        gradient_accumulation=t.gradient_accumulation, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
        warmup_ratio=t.warmup_ratio, lr_scheduler=t.lr_scheduler, max_grad_norm=1.0,
        log_every=log_every, save_every=eval_every, save_total_limit=t.save_total_limit,
        seed=recipe.seed, bf16=t.bf16, distributed=t.distributed,
    )  # fmt: skip
    args.per_device_eval_batch_size = t.eval_batch_size
    args.train_sampling_strategy = "group_by_length"  # similar lengths per batch: far less padding
    if has_dev:
        args.eval_strategy = "steps"
        args.eval_steps = eval_every
        args.load_best_model_at_end = True
        args.metric_for_best_model = f"eval_{task.metric_for_best}"
        args.greater_is_better = True
    callbacks = [HistoryCallback(work / "history.jsonl"), RichProgressCallback(f"finetune {recipe.task}")]
    if has_dev and t.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    trainer = FinetuneTrainer(
        model=model, args=args, train_dataset=task.datasets["train"], eval_dataset=task.datasets.get("dev"),
        data_collator=task.collator(tokenizer), callbacks=callbacks, task=task, head_modules=head_modules,
        head_learning_rate=t.head_learning_rate,
        compute_metrics=(lambda p: task.metrics(p.predictions, p.label_ids, "dev", tune=True)) if has_dev else None,
    )  # fmt: skip
    quiet_trainer(trainer)
    trainer.setup_safety(t.divergence_factor)
    return trainer


def _save(recipe: RecipeConfig, task: Any, model: nn.Module, tokenizer, work: Path) -> None:
    """model/: merged plain weights (+ tokenizer); adapter/: the LoRA adapter with the head, for LoRA runs."""
    if recipe.tuning.method == "lora":
        model.save_pretrained(work / "adapter")
        tokenizer.save_pretrained(work / "adapter")
        model = model.merge_and_unload()
    if hasattr(model, "settings"):
        model.settings = task.settings  # ICD: the tuned threshold travels with the model
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
