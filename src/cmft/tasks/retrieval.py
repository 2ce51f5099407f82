"""Bi-encoder retrieval: a plain `SentenceTransformer` (Transformer → Pooling → Normalize; `model/` also loads with
AutoModel) trained on sentence-transformers' trainer with in-batch negatives (MultipleNegativesRankingLoss or its
cached form), a no-duplicates sampler and optional mined hard negatives; evaluation ranks each split's corpus."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, PositiveFloat, PositiveInt
from torch import nn

from cmft import distributed, memory
from cmft.data.retrieval import RetrievalSplit, read_retrieval_split
from cmft.errors import CmftError
from cmft.heads import mean_pool
from cmft.lora import wrap_lora
from cmft.metrics import rank, retrieval_metrics
from cmft.recipe import RecipeBase, TaskSection, TuningConfig
from cmft.tasks.base import SPLITS, Task, Unit, cut_to, load_pretrained
from cmft.tasks.retrieval_training import (
    activation_bytes,
    evaluator,
    fit_loss,
    mine_hard_negatives,
    trainer_class,
)

log = logging.getLogger("cmft")
CARD_USAGE = """from sentence_transformers import SentenceTransformer

model = SentenceTransformer(".", device="cpu")
embeddings = model.encode(["{example}"])  # {pooling}-pooled, L2-normalised: dot product = cosine"""
CARD_ADAPTER = """import torch
from peft import PeftModel
from transformers import AutoModel, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(".")
encoder = PeftModel.from_pretrained(AutoModel.from_pretrained("{base}"), "../adapter").eval()  # unmerged
states = encoder(**tokenizer(["{example}"], return_tensors="pt")).last_hidden_state
pooled = states.mean(1) if "{pooling}" == "mean" else states[:, 0]  # one text: no padding to mask
embedding = torch.nn.functional.normalize(pooled, dim=-1)  # the same as model.encode"""


class RetrievalConfig(TaskSection):
    """The recipe's `retrieval` section."""

    query_field: str = "query"
    """Pairs / triplets files (jsonl or csv): the query column."""
    document_field: str = "positive"
    """The relevant document's column."""
    negative_field: str = "negative"
    """Optional column of negative documents (a string or a list); used for training when present."""
    pooling: Literal["mean", "cls"] = "mean"
    loss: Literal["in_batch", "cached"] = "in_batch"
    """`in_batch`: MultipleNegativesRankingLoss; `cached`: its GradCache version, for large batches on small memory."""
    mini_batch_size: PositiveInt = 16
    """`cached` loss: examples embedded per forward pass (memory), while the batch stays training.batch_size."""
    group_by_length: bool = True
    """Batches of similar length (far less padding) with no text twice; false: sentence-transformers' sampler."""
    scale: PositiveFloat = 20.0
    """Similarity scale (inverse temperature) of the in-batch softmax."""
    hard_negatives: int = Field(0, ge=0, le=16)
    """Negatives mined per training query with the starting model (0 = in-batch negatives only)."""
    hard_negative_margin: float = Field(0.05, ge=0, lt=1)
    """A mined negative must score below (1 - margin) × the positive's score, to skip unlabelled positives."""
    top_k: PositiveInt = 100
    """Hits ranked per query for the metrics (recall@100, map@100 need 100)."""


class EmbeddingModule(nn.Module):
    """Mean (or CLS) pooling then L2 normalisation: what the saved SentenceTransformer computes."""

    def __init__(self, encoder: nn.Module, pooling: str):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        pooled = states[:, 0] if self.pooling == "cls" else mean_pool(states, attention_mask)
        return nn.functional.normalize(pooled, dim=-1)


