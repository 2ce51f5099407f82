"""The training engine shared by pretraining and fine-tuning: HF Trainer arguments, cmft's callbacks, one assembly
of both into a trainer (`trainer_parts`, `ready`), and the fine-tuning trainer of the token and sequence tasks
(`FinetuneTrainer`: NER, ICD coding, note classification; a task brings its pieces, `TrainingTask`)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from cmft.backends import token_count
from cmft.checkpointing import SafeTrainerMixin
from cmft.distributed import split_batch
from cmft.errors import CmftError
from cmft.modeling import bf16_available
from cmft.tracking import tracking

log = logging.getLogger("cmft")

HISTORY_KEYS = {"learning_rate": "lr"}
DROPPED_KEYS = {"total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


def training_arguments(
    output_dir: Path,
    *,
    max_steps: int,
    batch_size: int,
    gradient_accumulation: int,
    learning_rate: float,
    weight_decay: float,
    warmup_ratio: float,
    lr_scheduler: str,
    max_grad_norm: float,
    log_every: int,
    save_every: int,
    save_total_limit: int,
    seed: int,
    bf16: bool | str,
    distributed: str = "ddp",
    fsdp_layers: list[str] | None = None,
    batch_field: str = "training.batch_size",
    cls: type[TrainingArguments] = TrainingArguments,
    report_to: list[str] | None = None,
    **extra: Any,
) -> TrainingArguments:
    """TrainingArguments (or a subclass) with cmft's conventions: checkpoints in the run folder, reporting only to
    `report_to` (cmft.tracking).

    `batch_size` is the recipe's: rows per micro-batch over all processes together. Under torchrun it is divided
    across the processes, so the global batch (batch_size × gradient_accumulation) does not change."""
    use_bf16 = bf16_available() if bf16 == "auto" else bool(bf16)
    split = split_batch(batch_size, gradient_accumulation, batch_field)
    if split.processes > 1:
        log.info(
            "batch: %d per device × %d processes × %d accumulation = %d rows per optimizer step (%s)",
            split.per_device,
            split.processes,
            split.accumulation,
            split.global_batch_size,
            distributed,
        )
    return cls(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=split.per_device,
        gradient_accumulation_steps=gradient_accumulation,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        warmup_steps=int(warmup_ratio * max_steps),
        lr_scheduler_type=lr_scheduler,
        max_grad_norm=max_grad_norm,
        logging_steps=log_every,
        save_steps=save_every,
        save_total_limit=save_total_limit,
        seed=seed,
        data_seed=seed,
        bf16=use_bf16,
        use_cpu=not torch.cuda.is_available(),
        report_to=report_to or [],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_backend="gloo" if split.processes > 1 and not torch.cuda.is_available() else None,
        **sharding_arguments(distributed, fsdp_layers),
        **extra,
    )


def sharding_arguments(distributed: str, fsdp_layers: list[str] | None = None) -> dict[str, Any]:
    """`ddp`: the Trainer's default under torchrun (each process holds the whole model). `fsdp`: parameters,
    gradients and optimizer state sharded across GPUs, one FSDP unit per `fsdp_layers` module (default: the
    model's `_no_split_modules`) — for encoders too large to replicate."""
    if distributed == "ddp":
        return {}
    if distributed != "fsdp":
        raise CmftError(f"training.distributed: {distributed!r}: use ddp or fsdp")
    if not torch.cuda.is_available():
        raise CmftError(
            "training.distributed: fsdp needs CUDA GPUs (cmft runs FSDP on nccl only; CPU runs use ddp over gloo); "
            "set training.distributed=ddp"
        )
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {"transformer_layer_cls_to_wrap": fsdp_layers} if fsdp_layers else {},
    }


