"""HF Trainer with masking applied per optimizer step, so the mask rate follows the step exactly."""

from __future__ import annotations

import hashlib
import time

import torch
from transformers import Trainer

from cmft.checkpointing import SafeTrainerMixin
from cmft.pretraining.masking import Masker, MaskingStats, scheduled_rate
from cmft.pretraining.packing import model_inputs


def row_generator(seed: int, step: int, row: int) -> torch.Generator:
    """The masking generator of one packed row at one optimizer step (a hash, so no two triples collide)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{row}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


class MaskedLMTrainer(SafeTrainerMixin, Trainer):
    """Masks each micro-batch when the Trainer gathers the batches of one optimizer step.

    Doing it here (not in the collator, which the data loader runs one batch ahead) ties the rate to the
    step being taken. Each row's generator is seeded by (seed, step, the row's dataset index): masking is
    identical after `--resume`, and the same rows get the same masks whatever the number of processes (under
    torchrun each process masks its own shard, differently from the others) or the micro-batch split."""

    def __init__(self, *args, masker: Masker, rates: tuple[float, float, str], attention: str, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.masker = masker
        self.rates = rates
        self.attention = attention
        self.masking_seed = seed
        self.current_rate = rates[0]
        self.window = MaskingStats()
        self.totals = MaskingStats()
        self.real_tokens = 0
        self.window_start = time.monotonic()

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        step = self.state.global_step
        start, end, schedule = self.rates
        self.current_rate = scheduled_rate(step, self.state.max_steps, start, end, schedule)
        local_attention = self.model.config.local_attention
        prepared = []
        for batch in batches:
            generators = [row_generator(self.masking_seed, step, int(row)) for row in batch["row"]]
            masked, stats = self.masker(batch, self.current_rate, generators)
            self.window.add(stats)
            self.totals.add(stats)
            self.real_tokens += int((batch["document"] >= 0).sum())
            prepared.append(model_inputs(masked, self.attention, local_attention))
        return prepared, self._get_num_items_in_batch(prepared, device)

    def _sum_over_processes(self) -> None:
        """Under torchrun each process counted its own shard: log the totals of all of them (all processes log)."""
        if self.args.world_size <= 1:
            return
        w = self.window
        counts = torch.tensor([self.real_tokens, w.tokens, w.medical_tokens, w.masked, w.masked_medical])
        counts = self.accelerator.reduce(counts.to(self.args.device), reduction="sum").tolist()
        self.real_tokens = int(counts[0])
        self.window = MaskingStats(*(int(c) for c in counts[1:]))

    def cmft_state(self) -> dict:
        return super().cmft_state() | {"mask_rate": self.current_rate, "masking_seed": self.masking_seed}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            elapsed = max(time.monotonic() - self.window_start, 1e-9)
            self._sum_over_processes()
            logs["tokens_per_s"] = round(self.real_tokens / elapsed, 1)
            logs["mask_rate"] = round(self.current_rate, 5)
            logs["masked_share"] = round(self.window.rate, 5)
            logs["medical_share_of_tokens"] = round(self.window.medical_share_of_tokens, 5)
            logs["medical_share_of_masked"] = round(self.window.medical_share_of_masked, 5)
            self.window = MaskingStats()
            self.real_tokens = 0
            self.window_start = time.monotonic()
        super().log(logs, start_time)
