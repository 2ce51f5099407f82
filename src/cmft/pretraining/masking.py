"""Masked-language-model masking: a per-step rate schedule and medical-word emphasis.

Design of the emphasis (no public implementation exists):
- A row's maskable tokens are grouped into units: each medical word or code is one unit (whole-word masking;
  `whole_word: all` groups every word), every other token is a unit of its own.
- Units are drawn without replacement with probability proportional to a weight — `medical_weight` for
  medical units, 1 otherwise (Efraimidis–Spirakis keys u^(1/w)) — until the scheduled share of the row's
  tokens is masked. So the overall rate is exactly the scheduled one (to within one word), and only the
  *choice* of what to mask moves toward medical words.
- Chosen tokens get the BERT 80/10/10 treatment: [MASK], a random token, or unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


def scheduled_rate(step: int, total_steps: int, start: float, end: float, schedule: str = "linear") -> float:
    """Mask rate at optimizer step `step` (0-based): `start` at the first step, exactly `end` at the last."""
    progress = 1.0 if total_steps <= 1 else min(max(step / (total_steps - 1), 0.0), 1.0)
    if schedule == "cosine":
        progress = 0.5 * (1 - math.cos(math.pi * progress))
    return start + (end - start) * progress


@dataclass
class MaskingStats:
    """Counts that show the emphasis achieved: medical share among masked tokens vs among all tokens."""

    tokens: int = 0
    medical_tokens: int = 0
    masked: int = 0
    masked_medical: int = 0

    def add(self, other: MaskingStats) -> None:
        self.tokens += other.tokens
        self.medical_tokens += other.medical_tokens
        self.masked += other.masked
        self.masked_medical += other.masked_medical

    @property
    def rate(self) -> float:
        return self.masked / max(self.tokens, 1)

    @property
    def medical_share_of_tokens(self) -> float:
        return self.medical_tokens / max(self.tokens, 1)

    @property
    def medical_share_of_masked(self) -> float:
        return self.masked_medical / max(self.masked, 1)


@dataclass
class Masker:
    mask_token_id: int
    vocab_size: int
    special_ids: list[int]
    medical_weight: float = 2.0
    mask_token_fraction: float = 0.8
    random_token_fraction: float = 0.1
    _replacement_ids: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        allowed = torch.ones(self.vocab_size, dtype=torch.bool)
        allowed[[i for i in self.special_ids if 0 <= i < self.vocab_size]] = False
        self._replacement_ids = torch.nonzero(allowed).flatten()

    def _choose(self, unit: torch.Tensor, medical: torch.Tensor, rate: float, weight: float, generator) -> torch.Tensor:
        """Boolean mask of the tokens of one row to predict."""
        chosen = torch.zeros_like(medical)
        valid = unit >= 0
        n_tokens = int(valid.sum())
        if n_tokens == 0:
            return chosen
        units, inverse, sizes = torch.unique(unit[valid], return_inverse=True, return_counts=True)
        is_medical = torch.zeros(len(units), dtype=torch.bool).index_put_((inverse,), medical[valid], accumulate=True)
        weights = torch.where(is_medical, torch.tensor(weight), torch.tensor(1.0))
        keys = torch.rand(len(units), generator=generator).clamp_min(1e-12).log() / weights
        order = torch.argsort(keys, descending=True)
        target = math.floor(rate * n_tokens + torch.rand(1, generator=generator).item())
        before = torch.cumsum(sizes[order], 0) - sizes[order]
        picked_units = torch.zeros(len(units), dtype=torch.bool)
        picked_units[order[before < target]] = True
        chosen[valid] = picked_units[inverse]
        return chosen

    def __call__(
        self,
        batch: dict[str, torch.Tensor],
        rate: float,
        generator: torch.Generator | Sequence[torch.Generator],
        weight: float | None = None,
    ) -> tuple[dict[str, torch.Tensor], MaskingStats]:
        """Return the batch with masked `input_ids` and `labels` (-100 where not predicted), and its stats.

        One generator for the batch, or one per row: a row's own generator draws only over the row's maskable
        tokens, so its mask does not depend on the padding or on the other rows of its micro-batch."""
        weight = self.medical_weight if weight is None else weight
        unit, medical, input_ids = batch["unit"].cpu(), batch["medical"].cpu(), batch["input_ids"].cpu()
        valid = unit >= 0
        if isinstance(generator, torch.Generator):
            chosen = torch.stack([self._choose(unit[r], medical[r], rate, weight, generator) for r in range(len(unit))])
            roll = torch.rand(input_ids.shape, generator=generator)
            replacement = torch.randint(len(self._replacement_ids), input_ids.shape, generator=generator)
        else:
            if len(generator) != len(unit):
                raise ValueError(f"{len(generator)} generators for {len(unit)} rows")
            chosen = torch.zeros_like(valid)
            roll = torch.ones(input_ids.shape)  # 1.0: neither [MASK] nor a random token
            replacement = torch.zeros(input_ids.shape, dtype=torch.long)
            for r, row_generator in enumerate(generator):
                chosen[r] = self._choose(unit[r], medical[r], rate, weight, row_generator)
                n = int(valid[r].sum())
                roll[r, valid[r]] = torch.rand(n, generator=row_generator)
                replacement[r, valid[r]] = torch.randint(len(self._replacement_ids), (n,), generator=row_generator)
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
        to_mask = chosen & (roll < self.mask_token_fraction)
        to_random = chosen & ~to_mask & (roll < self.mask_token_fraction + self.random_token_fraction)
        random_ids = self._replacement_ids[replacement]
        masked_ids = torch.where(to_mask, torch.full_like(input_ids, self.mask_token_id), input_ids)
        masked_ids = torch.where(to_random, random_ids, masked_ids)
        stats = MaskingStats(
            tokens=int(valid.sum()),
            medical_tokens=int((medical & valid).sum()),
            masked=int(chosen.sum()),
            masked_medical=int((chosen & medical).sum()),
        )
        device = batch["input_ids"].device
        return {**batch, "input_ids": masked_ids.to(device), "labels": labels.to(device)}, stats
