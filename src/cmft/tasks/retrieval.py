"""Bi-encoder retrieval: a shared encoder with mean (or CLS) pooling and L2 normalisation, in sentence-transformers.

The model is a plain `SentenceTransformer` (Transformer → Pooling → Normalize), so `model/` loads with
`SentenceTransformer(model/)` and its encoder with `AutoModel.from_pretrained(model/)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cmft.data.retrieval import RetrievalSplit
from cmft.metrics import PRIMARY_METRIC, retrieval_metrics

MODEL_CARD = """# cmft bi-encoder

Trained with `cmft finetune` (task: retrieval). Embeddings are {pooling}-pooled and L2-normalised, so the dot
product is the cosine similarity.

```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("path/to/model")
embeddings = model.encode(["query or document text"])
```

The encoder alone loads with `transformers.AutoModel.from_pretrained("path/to/model")`.
"""


def build_model(encoder: str, attention: str, trust_remote_code: bool, pooling: str, max_length: int, device: str):
    """Transformer → Pooling → Normalize over a local folder or hub id."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.model_card import SentenceTransformerModelCardData
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    transformer = Transformer(
        encoder,
        model_kwargs={
            "attn_implementation": attention,
            "trust_remote_code": trust_remote_code,
            "use_safetensors": True,
        },
        processor_kwargs={"trust_remote_code": trust_remote_code},
        config_kwargs={"trust_remote_code": trust_remote_code},
        max_seq_length=max_length,
    )
    pooled = Pooling(transformer.get_embedding_dimension(), pooling)
    card = SentenceTransformerModelCardData(generate_widget_examples=False, local_files_only=True)
    return SentenceTransformer(modules=[transformer, pooled, Normalize()], device=device, model_card_data=card)


def load_model(model_dir: str | Path, device: str | None = None):
    from sentence_transformers import SentenceTransformer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return SentenceTransformer(str(model_dir), device=device, model_kwargs={"use_safetensors": True})


def save_model(model, folder: Path, pooling: str) -> None:
    """Save without sentence-transformers' generated card: it quotes training examples (note text)."""
    model.save_pretrained(str(folder), create_model_card=False)
    (folder / "README.md").write_text(MODEL_CARD.format(pooling=pooling), encoding="utf-8")


def encode(model, texts: list[str], batch_size: int) -> torch.Tensor:
    """L2-normalised embeddings (float32, on CPU); sentence-transformers sorts by length internally."""
    embeddings = model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    return torch.nn.functional.normalize(embeddings.float(), dim=-1).cpu()


def rank(query_embeddings: torch.Tensor, corpus_embeddings: torch.Tensor, corpus_ids: list[str], top_k: int,
         chunk: int = 1024) -> list[list[tuple[str, float]]]:  # fmt: skip
    """Top-k (document id, cosine) per query, ties broken by ascending id (as sentence-transformers does)."""
    k = min(top_k, len(corpus_ids))
    results = []
    for start in range(0, len(query_embeddings), chunk):
        scores = query_embeddings[start : start + chunk] @ corpus_embeddings.T
        values, indices = torch.topk(scores, k, dim=1)
        for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True):
            hits = sorted(zip(row_values, row_indices, strict=True), key=lambda h: (-h[0], corpus_ids[h[1]]))
            results.append([(corpus_ids[i], score) for score, i in hits])
    return results


def evaluate_split(model, split: RetrievalSplit, top_k: int, batch_size: int) -> dict[str, float]:
    """The split's metrics: every evaluated query searched against the split's whole corpus."""
    query_ids = split.evaluated_queries
    corpus_ids = list(split.corpus)
    queries = encode(model, [split.queries[q] for q in query_ids], batch_size)
    corpus = encode(model, [split.corpus[c] for c in corpus_ids], batch_size)
    hits = rank(queries, corpus, corpus_ids, max(top_k, 100))
    metrics: dict[str, Any] = retrieval_metrics(
        [[d for d, _ in h] for h in hits], [split.relevant[q] for q in query_ids]
    )
    return {**metrics, "n_queries": len(query_ids), "n_documents": len(corpus_ids)}


def make_evaluator(split: RetrievalSplit, top_k: int, batch_size: int):
    """A sentence-transformers evaluator reporting cmft's metrics (dev ndcg@10 picks the best checkpoint)."""
    from sentence_transformers.sentence_transformer.evaluation import SentenceEvaluator

    class RetrievalEvaluator(SentenceEvaluator):
        def __init__(self):
            super().__init__()
            self.primary_metric = PRIMARY_METRIC["retrieval"]
            self.greater_is_better = True

        def __call__(self, model, output_path=None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
            metrics = evaluate_split(model, split, top_k, batch_size)
            return {k: float(v) for k, v in metrics.items() if not k.startswith("n_")}

    return RetrievalEvaluator()
