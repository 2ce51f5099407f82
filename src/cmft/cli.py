"""The `cmft` command line: each command parses its options and calls one library function."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from cmft.distributed import is_main
from cmft.errors import CmftError

app = typer.Typer(
    help="cmft: pretrain, fine-tune and export clinical ModernBERT encoders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Overrides = Annotated[list[str] | None, typer.Argument(help="Config overrides: key.sub=value (YAML scalars).")]
OutputDir = Annotated[Path | None, typer.Option("--output-dir", help="Run folder to write (default: runs/...).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the newest unfinished run from its checkpoint.")]


def _setup_logging() -> None:
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler], force=True)
    for noisy in (
        "transformers",
        "datasets",
        "accelerate",
        "sentence_transformers",
        "httpx",
        "urllib3",
        "matplotlib",
        "huggingface_hub",
    ):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _print_version(value: bool) -> None:
    if value:
        from cmft.version import __version__

        typer.echo(f"cmft {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """cmft: pretrain, fine-tune and export clinical ModernBERT encoders."""


@app.command()
def pretrain(
    config: Annotated[
        str | None,
        typer.Argument(help="A bundled config name (default clinical_tiny; `cmft configs list`) or a YAML path."),
    ] = None,
    overrides: Overrides = None,
    output_dir: OutputDir = None,
    resume: Resume = False,
) -> None:
    """Pretrain a clinical ModernBERT encoder with masked-language modelling on the bundled corpus."""
    from cmft.pretraining.run import pretrain as run_pretrain

    _run_stage("pretrain", run_pretrain, config, overrides, output_dir, resume)


@app.command()
def finetune(
    recipe: Annotated[
        str | None, typer.Argument(help="A recipe path or a bundled recipe name (e.g. icd_coding).")
    ] = None,
    overrides: Overrides = None,
    output_dir: OutputDir = None,
    resume: Resume = False,
) -> None:
    """Fine-tune an encoder on a task recipe: NER, ICD coding, note classification or retrieval."""
    from cmft.finetuning.run import finetune as run_finetune

    _run_stage("finetune", run_finetune, recipe, overrides, output_dir, resume)


def _run_stage(kind: str, run: Callable, source: str | None, overrides: list[str] | None, output_dir: Path | None,
               resume: bool) -> None:  # fmt: skip
    items = list(overrides or [])
    if source is not None and "=" in source:  # `cmft pretrain key=value` (the default config), `--resume key=value`
        items.insert(0, source)
        source = None
    run_dir = run(source, items, output_dir=output_dir, resume=resume)
    if is_main():
        typer.echo(f"{kind} run finished: {run_dir}")


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A finished fine-tuning or pretraining run folder.")],
    split: Annotated[
        str | None, typer.Option(help="Split of the run's recipe to evaluate: train, dev or test (default test).")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="Evaluate on this data file instead (read as --split).")] = None,
) -> None:
    """Recompute a run's metrics from its saved model and print them as JSON (metrics.json is left as training wrote
    it); on the test split, or a pretraining run's held-out documents, they reproduce metrics.json."""
    import json

    from cmft.evaluation import evaluate_run

    typer.echo(json.dumps(evaluate_run(run_dir, split, data), indent=2))


