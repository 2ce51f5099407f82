"""A span model chained after a span-giving one: `cmft predict NER_RUN --assertion RUN` and `cmft serve NER_RUN
--assertion RUN` give each NER entity the assertion status of its span (`assertion`, the label, and
`assertion_score`, that label's probability), as the assertion model alone predicts that (text, start, end) row.

The first model must give spans (`Task.gives_spans`: NER), the second must read one (`Task.reads_spans`:
assertion). After a batch of texts has its spans, all of them go through the second model together: each becomes the
record `{"text", "start", "end"}` the second task reads (`Task.input_text`: the text with its span marked), is
encoded, run in length-sorted batches and decoded. `cmft predict` runs them with `cmft.inference.predict_texts`,
`cmft serve` through a batcher of its own (`marked`, then `attach`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmft.backends import Unit, per_text
from cmft.errors import CmftError
from cmft.inference import Backend, Loaded, open_source, predict_texts

FIELDS = ("assertion", "assertion_score")  # what the chain adds to each span


@dataclass
class Chain:
    """The second model of a chain (an assertion model) and how `cmft predict` batches it."""

    loaded: Loaded
    backend: Backend
    source: Path
    batch_size: int = 16

    @property
    def markers(self) -> list[str]:
        """Strings that the second model reads as its own span marks: a text holding one gets no status."""
        return list(self.loaded.meta.get("assertion", {}).get("markers", []))

    def marked(self, first: Loaded, texts: list[str], predictions: list[dict[str, Any]]
               ) -> tuple[list[dict[str, Any]], list[str]]:  # fmt: skip
        """Every span of `predictions` (the first model's, one per text) and its text as the second model reads it.
        The spans of a text that already holds a marker string get `None` for both fields (a second mark would be
        ambiguous), and are left out."""
        spans, inputs = [], []
        for number, (text, prediction) in enumerate(zip(texts, predictions, strict=True)):
            found = first.task.spans(prediction)
            if any(marker in text for marker in self.markers):
                for span in found:
                    span.update(dict.fromkeys(FIELDS))
                continue
            for span in found:
                record = {"text": text, "start": span["start"], "end": span["end"]}
                inputs.append(self.loaded.task.input_text(self.loaded.meta, record, "text", f"text {number + 1}"))
                spans.append(span)
        return spans, inputs

    @property
    def info(self) -> dict[str, Any]:
        """What `cmft serve`'s /info says of the chained model."""
        return {"task": self.loaded.task.name, "source": self.source.name, "labels": self.loaded.meta["labels"],
                "max_length": self.loaded.meta["max_length"], "backend": self.backend.name}  # fmt: skip

    def encode(self, inputs: list[str]) -> list[Unit]:
        """The model rows of `marked`'s texts, one per span (for a batcher of the chained model)."""
        return self.loaded.task.encode(self.loaded.tokenizer, inputs, self.loaded.meta)[0]

    def decode(self, inputs: list[str], units: list[Unit], outputs: list[Any]) -> list[dict[str, Any]]:
        """The chained model's prediction of each of `inputs` from the outputs of its `encode` rows."""
        grouped = per_text(units, outputs, len(inputs))
        return [self.loaded.task.decode(self.loaded.meta, text, rows, row_units)
                for text, (rows, row_units) in zip(inputs, grouped, strict=True)]  # fmt: skip

    @staticmethod
    def attach(spans: list[dict[str, Any]], statuses: list[dict[str, Any]]) -> None:
        """The second model's label and its probability onto each span (in place)."""
        for span, status in zip(spans, statuses, strict=True):
            span["assertion"], span["assertion_score"] = status["label"], status["score"]

    def add(self, first: Loaded, texts: list[str], predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`predictions` with the status of each of their spans (in place, and returned)."""
        spans, inputs = self.marked(first, texts, predictions)
        if inputs:
            statuses, _ = predict_texts(self.loaded, self.backend, inputs, self.batch_size)
            self.attach(spans, statuses)
        return predictions


def check_first(loaded: Loaded, source: str | Path) -> None:
    if not loaded.task.gives_spans:
        raise CmftError(f"--assertion: {source} is a {loaded.task.name} model; chaining needs a model that finds spans "
                        f"(NER) as SOURCE")  # fmt: skip


def open_chain(first: Loaded, first_source: str | Path, source: str | Path, onnx: bool, int8: bool = False,
               threads: int | None = None, device_id: int | None = None, batch_size: int = 16) -> Chain:  # fmt: skip
    """The assertion model of `--assertion RUN` after `first` (the SOURCE model), opened as SOURCE is (torch, or
    with `onnx` its export); a one-line error when either model cannot take its place in the chain."""
    check_first(first, first_source)
    loaded, backend = open_source(source, onnx, int8, threads, device_id)
    if not loaded.task.reads_spans:
        raise CmftError(f"--assertion: {source} is a {loaded.task.name} model; pass an assertion run (or export)")
    return Chain(loaded, backend, Path(source), batch_size)
