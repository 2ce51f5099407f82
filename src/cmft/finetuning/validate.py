"""`cmft validate`: everything that can be checked before training, in seconds."""

from __future__ import annotations

from cmft.finetuning.run import load_recipe


def validate_recipe(recipe: str, overrides: list[str]) -> str:
    """Keys and types, data files and labels, and that the encoder and its tokenizer load. Returns a summary."""
    config = load_recipe(recipe, overrides)
    from cmft.finetuning.engine import check_encoder, load_tokenizer, resolve_encoder
    from cmft.tasks import get_task

    encoder = resolve_encoder(config.model.encoder)
    check_encoder(config, encoder)
    tokenizer = load_tokenizer(encoder, config.model.trust_remote_code)
    if config.task == "retrieval":
        from cmft.finetuning.retrieval_engine import read_splits

        splits = read_splits(config)
        sizes = ", ".join(
            f"{n} {len(s.evaluated_queries)} queries / {len(s.corpus)} documents" for n, s in splits.items()
        )
        return f"ok: retrieval recipe; encoder {encoder}; {sizes}"
    task = get_task(config)
    task.prepare(tokenizer)
    sizes = ", ".join(f"{name} {len(rows)}" for name, rows in task.datasets.items())
    return f"ok: {config.task} recipe; encoder {encoder}; {len(task.labels)} labels; examples: {sizes}"
