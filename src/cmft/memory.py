"""Training memory: free memory, the activations a micro-batch keeps, and gradient checkpointing on or off."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from cmft import distributed
from cmft.errors import CmftError

log = logging.getLogger("cmft")

KEPT_PER_TOKEN_AND_LAYER = (14, 6, 256)
"""Floats autograd keeps per token and layer: 14 × hidden + 6 × intermediate + 256. Measured with saved-tensor hooks
on ModernBERT (intermediate 1.5 × hidden): banded 16.5 × hidden at hidden 768 and 17.8 at 64, sdpa 17.4-18.2 at 768
(tests check the estimate stays above what is kept and within 2× of it)."""


def available_memory() -> int:
    """Free memory where training runs, in bytes: the GPU's when CUDA is there, else this machine's (psutil)."""
    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)


def memory_share() -> int:
    """This process's share of the free memory: torchrun's processes on one machine train side by side."""
    share = available_memory()
    return share if torch.cuda.is_available() else share // distributed.local_world_size()


def activation_bytes(config: Any, rows: int, length: int, implementation: str, checkpointing: bool) -> int:
    """What autograd keeps for one micro-batch of `rows` × `length` tokens (fp32). Checkpointing keeps each layer's
    input and recomputes one layer at a time. sdpa adds its two [length × length] masks, eager its score matrices
    in every layer; the banded and flash paths keep O(length) per layer."""
    layers, hidden = config.num_hidden_layers, config.hidden_size
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    per_hidden, per_intermediate, per_token = KEPT_PER_TOKEN_AND_LAYER
    per_layer = per_hidden * hidden + per_intermediate * intermediate + per_token
    tokens = rows * length
    floats = (layers * hidden + per_layer) * tokens if checkpointing else layers * per_layer * tokens
    quadratic = 0  # bytes
    if implementation == "sdpa":
        quadratic = 2 * rows * length * length  # its two bool masks, one per layer type, shared by the layers
    elif implementation == "eager":
        quadratic = (1 if checkpointing else layers) * 8 * rows * config.num_attention_heads * length * length
    return 4 * floats + quadratic


def choose_checkpointing(setting: bool | str, config: Any, shapes: list[tuple[int, int]], implementation: str
                         ) -> tuple[bool, str]:  # fmt: skip
    """(on or off, why). `true`/`false` as set; `auto`: on when the activations of the largest micro-batch (`shapes`:
    rows × tokens per forward pass, at full length) would take more than half of the free memory — the other half
    holds weights, gradients, optimizer state and the allocator's slack."""
    if setting != "auto":
        return bool(setting), "set in the recipe"
    need, (rows, length) = max((activation_bytes(config, r, n, implementation, False), (r, n)) for r, n in shapes)
    free = memory_share()
    chosen = need > free // 2
    why = (f"auto: activations of a {rows} × {length} micro-batch ≈ {need / 2**30:.2f} GiB, "
           f"{'more' if chosen else 'less'} than half of the {free / 2**30:.1f} GiB free")  # fmt: skip
    log.info("training.gradient_checkpointing: %s (%s)", "on" if chosen else "off", why)
    return chosen, why


def enable_checkpointing(model: nn.Module) -> int:
    """Recompute each transformer layer in the backward pass (non-reentrant: works with LoRA's frozen inputs, with
    packing's mask dicts and with torch.compile). Reaches the transformers model inside cmft's task modules, peft
    wrappers and sentence-transformers; returns how many models were switched (0: nothing supports it)."""
    from transformers import PreTrainedModel

    switched = 0
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            switched += 1
    return switched


def set_checkpointing(setting: bool | str, model: nn.Module, config: Any, shapes: list[tuple[int, int]],
                      implementation: str) -> tuple[bool, str]:  # fmt: skip
    """Resolve `training.gradient_checkpointing` (choose_checkpointing) for `model` and switch it on when chosen;
    (on or off, why). The one toggle of pretraining and fine-tuning."""
    chosen, why = choose_checkpointing(setting, config, shapes, implementation)
    if chosen:
        checkpointing_on(model, config)
    return chosen, why


def checkpointing_on(model: nn.Module, config: Any) -> None:
    """enable_checkpointing, or a CmftError when the encoder (`config`) supports none."""
    if not enable_checkpointing(model):
        raise CmftError(f"training.gradient_checkpointing: this encoder ({config.model_type}) does not support it; "
                        "set it to false")  # fmt: skip
