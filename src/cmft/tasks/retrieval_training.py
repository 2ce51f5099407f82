"""How the bi-encoder trains (cmft.tasks.retrieval): sentence-transformers' trainer with cmft's checkpoint safety and
no generated card, an evaluator over cmft's evaluation loop, mined hard negatives, and the loss that fits memory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cmft.backends import TorchBackend
from cmft.tasks.base import Task


def evaluator(task: Task, batch_size: int, pad_id: int) -> Any:
    """A sentence-transformers evaluator over cmft's evaluation loop (dev ndcg@10 picks the best checkpoint)."""
    from sentence_transformers.sentence_transformer.evaluation import SentenceEvaluator

    class RetrievalEvaluator(SentenceEvaluator):
        def __init__(self):
            super().__init__()
            self.primary_metric = task.metric_for_best
            self.greater_is_better = True

        def __call__(self, model, output_path=None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
            was_training = model.training
            metrics = task.evaluate(TorchBackend(task.inference_module(model).eval()), "dev", batch_size, pad_id)
            model.train(was_training)
            return {k: float(v) for k, v in metrics.items() if not k.startswith("n_")}

    return RetrievalEvaluator()


def trainer_class() -> type:
    from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer

    from cmft.checkpointing import SafeTrainerMixin

    class RetrievalTrainer(SafeTrainerMixin, SentenceTransformerTrainer):
        def add_model_card_callback(self, default_args_dict: dict[str, Any]) -> None:
            pass  # its model card quotes training texts (note text): cmft writes its own card instead

        def _load_best_model(self) -> None:
            # sentence-transformers reloads the whole model from the checkpoint, which fails for a LoRA encoder (only
            # logged, and the last step's adapter was kept): load the best checkpoint's adapter into it instead.
            from peft import PeftModel, set_peft_model_state_dict
            from safetensors.torch import load_file

            encoder = self.model[0].model
            if not isinstance(encoder, PeftModel):
                return super()._load_best_model()
            weights = load_file(str(Path(self.state.best_model_checkpoint) / "adapter_model.safetensors"))
            set_peft_model_state_dict(encoder, weights)

        def _save(self, output_dir: str | None = None, state_dict=None) -> None:
            # No generated model card in checkpoints: sentence-transformers' card quotes training texts.
            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            self.model.save_pretrained(output_dir, create_model_card=False)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    return RetrievalTrainer


def mine_hard_negatives(model: Any, corpus: list[str], rows: list[dict], count: int, margin: float,
                        batch_size: int) -> list[dict]:  # fmt: skip
    """Each query's `count` highest-scoring non-relevant `corpus` documents, below (1 - margin) × its positive's
    score."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives as mine

    pairs = Dataset.from_list([{"anchor": r["anchor"], "positive": r["positive"]} for r in rows])
    mined = mine(
        pairs, model, anchor_column_name="anchor", positive_column_name="positive", corpus=corpus,
        num_negatives=count, relative_margin=margin or None, sampling_strategy="top",
        output_format="n-tuple", batch_size=batch_size, verbose=False,
    )  # fmt: skip
    return mined.to_list()


def activation_bytes(config, length: int) -> int:
    """Training activations kept per text of `length` tokens on CPU, where sdpa/eager attention materialise the
    heads × length² scores. What autograd really keeps is 0.76–0.83 of it for MiniLM-L6 (256–512 tokens) and
    about 0.3 for ModernBERT (no attention dropout: no kept scores); the test suite checks it stays on the safe side."""
    layers, heads, hidden = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
    return layers * (12 * heads * length * length + 128 * hidden * length)


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
