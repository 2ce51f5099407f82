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


def encode_chunks(
    encoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states and mask. Chunked input [B, C, S] is encoded chunk by chunk (PLM-ICD) and concatenated.

    Chunks that are all padding are skipped. A note's last chunk is usually part-filled: the full chunks are
    encoded in one call and the part-filled ones in another, cut to the longest of them, so the encoder does not
    run over the padding (chunks are right-padded; padding positions keep zero states, which the head masks)."""
    if input_ids.dim() == 2:
        return encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state, attention_mask
    batch, chunks, size = input_ids.shape
    flat_ids, flat_mask = input_ids.reshape(-1, size), attention_mask.reshape(-1, size)
    rows = flat_mask.any(-1).nonzero().squeeze(-1)
    lengths = flat_mask[rows].sum(-1)
    states: torch.Tensor | None = None
    for group in (rows[lengths == size], rows[lengths < size]):
        if len(group) == 0:
            continue
        width = int(flat_mask[group].sum(-1).max())
        ids, mask = flat_ids[group, :width], flat_mask[group, :width]
        encoded = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        if states is None:
            states = encoded.new_zeros((batch * chunks, size, encoded.shape[-1]))
        states[group, :width] = encoded
    assert states is not None  # every note has a chunk: encode_note always gives [CLS] … [SEP]
    return states.reshape(batch, chunks * size, -1), attention_mask.reshape(batch, chunks * size)
