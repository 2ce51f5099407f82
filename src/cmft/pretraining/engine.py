"""The pretraining engine: corpus → vocabulary → masking → packing → HF Trainer → evaluation → run folder."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    ModernBertConfig,
    ModernBertForMaskedLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    set_seed,
)

from cmft import distributed
from cmft.cards import write_model_card
from cmft.checkpointing import resume_point
from cmft.config import dump_config
from cmft.errors import CmftError
from cmft.memory import checkpointing_on, set_checkpointing
from cmft.modeling import check_model_source, choose_attention, hub_error, model_type_of
from cmft.pretraining.config import ArchitectureConfig, PretrainConfig
from cmft.pretraining.corpus import Corpus
from cmft.pretraining.evaluate import evaluation_rows, heldout_accuracy
from cmft.pretraining.lexicon import Lexicon
from cmft.pretraining.masking import Masker
from cmft.pretraining.packing import PackedDataset, collate_packed
from cmft.pretraining.rows import Rows, read_corpus, streamed, training_data
from cmft.pretraining.trainer import MaskedLMTrainer
from cmft.pretraining.vocab import refine_tokenizer, save_tokenizer, tokens_per_word, train_tokenizer
from cmft.runs import finish_run
from cmft.tasks import BARE_ENCODER
from cmft.tasks.base import write_manifest
from cmft.tracking import trackers
from cmft.training import plot_history, read_history, ready, set_threads, trainer_parts

log = logging.getLogger("cmft")


@dataclass
class Setup:
    """What training needs, built from the config (and from the run folder on resume)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    attention: str
    """transformers' attn_implementation."""
    vocab: dict
    attention_reason: str = ""


def modernbert_config(
    arch: ArchitectureConfig, tokenizer: PreTrainedTokenizerFast, attention: str, sparse_prediction: bool = True
) -> ModernBertConfig:
    """A fresh ModernBertConfig (a fresh one per model: `from_config` writes the backend into it)."""
    config = ModernBertConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings,
        local_attention=arch.local_attention,
        global_attn_every_n_layers=arch.global_attn_every_n_layers,
        global_rope_theta=arch.global_rope_theta,
        local_rope_theta=arch.local_rope_theta,
        embedding_dropout=arch.hidden_dropout,
        mlp_dropout=arch.hidden_dropout,
        attention_dropout=arch.hidden_dropout,
        pad_token_id=tokenizer.pad_token_id,
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sparse_prediction=sparse_prediction,
    )
    config._attn_implementation = attention
    return config


