"""ICD code descriptions (icd_coding.descriptions): the one reader, each label's description, and the label queries
descriptions give (init_from_descriptions before training; zero-shot codes after it, cmft.tasks.icd_zero_shot)."""

from __future__ import annotations

import gzip
import re
import zlib
from contextlib import nullcontext
from typing import Any

import torch

from cmft.errors import CmftError
from cmft.paths import resolve_path
from cmft.tasks.icd_labels import normalize_code

CODE = re.compile(r"^(?=.*[0-9])[A-Za-z0-9.]+$")  # ICD-9-CM, ICD-10-CM and -PCS codes: letters, digits, a dot


def read_descriptions(given: str) -> dict[str, str]:
    """Code → description from a `code<TAB>description` file (icd_coding.descriptions; gzip when named .gz; blank
    lines skipped; a header row is told by a first column that is no code: `code`, `icd9_code`), codes normalised as
    the data's; the first row of a code wins. A bad file is a CmftError naming it and the problem."""
    path, where = resolve_path(given), f"icd_coding.descriptions: {given}"
    if not path.is_file():
        raise CmftError(f"{where}: {'a folder, not a file' if path.is_dir() else 'file not found'}")
    descriptions: dict[str, str] = {}
    opener: Any = gzip.open if path.name.endswith(".gz") else open
    rows = 0
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                fields = [field.strip() for field in line.rstrip("\r\n").split("\t")]
                if len(fields) != 2 or not all(fields):
                    found = f"{len(fields)} tab-separated columns" if len(fields) != 2 else "an empty column"
                    raise CmftError(f"{where}: line {number}: {found}; expected code<TAB>description")
                rows += 1
                if rows > 1 or CODE.match(fields[0]):  # a first row whose code is no code is the header
                    descriptions.setdefault(normalize_code(fields[0]), fields[1])
    except UnicodeDecodeError:
        raise CmftError(f"{where}: not a UTF-8 text file") from None
    except (OSError, EOFError, zlib.error) as exc:
        reason = "not a readable gzip file" if path.name.endswith(".gz") else f"cannot read ({exc})"
        raise CmftError(f"{where}: {reason}") from None
    if not descriptions:
        raise CmftError(f"{where}: no code<TAB>description rows")
    return descriptions


def label_descriptions(descriptions: dict[str, str], labels: list[str]) -> dict[str, str]:
    """The description of each label that has one: its own row, or for a 3-character category without a row, its
    first code's. Labels with neither are left out (and counted in metrics.json: n_labels_without_description)."""
    first: dict[str, str] = {}
    for code, text in descriptions.items():
        first.setdefault(normalize_code(code, "category"), text)
    found = {}
    for label in labels:
        text = descriptions.get(label)
        if text is None and normalize_code(label, "category") == label:
            text = first.get(label)
        if text is not None:
            found[label] = text
    return found


def undescribed(descriptions: dict[str, str], labels: list[str]) -> int:
    """How many labels have no description (label_descriptions leaves them out)."""
    return len(labels) - len(label_descriptions(descriptions, labels))


def description_queries(coder: Any, tokenizer: Any, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """The label query each description gives, tanh(W · mean-pooled encoding), [texts, attention_dim] in fp32 on the
    coder's device: its encoder in eval mode, without gradients, in its attention's dtype (autocast under
    flash-attention)."""
    from cmft.backends import attention_of
    from cmft.heads import mean_pool
    from cmft.modeling import inference_dtype

    device, dtype = next(coder.parameters()).device, inference_dtype(attention_of(coder))
    half = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    training, rows = coder.training, []
    coder.eval()
    with torch.no_grad(), half:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=64,
                              return_tensors="pt").to(device)  # fmt: skip
            states = coder.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            pooled = mean_pool(states.last_hidden_state, batch["attention_mask"])
            rows.append(torch.tanh(coder.head.project(pooled)).float())
    coder.train(training)
    return torch.cat(rows)


def scaled(queries: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Each query rescaled to `norm`, the label queries' own scale (their attention's sharpness)."""
    return queries * (norm / queries.norm(dim=1).clamp_min(1e-6))[:, None]


def init_queries_from_descriptions(coder: Any, tokenizer, labels: list[str], descriptions: dict[str, str]) -> None:
    """Label query u_l ← the query its description gives (description_queries), at the initial queries' mean norm,
    for each label with a description."""
    known = label_descriptions(descriptions, labels)
    rows = [i for i, code in enumerate(labels) if code in known]
    if not rows:
        return
    queries = description_queries(coder, tokenizer, [known[labels[i]] for i in rows])
    weight = coder.head.label_queries.weight
    with torch.no_grad():
        weight[rows] = scaled(queries, weight.norm(dim=1).mean()).to(weight.dtype)
