"""The machinery behind `cmft predict` (cmft.predict) for inputs of any size: lazy readers of jsonl, text lines, csv
and Parquet (`inputs`), the parts folder that makes a run resumable and shardable over processes (`parts`), the
final output files, JSON lines or Parquet (`outputs`), and rank 0's progress display (`progress`)."""