class RetrievalTask(Task):
    name = "retrieval"
    section_name = "retrieval"
    section = RetrievalConfig
    metric_for_best = "ndcg@10"
    output = "embeddings"
    output_meaning = "[batch, dim] L2-normalised embeddings (the dot product is the cosine similarity)"
    searches = True
    learning_rates = {"tiny": {"full": 2e-4, "lora": 1e-3}, "pretrained": {"full": 5e-5, "lora": 1e-3}}
    throughput_unit = "texts"
    description = "Embeds queries and documents (a bi-encoder) so that relevant pairs score high."
    pipeline_tag = "sentence-similarity"
    library_name = "sentence-transformers"
    card_usage = {"sentence-transformers": CARD_USAGE}
    card_adapter = CARD_ADAPTER

    def __init__(self, recipe: RecipeBase | None = None):
        super().__init__(recipe)
        self.settings: RetrievalConfig = self.section_of(recipe)
        self.splits: dict[str, RetrievalSplit] = {}

    # data -------------------------------------------------------------------------------------------
    def check_recipe(self) -> None:
        if self.recipe.training.distributed == "fsdp":
            raise CmftError(
                "training.distributed: fsdp is not supported for retrieval (sentence-transformers); use ddp"
            )

    def prepare(self, tokenizer: Any, splits: tuple[str, ...] = SPLITS) -> None:
        """Read `splits`; each evaluated split's rows are its queries, then its whole corpus, tokenized."""
        for name in splits:
            split = read_retrieval_split(self.recipe.data, name, self.settings)
            if split is None:
                continue
            self.splits[name] = split
            self.report |= split.counts()
            texts = [split.queries[q] for q in split.evaluated_queries] + list(split.corpus.values())
            limit = self.recipe.training.max_length
            encoded = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
            self.datasets[name] = [{"input_ids": cut_to(ids, limit)} for ids in encoded]

    def summary(self) -> str:
        return ", ".join(f"{n} {len(s.evaluated_queries)} queries / {len(s.corpus)} documents"
                         for n, s in self.splits.items())  # fmt: skip

    def counts(self, split: str) -> dict[str, int]:  # score() reports n_queries and n_documents
        return {}

    def batches_per_epoch(self, batch_size: int) -> int:
        from datasets import Dataset

        from cmft.tasks.retrieval_sampler import GroupedNoDuplicatesBatchSampler

        rows = self.splits["train"].training_rows()
        if not self.settings.group_by_length:
            return -(-len(rows) // batch_size)
        # rows sharing a text (e.g. "None.") need separate batches
        sampler = GroupedNoDuplicatesBatchSampler(Dataset.from_list(rows), batch_size, drop_last=False,
                                                  seed=self.recipe.seed)  # fmt: skip
        return len(sampler)

    # model ------------------------------------------------------------------------------------------
    def build_model(self, encoder: str, attention: str, trust_remote_code: bool) -> nn.Module:
        """Transformer → Pooling → Normalize over a local folder or hub id."""
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.model_card import SentenceTransformerModelCardData
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

        remote = {"trust_remote_code": trust_remote_code}
        try:
            transformer = Transformer(
                encoder, model_kwargs={"attn_implementation": attention, "use_safetensors": True, **remote},
                processor_kwargs=remote, config_kwargs=remote, max_seq_length=self.recipe.training.max_length,
            )  # fmt: skip
        except (OSError, ValueError) as exc:
            why = type(exc).__name__
            raise CmftError(f"model.encoder: {encoder}: could not load it as an encoder ({why})") from None
        pooled = Pooling(transformer.get_embedding_dimension(), self.settings.pooling)
        card = SentenceTransformerModelCardData(generate_widget_examples=False, local_files_only=True)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return SentenceTransformer(modules=[transformer, pooled, Normalize()], device=device, model_card_data=card)

    def head_modules(self, model: nn.Module) -> list[str]:
        return []

    def wrap_lora(self, model: nn.Module, tuning: TuningConfig, heads: list[str]) -> nn.Module:
        model[0].model = wrap_lora(model[0].model, model[0].model.config.model_type, tuning, heads)
        return model

    def merge_lora(self, model: nn.Module, adapter: Path | None, tokenizer: Any) -> nn.Module:
        if adapter is not None:
            model[0].model.save_pretrained(adapter)
        model[0].model = model[0].model.merge_and_unload()
        return model

    def inference_module(self, model: nn.Module) -> nn.Module:
        return EmbeddingModule(model[0].model, self.settings.pooling)

    def save(self, model: nn.Module, tokenizer, folder: Path) -> None:
        """Save without sentence-transformers' generated card: it quotes training examples (note text); the engine
        writes cmft's card (cmft.cards)."""
        model.save_pretrained(str(folder), create_model_card=False)
        evaluator_folder = folder.parent / "checkpoints" / "eval"  # the trainer's; cmft's evaluator writes nothing
        if evaluator_folder.is_dir() and not any(evaluator_folder.iterdir()):
            evaluator_folder.rmdir()

    def meta(self) -> dict[str, Any]:
        return _meta(self.recipe)

    # training: sentence-transformers' trainer (make_trainer) batches the texts and computes the in-batch loss ------
    def collator(self, tokenizer: Any) -> Any:
        raise CmftError("retrieval: batches are sentence-transformers' (its trainer collates the text rows)")

    def loss(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        raise CmftError("retrieval: the loss is sentence-transformers' (in-batch negatives, built in make_trainer)")

    def trainer_arguments(self) -> tuple[type, dict[str, Any]]:
        from sentence_transformers.sentence_transformer.training_args import (
            BatchSamplers,
            SentenceTransformerTrainingArguments,
        )

        from cmft.tasks.retrieval_sampler import GroupedNoDuplicatesBatchSampler

        # a duplicate text in a batch would be a false negative; grouping by length saves most of the padding
        sampler = GroupedNoDuplicatesBatchSampler if self.settings.group_by_length else BatchSamplers.NO_DUPLICATES
        return SentenceTransformerTrainingArguments, {"batch_sampler": sampler}

    def pass_shape(self, rows: int) -> tuple[int, int]:
        texts = rows * (2 + self.settings.hard_negatives)  # query, positive, negatives
        if self.settings.loss == "cached":
            texts = min(texts, self.settings.mini_batch_size)
        return texts, self.recipe.training.max_length

    def make_trainer(self, model: nn.Module, args: Any, callbacks: list, tokenizer: Any, heads: list[str]) -> Any:
        from datasets import Dataset

        rows = self._training_rows(model)
        train_dataset = Dataset.from_list(rows)
        loss = self._loss(model, args.per_device_train_batch_size, len(train_dataset.column_names))
        pad_id = tokenizer.pad_token_id or 0
        dev = evaluator(self, args.per_device_eval_batch_size, pad_id) if "dev" in self.datasets else None
        return trainer_class()(model=model, args=args, train_dataset=train_dataset, loss=loss, evaluator=dev,
                               callbacks=callbacks)  # fmt: skip

    def _training_rows(self, model: nn.Module) -> list[dict]:
        rows = self.splits["train"].training_rows()
        if self.settings.hard_negatives:
            settings, corpus = self.settings, list(self.splits["train"].corpus.values())
            mined = mine_hard_negatives(model, corpus, rows, settings.hard_negatives, settings.hard_negative_margin,
                                        self.recipe.training.eval_batch_size)  # fmt: skip
            self.report["n_hard_negative_rows"] = len(mined)
            if mined:
                rows = mined
            else:
                log.warning("retrieval.hard_negatives: no negative passed the margin; training on in-batch negatives")
        if not rows:
            raise CmftError(f"data.train: {self.splits['train'].source}: no training pair left")
        return rows

    def _loss(self, model: nn.Module, per_device: int, texts_per_row: int) -> nn.Module:
        from sentence_transformers.sentence_transformer.losses import (
            CachedMultipleNegativesRankingLoss,
            MultipleNegativesRankingLoss,
        )

        settings = self.settings
        # under torchrun each query also sees the other processes' documents: in-batch negatives = the global batch
        gather = distributed.launched()
        kind, mini_batch = settings.loss, settings.mini_batch_size
        if not torch.cuda.is_available():
            per_text = activation_bytes(model[0].model.config, self.recipe.training.max_length)
            # rank 0 decides for all: processes must agree on the loss (they gather each other's embeddings)
            kind, mini_batch, why = distributed.agree(lambda: fit_loss(
                kind, mini_batch, per_device, texts_per_row, per_text, memory.memory_share()))  # fmt: skip
            if why:
                log.warning(why)
                self.report["loss"] = f"cached (chosen for memory), mini_batch_size {mini_batch}"
        if kind == "cached":
            return CachedMultipleNegativesRankingLoss(model, scale=settings.scale, mini_batch_size=mini_batch,
                                                      gather_across_devices=gather)  # fmt: skip
        return MultipleNegativesRankingLoss(model, scale=settings.scale, gather_across_devices=gather)

    # metrics ----------------------------------------------------------------------------------------
    def score(self, outputs: list[np.ndarray], split: str, tune: bool = False) -> dict[str, Any]:
        """Every evaluated query searched against the split's whole corpus (rows: queries, then documents)."""
        data = self.splits[split]
        query_ids, corpus_ids = data.evaluated_queries, list(data.corpus)
        embeddings = torch.from_numpy(np.stack(outputs).astype(np.float32))
        hits = rank(embeddings[: len(query_ids)], embeddings[len(query_ids) :], corpus_ids,
                    max(self.settings.top_k, 100))  # fmt: skip
        metrics: dict[str, Any] = retrieval_metrics([[d for d, _ in h] for h in hits],
                                                    [data.relevant[q] for q in query_ids])  # fmt: skip
        return {**metrics, "n_queries": len(query_ids), "n_documents": len(corpus_ids)}

    # inference --------------------------------------------------------------------------------------
    @classmethod
    def load_inference(cls, folder: Path, meta: dict[str, Any], attention: str) -> nn.Module:
        from transformers import AutoModel

        return EmbeddingModule(load_pretrained(AutoModel, folder, attention), meta["pooling"]).eval()

    @classmethod
    def manifest_from_recipe(cls, folder: Path, recipe: RecipeBase) -> dict[str, Any]:
        return _meta(recipe)

    @classmethod
    def decode(cls, meta: dict[str, Any], text: str, outputs: list[np.ndarray], units: list[Unit]) -> dict[str, Any]:
        return {"embedding": [round(float(v), 6) for v in outputs[0]]}


def _meta(recipe: RecipeBase) -> dict[str, Any]:
    return {"task": RetrievalTask.name, "max_length": recipe.training.max_length,
            "pooling": RetrievalTask.section_of(recipe).pooling, "normalized": True}  # fmt: skip
