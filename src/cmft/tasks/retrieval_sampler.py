"""A batch sampler for in-batch-negative training: similar lengths per batch (little padding), no text twice."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from sentence_transformers.base.sampler import DefaultBatchSampler

POOL_BATCHES = 16
"""Rows are shuffled, cut into pools of 16 batches, and sorted by length inside each pool."""


class GroupedNoDuplicatesBatchSampler(DefaultBatchSampler):
    """Shuffled pools of rows sorted by length, filled into batches where no text (of any column) repeats.

    Padding is what a bi-encoder pays for on long dialogues: grouping by length cuts it several-fold, while the
    pools keep each batch's topics random. A row whose text already sits in the batch waits for the next batch,
    as in sentence-transformers' NoDuplicatesBatchSampler (a duplicate would be scored as its own negative).
    """

    def __init__(self, dataset, batch_size: int, drop_last: bool, valid_label_columns=None, generator=None,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last,
                         valid_label_columns=valid_label_columns, generator=generator, seed=seed)  # fmt: skip
        columns = [c for c in dataset.column_names if c not in (valid_label_columns or [])]
        self.row_texts = [tuple(str(dataset[c][i]) for c in columns) for i in range(len(dataset))]
        self.lengths = [max(len(t) for t in texts) for texts in self.row_texts]

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.row_texts), generator=generator).tolist()
        pool_size = self.batch_size * POOL_BATCHES
        batches: list[list[int]] = []
        carried: list[int] = []
        for start in range(0, len(order), pool_size):
            pool = carried + sorted(order[start : start + pool_size], key=lambda i: -self.lengths[i])
            filled, carried = self._fill(pool, math.ceil(len(pool) / self.batch_size))
            batches.extend(filled)
        for index in carried:  # rows whose text repeats too often in a pool: any batch with room, else a new one
            texts = self.row_texts[index]
            target = next((b for b in batches if len(b) < self.batch_size and not self._shares(b, texts)), None)
            if target is None:
                batches.append(target := [])
            target.append(index)
        batches = [b for b in batches if b and (len(b) == self.batch_size or not self.drop_last)]
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in order]

    def _shares(self, batch: list[int], texts: tuple[str, ...]) -> bool:
        return any(set(self.row_texts[i]).intersection(texts) for i in batch)

    def _fill(self, pool: list[int], n_batches: int) -> tuple[list[list[int]], list[int]]:
        """Rows (sorted by length) into `n_batches` batches: each to the nearest batch with room and no shared text."""
        batches: list[list[int]] = [[] for _ in range(n_batches)]
        seen: list[set[str]] = [set() for _ in range(n_batches)]
        carried = []
        for position, index in enumerate(pool):
            nominal = min(position // self.batch_size, n_batches - 1)
            nearest = sorted(range(n_batches), key=lambda b: (abs(b - nominal), b))
            target = next(
                (
                    b
                    for b in nearest
                    if len(batches[b]) < self.batch_size and not seen[b].intersection(self.row_texts[index])
                ),
                None,
            )
            if target is None:
                carried.append(index)
                continue
            batches[target].append(index)
            seen[target].update(self.row_texts[index])
        return batches, carried

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())
