"""Tokenized documents, first-fit-decreasing packing, and the attention inputs that keep documents apart."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from cmft.attention import IMPLEMENTATION, segment_masks
from cmft.pretraining.lexicon import Lexicon


@dataclass
class Document:
    """One tokenized document (or a max_length piece of a long one).

    `unit` groups the tokens that are masked together (a medical word, or a word under whole-word masking);
    special tokens have unit -1 and are never masked. `medical` flags tokens inside lexicon words or codes.
    """

    ids: np.ndarray
    unit: np.ndarray
    medical: np.ndarray


def _units(offsets: np.ndarray, word_ids: np.ndarray, spans: list[tuple[int, int]], whole_word: str):
    """Masking units and medical flags for the tokens of one document (specials excluded by the caller)."""
    # probe each token by its last character: byte-level BPE offsets include the space before a word
    probe = np.maximum(offsets[:, 1] - 1, offsets[:, 0])
    if spans:
        span_start = np.array([s for s, _ in spans])
        span_end = np.array([e for _, e in spans])
        index = np.searchsorted(span_start, probe, side="right") - 1
        medical = (index >= 0) & (probe < span_end[np.clip(index, 0, None)])
    else:
        index = np.full(len(probe), -1)
        medical = np.zeros(len(probe), dtype=bool)
    span_of = np.where(medical, index, -1)
    if whole_word == "none":
        return np.arange(len(probe), dtype=np.int32), medical
    same_span = medical[1:] & (span_of[1:] == span_of[:-1])
    new_unit = np.ones(len(probe), dtype=bool)
    if whole_word == "all":
        new_unit[1:] = ~(same_span | (word_ids[1:] == word_ids[:-1]))
    else:
        new_unit[1:] = ~same_span
    return (np.cumsum(new_unit) - 1).astype(np.int32), medical


def tokenize_documents(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerFast,
    lexicon: Lexicon,
    max_length: int,
    whole_word: str = "medical",
    batch_size: int = 1000,
) -> list[Document]:
    """Tokenize without truncation; documents longer than `max_length` are cut into pieces, none dropped."""
    body = max_length - 2
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    documents: list[Document] = []
    for first in range(0, len(texts), batch_size):
        batch = list(texts[first : first + batch_size])
        encoded = tokenizer(batch, add_special_tokens=False, return_offsets_mapping=True)
        for position, text in enumerate(batch):
            ids = np.asarray(encoded["input_ids"][position], dtype=np.int32)
            if len(ids) == 0:
                continue
            offsets = np.asarray(encoded["offset_mapping"][position], dtype=np.int64).reshape(-1, 2)
            word_ids = (
                np.asarray([-1 if w is None else w for w in encoded.word_ids(position)])
                if whole_word == "all"
                else np.empty(0)
            )
            unit, medical = _units(offsets, word_ids, lexicon.spans(text), whole_word)
            for start in range(0, len(ids), body):
                piece = slice(start, start + body)
                piece_unit = unit[piece] - unit[piece][0]
                documents.append(
                    Document(
                        ids=np.concatenate([[cls_id], ids[piece], [sep_id]]).astype(np.int32),
                        unit=np.concatenate([[-1], piece_unit, [-1]]).astype(np.int32),
                        medical=np.concatenate([[False], medical[piece], [False]]),
                    )
                )
    return documents


def pack_first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group items into bins of at most `capacity` tokens, longest first, each into the first bin it fits.

    A max segment tree over the bins' free space finds the first fitting bin in O(log n)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    free = [0] * (2 * size)
    for leaf in range(size):
        free[size + leaf] = capacity
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    bins: list[list[int]] = []
    for item in order:
        need = lengths[item]
        if need > capacity:
            raise ValueError(f"item of length {need} exceeds capacity {capacity}")
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        leaf = node - size
        if leaf == len(bins):
            bins.append([])
        bins[leaf].append(item)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


class PackedRow(list):
    """The documents of one packed row (a list), and the row's index in its dataset."""

    def __init__(self, documents: list[Document], index: int):
        super().__init__(documents)
        self.dataset_index = index