class HistoryCallback(TrainerCallback):
    """Append one JSON object per logged step to history.jsonl (no text, only numbers)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step}
        for key, value in logs.items():
            if key in DROPPED_KEYS or not isinstance(value, (int, float)):
                continue
            record[HISTORY_KEYS.get(key, key)] = value
        if len(record) > 1:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


class RichProgressCallback(TrainerCallback):
    """A rich progress bar with loss, tokens/s and (when pretraining) the mask rate."""

    def __init__(self, description: str = "training"):
        self.description = description
        self.progress: Progress | None = None
        self.task = None
        self.console = Console(stderr=True)
        self.last_print = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            self.description, total=state.max_steps, status="", completed=state.global_step
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if self.progress is None or not logs or "loss" not in logs:
            return
        parts = [f"loss {logs['loss']:.4f}"]
        if "tokens_per_s" in logs:
            parts.append(f"{logs['tokens_per_s']:,.0f} tok/s")
        if "mask_rate" in logs:
            parts.append(f"mask {logs['mask_rate']:.3f}")
        status = "  ".join(parts)
        self.progress.update(self.task, status=status)
        if not self.console.is_terminal and time.monotonic() - self.last_print > 5:
            self.console.print(f"step {state.global_step}/{state.max_steps}  {status}")
            self.last_print = time.monotonic()

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def quiet_trainer(trainer) -> None:
    """Replace transformers' tqdm bar and dict printer with cmft's rich bar."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)


def trainer_parts(work: Path, checkpoints: Path, description: str, report_to: Any, **arguments: Any
                  ) -> tuple[TrainingArguments, list[TrainerCallback]]:  # fmt: skip
    """What every cmft trainer gets: its arguments (checkpoints in `checkpoints`, reporting to `report_to`'s trackers,
    cmft.tracking) and its callbacks (history.jsonl in `work`, the progress bar titled `description`, the trackers)."""
    reported, trackers = tracking(report_to, work)
    args = training_arguments(checkpoints, report_to=reported, **arguments)
    return args, [HistoryCallback(work / "history.jsonl"), RichProgressCallback(description), *trackers]


def ready(trainer: Any, divergence_factor: float | None) -> Any:
    """A built trainer made cmft's: the rich bar instead of transformers' printers, and the divergence guard."""
    quiet_trainer(trainer)
    trainer.setup_safety(divergence_factor)
    return trainer


def read_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_history(history: list[dict[str, Any]], path: Path, keys: tuple[str, ...] = ("loss",)) -> None:
    """One panel per key against the step (keys absent from the history are skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [k for k in keys if any(k in row for row in history)]
    if not present:
        return
    fig, axes = plt.subplots(len(present), 1, figsize=(7, 2.6 * len(present)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], present, strict=True):
        rows = [r for r in history if key in r]
        ax.plot([r["step"] for r in rows], [r[key] for r in rows])
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


class TrainingTask(Protocol):
    """What FinetuneTrainer asks of its task (cmft.tasks.base.Task)."""

    def loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]: ...

    def checkpoint_state(self) -> dict[str, Any]: ...

    def load_checkpoint_state(self, state: dict[str, Any]) -> None: ...


class FinetuneTrainer(SafeTrainerMixin, Trainer):
    """HF Trainer with the task's loss, a separate learning rate for the head, and tokens/s in the log."""

    def __init__(self, *args, task: TrainingTask, head_modules: list[str], head_learning_rate: float | None,
                 **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.task = task
        self.head_modules = set(head_modules)
        self.head_learning_rate = head_learning_rate
        self.real_tokens = 0
        self.window_start = time.monotonic()

    def cmft_state(self) -> dict[str, Any]:
        return {**super().cmft_state(), **self.task.checkpoint_state()}

    def load_cmft_state(self, state: dict[str, Any]) -> None:
        super().load_cmft_state(state)
        self.task.load_checkpoint_state(state)

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
        """The Trainer's own optimizer and weight-decay grouping (no decay on biases and norms), with the head's
        parameters in groups of their own at `head_learning_rate`."""
        if self.optimizer is None and self.head_learning_rate is not None:
            model = self.model if model is None else model
            decayed = set(self.get_decay_parameter_names(model))
            groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
            for name, parameter in model.named_parameters():
                if parameter.requires_grad:
                    in_head = bool(self.head_modules & set(name.split(".")))
                    groups.setdefault((in_head, name in decayed), []).append(parameter)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = optimizer_cls(
                [
                    {
                        "params": parameters,
                        "lr": self.head_learning_rate if in_head else self.args.learning_rate,
                        "weight_decay": self.args.weight_decay if decays else 0.0,
                    }
                    for (in_head, decays), parameters in sorted(groups.items(), key=lambda item: item[0])
                ],
                **optimizer_kwargs,
            )
        return super().create_optimizer(model)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["tokens_per_s"] = round(self.real_tokens / max(time.monotonic() - self.window_start, 1e-9), 1)
            self.real_tokens, self.window_start = 0, time.monotonic()
        super().log(logs, start_time)
