"""ICD zero-shot candidates (icd_coding.label_space.zero_shot_candidates, K): how much of what the full scoring of the
zero-shot codes finds each note's K candidates keep, and how long prediction takes with them.

The run is a fine-tuned ICD coding run (label_attention head, level code) saved without zero-shot codes. The script
adds them in memory as a zero-shot run adds them after training (cmft.tasks.icd_zero_shot.add_zero_shot_codes: the
codes of the description table in a trained code's category, queries from their descriptions through the run's
encoder), and scores them through the shipped head (cmft.heads.LabelAttentionHead) with every zero-shot code in full
("dense": zero_shot_candidates null) and with each K of --ks.

Candidates, on the first --notes dev notes of the run's recipe, per K (Z: the zero-shot codes):
    gold_share_candidates   dev gold zero-shot codes that are among their note's K candidates, over all of them
    gold_share_dense_top_k  the same for the full scoring's own top K of each note (the reference)
    gold_share_random       K / Z: what K codes drawn at random would hold
    dense_top10_kept        share of each note's full-scoring top 10 zero-shot codes among its candidates (mean over
                            notes); dense_top50_kept the same for the top 50
    average_precision       micro average precision over the zero-shot codes (every note × every zero-shot code,
                            ranked by logit; tied scores as a block, as sklearn counts them); a code outside its note's
                            candidates has logit −700. The dense figure is `average_precision_dense`.

Prediction time, on the first --timing-notes dev notes: `cmft.inference.predict_texts` (what `cmft predict` runs: the
task's encoding, batches of --batch-size, decoding) with PyTorch, for "none" (the run as saved: no zero-shot code),
"dense" and each K. All variants share one encoder in memory (only the head differs); each gets the same warm-up
(predict on the first 4 notes); then --rounds rounds, each timing every variant once, round r in the variants' order
rotated by r // 2 and reversed on odd rounds (two variants: AB, BA, BA, AB, …). Per variant: the seconds of each
round, median, min, max, spread ((max − min) / median), and median and min as ratios to "none". Zero-shot codes are
decoded at the trained codes' threshold (the value add_zero_shot_codes gives them before dev tunes their own), so
decoding outputs about as many codes in every variant.

--onnx: also exports "none", "dense" and each K of --onnx-ks with `cmft export`'s export_run (its seconds and parity
are recorded) and times predict_texts through onnxruntime (OnnxBackend, --threads threads) in the same way. An export
that fails its parity check is recorded with its error and not timed (candidate scores that tie to float precision, as
in a barely trained model, can make onnxruntime choose other candidates than PyTorch).

--big: a large label space as well, for sizes only. Recall: the model's trained codes, and as zero-shot codes every
sibling of every train code plus the train codes outside the label space (those with a description), each scored
from its description as above. Timing (and --onnx): trained rows for every train code, the model's own rows and one
for each train code outside the label space whose rows are SYNTHETIC (query from its description, output weight the
model's mean output weight plus 0.1 × its per-dimension spread × Gaussian noise (seed 0), bias the model's mean bias)
— they serve the head's sizes only, not any figure of quality — plus the siblings of all of them as zero-shot codes.
"none" is then these trained rows without zero-shot codes. The ONNX "dense" variant is not exported at this size.

    python benchmarks/icd_zero_shot.py --run runs/finetune/<icd run> [--notes 250] [--timing-notes 30]
        [--ks 64,128,256,512,1024] [--rounds 5] [--batch-size 16] [--threads 1] [--big] [--onnx] [--onnx-ks 512]
        [--results benchmarks/results/icd_zero_shot.json]
    python benchmarks/icd_zero_shot.py --run runs/finetune/<icd run> --quick

`--quick` (16 recall notes, 8 timing notes, K 64 and 512, 2 rounds; --big and --onnx only when given) checks that the
script runs: under half a minute with the tiny encoder of `cmft pretrain` on one thread (about two minutes with --big
--onnx); its figures mean nothing. Its default results file is benchmarks/results/icd_zero_shot_quick.json. The full
run with that encoder takes about 2 minutes, about 7 with --big --onnx (--big: up to about 8 GiB at once, the dense
head's [16, 33k, T] attention). Time it on otherwise idle cores: the load average at the start and end is recorded.
Prints one JSON line last: the results record without the machine and library versions.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import provenance, shown, write_results  # noqa: E402

from cmft.heads import LabelAttentionHead  # noqa: E402
from cmft.inference import Loaded, OnnxBackend, load_export, open_source, predict_texts  # noqa: E402
from cmft.tasks import get_task  # noqa: E402
from cmft.tasks.icd_descriptions import description_queries, read_descriptions, scaled  # noqa: E402
from cmft.tasks.icd_zero_shot import _append_rows, _zero_shot_biases, add_zero_shot_codes, zero_shot_codes  # noqa: E402

WARM_UP_NOTES = 4
TOP = (10, 50)  # the full scoring's top codes whose share among the candidates is recorded
SYNTHETIC = ("timing and ONNX only: the trained rows beyond the model's (one per train code outside its label space) "
             "are synthetic (query from the code's description, output weight the model's mean output weight plus "
             "noise, bias its mean bias) and serve the head's sizes only; the recall figures use the model's own "
             "trained rows and zero-shot rows built as the shipped code builds them")  # fmt: skip
Variant = Callable[[], tuple[Loaded, Any]]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# the heads ------------------------------------------------------------------------------------------------------
def grown(base: LabelAttentionHead, queries: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor,
          zero_shot: int) -> LabelAttentionHead:  # fmt: skip
    """A copy of `base` with rows appended (the last `zero_shot` of all its rows being zero-shot ones)."""
    head = copy.deepcopy(base)
    _append_rows(head, queries.to(base.label_queries.weight), weights, biases.to(base.output_bias))
    head.zero_shot, head.candidates = zero_shot, None
    return head.eval()


def settings_with(meta: dict[str, Any], labels: list[str], codes: list[str], threshold: float,
                  candidates: int | None) -> dict[str, Any]:  # fmt: skip
    """The model settings (icd_coding.json) of a variant: its labels, its zero-shot codes (the last) and K."""
    return {**meta["icd"], "labels": labels, "code_thresholds": meta["icd"].get("code_thresholds") or {},
            "zero_shot_labels": codes, "zero_shot_threshold": threshold if codes else None,
            "zero_shot_candidates": candidates if codes else None}  # fmt: skip


def variant_settings(meta: dict[str, Any], trained: list[str], codes: list[str], threshold: float,
                     ks: list[int]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The settings of "none" (the trained codes alone), "dense" and "K=k" for each k."""
    labels = trained + codes
    return {"none": settings_with(meta, trained, [], threshold, None),
            "dense": settings_with(meta, labels, codes, threshold, None),
            **{f"K={k}": settings_with(meta, labels, codes, threshold, k) for k in ks}}  # fmt: skip


