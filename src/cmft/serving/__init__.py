"""`cmft serve`: a fine-tuning run or export folder behind an HTTP service with dynamic batching."""
