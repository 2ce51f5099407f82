"""Top-k masked-token accuracy on the held-out slice, at a fixed rate and seed, split medical / other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from cmft.errors import CmftError
from cmft.pretraining.config import EvaluationConfig, PretrainConfig
from cmft.pretraining.lexicon import Lexicon
from cmft.pretraining.masking import Masker
from cmft.pretraining.packing import PackedDataset, collate_packed, model_inputs, tokenize_documents

TOP_K = (1, 5, 10, 25)


def evaluation_rows(texts: list[str], tokenizer: Any, lexicon: Lexicon, max_length: int) -> PackedDataset:
    """Documents packed into rows of at most `max_length` tokens for `heldout_accuracy`."""
    return PackedDataset(tokenize_documents(texts, tokenizer, lexicon, max_length, "none"), max_length)


def heldout_accuracy(model: PreTrainedModel, tokenizer: Any, rows: PackedDataset, attention: str,
                     evaluation: EvaluationConfig) -> dict[str, float]:  # fmt: skip
    """The metrics.json figures of a pretraining run: `masked_token_accuracy` at the config's rate, seed and batch."""
    masker = Masker(tokenizer.mask_token_id, len(tokenizer), tokenizer.all_special_ids)
    return masked_token_accuracy(model, rows, masker, tokenizer.pad_token_id, attention, evaluation.rate,
                                 evaluation.seed, evaluation.batch_size)  # fmt: skip


def evaluate_pretraining_run(run_dir: Path, split: str | None = None, data: Path | None = None) -> dict[str, Any]:
    """`cmft evaluate` of a `cmft pretrain` run: its model/ scored on the held-out documents of its recipe.yaml (as
    the run's metrics.json), or on the documents of `data` (a text or jsonl file, read as a corpus source)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from cmft.config import load_config
    from cmft.modeling import choose_attention
    from cmft.pretraining.config import SourceConfig
    from cmft.pretraining.corpus import heldout_documents, iter_source
    from cmft.tasks.base import load_pretrained

    if split not in (None, "heldout"):
        raise CmftError(f"--split {split}: a pretraining run is evaluated on its held-out documents (or --data PATH); "
                        "leave --split out")  # fmt: skip
    if not (run_dir / "recipe.yaml").is_file():
        raise CmftError(f"{run_dir}: not a finished run (needs recipe.yaml and model/)")
    config = load_config(PretrainConfig, run_dir / "recipe.yaml")
    if data is not None:
        if not data.exists():
            raise CmftError(f"--data {data}: file not found")
        texts, split = list(iter_source(SourceConfig(path=str(data)))), str(data)
    else:
        texts, split = heldout_documents(config.corpus), "heldout"
    if not texts:
        raise CmftError(f"{data}: no non-empty document")
    attention = choose_attention("auto", "modernbert", training=False).implementation
    model = load_pretrained(AutoModelForMaskedLM, run_dir / "model", attention)
    if torch.cuda.is_available():
        model = model.cuda()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    rows = evaluation_rows(texts, tokenizer, Lexicon.from_files(config.masking.lexicon), config.training.max_length)
    metrics = heldout_accuracy(model, tokenizer, rows, attention, config.evaluation)
    return {**metrics, "split": split, "n_examples": len(texts)}


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
