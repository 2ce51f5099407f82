"""ICD notes, whole ([B, T]) or in chunks ([B, C, chunk_size]): their token ids (`encode_note`), one padding for
training and inference, and the encoding of chunked notes (`encode_chunks` in training, `IcdModule` in inference)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from cmft.backends import Unit, pad_rows


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


def pad_notes(units: list[Unit], pad_id: int, settings: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Padded to the longest note (whole: [B, T]) or to the most chunks ([B, C, chunk_size])."""
    chunked = settings["mode"] == "chunked"
    return pad_chunks(units, pad_id, settings["chunk_size"]) if chunked else pad_rows(units, pad_id)


def collate_notes(features: list[dict], pad_id: int, settings: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Training batches, padded as inference pads them (`pad_notes`)."""
    units = [Unit(row, feature["input_ids"]) for row, feature in enumerate(features)]
    ids, mask = pad_notes(units, pad_id, settings)
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


def encode_note(tokenizer, text: str, settings: dict[str, Any]) -> tuple[Any, bool]:
    """Token ids for one note and whether it was cut: whole → [CLS] … [SEP] up to max_length; chunked →
    a list of chunks of chunk_size, each [CLS] … [SEP], at most max_chunks."""
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if settings["mode"] == "whole":
        room = settings["max_length"] - 2
        return [cls_id, *body[:room], sep_id], len(body) > room
    room = settings["chunk_size"] - 2
    pieces = [body[i : i + room] for i in range(0, max(len(body), 1), room)]
    return [[cls_id, *p, sep_id] for p in pieces[: settings["max_chunks"]]], len(pieces) > settings["max_chunks"]


class IcdModule(nn.Module):
    """Probabilities of every code, with the exported signature. Chunked input [B, C, S] encodes every chunk (no
    data-dependent skipping, so it traces); the label attention masks the padding chunks."""

    def __init__(self, coder: nn.Module):
        super().__init__()
        self.coder = coder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.coder.head(*self.states(input_ids, attention_mask)))

    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states [B, T, H] and mask [B, T]; chunked: T = C × S, chunk c's position s at c × S + s."""
        if input_ids.dim() == 2:
            states = self.coder.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return states, attention_mask
        batch, chunks, size = input_ids.shape
        flat_mask = attention_mask.reshape(-1, size)
        states = self.coder.encoder(input_ids=input_ids.reshape(-1, size), attention_mask=flat_mask)
        states = states.last_hidden_state
        states = torch.where(flat_mask[..., None].bool(), states, torch.zeros_like(states))
        return states.reshape(batch, chunks * size, -1), attention_mask.reshape(batch, chunks * size)