def torch_variant(loaded: Loaded, backend: Any, head: LabelAttentionHead, settings: dict[str, Any]) -> Variant:
    """What predict_texts runs for one variant: the shared module with `head`, and the variant's manifest."""
    coder, candidates = loaded.module.coder, settings["zero_shot_candidates"]
    variant = replace(loaded, meta={**loaded.meta, "labels": settings["labels"], "icd": settings})

    def ready() -> tuple[Loaded, Any]:
        coder.head = head
        head.candidates = candidates
        return variant, backend

    return ready


# candidates ------------------------------------------------------------------------------------------------------
def micro_average_precision(scores: np.ndarray, gold: np.ndarray) -> float | None:
    """Average precision over every (note, code) pair ranked by score; tied scores count as one block (precision read
    at the block's end, as sklearn's average_precision_score)."""
    if not gold.any():
        return None
    order = np.argsort(-scores, axis=None, kind="stable")
    ranked, hits = scores.ravel()[order], gold.ravel()[order]
    found = np.cumsum(hits)
    ends = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])  # the last position of each run of tied scores
    end = ends[np.searchsorted(ends, np.arange(len(ranked)))]
    return float((found[end] / (end + 1.0))[hits].mean())


def candidate_figures(loaded: Loaded, head: LabelAttentionHead, trained: int, codes: list[str], examples: list[Any],
                      ks: list[int], batch_size: int) -> dict[str, Any]:  # fmt: skip
    """The candidates' figures (module docstring) of `head` (`trained` rows, then the zero-shot `codes`)."""
    started = time.monotonic()
    column = {code: j for j, code in enumerate(codes)}
    gold = np.zeros((len(examples), len(codes)), dtype=bool)
    for row, example in enumerate(examples):
        gold[row, [column[code] for code in example.label if code in column]] = True
    meta = loaded.meta
    units, _ = loaded.task.encode(loaded.tokenizer, [example.text for example in examples], meta)
    longest = meta["icd"]["max_length"]
    batch_size = max(1, min(batch_size, 2**28 // (len(codes) * longest)))  # [batch, Z, T] fp32 scores ≤ 1 GiB
    dense = np.empty(gold.shape)
    logits = {k: np.empty(gold.shape) for k in ks}
    chosen = {k: np.zeros(gold.shape, dtype=bool) for k in ks}
    saved = head.candidates
    try:
        with torch.inference_mode():
            for start in range(0, len(units), batch_size):
                ids, mask = loaded.task.collate(units[start : start + batch_size], loaded.pad_id, meta)
                states, real = loaded.module.states(torch.from_numpy(ids), torch.from_numpy(mask))
                rows = slice(start, start + len(ids))
                head.candidates = None
                dense[rows] = head(states, real)[:, trained:].double().numpy()
                for k in ks:
                    head.candidates = k
                    scored, _, indices = head.attend_rows(states, real)
                    logits[k][rows] = scored[:, trained:].double().numpy()
                    if indices is None:  # K ≥ Z: every zero-shot code
                        chosen[k][rows] = True
                    else:
                        np.put_along_axis(chosen[k][rows], indices[:, trained:].numpy() - trained, True, axis=1)
    finally:
        head.candidates = saved
    rank = np.empty(gold.shape, dtype=np.int64)  # each code's place in its note's full-scoring order (0 = first)
    np.put_along_axis(rank, np.argsort(-dense, axis=1, kind="stable"), np.arange(len(codes))[None, :], axis=1)
    n_gold = int(gold.sum())

    def share(inside: np.ndarray) -> float | None:
        return round(float((inside & gold).sum() / n_gold), 4) if n_gold else None

    by_k = {}
    for k in ks:
        by_k[str(k)] = {
            "gold_share_candidates": share(chosen[k]),
            "gold_share_dense_top_k": share(rank < k),
            "gold_share_random": round(min(k / len(codes), 1.0), 4),
            **{f"dense_top{top}_kept": round(float(((rank < top) & chosen[k]).sum(1).mean() / min(top, len(codes))),
                                             4) for top in TOP},
            "average_precision": _rounded(micro_average_precision(logits[k], gold)),
            "candidates_per_note": int(chosen[k].sum(1).max()),
        }  # fmt: skip
    return {"notes": len(examples), "trained_codes": trained, "zero_shot_codes": len(codes),
            "gold_zero_shot_codes": n_gold, "notes_with_gold_zero_shot_codes": int(gold.any(1).sum()),
            "recall_batch_size": batch_size, "average_precision_dense": _rounded(micro_average_precision(dense, gold)),
            "by_k": by_k, "seconds": round(time.monotonic() - started, 1)}  # fmt: skip


def _rounded(value: float | None, digits: int = 5) -> float | None:
    return None if value is None else round(value, digits)


# timing --------------------------------------------------------------------------------------------------------------
def time_variants(variants: dict[str, Variant], texts: list[str], rounds: int, batch_size: int) -> dict[str, Any]:
    """predict_texts over `texts` for each variant: the same warm-up each, rounds in rotated and reversed order."""
    names = list(variants)
    for name in names:
        predict_texts(*variants[name](), texts[:WARM_UP_NOTES], batch_size)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, list[dict[str, Any]]] = {}
    orders = []
    for r in range(rounds):
        turn = (r // 2) % len(names)  # rotated every other round, reversed on odd rounds: with two variants ABBA…
        order = names[turn:] + names[:turn]
        order = order[::-1] if r % 2 else order
        orders.append(order)
        for name in order:
            loaded, backend = variants[name]()
            gc.collect()
            started = time.perf_counter()
            outputs[name], _ = predict_texts(loaded, backend, texts, batch_size)
            seconds[name].append(time.perf_counter() - started)
        log(f"round {r}: " + ", ".join(f"{name} {seconds[name][-1]:.2f} s" for name in names))
    base, base_min = statistics.median(seconds[names[0]]), min(seconds[names[0]])
    per_variant = {}
    for name in names:
        median, fastest, slowest = statistics.median(seconds[name]), min(seconds[name]), max(seconds[name])
        codes = [len(result["codes"]) for result in outputs[name]]
        zero_shot = [sum(bool(code.get("zero_shot")) for code in result["codes"]) for result in outputs[name]]
        per_variant[name] = {
            "seconds": [round(s, 3) for s in seconds[name]], "median_s": round(median, 3), "min_s": round(fastest, 3),
            "max_s": round(slowest, 3), "spread": round((slowest - fastest) / median, 3),
            f"ratio_to_{names[0]}": round(median / base, 3), f"min_ratio_to_{names[0]}": round(fastest / base_min, 3),
            "codes_per_note": round(statistics.fmean(codes), 2), "zero_shot_codes_output": sum(zero_shot),
        }  # fmt: skip
    return {"notes": len(texts), "batch_size": batch_size, "rounds": rounds, "warm_up_notes": WARM_UP_NOTES,
            "orders": orders, "variants": per_variant}  # fmt: skip


# ONNX ---------------------------------------------------------------------------------------------------------------
def save_variant(folder: Path, run: Path, loaded: Loaded, head: LabelAttentionHead, settings: dict[str, Any]) -> Path:
    """A run folder holding the run's encoder with `head` and `settings`: what export_run reads."""
    coder = loaded.module.coder
    kept = coder.head, coder.settings
    coder.head, coder.settings = head, settings
    head.candidates = settings["zero_shot_candidates"]
    try:
        coder.save_pretrained(folder / "model")
    finally:
        coder.head, coder.settings = kept
    loaded.tokenizer.save_pretrained(folder / "model")
    for name in ("recipe.yaml", "metrics.json"):
        if (run / name).is_file():
            shutil.copy(run / name, folder / name)
    return folder


def onnx_variants(folders: dict[str, Path], exports_to: Path, threads: int
                  ) -> tuple[dict[str, Variant], dict[str, Any]]:  # fmt: skip
    """Each run folder exported as `cmft export` exports it, and an onnxruntime variant of each that passes parity."""
    from cmft.errors import CmftError
    from cmft.export import export_run

    variants, exports = {}, {}
    for name, folder in folders.items():
        started = time.monotonic()
        try:
            out, parity = export_run(folder, exports_to / name.replace("=", ""))
        except CmftError as exc:  # a parity failure (its report kept in the folder): recorded, not timed
            report = exports_to / name.replace("=", "") / "parity.json"
            parity = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else {}
            kept = {key: parity[key] for key in ("max_abs_diff", "per_output") if key in parity}
            exports[name] = {"passed": False, "error": str(exc).replace(str(exports_to), "<exports>"), **kept}
            log(f"export {name}: {exports[name]['error']}")
            continue
        exports[name] = {"passed": True, "seconds": round(time.monotonic() - started, 1),
                         "export_seconds": parity.get("export_seconds"), "max_abs_diff": parity["max_abs_diff"],
                         "per_output": parity["per_output"]}  # fmt: skip
        log(f"export {name}: {exports[name]['seconds']} s, parity {parity['max_abs_diff']:.1e}")
        pair = (load_export(out), OnnxBackend(out / "model.onnx", threads=threads))
        variants[name] = lambda pair=pair: pair
    return variants, exports


def onnx_timing(folders: dict[str, Path], exports_to: Path, texts: list[str], args: argparse.Namespace
                ) -> dict[str, Any]:  # fmt: skip
    """The exports of `folders` and predict_texts through each of them, timed as the PyTorch variants."""
    variants, exports = onnx_variants(folders, exports_to, args.threads)
    return {"exports": exports, **time_variants(variants, texts, args.rounds, args.batch_size)}


# the large synthetic case --------------------------------------------------------------------------------------
def big_heads(task: Any, loaded: Loaded, base: LabelAttentionHead, trained: list[str]) -> dict[str, Any]:
    """The --big heads (module docstring): recall's (the model's trained rows, zero-shot: every train code's siblings
    and the described train codes outside the label space) and timing's (synthetic rows for the train codes outside
    the label space, zero-shot: the siblings of every train code)."""
    coder, descriptions = loaded.module.coder, task.descriptions
    outside = sorted(code for code in task.train_counts if code not in set(trained))
    siblings = zero_shot_codes(descriptions, trained + outside)
    recall_codes = sorted(set(siblings) | {code for code in outside if code in descriptions})
    texts = {code: descriptions.get(code, code) for code in [*outside, *siblings]}
    started = time.monotonic()
    kept = coder.head
    coder.head = base
    try:
        queries = description_queries(coder, loaded.tokenizer, list(texts.values()), 128)
    finally:
        coder.head = kept
    queries = scaled(queries, base.label_queries.weight.norm(dim=1).mean())
    row = {code: i for i, code in enumerate(texts)}
    log(f"big: {len(texts)} description queries in {time.monotonic() - started:.0f} s")

    def rows(codes: list[str]) -> torch.Tensor:
        return queries[[row[code] for code in codes]]

    with torch.no_grad():
        mean, bias = base.output_weight.mean(0), base.output_bias.detach()
        biases = torch.tensor(_zero_shot_biases(task, recall_codes, bias.numpy()))
        recall = grown(base, rows(recall_codes), mean.expand(len(recall_codes), -1), biases, len(recall_codes))
        noise = torch.randn(len(outside), mean.shape[0], generator=torch.Generator().manual_seed(0))
        synthetic = mean + 0.1 * base.output_weight.std(0) * noise
        many = grown(base, rows(outside), synthetic, torch.full((len(outside),), float(bias.mean())), 0)
        biases = torch.tensor(_zero_shot_biases(task, siblings, bias.numpy()))
        timing = grown(many, rows(siblings), mean.expand(len(siblings), -1), biases, len(siblings))
    return {"recall": (recall, recall_codes), "none": many, "timing": (timing, trained + outside, siblings),
            "queries_seconds": round(time.monotonic() - started, 1)}  # fmt: skip


# main -----------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a fine-tuned ICD coding run (label_attention, no zero-shot)")
    parser.add_argument("--notes", type=int, default=None, help="dev notes for the candidates' figures (250)")
    parser.add_argument("--timing-notes", type=int, default=None, help="dev notes timed per variant (30)")
    parser.add_argument("--ks", default=None, help="candidates K, comma-separated (64,128,256,512,1024)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (5)")
    parser.add_argument("--batch-size", type=int, default=16, help="predict's batch size (cmft predict's default)")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    parser.add_argument("--big", action="store_true", help="also the large label space (synthetic trained rows)")
    parser.add_argument("--onnx", action="store_true", help="also export and time through onnxruntime")
    parser.add_argument("--onnx-ks", default="512", help="K of the exported candidate variants (512)")
    parser.add_argument("--quick", action="store_true", help="a few notes, 2 rounds, K 64 and 512: does it run?")
    parser.add_argument("--results", default=None, help="default benchmarks/results/icd_zero_shot[_quick].json")
    args = parser.parse_args()
    quick = {"notes": 16, "timing_notes": 8, "ks": "64,512", "rounds": 2}
    full = {"notes": 250, "timing_notes": 30, "ks": "64,128,256,512,1024", "rounds": 5}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    ks = sorted({int(k) for k in args.ks.split(",")})
    onnx_ks = sorted({int(k) for k in args.onnx_ks.split(",")}) if args.onnx else []
    if min(ks + onnx_ks + [args.notes, args.timing_notes, args.rounds]) < 1:
        parser.error("--notes, --timing-notes, --rounds and every K must be at least 1")

    torch.set_num_threads(args.threads)
    started, load = time.monotonic(), [round(x, 2) for x in os.getloadavg()]  # other work slows the timings
    run = Path(args.run)
    loaded, backend = open_source(run, onnx=False)  # as `cmft predict RUN` opens it
    icd = loaded.meta.get("icd") or {}
    if loaded.task.name != "icd_coding" or icd.get("head") != "label_attention" or icd.get("level") != "code":
        parser.error(f"--run {args.run}: not an ICD coding run with the label_attention head at level code")
    if icd.get("zero_shot_labels"):
        parser.error(f"--run {args.run}: saved with zero-shot codes; pass the run without them")
    coder, tokenizer = loaded.module.coder, loaded.tokenizer
    task = get_task(loaded.recipe)
    task.restore(loaded.meta)
    task.prepare(tokenizer, splits=("train", "dev"))
    task.descriptions = read_descriptions(task.options.descriptions)
    trained, threshold = list(task.labels), float(task.threshold)
    base = copy.deepcopy(coder.head).eval()
    queries_started = time.monotonic()
    add_zero_shot_codes(task, coder, tokenizer)  # the shipped path: coder.head now has the zero-shot rows
    queries_seconds = round(time.monotonic() - queries_started, 1)
    codes, head = list(task.zero_shot_labels), coder.head.eval()
    if not codes:
        parser.error(f"--run {args.run}: its label space has no zero-shot sibling in {task.options.descriptions}")
    coder.head = base
    examples = task.splits["dev"].examples
    texts = [example.text for example in examples[: args.timing_notes]]
    log(f"{len(trained)} trained codes, {len(codes)} zero-shot codes ({queries_seconds} s for their queries)")

    result: dict[str, Any] = {
        "benchmark": "icd_zero_shot", "quick": args.quick, "run": shown(run),
        "model": {"model_type": loaded.module.coder.config.model_type, "hidden_size": coder.config.hidden_size,
                  "layers": coder.config.num_hidden_layers, "attention_dim": base.project.out_features,
                  "mode": icd["mode"], "max_length": icd["max_length"], "trained_codes": len(trained),
                  "threshold": threshold},
        "threads": torch.get_num_threads(), "load_average_at_start": load, "ks": ks,
        "zero_shot_threshold_in_timing": threshold,
    }  # fmt: skip
    case: dict[str, Any] = {"zero_shot_codes": len(codes), "queries_seconds": queries_seconds}
    case["candidates"] = candidate_figures(loaded, head, len(trained), codes, examples[: args.notes], ks,
                                           args.batch_size)  # fmt: skip
    log(f"candidates: {json.dumps(case['candidates']['by_k'])}")
    settings = variant_settings(loaded.meta, trained, codes, threshold, ks)
    heads = {name: base if name == "none" else head for name in settings}
    variants = {name: torch_variant(loaded, backend, heads[name], settings[name]) for name in settings}
    case["timing"] = time_variants(variants, texts, args.rounds, args.batch_size)
    result["codiesp"] = case

    big = None
    if args.big:
        big = big_heads(task, loaded, base, trained)
        recall_head, recall_codes = big["recall"]
        timing_head, big_trained, siblings = big["timing"]
        result["big"] = {"synthetic": SYNTHETIC, "queries_seconds": big["queries_seconds"]}
        result["big"]["candidates"] = candidate_figures(loaded, recall_head, len(trained), recall_codes,
                                                        examples[: args.notes], ks, args.batch_size)  # fmt: skip
        log(f"big candidates: {json.dumps(result['big']['candidates']['by_k'])}")
        del recall_head
        big["recall"] = None
        big_settings = variant_settings(loaded.meta, big_trained, siblings, threshold, ks)
        big_variants = {name: torch_variant(loaded, backend, big["none"] if name == "none" else timing_head, s)
                        for name, s in big_settings.items()}  # fmt: skip
        result["big"]["timing"] = {"trained_codes": len(big_trained), "synthetic_trained_rows": len(big_trained)
                                   - len(trained), "zero_shot_codes": len(siblings),
                                   **time_variants(big_variants, texts, args.rounds, args.batch_size)}  # fmt: skip
    coder.head = base

    if args.onnx:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            chosen = variant_settings(loaded.meta, trained, codes, threshold, onnx_ks)
            folders = {name: run if name == "none" else save_variant(root / f"run-{name}", run, loaded, head,
                                                                     chosen[name]) for name in chosen}  # fmt: skip
            result["codiesp"]["onnx"] = onnx_timing(folders, root / "exports", texts, args)
            if big is not None:
                chosen = variant_settings(loaded.meta, big_trained, siblings, threshold, onnx_ks)
                folders = {name: save_variant(root / f"run-big-{name}", run, loaded,
                                              big["none"] if name == "none" else timing_head, chosen[name])
                           for name in chosen if name != "dense"}  # fmt: skip
                result["big"]["onnx"] = onnx_timing(folders, root / "exports-big", texts, args)

    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.monotonic() - started, 1)
    default = "benchmarks/results/icd_zero_shot_quick.json" if args.quick else "benchmarks/results/icd_zero_shot.json"
    write_results(args.results or ROOT / default, {**provenance(), **result})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
