"""Config loading shared by every command: YAML → pydantic, `key.sub=value` overrides, clear errors."""

from __future__ import annotations

import contextlib
import difflib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from cmft.errors import CmftError

AttentionChoice = Literal["auto", "banded", "sdpa", "eager", "flash_attention_2", "flex_attention"]
"""`model.attention` values (cmft.modeling.choose_attention resolves `auto`)."""
Tracker = Literal["tensorboard", "mlflow", "wandb"]
"""Experiment trackers `training.report_to` may name (cmft.tracking)."""

ConfigT = TypeVar("ConfigT", bound="StrictModel")


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class TrainingBase(StrictModel):
    """The `training` keys pretraining and fine-tuning share, with the same meaning and default; each stage's
    `TrainingConfig` adds its own (epochs, rates, batch size, …)."""

    max_steps: PositiveInt | None = None
    """Optimizer steps; null trains for `epochs` passes."""
    gradient_accumulation: PositiveInt = 1
    max_length: PositiveInt = 512
    weight_decay: float = Field(0.01, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = "linear"
    log_every: PositiveInt = 10
    save_total_limit: PositiveInt = 2
    divergence_factor: PositiveFloat | None = 10.0
    """Stop when the smoothed loss exceeds this many times its lowest (NaN/inf always stops); null: off."""
    gradient_checkpointing: Literal["auto", True, False] = "auto"
    """Recompute each layer in the backward pass: far less activation memory for about a sixth more time. `auto`:
    on when a micro-batch's activations at max_length would take more than half the free memory."""
    report_to: Literal["none"] | Tracker | list[Tracker] = "none"
    """Experiment tracking through the Trainer's integrations; tensorboard writes into the run folder's tensorboard/."""
    bf16: Literal["auto", True, False] = "auto"
    threads: PositiveInt | None = None
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: ddp replicates the model on each process; fsdp shards it (CUDA GPUs only). batch_size
    stays the global micro-batch, divided across the processes."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a", "b", "c"], value); the value is read as a YAML scalar."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise CmftError(f"override {item!r}: expected key.sub=value (e.g. training.max_steps=20)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string; users mean a number
        with contextlib.suppress(ValueError):
            value = float(value) if any(c in value for c in ".eE") else int(value)
    return [part for part in key.strip().split(".")], value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key.sub=value` override applied (creating sections as needed)."""
    result = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        path, value = parse_override(item)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return result


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with `yaml.safe_load`; every failure is a one-line CmftError."""
    path = Path(path)
    if not path.is_file():
        raise CmftError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CmftError(f"{path}: not a UTF-8 text file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise CmftError(f"{path}: malformed YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CmftError(f"{path}: expected a mapping of config sections at the top level")
    return data


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names that the model accepts at the parent of `loc` (for did-you-mean)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        for arg in list(candidates):
            candidates.extend(getattr(arg, "__args__", ()))
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def format_validation_error(source: str, model: type[BaseModel], exc: ValidationError) -> str:
    """One line naming the file and the first failing field, with a suggestion for typos."""
    error = exc.errors()[0]
    loc = tuple(error["loc"])
    field = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        known = _fields_at(model, loc)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
        if not close and known:
            hint = f"; known keys here: {', '.join(known)}"
        return f"{source}: unknown key {field!r}{hint}"
    if error["type"] == "missing":
        return f"{source}: missing required key {field!r}"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{source}: {field}: {message}" if loc else f"{source}: {message}"


def build_config(model: type[ConfigT], data: dict[str, Any], source: str) -> ConfigT:
    """Validate a mapping into `model`, turning pydantic errors into a one-line CmftError."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise CmftError(format_validation_error(source, model, exc)) from None


def load_config(model: type[ConfigT], path: str | Path, overrides: list[str] | None = None) -> ConfigT:
    """Load a YAML config file, apply `key=value` overrides and validate it."""
    data = apply_overrides(read_yaml(path), overrides or [])
    return build_config(model, data, str(path))


def dump_config(config: BaseModel, path: str | Path, notes: dict[str, str] | None = None) -> None:
    """Write the fully resolved config (after overrides) as YAML; `notes` ({"model.attention": why}) become comments
    at the end of those keys' lines (what `auto` chose, and why)."""
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    Path(path).write_text(_annotate(text, notes) if notes else text, encoding="utf-8")


def _annotate(text: str, notes: dict[str, str]) -> str:
    lines, keys = [], []  # keys: (indent, name) of the mappings above the current line
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        indent = len(line) - len(stripped)
        name, colon, value = stripped.partition(":")
        if colon and not stripped.startswith(("-", "#")):
            keys = [(i, k) for i, k in keys if i < indent] + [(indent, name)]
            note = notes.get(".".join(k for _, k in keys))
            if note and value.strip():
                line += "  # " + " ".join(note.split())
        lines.append(line)
    return "\n".join(lines) + "\n"