@app.command()
def predict(
    source: Annotated[Path | None, typer.Argument(help="A fine-tuning run folder or an export folder.")] = None,
    input: Annotated[
        Path | None,
        typer.Argument(
            help="Input texts: .jsonl (`text`, optional `id`), .csv/.tsv or .parquet (columns `text`, "
            "`id`), or a text file, one text per line."
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Output file: JSON lines, or Parquet if it ends in .parquet (default: stdout).")
    ] = None,
    onnx: Annotated[
        bool, typer.Option("--onnx", help="Run the ONNX export (a run folder: export/<run name>).")
    ] = False,
    int8: Annotated[bool, typer.Option("--int8", help="With --onnx: the int8 model.")] = False,
    corpus: Annotated[Path | None, typer.Option(help="Retrieval: search this corpus (jsonl or text lines).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Retrieval: hits per query with --corpus.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Texts per batch (length-sorted).")] = 16,
    buffer_rows: Annotated[
        int, typer.Option("--buffer-rows", help="Input rows read, sorted and written at a time (and per part file).")
    ] = 10_000,
    text_field: Annotated[str, typer.Option("--text-field", help="The field or column holding the text.")] = "text",
    evidence: Annotated[
        bool, typer.Option("--evidence", help="ICD coding: each code's evidence spans (character offsets).")
    ] = False,
    evidence_k: Annotated[int | None, typer.Option("--evidence-k", help="With --evidence: spans per code (3).")] = None,
    evidence_method: Annotated[
        str | None,
        typer.Option("--evidence-method", help="With --evidence: attention (default) or attention_x_gradient (torch)."),
    ] = None,
    assertion: Annotated[
        Path | None,
        typer.Option("--assertion", help="NER: an assertion run (or export) that gives each entity its status."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="With --output: continue a killed run from its finished parts.")
    ] = False,
    merge: Annotated[
        Path | None, typer.Option("--merge", help="Only assemble this output from its finished parts (OUT.parts/).")
    ] = None,
) -> None:
    """Batch inference to JSON lines or Parquet: labels with scores, entities with character offsets, ICD codes with
    probabilities (and, with --evidence, the spans of the note their label attention weighs most), embeddings or
    top-k hits. Streams inputs of any size; resumable with --output; runs sharded under torchrun."""
    if merge is not None:
        if source is not None or input is not None:
            raise CmftError("--merge OUT takes no SOURCE or INPUT: it assembles OUT from OUT.parts/")
        from cmft.predict import merge as run_merge

        summary = run_merge(merge)
        typer.echo(f"predict: merged {summary['n_inputs']} texts → {merge}", err=True)
        return
    if source is None or input is None:
        raise CmftError("cmft predict needs SOURCE and INPUT (or --merge OUT); see cmft predict --help")
    from cmft.predict import predict as run_predict

    summary = run_predict(source, input, output, onnx=onnx, batch_size=batch_size, corpus=corpus, top_k=top_k,
                          int8=int8, text_field=text_field, evidence=evidence, evidence_k=evidence_k,
                          evidence_method=evidence_method, buffer_rows=buffer_rows, resume=resume,
                          assertion=assertion)  # fmt: skip
    if not is_main():
        return
    notes = [f"{summary['n_inputs']} texts in {summary['seconds']:.1f} s ({summary['rows_per_s']:.1f} texts/s)",
             f"{summary['backend']} ({summary['provider']})"]  # fmt: skip
    if summary["processes"] > 1:
        shares = " + ".join(str(n) for n in summary.get("per_process", []))
        notes.append(f"{summary['processes']} processes" + (f" ({shares} texts)" if shares else ""))
    for key, label in (("n_reused", "from earlier parts"), ("n_truncated", "truncated to the model's limit"),
                       ("n_windowed", "split into windows"), ("n_empty_skipped", "empty, skipped")):  # fmt: skip
        if summary.get(key):
            notes.append(f"{summary[key]} {label}")
    typer.echo("predict: " + ", ".join(notes) + (f" → {output}" if output else ""), err=True)


@app.command()
def serve(
    source: Annotated[Path, typer.Argument(help="A fine-tuning run folder or an export folder.")],
    host: Annotated[str, typer.Option(help="Address to listen on (loopback unless told otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    onnx: Annotated[bool, typer.Option("--onnx", help="Serve the ONNX export (of a run: export/<name>).")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="With --onnx: the int8 model.")] = False,
    max_batch_tokens: Annotated[int, typer.Option(help="Padded tokens per forward pass at most.")] = 4096,
    max_batch_size: Annotated[int, typer.Option(help="Rows (texts or windows) per forward pass at most.")] = 16,
    max_wait_ms: Annotated[float, typer.Option(help="How long a request may wait for others to batch with.")] = 0.0,
    batching: Annotated[bool, typer.Option(help="--no-batching: one request per forward pass.")] = True,
    api_key_file: Annotated[Path | None, typer.Option(help="Require this file's key as a Bearer token.")] = None,
    corpus: Annotated[Path | None, typer.Option(help="Retrieval: documents for /search (jsonl or text lines).")] = None,
    max_texts: Annotated[int, typer.Option(help="Texts per request at most (more: 413).")] = 256,
    max_body_mb: Annotated[float, typer.Option(help="Request body size limit in MiB (more: 413).")] = 8.0,
    assertion: Annotated[
        Path | None,
        typer.Option("--assertion", help="NER: an assertion run (or export) that gives each entity its status."),
    ] = None,
) -> None:
    """An HTTP service for the model: POST /predict, /search; GET /health, /ready, /info, /metrics, /docs."""
    from cmft.serving.run import serve as run_serve

    run_serve(source, host, port, onnx=onnx, int8=int8, max_batch_tokens=max_batch_tokens,
              max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, batching=batching, api_key_file=api_key_file,
              corpus=corpus, max_texts=max_texts, max_body_mb=max_body_mb, assertion=assertion)  # fmt: skip


@app.command()
def export(
    run_dir: Annotated[Path | None, typer.Argument(help="Run folder (default: runs/finetune/latest).")] = None,
    onnx: Annotated[bool, typer.Option("--onnx", help="Export to ONNX (the only format).")] = False,
    quantize: Annotated[str | None, typer.Option(help="Also write an int8 model: int8.")] = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", help="Default: export/<run name>.")] = None,
    overrides: Overrides = None,
) -> None:
    """Export a run to ONNX (every head; a pretrain run: the encoder), parity-checked against PyTorch."""
    if not onnx:
        raise CmftError("cmft export needs --onnx (the only export format)")
    from cmft.export import export_run

    if run_dir is not None and (run_dir / "model" / "config.json").is_file():
        from cmft.modeling import check_model_folder

        check_model_folder(run_dir / "model", "export")  # before tracing: safetensors only, intact, matching
    folder, report = export_run(run_dir, output_dir, quantize, list(overrides or []))
    typer.echo(
        f"exported {report['task']} to {folder}: max |onnx - torch| {report['max_abs_diff']:.2e} over lengths "
        f"{', '.join(report['per_length'])} ({report['provider']})"
    )
    if "int8" in report and "metric" in report["int8"]:
        q = report["int8"]
        typer.echo(
            f"int8: dev {q['metric']} {q['fp32']:.4f} → {q['int8']:.4f}; "
            f"{q['size_mb_fp32']} MB → {q['size_mb_int8']} MB"
        )


@app.command()
def validate(
    recipe: Annotated[str, typer.Argument(help="A recipe path or bundled name.")],
    overrides: Overrides = None,
) -> None:
    """Check a recipe: keys, types, files, labels and that the encoder loads."""
    from cmft.finetuning.validate import validate_recipe

    typer.echo(validate_recipe(recipe, list(overrides or [])))


def _describe_recipe(path: Path) -> str:
    from cmft.finetuning.run import load_recipe

    recipe = load_recipe(path)
    return f"task={recipe.task:<20} tuning={recipe.tuning.method}"


def _describe_config(path: Path) -> str:
    from cmft.config import load_config
    from cmft.pretraining.config import PretrainConfig

    config = load_config(PretrainConfig, path)
    shape = config.model.architecture
    return f"hidden={shape.hidden_size:<5} layers={shape.num_hidden_layers:<3} max_steps={config.training.max_steps}"


def _bundled_group(command: str, folder: str, what: str, describe: Callable[[Path], str], after_cp: str) -> None:
    """`cmft COMMAND list | show NAME | cp NAME DEST` over one bundled folder."""
    from cmft.paths import bundled_config, bundled_configs

    group = typer.Typer(help=f"List, show and copy the bundled {what}s.", no_args_is_help=True)
    app.add_typer(group, name=command)

    @group.command("list", help=f"List the bundled {what}s.")
    def list_all() -> None:
        for name, path in bundled_configs(folder).items():
            typer.echo(f"{name:<28} {describe(path)}")

    @group.command("show", help=f"Print a bundled {what}.")
    def show(name: str) -> None:
        typer.echo(bundled_config(name, folder, what, f"cmft {command} list").read_text(encoding="utf-8"), nl=False)

    @group.command("cp", help=f"Copy a bundled {what} to edit it; {after_cp}.")
    def copy(name: str, dest: Path) -> None:
        _copy(bundled_config(name, folder, what, f"cmft {command} list"), dest)


_bundled_group(
    "recipes", "recipes", "recipe", _describe_recipe, "its data paths stay `bundled:...` until you change them"
)
_bundled_group("configs", "pretrain", "pretraining config", _describe_config, "run it with `cmft pretrain DEST`")


def _copy(source: Path, dest: Path) -> None:
    target = dest / source.name if dest.is_dir() else dest
    if target.exists():
        raise CmftError(f"{target}: already exists; choose another destination")
    try:
        target.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    except OSError as exc:
        raise CmftError(f"{target}: cannot write ({exc.strerror})") from None
    typer.echo(f"copied {source.name} to {target}")


def main() -> None:
    """Entry point: bad input → one line on stderr and exit 2; unexpected errors → exit 1."""
    _setup_logging()
    try:
        status = app(standalone_mode=False)
    except CmftError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as exc:
        # typer bundles its own click: recognise its usage errors (unknown option, missing argument) by shape
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(2)
        raise
    sys.exit(status if isinstance(status, int) else 0)


if __name__ == "__main__":
    main()
