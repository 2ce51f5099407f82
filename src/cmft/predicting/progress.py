"""Rank 0's progress over its share of the rows: a rich bar with rows/s and the time left on a terminal (rows/s alone
while the total is unknown), or, in a batch job's log, a plain line every minute."""

from __future__ import annotations

import sys
import time
from typing import Any

LOG_EVERY_S = 60.0


class RowProgress:
    def __init__(self, total: int | None, show: bool = True):
        from rich.console import Console

        self.total, self.done = total, 0.0
        self.started = self.logged = time.perf_counter()
        console = Console(stderr=True)
        self.bar: Any = None
        self.log = show and not console.is_terminal
        if show and console.is_terminal:
            self.bar = _bar(console)
            self.task = self.bar.add_task("predict", total=total)
            self.bar.start()

    def update(self, done: float) -> None:
        """`done` rows of this process's share so far (fractions while a buffer is under way)."""
        self.done = done
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
        elif self.log and time.perf_counter() - self.logged >= LOG_EVERY_S:
            self.logged = time.perf_counter()
            rate = done / max(self.logged - self.started, 1e-9)
            share = f"{int(done):,}" + (f"/{self.total:,}" if self.total else "")
            left = f", about {(self.total - done) / rate / 60:.0f} min left" if self.total and rate > 0 else ""
            sys.stderr.write(f"predict progress: {share} rows, {rate:,.1f} rows/s{left}\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _bar(console: Any) -> Any:
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class RowsColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            done = f"{int(task.completed):,}" + (f"/{int(task.total):,}" if task.total is not None else "")
            return Text(f"{done} rows, {task.speed or 0:,.1f} rows/s")

    return Progress(TextColumn("[bold]predict"), BarColumn(), RowsColumn(), TimeRemainingColumn(), console=console,
                    transient=True)  # fmt: skip
