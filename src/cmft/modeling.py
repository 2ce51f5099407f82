"""Encoders: attention backend choice, loading from a local folder or a hub id with clear errors."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import torch

from cmft.errors import CmftError

GEOMETRY = ("hidden_size", "num_hidden_layers", "intermediate_size")
"""The config keys that size an encoder (the model card; `learning_rate: auto` compares them)."""


class Attention(NamedTuple):
    choice: str
    """The recipe value as resolved (never `auto`): what recipe.yaml records."""
    implementation: str
    """What transformers' `attn_implementation` gets."""
    reason: str


def flash_attention_available() -> bool:
    """flash-attn installed and a CUDA GPU it supports (Ampere, compute capability 8.0, or newer)."""
    return (torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
            and torch.cuda.get_device_capability()[0] >= 8)  # fmt: skip


def choose_attention(choice: str, model_type: str | None, training: bool, field: str = "model.attention") -> Attention:
    """The attention backend, by a fixed rule (docs/long-notes.md has the measurements behind it):
    1. flash-attention 2 when flash-attn is installed on an Ampere-or-newer CUDA GPU and the encoder is ModernBERT
       (unpadded varlen kernels, local windows skipped);
    2. otherwise cmft's banded attention for ModernBERT, on CPU and on any GPU (T4, V100 included), training or
       inference: exact, and from 1,024 tokens on the fastest path measured on CPU (1.92× sdpa's forward at 8,192
       tokens, 1.76× with the backward pass, less memory); up to 256 tokens it is one masked sdpa call, as sdpa;
    3. otherwise (BERT-style encoders, no local layers) torch's sdpa.
    flex_attention is never chosen: on CPU it compiles per new length (12-25 s cold) and has no backward."""
    modernbert = model_type == "modernbert"
    if choice == "auto":
        if modernbert and flash_attention_available():
            return Attention("flash_attention_2", "flash_attention_2", "flash-attn on an Ampere-or-newer GPU")
        if not modernbert:
            return Attention("sdpa", "sdpa", f"{model_type or 'this encoder'} has no local-attention layers")
        where = "GPU without flash-attention 2" if torch.cuda.is_available() else "CPU"
        choice, reason = "banded", f"ModernBERT on {where}: local layers attend within their window only (exact)"
    else:
        reason = "set in the recipe"
    if choice == "flash_attention_2" and not flash_attention_available():
        raise CmftError(f"{field}: flash_attention_2 needs flash-attn (`pip install cmft[flash]`) on an "
                        "Ampere-or-newer CUDA GPU; use auto")  # fmt: skip
    if choice == "banded":
        if not modernbert:
            raise CmftError(f"{field}: banded is for ModernBERT encoders (local-attention layers); this encoder is "
                            f"{model_type}: use auto or sdpa")  # fmt: skip
        from cmft.attention import register

        return Attention("banded", register(), reason)
    if choice == "flex_attention" and training and not torch.cuda.is_available():
        raise CmftError(f"{field}: flex_attention has no backward pass on CPU (torch {torch.__version__}); use banded")
    return Attention(choice, choice, reason)


class Inference(NamedTuple):
    implementation: str
    """What transformers' `attn_implementation` gets."""
    dtype: torch.dtype
    """What the forward pass computes in (cmft.inference.TorchBackend autocasts to it; weights stay fp32)."""
    reason: str


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def inference_dtype(implementation: str | None) -> torch.dtype:
    """flash-attention 2 has no fp32 kernels: it runs in bf16 (fp16 on a GPU without bf16); every other
    implementation in fp32 (exact, as trained weights are kept)."""
    if implementation != "flash_attention_2":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16


def choose_inference(model_type: str | None, parity: bool = False) -> Inference:
    """The (attention, dtype) pair that `cmft predict`, `cmft evaluate`, `cmft serve` and the export's parity
    reference load a saved model with, by choose_attention's rule for the machine they run on:
    flash-attention 2 in bf16 (fp16 where bf16 is unsupported) with flash-attn on an Ampere-or-newer GPU and a
    ModernBERT encoder; otherwise fp32 with banded attention (ModernBERT) or sdpa (other encoders): on CPU, a T4 or
    V100, or without flash-attn. `parity` (the export's check against its traced fp32 graph, which never traces
    flash-attention): always fp32 with banded or sdpa, on any device."""
    attention = choose_attention("auto", model_type, training=False)
    if attention.implementation == "flash_attention_2" and parity:
        from cmft.attention import register

        attention = Attention("banded", register(), "export parity check: fp32 against the traced fp32 graph")
    dtype = inference_dtype(attention.implementation)
    return Inference(attention.implementation, dtype, f"{attention.reason}; {DTYPE_NAMES[dtype]}")


