"""The fine-tuning engine, the same for every task (cmft.tasks supplies data, model, trainer, scoring, saving):
encoder → task data → (LoRA) → trainer → best dev checkpoint → the task's last touches (ICD: zero-shot codes) → dev and
test metrics (the tasks' one evaluation loop) → run folder: model/ with the task's manifest (cmft_task.json)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, EarlyStoppingCallback, set_seed

from cmft import distributed
from cmft.backends import TorchBackend
from cmft.cards import write_model_card
from cmft.checkpointing import resume_point
from cmft.config import dump_config
from cmft.errors import CmftError
from cmft.finetuning.config import RecipeConfig, step_schedule
from cmft.finetuning.rates import resolve_learning_rate
from cmft.lora import refresh_adapter
from cmft.memory import set_checkpointing
from cmft.modeling import DTYPE_NAMES, check_model_source, choose_attention, choose_inference, hub_error, model_type_of
from cmft.runs import finish_run
from cmft.tasks import get_task
from cmft.tasks.base import Task, write_manifest
from cmft.tracking import trackers as check_trackers
from cmft.training import plot_history, read_history, ready, set_threads, trainer_parts

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


def rotary_positions(config: Any) -> bool:
    """Whether a model config places tokens by rotary embeddings (ModernBERT), not by an absolute position table."""
    return bool(getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None))


def check_positions(recipe: RecipeConfig, encoder: str, task: Task) -> None:
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
    length, key = task.tokens_per_pass()
    if limit is None or length <= limit:
        return
    if rotary_positions(config):
        log.warning("%s (%d) is longer than the encoder's max_position_embeddings (%d): rotary positions past the "
                    "trained length", key, length, limit)  # fmt: skip
        return
    way_out = f"set {key}={limit} or less{task.position_way_out(limit)}"
    raise CmftError(f"{key} ({length}) is longer than the encoder's max_position_embeddings ({limit}); {way_out}")


def check_encoder(recipe: RecipeConfig, encoder: str, task: Task) -> None:
    """The checks `cmft validate` and every fine-tuning run make before loading weights: a warning when remote code
    will run, the position-table length check (raises CmftError) and the learning-rate advice."""
    if recipe.model.trust_remote_code:
        log.warning("model.trust_remote_code is on: code from %s will run on this machine", encoder)
    check_positions(recipe, encoder, task)


def run_finetuning(recipe: RecipeConfig, final: Path, work: Path, resume: bool) -> Path:
    """Train in `work` (the `.partial` folder) and rename it to `final` when everything is written."""
    task = get_task(recipe)
    task.check_recipe()
    check_trackers(recipe.training.report_to)  # before anything heavy
    if recipe.tuning.method == "lora" and recipe.training.distributed == "fsdp":
        raise CmftError("training.distributed: fsdp with tuning.method lora is not supported; use ddp")
    if distributed.is_main():
        dump_config(recipe, work / "recipe.yaml")
    set_threads(recipe.training.threads)
    set_seed(recipe.seed)
    started = time.monotonic()
    encoder = resolve_encoder(recipe.model.encoder)
    model_type = model_type_of(encoder, recipe.model.trust_remote_code)
    chosen = choose_attention(recipe.model.attention, model_type, True)
    log.info("model.attention: %s → %s (%s)", recipe.model.attention, chosen.choice, chosen.reason)
    recipe.model.attention = chosen.choice  # recipe.yaml records the choice
    check_encoder(recipe, encoder, task)
    rate_why = resolve_learning_rate(recipe, encoder)
    tokenizer = load_tokenizer(encoder, recipe.model.trust_remote_code)
    task.prepare(tokenizer)
    model = task.build_model(encoder, chosen.implementation, recipe.model.trust_remote_code)
    why = _set_checkpointing(recipe, task, model, chosen.implementation)
    if distributed.is_main():  # as resolved: what `auto` chose for attention and checkpointing, and why
        inference = choose_inference(model_type)  # what predict, evaluate and serve load the model with here
        used = f"inference here: {inference.implementation} in {DTYPE_NAMES[inference.dtype]}"
        notes = {"model.attention": f"{chosen.reason}; {used}", "training.gradient_checkpointing": why}
        dump_config(recipe, work / "recipe.yaml", notes | ({"training.learning_rate": rate_why} if rate_why else {}))
    heads = task.head_modules(model)
    if recipe.tuning.method == "lora":
        model = task.wrap_lora(model, recipe.tuning, heads)
    trainer = _build_trainer(recipe, task, model, tokenizer, heads, work)
    output = trainer.train(resume_from_checkpoint=resume_point(work / "checkpoints", resume))  # best dev at the end
    report: dict[str, Any] = {
        "train_seconds": round(time.monotonic() - started, 1),  # everything up to here: data, model, training
        "train_examples_per_s": round(output.metrics.get("train_samples_per_second", 0.0), 2),
        **distributed.split_batch(recipe.training.batch_size, recipe.training.gradient_accumulation).report(),
        **task.report,
    }
    model = _trained_model(trainer, task, recipe, tokenizer, work)
    if not distributed.is_main():  # rank 0 evaluates and writes
        return finish_run(final)
    model = task.finish_model(model, tokenizer)
    if recipe.tuning.method == "lora":
        refresh_adapter(work / "adapter", model)
    report |= task.report
    metrics = _final_metrics(task, model, recipe, tokenizer.pad_token_id or 0, report)
    task.save(model, tokenizer, work / "model")
    write_manifest(work / "model", task.meta())
    task.save_extras(work / "model", metrics.pop("_outputs"), metrics["split"], work / "plots")
    (work / "metrics.json").write_text(json.dumps(_finite(metrics), indent=2), encoding="utf-8")
    write_model_card(work, task.meta(), encoder)
    plot_history(read_history(work / "history.jsonl"), work / "plots" / "loss.png",
                 ("loss", "eval_loss", f"eval_{task.metric_for_best}", "lr"))  # fmt: skip
    shown = [f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and not k.startswith("dev_")]
    log.info("finetune %s: %s", recipe.task, ", ".join(shown)[:400])
    return finish_run(final)


def _set_checkpointing(recipe: RecipeConfig, task: Task, model: Any, implementation: str) -> str:
    """Resolve training.gradient_checkpointing for one training forward pass of the task and switch it on; why."""
    t = recipe.training
    rows = distributed.split_batch(t.batch_size, t.gradient_accumulation).per_device
    t.gradient_checkpointing, why = set_checkpointing(t.gradient_checkpointing, model, task.encoder_config(model),
                                                      [task.pass_shape(rows)], implementation)  # fmt: skip
    return why


def _trained_model(trainer: Any, task: Task, recipe: RecipeConfig, tokenizer: Any, work: Path) -> Any:
    """The best checkpoint's model as a plain (merged, unsharded) model on rank 0: LoRA saves its adapter (with the
    head) in adapter/ and merges; FSDP gathers the shards into model/ (a collective) and rank 0 reads them back."""
    if trainer.is_fsdp_enabled:
        trainer.save_model(str(work / "model"))
        return task.load_model(work / "model") if distributed.is_main() else None
    model = trainer.model
    if recipe.tuning.method == "lora" and distributed.is_main():
        model = task.merge_lora(model, work / "adapter", tokenizer)
    return model


def _final_metrics(task: Task, model: Any, recipe: RecipeConfig, pad_id: int, report: dict[str, Any]) -> dict:
    """Dev metrics (settings such as the ICD threshold are tuned here) and the test split's, or dev's without one,
    computed on the in-memory model with the attention it was trained with (its fp32 weights autocast to bf16/fp16
    under flash-attention, as the Trainer's dev evaluations ran), and what ran."""
    backend = TorchBackend(task.inference_module(model).eval())
    batch = recipe.training.eval_batch_size
    dev_metrics = task.evaluate(backend, "dev", batch, pad_id, tune=True) if "dev" in task.datasets else {}
    split = "test" if "test" in task.datasets else ("dev" if "dev" in task.datasets else "train")
    started = time.monotonic()
    outputs = task.split_outputs(backend, split, batch, pad_id)
    unit = task.throughput_unit
    report[f"{split}_{unit}_per_s"] = round(len(outputs) / (time.monotonic() - started), 2)
    metrics = task.score(outputs, split) if split != "dev" else dict(dev_metrics)
    metrics |= {"split": split, **task.counts(split)}
    metrics |= {f"dev_{k}": v for k, v in dev_metrics.items() if _flat_figure(v)}
    metrics |= report | backend.ran()
    return {**metrics, "_outputs": outputs}


def _build_trainer(recipe: RecipeConfig, task: Task, model: Any, tokenizer: Any, heads: list[str], work: Path) -> Any:
    """The task's trainer with cmft's schedule, checkpoints, history, progress, early stopping and best-checkpoint
    loading on the dev metric — the same for every task."""
    t = recipe.training
    has_dev = "dev" in task.datasets
    max_steps, _, eval_every, log_every = step_schedule(t, task.batches_per_epoch(t.batch_size))
    arguments_class, extra = task.trainer_arguments()
    args, callbacks = trainer_parts(
        work, work / "checkpoints", f"finetune {recipe.task}", t.report_to, max_steps=max_steps,
        batch_size=t.batch_size, gradient_accumulation=t.gradient_accumulation, learning_rate=t.learning_rate,
        weight_decay=t.weight_decay, warmup_ratio=t.warmup_ratio, lr_scheduler=t.lr_scheduler, max_grad_norm=1.0,
        log_every=log_every, save_every=eval_every, save_total_limit=t.save_total_limit, seed=recipe.seed,
        bf16=t.bf16, distributed=t.distributed, cls=arguments_class, **extra,
    )  # fmt: skip
    args.per_device_eval_batch_size = t.eval_batch_size
    if has_dev:
        args.eval_strategy = "steps"
        args.eval_steps = eval_every
        args.load_best_model_at_end = True
        args.metric_for_best_model = f"eval_{task.metric_for_best}"
        args.greater_is_better = True
        if t.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    return ready(task.make_trainer(model, args, callbacks, tokenizer, heads), t.divergence_factor)


def _flat_figure(value: Any) -> bool:
    """A number, or a flat mapping of numbers (a bucket → F1 table): what metrics.json repeats for dev."""
    if isinstance(value, dict):
        return all(v is None or isinstance(v, (int, float)) for v in value.values())
    return isinstance(value, (int, float))


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
