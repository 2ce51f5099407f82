"""What every results file records beside its figures: the command, the commit, the date and the machine (CPU model,
its vector extensions, cores) with the library versions. Speed-ups depend on the CPU, so a figure without these
facts cannot be compared with another machine's."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# /proc/cpuinfo flag → the name the results use; the ones that decide onnxruntime's and torch's int8/fp32 kernels
VECTOR_FLAGS = {"avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI",
                "avx_vnni": "AVX-VNNI", "avx512_bf16": "AVX-512 BF16", "amx_tile": "AMX", "amx_int8": "AMX-INT8",
                "asimd": "NEON", "sve": "SVE"}  # fmt: skip
LIBRARIES = ("torch", "transformers", "onnxruntime", "peft", "sentence-transformers")


def cpu() -> dict:
    """CPU model and vector extensions (Linux /proc/cpuinfo; the platform's words elsewhere)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags |= set(value.split())
    except OSError:
        pass
    return {"cpu_model": model, "vector_extensions": [name for flag, name in VECTOR_FLAGS.items() if flag in flags],
            "cores": os.cpu_count()}  # fmt: skip


def commit() -> str:
    """The checkout's commit, marked `+changes` when the working tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict:
    found = {}
    for name in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return {"python": platform.python_version(), **found}


def shown(path: str | Path) -> str:
    """A path as the results record names it, never absolute: relative to the checkout, or from its `runs/` on."""
    path = Path(path).resolve()
    if path.is_relative_to(ROOT):
        return str(path.relative_to(ROOT))
    parts = path.parts
    return str(Path(*parts[parts.index("runs") :])) if "runs" in parts else path.name


def relative_argument(argument: str) -> str:
    """A command-line argument with any absolute path in it (`PATH`, `--key=PATH`) as `shown` names it."""
    key, equals, value = argument.rpartition("=") if argument.startswith("--") else ("", "", argument)
    return key + equals + shown(value) if Path(value).is_absolute() else argument


def provenance(argv: list[str] | None = None) -> dict:
    """The facts a results record starts with."""
    argv = sys.argv if argv is None else argv
    command = shlex.join(["python", *(relative_argument(argument) for argument in argv)])
    return {"command": command, "commit": commit(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "machine": {**cpu(), "platform": platform.platform(terse=True)}, "versions": versions()}  # fmt: skip


def write_results(path: str | Path, record: dict) -> Path:
    """Write one results record (provenance first) as a JSON file, replacing an earlier one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path
