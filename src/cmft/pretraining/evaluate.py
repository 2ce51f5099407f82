"""Top-k masked-token accuracy on the held-out slice, at a fixed rate and seed, split medical / other."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from cmft.pretraining.masking import Masker
from cmft.pretraining.packing import PackedDataset, collate_packed, model_inputs

TOP_K = (1, 5, 10, 25)


@torch.no_grad()
def masked_token_accuracy(
    model: PreTrainedModel,
    dataset: PackedDataset,
    masker: Masker,
    pad_id: int,
    attention: str,
    rate: float = 0.15,
    seed: int = 1234,
    batch_size: int = 16,
) -> dict[str, float]:
    """mlm_top{1,5,10,25}, mlm_top1_medical, mlm_top1_other and eval_loss.

    Masking here is uniform (weight 1, token level) so that models trained with and without medical
    emphasis are scored on the same positions."""
    model.eval()
    device = next(model.parameters()).device
    local_attention = model.config.local_attention
    generator = torch.Generator().manual_seed(seed)
    hits = {k: 0 for k in TOP_K}
    medical_hits = other_hits = medical_total = total = 0
    loss_sum = 0.0
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collate_packed(rows, pad_id)
        # token-level units so the choice ignores word boundaries and medical weight
        batch["unit"] = torch.where(batch["unit"] >= 0, torch.arange(batch["unit"].numel()).view_as(batch["unit"]), -1)
        batch, _ = masker(batch, rate, generator, weight=1.0)
        selected = batch["labels"] != -100
        if not selected.any():
            continue
        batch = {k: v.to(device) for k, v in batch.items()}
        selected = selected.to(device)
        inputs = model_inputs(batch, attention, local_attention)
        logits = model(**inputs).logits
        flat_labels = inputs["labels"]
        if logits.dim() == 3:  # a model without sparse prediction returns every position
            logits = logits[flat_labels != -100]
        targets = flat_labels[flat_labels != -100]
        loss_sum += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        top = logits.topk(max(TOP_K), dim=-1).indices
        found = top == targets[:, None]
        for k in TOP_K:
            hits[k] += int(found[:, :k].any(-1).sum())
        medical = batch["medical"][selected]  # row-major, as the logits
        medical_hits += int(found[:, 0][medical].sum())
        other_hits += int(found[:, 0][~medical].sum())
        medical_total += int(medical.sum())
        total += int(selected.sum())
    metrics = {f"mlm_top{k}": hits[k] / max(total, 1) for k in TOP_K}
    metrics["mlm_top1_medical"] = medical_hits / max(medical_total, 1)
    metrics["mlm_top1_other"] = other_hits / max(total - medical_total, 1)
    metrics["eval_loss"] = loss_sum / max(total, 1)
    metrics["n_masked_tokens"] = total
    metrics["n_masked_medical_tokens"] = medical_total
    return metrics
