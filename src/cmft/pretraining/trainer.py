"""HF Trainer with masking applied per optimizer step, so the mask rate follows the step exactly."""

from __future__ import annotations

import time

import torch
from transformers import Trainer

from cmft.checkpointing import SafeTrainerMixin
from cmft.pretraining.masking import Masker, MaskingStats, scheduled_rate
from cmft.pretraining.packing import model_inputs


class MaskedLMTrainer(SafeTrainerMixin, Trainer):
    """Masks each micro-batch when the Trainer gathers the batches of one optimizer step.

    Doing it here (not in the collator, which the data loader runs one batch ahead) ties the rate to the
    step being taken, and seeding each micro-batch's generator by (seed, step, index) makes masking
    identical after `--resume`."""

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
        for index, batch in enumerate(batches):
            generator = torch.Generator().manual_seed(self.masking_seed * 1_000_003 + step * 1009 + index)
            masked, stats = self.masker(batch, self.current_rate, generator)
            self.window.add(stats)
            self.totals.add(stats)
            self.real_tokens += int((batch["document"] >= 0).sum())
            prepared.append(model_inputs(masked, self.attention, local_attention))
        return prepared, self._get_num_items_in_batch(prepared, device)

    def cmft_state(self) -> dict:
        return super().cmft_state() | {"mask_rate": self.current_rate, "masking_seed": self.masking_seed}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            elapsed = max(time.monotonic() - self.window_start, 1e-9)
            logs["tokens_per_s"] = round(self.real_tokens / elapsed, 1)
            logs["mask_rate"] = round(self.current_rate, 5)
            logs["masked_share"] = round(self.window.rate, 5)
            logs["medical_share_of_tokens"] = round(self.window.medical_share_of_tokens, 5)
            logs["medical_share_of_masked"] = round(self.window.medical_share_of_masked, 5)
            self.window = MaskingStats()
            self.real_tokens = 0
            self.window_start = time.monotonic()
        super().log(logs, start_time)