class PackedDataset(torch.utils.data.Dataset):
    """Each item is one packed row: a list of documents that share a sequence without seeing each other."""

    def __init__(self, documents: list[Document], max_length: int):
        self.documents = documents
        self.rows = pack_first_fit_decreasing([len(d.ids) for d in documents], max_length)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> PackedRow:
        return PackedRow([self.documents[i] for i in self.rows[index]], index)

    def fill_ratio(self, max_length: int) -> float:
        return sum(len(d.ids) for d in self.documents) / (len(self.rows) * max_length)


def collate_packed(rows: list[list[Document]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad packed rows to the longest; per-token document index (-1 on padding) and per-document positions;
    `row`: each row's dataset index (-1 when not known), which seeds its masking."""
    length = max(sum(len(d.ids) for d in row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    document = torch.full(shape, -1, dtype=torch.long)
    position = torch.zeros(shape, dtype=torch.long)
    unit = torch.full(shape, -1, dtype=torch.long)
    medical = torch.zeros(shape, dtype=torch.bool)
    for r, row in enumerate(rows):
        cursor, unit_offset = 0, 0
        for d, doc in enumerate(row):
            span = slice(cursor, cursor + len(doc.ids))
            input_ids[r, span] = torch.from_numpy(doc.ids.astype(np.int64))
            document[r, span] = d
            position[r, span] = torch.arange(len(doc.ids))
            doc_unit = torch.from_numpy(doc.unit.astype(np.int64))
            unit[r, span] = torch.where(doc_unit >= 0, doc_unit + unit_offset, -1)
            medical[r, span] = torch.from_numpy(doc.medical)
            unit_offset += int(doc.unit.max()) + 1
            cursor += len(doc.ids)
    return {
        "input_ids": input_ids,
        "document": document,
        "position_ids": position,
        "unit": unit,
        "medical": medical,
        "row": torch.tensor([getattr(row, "dataset_index", -1) for row in rows], dtype=torch.long),
    }


def document_attention(document: torch.Tensor, position: torch.Tensor, local_attention: int) -> dict[str, torch.Tensor]:
    """ModernBERT's per-layer-type masks for sdpa/eager: attend only within the same document (and, for
    sliding layers, within local_attention/2 positions). Padding attends to itself so no row is empty."""
    same = (document[:, :, None] == document[:, None, :]) & (document[:, :, None] >= 0)
    same |= torch.eye(document.shape[1], dtype=torch.bool, device=document.device)
    near = (position[:, :, None] - position[:, None, :]).abs() <= local_attention // 2
    return {"full_attention": same[:, None], "sliding_attention": (same & near)[:, None]}


def flash_attention_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | int]:
    """Flatten a packed batch to one unpadded sequence with cu_seq_lens (flash-attention's varlen path)."""
    real = batch["document"] >= 0
    starts = (batch["position_ids"] == 0)[real]
    boundaries = torch.nonzero(starts).flatten()
    lengths = torch.diff(torch.cat([boundaries, boundaries.new_tensor([len(starts)])]))
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    flat = {key: value[real][None] for key, value in batch.items() if key in ("input_ids", "position_ids", "labels")}
    max_len = int(lengths.max())
    return {
        **flat,
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max_len,
        "max_length_k": max_len,
    }


def model_inputs(batch: dict[str, torch.Tensor], attention: str, local_attention: int) -> dict:
    """What ModernBERT's forward takes for a packed batch under the given attention backend."""
    if attention == "flash_attention_2":
        return flash_attention_inputs(batch)
    inputs = {key: batch[key] for key in ("input_ids", "position_ids", "labels") if key in batch}
    if attention == IMPLEMENTATION:  # banded: the document index per token, no [L × L] masks
        inputs["attention_mask"] = segment_masks(batch["document"])
    else:
        inputs["attention_mask"] = document_attention(batch["document"], batch["position_ids"], local_attention)
    return inputs
