"""Encoders: attention backend choice, loading from a local folder or a hub id with clear errors."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from cmft.errors import CmftError


def flash_attention_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_attention(choice: str) -> str:
    """`auto` → flash_attention_2 when flash-attn and CUDA are present, else sdpa."""
    if choice == "auto":
        return "flash_attention_2" if flash_attention_available() else "sdpa"
    if choice == "flash_attention_2" and not flash_attention_available():
        raise CmftError("model.attention: flash_attention_2 needs a CUDA GPU and `pip install .[flash]`; use auto")
    return choice


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
