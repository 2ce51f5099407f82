"""LoRA with peft: default target modules per architecture; the task head is trained fully and saved."""

from __future__ import annotations

from torch import nn

from cmft.errors import CmftError
from cmft.finetuning.config import TuningConfig

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
