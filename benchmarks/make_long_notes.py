"""Build the long-note set: CONSTRUCTED notes of 2,048-8,192 tokens made by joining CodiEsp case reports.

No bundled data set has notes longer than about 1,500 tokens, so whole-note coding at 4,096-8,192 tokens is
measured on notes made here. Each split is built from the same CodiEsp split (train from train, dev from dev, test
from test: no report crosses splits): its reports are shuffled (seeded), and each note gets a target length drawn
uniformly from [min_tokens, max_tokens] and takes the next reports, joined by a blank line, until it reaches the
target; a report that would take it past max_tokens is left out (lengths: the sum of its reports' token counts with
the encoder's tokenizer). A note's codes are the union of
its reports' codes. Every record says `"constructed": true` and lists its source report ids. These are not real
long notes (a real discharge summary is one story, not several patients): use the set to measure speed, memory and
whether whole-note coding trains, not as clinical evidence.

    python benchmarks/make_long_notes.py OUT_DIR [--encoder runs/pretrain/latest/model] [--seed 0]

Writes OUT_DIR/{train,dev,test,few}.jsonl (few: the test split's first two notes) and OUT_DIR/summary.json. Your own
long notes need nothing of this: a jsonl of {"text", "codes"} records is a recipe's data.train as it is.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cmft.paths import bundled_file  # noqa: E402

SPLITS = ("train", "dev", "test")


def join_reports(reports: list[dict], lengths: list[int], rng: random.Random, min_tokens: int, max_tokens: int,
                 max_notes: int | None) -> list[dict]:  # fmt: skip
    """Consecutive reports joined until the note reaches its drawn target; a report that would take it past
    `max_tokens` is left out."""
    notes, index = [], 0
    while index < len(reports) and (max_notes is None or len(notes) < max_notes):
        target = rng.randint(min_tokens, max_tokens)
        taken, total = [], 0
        while index < len(reports) and total < target:
            if total + lengths[index] <= max_tokens:
                taken.append(reports[index])
                total += lengths[index]
            index += 1
        if total < min_tokens:  # the split's last reports: too short to be a long note
            break
        notes.append({"id": f"long-{len(notes):03d}", "text": "\n\n".join(r["text"] for r in taken),
                      "codes": sorted({code for r in taken for code in r["codes"]}), "tokens": total,
                      "sources": [r["id"] for r in taken], "constructed": True})  # fmt: skip
    return notes


def build(out: Path, tokenizer: str = "runs/pretrain/latest/model", seed: int = 0, min_tokens: int = 2048,
          max_tokens: int = 8192, max_notes: int | None = None) -> dict:  # fmt: skip
    """Write the set into `out`; returns its summary (paths, counts, token lengths)."""
    from transformers import AutoTokenizer

    encode = AutoTokenizer.from_pretrained(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"constructed": True, "source": "CodiEsp (English case reports, CC BY 4.0), bundled",
                     "seed": seed, "tokenizer": str(tokenizer), "target_tokens": [min_tokens, max_tokens]}  # fmt: skip
    for split in SPLITS:
        with open(bundled_file(f"data/codiesp/{split}.jsonl"), encoding="utf-8") as handle:
            reports = [json.loads(line) for line in handle if line.strip()]
        rng = random.Random(f"{seed}-{split}")
        rng.shuffle(reports)
        lengths = [len(encode(r["text"])["input_ids"]) for r in reports]
        notes = join_reports(reports, lengths, rng, min_tokens, max_tokens, max_notes)
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(note, ensure_ascii=False) + "\n" for note in notes), encoding="utf-8")
        summary[split] = str(path)
        tokens = sorted(note["tokens"] for note in notes)
        summary[f"{split}_notes"] = len(notes)
        summary[f"{split}_tokens_min_median_max"] = [tokens[0], tokens[len(tokens) // 2], tokens[-1]] if tokens else []
        if split == "test":
            (out / "few.jsonl").write_text("".join(json.dumps(n, ensure_ascii=False) + "\n" for n in notes[:2]),
                                           encoding="utf-8")  # fmt: skip
            summary["few"] = str(out / "few.jsonl")
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--encoder", default="runs/pretrain/latest/model", help="whose tokenizer counts the tokens")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(build(args.out, args.encoder, args.seed)))


if __name__ == "__main__":
    main()
