"""The fine-tuning optimizer: the Trainer's own weight-decay grouping (no decay on biases and norms), with the new
head at its own learning rate."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import TrainingArguments

from cmft.training import FinetuneTrainer


class Tagger(nn.Module):
    """An encoder layer (linear + LayerNorm) under a linear head, as the tasks' models are shaped."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict({"dense": nn.Linear(8, 8), "norm": nn.LayerNorm(8)})
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder["norm"](self.encoder["dense"](x)))


def _groups(tmp_path, head_learning_rate: float | None) -> dict[str, tuple[float, float]]:
    """Parameter name → (learning rate, weight decay) of its optimizer group."""
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, weight_decay=0.01, report_to=[],
                             use_cpu=True)  # fmt: skip
    model = Tagger()
    trainer = FinetuneTrainer(model=model, args=args, task=None, head_modules=["head"],
                              head_learning_rate=head_learning_rate)  # fmt: skip
    optimizer = trainer.create_optimizer()
    where = {id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}
    return {name: where[id(parameter)] for name, parameter in model.named_parameters()}


@pytest.mark.parametrize("head_learning_rate", [2e-3, None])
def test_no_weight_decay_on_biases_and_norms_and_the_head_at_its_rate(tmp_path, head_learning_rate):
    groups = _groups(tmp_path, head_learning_rate)
    head = head_learning_rate or 1e-4
    assert groups == {
        "encoder.dense.weight": (1e-4, 0.01),
        "encoder.dense.bias": (1e-4, 0.0),
        "encoder.norm.weight": (1e-4, 0.0),
        "encoder.norm.bias": (1e-4, 0.0),
        "head.weight": (head, 0.01),
        "head.bias": (head, 0.0),
    }
