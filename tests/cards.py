"""Checks of a model card (cmft.cards) shared by the tests that make run and export folders."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

SECTIONS = ("Model description", "Intended use", "Out-of-scope use", "Training data", "Training procedure",
            "Evaluation", "Limitations and bias", "How to load it", "Privacy")  # fmt: skip


def check_card(folder: Path, metrics_file: Path) -> dict[str, dict[str, Any]]:
    """The card in `folder` parses offline with huggingface_hub, carries the run's real metrics in model-index and
    every section, and each of its Python blocks runs from inside the folder. Returns each block's namespace, by
    its heading (the library), for the caller's own checks."""
    from huggingface_hub import ModelCard

    from cmft.cards import quality_metrics

    card = ModelCard.load(folder / "README.md")  # a local file: no network
    metrics = json.loads(metrics_file.read_text())
    data = card.data
    assert data.language == ["en"] and data.license and data.library_name and data.pipeline_tag
    assert "cmft" in data.tags
    expected = quality_metrics(metrics)
    assert expected, "no metric to report"
    got = {result.metric_type: result.metric_value for result in data.eval_results}
    assert got == expected
    assert {result.dataset_split for result in data.eval_results} == {metrics["split"]}
    headings = re.findall(r"^## (.+)$", card.text, flags=re.M)
    assert [h for h in headings if h != "Export"] == list(SECTIONS)
    assert "Unsupervised clinical decisions" in card.text
    assert "hold no note text" in card.text
    return run_blocks(folder, card.text)


def run_blocks(folder: Path, text: str) -> dict[str, dict[str, Any]]:
    """Run each ```python block under a `### library` heading in one shared namespace, from inside `folder`."""
    blocks = re.findall(r"^### (.+?)\n\n```python\n(.*?)\n```", text, flags=re.M | re.S)
    assert blocks, "no Python lines in the card"
    namespaces, shared = {}, {}
    before = Path.cwd()
    os.chdir(folder)
    try:
        for library, code in blocks:
            exec(compile(code, f"{folder.name}/README.md:{library}", "exec"), shared)  # noqa: S102
            namespaces[library] = dict(shared)
    finally:
        os.chdir(before)
    return namespaces
