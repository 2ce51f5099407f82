"""Retrieval fine-tuning on sentence-transformers' trainer: in-batch negatives (MultipleNegativesRankingLoss or
its cached/GradCache form), a no-duplicates batch sampler, optional hard negatives mined with the model itself,
dev ndcg@10 to keep the best checkpoint, and test metrics in metrics.json."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import EarlyStoppingCallback, set_seed

from cmft import distributed
from cmft.checkpointing import SafeTrainerMixin, resume_point
from cmft.config import dump_config
from cmft.data.retrieval import RetrievalSplit, read_retrieval_split
from cmft.errors import CmftError
from cmft.finetuning.config import RecipeConfig, step_schedule
from cmft.finetuning.engine import check_encoder, resolve_encoder
from cmft.finetuning.lora import wrap_lora
from cmft.modeling import resolve_attention
from cmft.runs import finish_run
from cmft.tasks import retrieval
from cmft.training import (
    HistoryCallback,
    RichProgressCallback,
    plot_history,
    quiet_trainer,
    read_history,
    set_threads,
    training_arguments,
)

log = logging.getLogger("cmft")


def read_splits(recipe: RecipeConfig, names: tuple[str, ...] = ("train", "dev", "test")) -> dict[str, RetrievalSplit]:
    splits = {}
    for name in names:
        split = read_retrieval_split(recipe.data, name, recipe.retrieval)
        if split is not None:
            splits[name] = split
    return splits


def _mine_hard_negatives(model, split: RetrievalSplit, rows: list[dict], recipe: RecipeConfig) -> list[dict]:
    """Each query's highest-scoring non-relevant training documents, below (1 - margin) × its positive's score."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    settings = recipe.retrieval
    pairs = Dataset.from_list([{"anchor": r["anchor"], "positive": r["positive"]} for r in rows])
    mined = mine_hard_negatives(
        pairs, model, anchor_column_name="anchor", positive_column_name="positive", corpus=list(split.corpus.values()),
        num_negatives=settings.hard_negatives, relative_margin=settings.hard_negative_margin or None,
        sampling_strategy="top",
        output_format="n-tuple", batch_size=recipe.training.eval_batch_size, verbose=False,
    )  # fmt: skip
    return mined.to_list()


def activation_bytes(config, length: int) -> int:
    """Training activations kept per text of `length` tokens on CPU, where sdpa/eager attention materialise the
    heads × length² scores. What autograd really keeps is 0.76–0.83 of it for MiniLM-L6 (256–512 tokens) and
    about 0.3 for ModernBERT (no attention dropout: no kept scores); the test suite checks it stays on the safe side."""
    layers, heads, hidden = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
    return layers * (12 * heads * length * length + 128 * hidden * length)