def _continued_model(config: PretrainConfig, attention: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    source = check_model_source(config.model.init_from or "")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForMaskedLM.from_pretrained(source, attn_implementation=attention, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        if Path(source).is_dir():
            raise CmftError(f"model.init_from: {source}: cannot load model or tokenizer ({exc})") from None
        raise hub_error(source, "model.init_from", exc) from None
    if model.config.model_type != "modernbert":
        raise CmftError(
            f"model.init_from: {source} is a {model.config.model_type} model; cmft pretrain continues ModernBERT"
        )
    if config.training.max_length > model.config.max_position_embeddings:
        raise CmftError(
            f"training.max_length: {config.training.max_length} is above the checkpoint's "
            f"max_position_embeddings ({model.config.max_position_embeddings})"
        )
    return model, tokenizer


def _set_sparse_prediction(model: PreTrainedModel, enabled: bool) -> None:
    model.config.sparse_prediction = enabled
    model.sparse_prediction = enabled


def _setup(config: PretrainConfig, corpus: Corpus, lexicon: Lexicon, work: Path, resume: bool) -> Setup:
    model_type = "modernbert" if config.model.init_from is None else model_type_of(config.model.init_from)
    chosen = choose_attention(config.model.attention, model_type, training=True)
    log.info("model.attention: %s → %s (%s)", config.model.attention, chosen.choice, chosen.reason)
    config.model.attention, attention = chosen.choice, chosen.implementation  # recipe.yaml records the choice
    tokenizer_dir = work / "tokenizer"
    if config.model.init_from is None:
        trains = distributed.is_main() and not (resume and tokenizer_dir.is_dir())
        if trains:  # once, on rank 0; the other processes load what it saved
            started = time.monotonic()
            tokenizer = train_tokenizer(
                corpus.train,
                config.tokenizer.vocab_size,
                config.tokenizer.lowercase,
                config.tokenizer.min_frequency,
                config.model.architecture.max_position_embeddings,
            )
            log.info("tokenizer: trained %d tokens in %.1f s", len(tokenizer), time.monotonic() - started)
            save_tokenizer(tokenizer, tokenizer_dir)
        distributed.barrier()
        if not trains:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = ModernBertForMaskedLM(modernbert_config(config.model.architecture, tokenizer, attention))
        vocab = {
            "tokenizer": "trained",
            "vocab_size": len(tokenizer),
            "tokens_added": 0,
            "tokens_per_word": tokens_per_word(tokenizer, corpus.heldout),
        }
    else:
        model, tokenizer = _continued_model(config, attention)
        refine = config.tokenizer.refine
        if refine.enabled and refine.max_new_tokens > 0:
            result = refine_tokenizer(
                tokenizer,
                model,
                corpus.train,
                lexicon,
                refine.max_new_tokens,
                refine.min_frequency,
                refine.min_pieces,
            )
            vocab = {
                "tokenizer": "refined",
                "vocab_size": len(tokenizer),
                "tokens_added": len(result.added),
                "tokens_per_word_before": result.tokens_per_word_before,
                "tokens_per_word_after": result.tokens_per_word_after,
                "added_examples": result.added[:50],
            }
        else:
            vocab = {"tokenizer": "unchanged", "vocab_size": len(tokenizer), "tokens_added": 0}
    if distributed.is_main():
        save_tokenizer(tokenizer, tokenizer_dir)
    distributed.barrier()
    _set_sparse_prediction(model, True)
    return Setup(model=model, tokenizer=tokenizer, attention=attention, vocab=vocab, attention_reason=chosen.reason)


def _train_stage(
    config: PretrainConfig,
    setup: Setup,
    train: Rows,
    work: Path,
    stage: str,
    max_steps: int,
    batch_size: int,
    learning_rate: float,
    resume: bool,
) -> dict:
    t = config.training
    masker = Masker(
        setup.tokenizer.mask_token_id,
        len(setup.tokenizer),
        setup.tokenizer.all_special_ids,
        config.masking.medical_weight,
        config.masking.mask_token_fraction,
        config.masking.random_token_fraction,
    )
    args, callbacks = trainer_parts(
        work,
        work / "checkpoints" / stage,
        f"pretrain {stage}",
        t.report_to,
        max_steps=max_steps,
        batch_size=batch_size,
        gradient_accumulation=t.gradient_accumulation,
        learning_rate=learning_rate,
        weight_decay=t.weight_decay,
        warmup_ratio=t.warmup_ratio,
        lr_scheduler=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        log_every=min(t.log_every, max_steps),
        save_every=t.save_every,
        save_total_limit=t.save_total_limit,
        seed=config.seed,
        bf16=t.bf16,
        distributed=t.distributed,
        fsdp_layers=["ModernBertEncoderLayer"],
        batch_field="training.batch_size" if stage == "main" else "long_context.batch_size",
        ddp_find_unused_parameters=False,  # every parameter takes part: skip DDP's extra graph traversal
    )
    pad_id = setup.tokenizer.pad_token_id
    trainer = MaskedLMTrainer(
        model=setup.model,
        args=args,
        train_dataset=train,
        data_collator=lambda rows: collate_packed(rows, pad_id),
        masker=masker,
        rates=(config.masking.start_rate, config.masking.end_rate, config.masking.schedule),
        attention=setup.attention,
        seed=config.seed,
        callbacks=callbacks,
    )
    ready(trainer, t.divergence_factor)
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=resume_point(Path(args.output_dir), resume))
    if args.fsdp:  # the model is sharded across processes: gather it into a plain model on every process
        setup.model = _gathered_model(trainer, work / f"{stage}_gathered", setup.attention)
    totals = trainer.totals
    return {
        f"{stage}_steps": max_steps,
        f"{stage}_seconds": round(time.monotonic() - started, 1),
        f"{stage}_final_mask_rate": trainer.current_rate,
        f"{stage}_medical_share_of_tokens": totals.medical_share_of_tokens,
        f"{stage}_medical_share_of_masked": totals.medical_share_of_masked,
    }


def _gathered_model(trainer: MaskedLMTrainer, folder: Path, attention: str) -> PreTrainedModel:
    """Save the FSDP-sharded model whole (a collective: every process takes part) and reload it unsharded."""
    trainer.save_model(str(folder))
    distributed.barrier()
    model = AutoModelForMaskedLM.from_pretrained(folder, use_safetensors=True, attn_implementation=attention)
    _set_sparse_prediction(model, True)
    distributed.barrier()
    if distributed.is_main():
        shutil.rmtree(folder)
    return model


def _long_context(
    config: PretrainConfig, setup: Setup, corpus: Corpus, lexicon: Lexicon, work: Path, resume: bool
) -> dict:
    stage = config.long_context
    assert stage is not None
    if stage.max_length > setup.model.config.max_position_embeddings:
        raise CmftError(
            f"long_context.max_length: {stage.max_length} is above max_position_embeddings "
            f"({setup.model.config.max_position_embeddings})"
        )
    # ModernBERT's recipe: continue at long length with a raised global RoPE theta. Rebuild from saved
    # weights so the rotary embedding picks up the new theta.
    staged = work / "stage1_model"
    _set_sparse_prediction(setup.model, True)
    if distributed.is_main():
        setup.model.save_pretrained(staged)
    distributed.barrier()
    setup.model = AutoModelForMaskedLM.from_pretrained(
        staged,
        use_safetensors=True,
        attn_implementation=setup.attention,
        rope_parameters={
            **setup.model.config.rope_parameters,
            "full_attention": {
                **setup.model.config.rope_parameters["full_attention"],
                "rope_theta": stage.global_rope_theta,
            },
        },
    )
    _set_sparse_prediction(setup.model, True)
    if config.training.gradient_checkpointing:
        checkpointing_on(setup.model, setup.model.config)
    distributed.barrier()
    if distributed.is_main():
        shutil.rmtree(staged)
    if config.corpus.streaming:
        train: Rows = streamed(config, setup.tokenizer, lexicon, stage.max_length)[0]
    else:
        train = training_data(config, corpus, setup.tokenizer, lexicon, stage.max_length).rows
    return _train_stage(
        config,
        setup,
        train,
        work,
        "long_context",
        stage.max_steps,
        stage.batch_size,
        stage.learning_rate,
        resume,
    )


def run_pretraining(config: PretrainConfig, final: Path, work: Path, resume: bool) -> Path:
    """Train in `work` (the `.partial` folder) and rename it to `final` when everything is written. Under
    torchrun every process trains on its shard of each batch; rank 0 alone evaluates and writes."""
    if distributed.is_main():
        dump_config(config, work / "recipe.yaml")
    set_threads(config.training.threads)
    set_seed(config.seed)
    started = time.monotonic()
    trackers(config.training.report_to)  # fail in seconds, before the corpus is read
    if config.model.init_from is not None:
        check_model_source(config.model.init_from)
    lexicon = Lexicon.from_files(config.masking.lexicon)
    corpus = read_corpus(config)  # streaming: the head of the stream, for the tokenizer
    setup = _setup(config, corpus, lexicon, work, resume)
    why = _set_checkpointing(config, setup)
    if distributed.is_main():  # as resolved: what `auto` chose for attention and checkpointing, and why
        dump_config(config, work / "recipe.yaml", {"model.attention": setup.attention_reason,
                                                   "training.gradient_checkpointing": why})  # fmt: skip
    max_length = config.training.max_length
    data = training_data(config, corpus, setup.tokenizer, lexicon, max_length)
    train, corpus, max_steps = data.rows, data.corpus, data.max_steps
    heldout = evaluation_rows(corpus.heldout, setup.tokenizer, lexicon, max_length)
    summary = {
        "documents_per_source": corpus.documents_per_source,
        **data.summary,
        "heldout_documents": len(corpus.heldout),
        "lexicon_words": len(lexicon),
        "attention": setup.attention,
        **distributed.split_batch(config.training.batch_size, config.training.gradient_accumulation).report(),
        "distributed": config.training.distributed if distributed.launched() else "none",
        **setup.vocab,
    }
    summary |= _train_stage(
        config,
        setup,
        train,
        work,
        "main",
        max_steps,
        config.training.batch_size,
        config.training.learning_rate,
        resume,
    )
    if config.long_context is not None:
        summary |= _long_context(config, setup, corpus, lexicon, work, resume)
    if distributed.is_main():
        _evaluate_and_save(config, setup, heldout, len(corpus.heldout), work, summary, started)
    return finish_run(final)


def _set_checkpointing(config: PretrainConfig, setup: Setup) -> str:
    """Resolve training.gradient_checkpointing for the largest micro-batch of either stage and switch it on; why."""
    t = config.training
    shapes = [(distributed.split_batch(t.batch_size, t.gradient_accumulation).per_device, t.max_length)]
    if config.long_context is not None:
        shapes.append((max(1, config.long_context.batch_size // distributed.world_size()),
                       config.long_context.max_length))  # fmt: skip
    t.gradient_checkpointing, why = set_checkpointing(t.gradient_checkpointing, setup.model, setup.model.config, shapes,
                                                      setup.attention)  # fmt: skip
    return why


def _evaluate_and_save(
    config: PretrainConfig,
    setup: Setup,
    heldout: PackedDataset,
    n_heldout: int,
    work: Path,
    summary: dict,
    started: float,
) -> None:
    metrics = heldout_accuracy(setup.model, setup.tokenizer, heldout, setup.attention, config.evaluation)
    metrics |= {"split": "heldout", "n_examples": n_heldout}
    metrics |= {key: summary[key] for key in ("global_batch_size", "world_size")}
    summary["wall_seconds"] = round(time.monotonic() - started, 1)
    _save_outputs(setup, work, metrics, summary)
    log.info(
        "pretrain: mlm_top1 %.4f  top5 %.4f  top10 %.4f  top25 %.4f (held-out, rate %.2f)",
        metrics["mlm_top1"],
        metrics["mlm_top5"],
        metrics["mlm_top10"],
        metrics["mlm_top25"],
        config.evaluation.rate,
    )


def _save_outputs(setup: Setup, work: Path, metrics: dict, summary: dict) -> None:
    _set_sparse_prediction(setup.model, False)  # users calling the model with labels expect full logits
    model_dir = work / "model"
    setup.model.save_pretrained(model_dir)
    save_tokenizer(setup.tokenizer, model_dir)
    config_path = model_dir / "config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    saved.pop("_attn_implementation_autoset", None)
    saved.pop("attn_implementation", None)  # let each loader pick its own backend
    config_path.write_text(json.dumps(saved, indent=2), encoding="utf-8")
    (work / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    (work / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    meta = {"task": BARE_ENCODER, "max_length": int(setup.model.config.max_position_embeddings)}
    write_manifest(model_dir, meta)
    write_model_card(work, meta)
    plot_history(
        read_history(work / "history.jsonl"),
        work / "plots" / "loss.png",
        ("loss", "mask_rate", "lr", "tokens_per_s"),
    )
    shutil.rmtree(work / "tokenizer", ignore_errors=True)
