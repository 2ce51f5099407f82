"""How long a bundled recipe takes as a user runs it: `cmft finetune RECIPE` from the checkout's root, in a child
process, wall-clock seconds and peak resident memory, with the run's test metrics.

    python benchmarks/recipe_time.py assertion [--set training.epochs=1 ...] [--results PATH]

The encoder is the recipe's own (`latest`: the newest `cmft pretrain` run under runs/pretrain). `--set` passes
recipe overrides as `cmft finetune` takes them. Prints one JSON line last (`wall_seconds`, `peak_rss_gib`,
`train_seconds` and the test metrics the run wrote) and writes it, with provenance, to --results (default
benchmarks/results/recipe_time_<recipe>.json). Time it on otherwise idle cores: other work on the machine slows it.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import provenance, write_results  # noqa: E402

FINISHED = re.compile(r"finetune run finished: (\S+)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a bundled recipe name (assertion, icd_coding, …) or a recipe file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--results", default=None)
    args = parser.parse_args()

    command = [sys.executable, "-m", "cmft", "finetune", args.recipe, *args.overrides]
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"cmft finetune {args.recipe} failed (exit {done.returncode}): {done.stderr.strip()[-400:]}")
    found = FINISHED.search(done.stdout + done.stderr)
    if found is None:
        raise SystemExit("cmft finetune finished without naming its run folder")
    run = ROOT / found.group(1)
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    scalars = {key: value for key, value in metrics.items() if isinstance(value, (int, float, str))}
    record = {
        **provenance(),
        "recipe": args.recipe, "overrides": args.overrides, "run_folder": found.group(1),
        "wall_seconds": round(wall, 1), "peak_rss_gib": round(peak_kib / 2**20, 2),
        "metrics": scalars,
    }  # fmt: skip
    name = Path(args.recipe).stem
    write_results(ROOT / (args.results or f"benchmarks/results/recipe_time_{name}.json"), record)
    print(json.dumps({key: value for key, value in record.items() if key not in ("machine", "versions")}))


if __name__ == "__main__":
    main()