def available_memory() -> int:
    """Free memory on this machine, in bytes."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil comes with accelerate; this is the fallback
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_share() -> int:
    """This process's share of the free memory: torchrun's processes on one machine train side by side."""
    return available_memory() // distributed.local_world_size()


def fit_loss(loss: str, mini_batch: int, batch: int, texts_per_row: int, per_text: int, available: int
             ) -> tuple[str, int, str | None]:  # fmt: skip
    """(loss, mini-batch size, why it changed): `in_batch` whose worst batch (every text at max_length) would take
    more than half the free memory becomes `cached` (GradCache: the same loss and gradients, embedded in
    mini-batches that fit), instead of being killed by the kernel part-way through an epoch."""
    budget = available // 2
    need = batch * texts_per_row * per_text
    if loss != "in_batch" or need <= budget:
        return loss, mini_batch, None
    fitted = max(1, min(batch, budget // per_text))
    why = (f"retrieval.loss: in_batch would need about {need / 2**30:.1f} GiB for a batch of {batch} rows × "
           f"{texts_per_row} texts at max_length ({available / 2**30:.1f} GiB free): training with `cached` "
           f"(GradCache: same loss and gradients) in mini-batches of {fitted} instead; set retrieval.loss=cached "
           f"and retrieval.mini_batch_size to choose")  # fmt: skip
    return "cached", fitted, why


def _make_trainer_class():
    from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer

    class RetrievalTrainer(SafeTrainerMixin, SentenceTransformerTrainer):
        def add_model_card_callback(self, default_args_dict: dict[str, Any]) -> None:
            pass  # its model card quotes training texts (note text): cmft writes its own card instead

        def _save(self, output_dir: str | None = None, state_dict=None) -> None:
            # No generated model card in checkpoints: sentence-transformers' card quotes training texts.
            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            self.model.save_pretrained(output_dir, create_model_card=False)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    return RetrievalTrainer


def run_retrieval(recipe: RecipeConfig, final: Path, work: Path, resume: bool) -> Path:
    from datasets import Dataset
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )
    from sentence_transformers.sentence_transformer.training_args import (
        BatchSamplers,
        SentenceTransformerTrainingArguments,
    )

    from cmft.finetuning.retrieval_sampler import GroupedNoDuplicatesBatchSampler

    if recipe.training.distributed == "fsdp":
        raise CmftError("training.distributed: fsdp is not supported for retrieval (sentence-transformers); use ddp")
    if distributed.is_main():
        dump_config(recipe, work / "recipe.yaml")
    set_threads(recipe.training.threads)
    set_seed(recipe.seed)
    started = time.monotonic()
    settings, t = recipe.retrieval, recipe.training
    encoder = resolve_encoder(recipe.model.encoder)
    attention = resolve_attention(recipe.model.attention)
    check_encoder(recipe, encoder)
    splits = read_splits(recipe)
    batch_split = distributed.split_batch(recipe.training.batch_size, recipe.training.gradient_accumulation)
    report: dict[str, Any] = {"encoder": encoder, **batch_split.report()}
    for split in splits.values():
        report |= split.counts()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = retrieval.build_model(encoder, attention, recipe.model.trust_remote_code, settings.pooling,
                                      t.max_length, device)  # fmt: skip
    except (OSError, ValueError) as exc:
        raise CmftError(f"model.encoder: {encoder}: could not load it as an encoder ({type(exc).__name__})") from None
    rows = splits["train"].training_rows()
    if settings.hard_negatives:
        mined = _mine_hard_negatives(model, splits["train"], rows, recipe)
        report["n_hard_negative_rows"] = len(mined)
        if mined:
            rows = mined
        else:
            log.warning("retrieval.hard_negatives: no negative passed the margin; training on in-batch negatives")
    if not rows:
        raise CmftError(f"data.train: {splits['train'].source}: no training pair left")
    train_dataset = Dataset.from_list(rows)
    if recipe.tuning.method == "lora":
        model[0].model = wrap_lora(model[0].model, model[0].model.config.model_type, recipe.tuning, [])
    # under torchrun each query also sees the other processes' documents: in-batch negatives = the global batch
    gather = distributed.launched()
    loss_kind, mini_batch = settings.loss, settings.mini_batch_size
    if device == "cpu":
        per_text, texts_per_row = activation_bytes(model[0].model.config, t.max_length), len(train_dataset.column_names)
        # rank 0 decides for all: processes must agree on the loss (they gather each other's embeddings)
        loss_kind, mini_batch, why = distributed.agree(lambda: fit_loss(
            loss_kind, mini_batch, batch_split.per_device, texts_per_row, per_text, memory_share()))  # fmt: skip
        if why:
            log.warning(why)
            report["loss"] = f"cached (chosen for memory), mini_batch_size {mini_batch}"
    if loss_kind == "cached":
        loss = CachedMultipleNegativesRankingLoss(model, scale=settings.scale, mini_batch_size=mini_batch,
                                                  gather_across_devices=gather)  # fmt: skip
    else:
        loss = MultipleNegativesRankingLoss(model, scale=settings.scale, gather_across_devices=gather)

    batches = math.ceil(len(rows) / t.batch_size)
    if settings.group_by_length:  # rows sharing a text (e.g. "None.") need separate batches
        batches = len(GroupedNoDuplicatesBatchSampler(train_dataset, t.batch_size, drop_last=False, seed=recipe.seed))
    max_steps, _, eval_every, log_every = step_schedule(t, batches)
    args = training_arguments(
        work / "checkpoints", max_steps=max_steps, batch_size=t.batch_size,
        gradient_accumulation=t.gradient_accumulation, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
        warmup_ratio=t.warmup_ratio, lr_scheduler=t.lr_scheduler, max_grad_norm=1.0,
        log_every=log_every, save_every=eval_every, save_total_limit=t.save_total_limit,
        seed=recipe.seed, bf16=t.bf16, distributed=t.distributed, cls=SentenceTransformerTrainingArguments,
        # a duplicate text in a batch would be a false negative; grouping by length saves most of the padding
        batch_sampler=GroupedNoDuplicatesBatchSampler if settings.group_by_length else BatchSamplers.NO_DUPLICATES,
    )  # fmt: skip
    evaluator = None
    callbacks = [HistoryCallback(work / "history.jsonl"), RichProgressCallback("finetune retrieval")]
    if "dev" in splits:
        evaluator = retrieval.make_evaluator(splits["dev"], settings.top_k, t.eval_batch_size)
        args.eval_strategy = "steps"
        args.eval_steps = eval_every
        args.load_best_model_at_end = recipe.tuning.method == "full"
        args.metric_for_best_model = "eval_ndcg@10"
        args.greater_is_better = True
        if t.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    trainer = _make_trainer_class()(model=model, args=args, train_dataset=train_dataset, loss=loss,
                                    evaluator=evaluator, callbacks=callbacks)  # fmt: skip
    quiet_trainer(trainer)
    trainer.setup_safety(t.divergence_factor)
    checkpoints = work / "checkpoints"
    output = trainer.train(resume_from_checkpoint=resume_point(checkpoints, resume))
    report["train_seconds"] = round(time.monotonic() - started, 1)
    report["train_examples_per_s"] = round(output.metrics.get("train_samples_per_second", 0.0), 2)

    model = trainer.model
    if recipe.tuning.method == "lora":
        if distributed.is_main():
            model[0].model.save_pretrained(work / "adapter")
        model[0].model = model[0].model.merge_and_unload()
    metrics: dict[str, Any] = {}
    if "dev" in splits:
        dev = retrieval.evaluate_split(model, splits["dev"], settings.top_k, t.eval_batch_size)
        metrics |= {f"dev_{k}": v for k, v in dev.items()}
    split_name = "test" if "test" in splits else ("dev" if "dev" in splits else "train")
    predict_started = time.monotonic()
    result = retrieval.evaluate_split(model, splits[split_name], settings.top_k, t.eval_batch_size)
    n_texts = result["n_queries"] + result["n_documents"]
    report[f"{split_name}_texts_per_s"] = round(n_texts / (time.monotonic() - predict_started), 2)
    metrics = {**result, "split": split_name, **metrics, **{k: v for k, v in report.items() if k != "encoder"}}
    if not distributed.is_main():
        return finish_run(final)
    retrieval.save_model(model, work / "model", settings.pooling)
    if (checkpoints / "eval").is_dir() and not any((checkpoints / "eval").iterdir()):
        (checkpoints / "eval").rmdir()  # the trainer's evaluator folder; cmft's evaluator writes nothing there
    (work / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    plot_history(read_history(work / "history.jsonl"), work / "plots" / "loss.png", ("loss", "eval_ndcg@10", "lr"))
    log.info("finetune retrieval: %s", ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
    return finish_run(final)
