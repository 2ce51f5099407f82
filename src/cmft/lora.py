"""LoRA with peft: default target modules per architecture; the task head is trained fully and saved."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from cmft.errors import CmftError
from cmft.recipe import TuningConfig

# peft has no defaults for ModernBERT; BERT-style names cover BERT, RoBERTa, MiniLM, PubMedBERT.
DEFAULT_TARGETS = {
    "modernbert": ["Wqkv", "Wo", "Wi"],
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "xlm-roberta": ["query", "key", "value", "dense"],
    "electra": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
}


def target_modules(model_type: str, tuning: TuningConfig) -> list[str]:
    if tuning.target_modules:
        return tuning.target_modules
    if model_type not in DEFAULT_TARGETS:
        raise CmftError(f"tuning.target_modules: no default for a {model_type} encoder; list its linear layers")
    return DEFAULT_TARGETS[model_type]


def wrap_lora(model: nn.Module, model_type: str, tuning: TuningConfig, head_modules: list[str]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=tuning.r,
        lora_alpha=tuning.alpha,
        lora_dropout=tuning.dropout,
        target_modules=target_modules(model_type, tuning),
        modules_to_save=sorted(set(head_modules) | set(tuning.modules_to_save or [])),
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise CmftError(f"tuning: LoRA could not wrap the encoder ({exc})") from None


def refresh_adapter(adapter: Path, model: nn.Module) -> None:
    """Rewrite the fully trained modules (the head) saved in `adapter` from the merged `model`, so that what a task
    changes after training (ICD coding: zero-shot codes appended to the head) reaches the adapter too."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = adapter / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    state = model.state_dict()
    for key in tensors:
        name = key.removeprefix("base_model.model.")
        if name in state:  # a LoRA matrix (lora_A, lora_B) has no counterpart in the merged model
            tensors[key] = state[name].detach().contiguous().cpu()
    save_file(tensors, str(path), metadata=metadata)
