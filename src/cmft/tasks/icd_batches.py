"""Batches of ICD notes, whole ([B, T]) or in chunks ([B, C, chunk_size]): one padding for training and inference."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cmft.tasks.base import Unit, pad_rows


def pad_chunks(units: list[Unit], pad_id: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, C, size] int64 input_ids and attention_mask: every note's chunks, right-padded, to the most chunks."""
    chunks = max(len(u.input_ids) for u in units)
    ids = np.full((len(units), chunks, size), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, unit in enumerate(units):
        for c, chunk in enumerate(unit.input_ids):
            ids[row, c, : len(chunk)] = chunk
            mask[row, c, : len(chunk)] = 1
    return ids, mask


def collate_notes(features: list[dict], pad_id: int, settings: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Pad to the longest note (whole: [B, T]) or to the most chunks ([B, C, chunk_size]), as inference does."""
    units = [Unit(row, feature["input_ids"]) for row, feature in enumerate(features)]
    chunked = settings["mode"] == "chunked"
    ids, mask = pad_chunks(units, pad_id, settings["chunk_size"]) if chunked else pad_rows(units, pad_id)
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if "labels" in features[0]:
        batch["labels"] = torch.tensor(np.stack([f["labels"] for f in features]), dtype=torch.float32)
    return batch
