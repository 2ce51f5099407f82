"""`cmft finetune`: the recipe engine."""
