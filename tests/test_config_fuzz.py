"""Property: any mapping fed to the config loader is either accepted or refused with a CmftError (one line),
never another exception: random keys, the real section names with random values, wrong types, None, lists,
huge and negative numbers."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmft.config import apply_overrides, build_config, read_yaml
from cmft.errors import CmftError
from cmft.finetuning.config import TASKS, RecipeConfig
from cmft.pretraining.config import PretrainConfig


def _names(model) -> list[str]:
    """Every field name of a config schema, nested sections included."""
    names: list[str] = []
    for name, info in model.model_fields.items():
        names.append(name)
        for arg in [info.annotation, *getattr(info.annotation, "__args__", ())]:
            if isinstance(arg, type) and hasattr(arg, "model_fields"):
                names.extend(_names(arg))
    return names


KEYS = sorted({*_names(RecipeConfig), *_names(PretrainConfig), *TASKS, "bundled", "path"})
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from([*TASKS, "auto", "lora", "full", "chunked", "mean", "line", "latest", "1e-4", "-1", "0"]),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=20,
)
documents = st.dictionaries(keys, values, max_size=8)


def _check(schema, data) -> None:
    try:
        build_config(schema, data, "fuzz.yaml")
    except CmftError as exc:
        message = str(exc)
        assert message.startswith("fuzz.yaml") and "\n" not in message, message


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(documents, st.sampled_from(TASKS))
def test_random_recipes_are_accepted_or_refused_with_cmft_error(data, task):
    _check(RecipeConfig, data)
    _check(RecipeConfig, {"task": task, "data": {"train": "x.jsonl"}, **data})


@FUZZ
@given(documents)
def test_random_pretrain_configs_are_accepted_or_refused_with_cmft_error(data):
    _check(PretrainConfig, data)


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=6), st.sampled_from(["", "x", "1", "[", "{", "-5"]))
def test_random_overrides_and_yaml_round_trips(tmp_path_factory, data, raw):
    path = tmp_path_factory.mktemp("fuzz") / "fuzz.yaml"
    path.write_text(yaml.safe_dump(data) + raw, encoding="utf-8")
    try:
        loaded = read_yaml(path)
    except CmftError as exc:
        assert "\n" not in str(exc)
        return
    overrides = [f"{key}.{inner}={raw}" for key in list(loaded)[:3] for inner in ("max_steps", "encoder")]
    _check(PretrainConfig, apply_overrides(loaded, overrides))
    _check(RecipeConfig, apply_overrides(loaded, overrides))


@pytest.mark.parametrize("text", ["a: b: c", "\t- x", "key: [1, 2", "!!python/object:os.system {}", "a: *unknown"])
def test_yaml_that_safe_load_refuses(tmp_path, text):
    path = tmp_path / "x.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CmftError, match="x.yaml"):
        read_yaml(path)
