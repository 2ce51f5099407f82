"""Evidence for predicted ICD codes: the spans of a note that each code's label-wise attention weighs most.

The weights. LabelAttentionHead gives each code l a softmax a_l over the note's token positions, and the code's
label state is Σ_t a_lt h_t. Method `attention` (the default) reports a_l. Method `attention_x_gradient` (PyTorch
only) reports a_lt · |x_t · ∂z_l/∂x_t|, renormalised over the note: attention times the gradient × input of the
code's logit z_l at token t's input embedding x_t, so a token needs both the code's attention and an embedding that
moves the code's logit.

From positions to characters. The note's tokens map back to the text through the tokenizer's offset mapping. Body
token i (the note without [CLS] and [SEP]) sits at position 1 + i (whole), or at c·S + 1 + i mod (S − 2) with
c = i // (S − 2) (chunked, S = chunk_size), as `encode_note` lays the note out and `IcdModule.states` flattens the
chunks; tokens cut by max_length or max_chunks have no position. [CLS], [SEP] and padding are not text and give no
evidence. Tokens that touch inside a run of letters and digits form one word (its weight: their sum); the
WORDS_PER_SPAN·k heaviest words are kept, neighbouring kept words join into spans, and a code's evidence is its k
heaviest spans: [{"start", "end", "weight"}], character offsets into the note (text[start:end]), heaviest first.

ONNX. `cmft export` traces `AttentionModule` for a label-attention head: the graph's second output,
`label_attention` [batch, codes, positions], holds a_l, so `cmft predict --onnx --evidence` gives the spans PyTorch
gives. The attention is computed for the probabilities anyway; a plain prediction does not fetch it. A head that
scores each note's zero-shot candidates only (cmft.heads.LabelAttentionHead.chooses) gives the attention of the codes
it scored, [batch, rows, positions], and a third output, `label_attention_codes` [batch, rows], each row's code index
(the other codes have none: no evidence), so that the graph never holds a [batch, codes, positions] array of zeros.

Memory. A batch's attention is [batch, codes, positions]; `EvidenceBackend` keeps, per note, only the rows of the
codes that `decode` will give (threshold and top_k of the request), so nothing larger outlives the forward pass.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from cmft.errors import CmftError
from cmft.tasks.icd_metrics import code_thresholds

METHODS = ("attention", "attention_x_gradient")
WORDS_PER_SPAN = 3
OUTPUT = "label_attention"
CODES = "label_attention_codes"  # with zero-shot candidates: the code index of each label_attention row
OUTPUT_MEANING = (
    "[batch, codes] probabilities (label-wise attention included); codes at or above the manifest's `threshold` are "
    f"predicted. With label attention a second output, `{OUTPUT}` [batch, codes, positions]: each code's attention "
    "over the note's tokens (what `cmft predict --evidence` reads); with zero-shot candidates, [batch, rows, "
    f"positions] for the codes scored in full, and a third output, `{CODES}` [batch, rows], their code indices"
)


def predicted_codes(probabilities: np.ndarray, meta: dict[str, Any]) -> list[int]:
    """Indices of the codes `decode` gives: at or above their threshold (the tuned one, or each code's own where
    tuned per code; a request's own threshold replaces them), most probable first, at most top_k."""
    own = meta["threshold"] == meta["icd"]["threshold"]
    thresholds = code_thresholds(meta["icd"]) if own else np.full(len(meta["labels"]), meta["threshold"])
    order = [int(j) for j in np.argsort(-probabilities, kind="stable") if probabilities[j] >= thresholds[j]]
    return order[: meta["top_k"]] if meta.get("top_k") else order


# the model ----------------------------------------------------------------------------------------------------
class AttentionModule(nn.Module):
    """An IcdModule's probabilities [B, L] and its label attention [B, L, T] (T: IcdModule.states' positions); when
    the head chooses zero-shot candidates, the attention [B, R, T] of the R codes scored in full and their indices."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, weights, codes = self.module.coder.head.attend_rows(*self.module.states(input_ids, attention_mask))
        return (torch.sigmoid(logits), weights) if codes is None else (torch.sigmoid(logits), weights, codes)


def exported_with_attention(cls: type, module: nn.Module, meta: dict[str, Any]) -> tuple[nn.Module, dict]:
    """IcdCodingTask.exported: a label-attention model's graph also outputs the attention (`label_attention`, and
    `label_attention_codes` when its head chooses zero-shot candidates)."""
    if meta["icd"]["head"] != "label_attention":
        return module, {cls.output: {0: "batch"}}
    outputs = {cls.output: {0: "batch"}, OUTPUT: {0: "batch", 2: "positions"}}
    return AttentionModule(module), outputs | ({CODES: {0: "batch"}} if module.coder.head.chooses else {})


def parity_view(cls: type, names: list[str], expected: list[np.ndarray], got: list[np.ndarray]
                ) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, int]]:  # fmt: skip
    """IcdCodingTask.parity_view: with zero-shot candidates, a code at the K-th place may be a candidate in PyTorch
    and not in onnxruntime (their candidate scores differ by float noise and nearly tie). Such swaps are counted
    (`candidate_swaps`) and the codes swapped are left out of the comparison (probabilities and attention rows);
    more than 1% of a batch's candidate slots (at least 1) are no near-tie: the outputs are then compared as they
    are, and parity fails."""
    if CODES not in names:
        return expected, got, {}
    probabilities, attention, codes = (names.index(name) for name in (cls.output, OUTPUT, CODES))
    want, have = expected[codes].astype(np.int64), got[codes].astype(np.int64)
    swapped = [np.setxor1d(want[row], have[row]) for row in range(len(want))]
    swaps = sum(len(differ) // 2 for differ in swapped)
    if swaps > max(1, want.size // 100) or not swaps:
        return expected, got, {"candidate_swaps": swaps}
    expected, got = [array.copy() for array in expected], [array.copy() for array in got]
    for row, differ in enumerate(swapped):
        if not len(differ):
            continue
        expected[probabilities][row, differ] = got[probabilities][row, differ] = 0.0
        both_want, both_have = np.isin(want[row], have[row]), np.isin(have[row], want[row])  # the same codes, in order
        for side, keep in ((expected, both_want), (got, both_have)):
            kept = side[attention][row][keep]
            side[attention][row] = 0.0
            side[attention][row][: len(kept)] = kept
            side[codes][row] = 0
            side[codes][row][: int(keep.sum())] = (want if side is expected else have)[row][keep]
    return expected, got, {"candidate_swaps": swaps}


def evidence_backend(cls: type, loaded: Any, backend: Any, method: str) -> EvidenceBackend:
    """IcdCodingTask.evidence_backend: the attention from the ONNX graph's second output or the PyTorch head."""
    head = loaded.meta["icd"]["head"]
    if head != "label_attention":
        raise CmftError(f"evidence: this ICD model's head is {head}, which has no label attention to take evidence "
                        "from; fine-tune with icd_coding.head=label_attention")  # fmt: skip
    if method not in METHODS:
        raise CmftError(f"evidence method {method!r}: choose one of {', '.join(METHODS)}")
    if not getattr(loaded.tokenizer, "is_fast", False):
        raise CmftError("evidence: the tokenizer gives no character offsets (no tokenizer.json); save a fast one")
    if backend.name == "onnx":
        if method != "attention":
            raise CmftError(f"evidence method {method}: PyTorch only; drop --onnx")
        if OUTPUT not in backend.output_names:
            raise CmftError(f"evidence: this export has no {OUTPUT} output (made before evidence existed); "
                            "export the run again")  # fmt: skip
        return EvidenceBackend(backend, loaded.meta, backend.outputs)
    from cmft.backends import TorchBackend

    attention = TorchBackend(AttentionModule(backend.module), backend.dtype)
    gradient = partial(attention_x_gradient, attention, loaded.meta)
    return EvidenceBackend(backend, loaded.meta, attention.outputs if method == "attention" else gradient)


