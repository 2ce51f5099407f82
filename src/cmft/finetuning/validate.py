"""`cmft validate`: everything that can be checked before training, in seconds."""

from __future__ import annotations

from cmft.finetuning.run import load_recipe


def validate_recipe(recipe: str, overrides: list[str]) -> str:
    """Keys and types, data files and labels, and that the encoder and its tokenizer load. Returns a summary."""
    config = load_recipe(recipe, overrides)
    from cmft.finetuning.engine import check_encoder, load_tokenizer, resolve_encoder
    from cmft.finetuning.rates import resolve_learning_rate
    from cmft.tasks import get_task

    task = get_task(config)
    task.check_recipe()
    encoder = resolve_encoder(config.model.encoder)
    check_encoder(config, encoder, task)
    resolve_learning_rate(config, encoder)  # says what `auto` stands for with this encoder
    tokenizer = load_tokenizer(encoder, config.model.trust_remote_code)
    task.prepare(tokenizer)
    return f"ok: {config.task} recipe; encoder {encoder}; {task.summary()}"
