"""Pretraining throughput: cmft's packed + sparse path against the two Hugging Face run_mlm.py data paths.

Same bundled corpus, tokenizer, tiny ModernBERT (pretrain/clinical_tiny.yaml geometry), seed, optimizer
(AdamW, lr 1e-3), batch 8, max_length 512 and 15% masking; only the data path differs:
  (a) cmft: documents packed first-fit-decreasing, per-document attention, MLM head on masked tokens only
  (b) run_mlm --line_by_line: one document per row, DataCollatorForLanguageModeling pads to the longest
  (c) run_mlm group_texts: all documents concatenated and cut into 512-token blocks (attends across documents)
Real (non-pad) tokens per second of optimizer steps (forward, backward, step, collation and masking).

    python benchmarks/pretrain_throughput.py [--steps 30] [--warmup 3]

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import DataCollatorForLanguageModeling, ModernBertForMaskedLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cmft.config import load_config  # noqa: E402
from cmft.pretraining.config import PretrainConfig  # noqa: E402
from cmft.pretraining.corpus import build_corpus  # noqa: E402
from cmft.pretraining.engine import modernbert_config  # noqa: E402
from cmft.pretraining.lexicon import Lexicon  # noqa: E402
from cmft.pretraining.masking import Masker  # noqa: E402
from cmft.pretraining.packing import PackedDataset, collate_packed, model_inputs, tokenize_documents  # noqa: E402
from cmft.pretraining.run import resolve_pretrain_config  # noqa: E402
from cmft.pretraining.vocab import train_tokenizer  # noqa: E402

MAX_LENGTH = 512
BATCH = 8
RATE = 0.15


def build_model(config: PretrainConfig, tokenizer, sparse: bool) -> ModernBertForMaskedLM:
    torch.manual_seed(config.seed)
    return ModernBertForMaskedLM(modernbert_config(config.model.architecture, tokenizer, "sdpa", sparse)).train()


def measure(model, batches, steps: int, warmup: int) -> dict:
    """Tokens/s over `steps` optimizer steps after `warmup` untimed ones; batches yields (inputs, real_tokens)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = 0
    started = 0.0
    for index in range(warmup + steps):
        if index == warmup:
            tokens, started = 0, time.perf_counter()
        inputs, real = next(batches)
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += real
    seconds = time.perf_counter() - started
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens, "steps": steps}


def cmft_batches(documents, tokenizer, masker, seed: int):
    dataset = PackedDataset(documents, MAX_LENGTH)
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(order), BATCH):
        batch = collate_packed([dataset[i] for i in order[start : start + BATCH]], tokenizer.pad_token_id)
        masked, _ = masker(batch, RATE, generator)
        yield model_inputs(masked, "sdpa", 128), int((batch["document"] >= 0).sum())


def line_by_line_batches(texts, tokenizer, seed: int):
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=RATE, seed=seed)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    for start in range(0, len(order), BATCH):
        encoded = tokenizer([texts[i] for i in order[start : start + BATCH]], truncation=True, max_length=MAX_LENGTH)
        batch = collator([{"input_ids": ids} for ids in encoded["input_ids"]])
        yield dict(batch), int(batch["attention_mask"].sum())


def grouped_batches(texts, tokenizer, seed: int):
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=RATE, seed=seed)
    ids = [t for row in tokenizer(texts)["input_ids"] for t in row]
    blocks = [ids[i : i + MAX_LENGTH] for i in range(0, len(ids) - MAX_LENGTH + 1, MAX_LENGTH)]
    random.Random(seed).shuffle(blocks)
    for start in range(0, len(blocks), BATCH):
        batch = collator([{"input_ids": block} for block in blocks[start : start + BATCH]])
        yield dict(batch), int(batch["input_ids"].numel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(PretrainConfig, resolve_pretrain_config("clinical_tiny"))
    corpus = build_corpus(config.corpus)
    tokenizer = train_tokenizer(corpus.train, config.tokenizer.vocab_size)
    lexicon = Lexicon.from_files(config.masking.lexicon)
    documents = tokenize_documents(corpus.train, tokenizer, lexicon, MAX_LENGTH, config.masking.whole_word)
    masker = Masker(tokenizer.mask_token_id, len(tokenizer), tokenizer.all_special_ids, config.masking.medical_weight)

    results = {
        "cmft": measure(
            build_model(config, tokenizer, sparse=True),
            cmft_batches(documents, tokenizer, masker, config.seed),
            args.steps,
            args.warmup,
        ),
        "hf_padded": measure(
            build_model(config, tokenizer, sparse=False),
            line_by_line_batches(corpus.train, tokenizer, config.seed),
            args.steps,
            args.warmup,
        ),
        "hf_grouped": measure(
            build_model(config, tokenizer, sparse=False),
            grouped_batches(corpus.train, tokenizer, config.seed),
            args.steps,
            args.warmup,
        ),
    }
    for name, figures in results.items():
        print(
            f"{name:>10}: {figures['tokens_per_s']:8.0f} real tokens/s over {figures['steps']} steps", file=sys.stderr
        )
    summary = {
        "cmft_tok_s": round(results["cmft"]["tokens_per_s"], 1),
        "hf_padded_tok_s": round(results["hf_padded"]["tokens_per_s"], 1),
        "hf_grouped_tok_s": round(results["hf_grouped"]["tokens_per_s"], 1),
        "ratio_vs_padded": round(results["cmft"]["tokens_per_s"] / results["hf_padded"]["tokens_per_s"], 3),
        "ratio_vs_grouped": round(results["cmft"]["tokens_per_s"] / results["hf_grouped"]["tokens_per_s"], 3),
        "max_length": MAX_LENGTH,
        "batch_size": BATCH,
        "mask_rate": RATE,
        "threads": args.threads,
        "steps": args.steps,
        "documents": len(corpus.train),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