def model_type_of(source: str, trust_remote_code: bool = False) -> str | None:
    """The `model_type` of a model folder or hub id (config.json only)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code).model_type
    except (OSError, ValueError):
        return None


def bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def check_model_source(name: str, field: str = "model.init_from") -> str:
    """A local folder must hold a model; anything else is taken as a hub id (which needs a network)."""
    path = Path(name)
    looks_local = path.is_absolute() or name.startswith((".", "~")) or path.exists() or name.count("/") > 1
    if looks_local:
        if not path.expanduser().is_dir():
            raise CmftError(f"{field}: {name}: folder not found")
        if not (path.expanduser() / "config.json").is_file():
            raise CmftError(f"{field}: {name}: no config.json there; point at a model folder (e.g. a run's model/)")
        check_model_folder(path.expanduser(), field)
        return str(path.expanduser())
    if not _in_local_cache(name) and not hub_reachable():
        raise CmftError(
            f"{field}: {name!r} is not a local folder and the Hugging Face hub cannot be reached from here; "
            "offline, point at a local model folder such as runs/pretrain/latest/model"
        )
    return name


def _in_local_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an invalid repo id, or no cache
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the hub endpoint, instead of huggingface_hub's minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_error(name: str, field: str, exc: Exception) -> CmftError:
    """Offline machines cannot reach the hub: say so in one line instead of a long traceback."""
    return CmftError(
        f"{field}: {name!r} is not a local folder and could not be loaded from the Hugging Face hub "
        f"({type(exc).__name__}); offline, point at a local model folder such as runs/pretrain/latest/model"
    )


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt")


def check_weights(folder: Path, field: str) -> None:
    """Weights load only from safetensors: a folder with only pickle weights is refused (unpickling runs code),
    and a truncated or corrupt .safetensors file is named instead of failing deep inside the loader."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files and not (folder / "model.safetensors.index.json").is_file():
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES and p.name not in NOT_WEIGHTS)
        if pickles:
            raise CmftError(
                f"{field}: {folder}: only pickle weights ({pickles[0]}), which cmft refuses to load (unpickling can "
                "run code); save the model with safetensors (save_pretrained(..., safe_serialization=True))"
            )
        return
    for path in files:
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception as exc:  # SafetensorError for a truncated or corrupt file
            reason = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
            raise CmftError(
                f"{field}: {path}: corrupt safetensors file ({reason}); copy or save the model again"
            ) from None


def tokenizer_size(folder: Path) -> int | None:
    """The number of token ids of a folder's tokenizer.json (vocabulary and added tokens), None if unknown."""
    path = folder / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ids = [token.get("id", -1) for token in data.get("added_tokens") or [] if isinstance(token, dict)]
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        ids.extend(v for v in vocab.values() if isinstance(v, int))
    elif isinstance(vocab, list):  # unigram: [[piece, score], ...]
        ids.append(len(vocab) - 1)
    ids = [i for i in ids if isinstance(i, int)]
    return max(ids) + 1 if ids else None


def check_vocab_fits(folder: Path, field: str) -> None:
    """A tokenizer with more ids than the model's embedding table gives index errors mid-run: refuse it now."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CmftError(f"{field}: {folder / 'config.json'}: not a readable JSON model config") from None
    size = config.get("vocab_size") if isinstance(config, dict) else None
    tokens = tokenizer_size(folder)
    if isinstance(size, int) and tokens is not None and tokens > size:
        raise CmftError(
            f"{field}: {folder}: the tokenizer has {tokens} token ids but the model's embedding table only {size}; "
            "the tokenizer and model do not match (use the tokenizer saved with this model)"
        )


def check_model_folder(folder: Path, field: str) -> None:
    """Safetensors weights that open, and a tokenizer that fits the model: checked in milliseconds, before loading."""
    check_weights(folder, field)
    check_vocab_fits(folder, field)
