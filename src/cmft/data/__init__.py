"""Readers for fine-tuning data: jsonl, csv, and note folders with tsv labels."""