class EvidenceBackend:
    """Rows of (probabilities [L], {code index: weight per position}) for the codes `decode` gives under `meta`; a
    code without an attention row (a zero-shot code outside the note's candidates) weighs 0 everywhere."""

    def __init__(self, backend: Any, meta: dict[str, Any], compute: Any):
        self.name, self.provider = backend.name, backend.provider
        self.meta, self.compute = meta, compute

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> list[tuple[np.ndarray, dict]]:
        probabilities, weights, *codes = self.compute(input_ids, attention_mask)  # codes: CODES, when there is one
        rows = []
        for row, row_probabilities in enumerate(probabilities):
            end = int(np.flatnonzero(attention_mask[row].reshape(-1)).max()) + 1  # the note's last position
            place = {int(code): r for r, code in enumerate(codes[0][row])} if codes else None
            kept = {}
            for j in predicted_codes(row_probabilities, self.meta):
                r = j if place is None else place.get(j)
                kept[j] = np.zeros(end, np.float32) if r is None else np.asarray(weights[row, r, :end], np.float32)
            rows.append((row_probabilities, kept))
        return rows


def attention_x_gradient(backend: Any, meta: dict[str, Any], input_ids: np.ndarray, attention_mask: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Probabilities [B, L] and, for the codes `decode` gives, a_lt · |x_t · ∂z_l/∂x_t| normalised over the
    positions (other codes: 0). One backward pass per code: the notes of a batch do not interact."""
    module, coder = backend.module, backend.module.module.coder
    device = next(module.parameters()).device
    captured: list[torch.Tensor] = []

    def keep(_layer: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        captured.append(output.detach().requires_grad_(True))  # the input embeddings x, a leaf to differentiate by
        return captured[-1]

    half = torch.autocast(device.type, dtype=backend.dtype) if backend.dtype != torch.float32 else nullcontext()
    handle = coder.encoder.get_input_embeddings().register_forward_hook(keep)
    try:
        with torch.enable_grad(), half:
            ids, mask = torch.from_numpy(input_ids).to(device), torch.from_numpy(attention_mask).to(device)
            logits, attention = coder.head.attend(*module.module.states(ids, mask))
    finally:
        handle.remove()
    embeddings, batch = captured[0], input_ids.shape[0]
    probabilities = torch.sigmoid(logits).detach().float().cpu().numpy()
    chosen = [predicted_codes(row, meta) for row in probabilities]
    weights = torch.zeros_like(attention, dtype=torch.float32).detach()
    for code in sorted({j for codes in chosen for j in codes}):
        rows = [row for row, codes in enumerate(chosen) if code in codes]
        (gradient,) = torch.autograd.grad(logits[rows, code].sum(), embeddings, retain_graph=True)
        saliency = (gradient.float() * embeddings.detach().float()).sum(-1).abs().reshape(batch, -1)
        product = attention[rows, code].detach().float() * saliency[rows]
        weights[rows, code] = product / product.sum(-1, keepdim=True).clamp_min(1e-12)
    return probabilities, weights.cpu().numpy()


# the note ---------------------------------------------------------------------------------------------------------
def note_offsets(tokenizer: Any, text: str, meta: dict[str, Any]) -> list[tuple[int, int]] | None:
    """(start, end) of each body token of the note (as encode_note tokenizes it) when evidence is asked for."""
    if "evidence" not in meta:
        return None
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [(int(start), int(end)) for start, end in encoded["offset_mapping"]]


def body_positions(count: int, settings: dict[str, Any]) -> np.ndarray:
    """The flat model position of each of `count` body tokens, -1 where max_length or max_chunks cut it."""
    index = np.arange(count)
    if settings["mode"] != "chunked":
        return np.where(index < settings["max_length"] - 2, index + 1, -1)
    size = settings["chunk_size"]
    chunk = index // (size - 2)
    return np.where(chunk < settings["max_chunks"], chunk * size + 1 + index % (size - 2), -1)


def note_words(text: str, offsets: list[tuple[int, int]], settings: dict[str, Any]) -> list[tuple[int, int, list]]:
    """The note's words: (start, end, the model positions of their tokens). Tokens join a word when they overlap it
    or touch it inside a run of letters and digits; whitespace at a token's edges is not part of it."""
    words: list[tuple[int, int, list]] = []
    for (start, end), position in zip(offsets, body_positions(len(offsets), settings).tolist(), strict=True):
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if start >= end:
            continue
        positions = [position] if position >= 0 else []
        if words and (start < words[-1][1] or (start == words[-1][1] and text[start - 1].isalnum()
                                               and text[start].isalnum())):  # fmt: skip
            first, last, held = words[-1]
            words[-1] = (first, max(last, end), held + positions)
        else:
            words.append((start, end, positions))
    return words


def spans_with_positions(weights: np.ndarray, words: list[tuple[int, int, list]], k: int
                         ) -> list[tuple[int, int, float, list]]:  # fmt: skip
    """A code's k heaviest spans of neighbouring heavy words: (start, end, weight, model positions), heaviest first."""
    weight = np.array([float(weights[positions].sum()) if positions else 0.0 for _, _, positions in words])
    heavy = sorted(j for j in np.argsort(-weight, kind="stable")[: WORDS_PER_SPAN * k].tolist() if weight[j] > 0)
    spans: list[list] = []  # [first word, last word, weight, positions]
    for j in heavy:
        if spans and spans[-1][1] == j - 1:
            spans[-1][1], spans[-1][2] = j, spans[-1][2] + weight[j]
            spans[-1][3] = spans[-1][3] + words[j][2]
        else:
            spans.append([j, j, weight[j], list(words[j][2])])
    spans.sort(key=lambda span: -span[2])
    return [(words[first][0], words[last][1], float(total), positions) for first, last, total, positions in spans[:k]]


def with_evidence(codes: list[dict], weights: dict[int, np.ndarray], text: str, unit: Any, meta: dict[str, Any]
                  ) -> list[dict]:  # fmt: skip
    """`codes` (decode's entries) each with its evidence spans; `weights`: EvidenceBackend's rows of these codes."""
    words = note_words(text, unit.offsets, meta["icd"])
    by_code = {meta["labels"][j]: row for j, row in weights.items()}
    for code in codes:
        found = spans_with_positions(by_code[code["code"]], words, meta["evidence"]["k"])
        code["evidence"] = [{"start": start, "end": end, "weight": round(weight, 6)} for start, end, weight, _ in found]
    return codes
