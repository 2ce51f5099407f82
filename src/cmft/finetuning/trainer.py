"""The HF Trainer that fine-tunes the token and sequence tasks (NER, ICD coding, note classification)."""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from cmft.checkpointing import SafeTrainerMixin


def token_count(input_ids: list) -> int:
    """Tokens in one input row: a list of ids, or (chunked ICD notes) a list of chunks."""
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
