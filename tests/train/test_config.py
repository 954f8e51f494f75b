"""Config errors are clear and come before any model loads."""

from __future__ import annotations

import pytest

from lmdistill.config import load_config
from lmdistill.errors import ConfigError
from lmdistill.losses import build_objective


def test_misspelt_key_names_key_and_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  stpes: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "train.stpes" in msg and "did you mean 'steps'" in msg and "batch_size" in msg


def test_wrong_type_and_bad_choice():
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"train\.mixed_precision.*'no', 'bf16' or 'fp16'"):
        load_config(None, ["train.mixed_precision=fp8"])


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher\.path.*does not exist"):
        load_config(None, [f"teacher.path={tmp_path}/nope"])
    with pytest.raises(ConfigError, match="nope.jsonl"):
        load_config(None, ["data.corpus=nope.jsonl"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.steps=7", "train.betas=[0.8, 0.9]", "objective={name: jsd, beta: 0.5}"])
    assert cfg.train.steps == 7 and cfg.train.betas == (0.8, 0.9) and cfg.objective == {"name": "jsd", "beta": 0.5}


def test_unknown_objective_lists_allowed():
    with pytest.raises(ConfigError) as err:
        build_objective("forwrd_kl")
    assert "forward_kl" in str(err.value)


def test_teacher_needs_exactly_one_source(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of 'path'"):
        load_config(None, ["teacher={dtype: float32}"])
    with pytest.raises(ConfigError, match="exactly one of 'path'"):
        load_config(None, [f"teacher={{path: {tmp_path}, cache: {tmp_path}}}"])


def test_logits_dtype_is_for_caches_and_named_when_wrong(tmp_path):
    with pytest.raises(ConfigError, match="'logits_dtype' applies to low-rank teacher caches"):
        load_config(None, [f"teacher={{path: {tmp_path}, logits_dtype: bfloat16}}"])
    with pytest.raises(ConfigError, match="logits_dtype"):
        load_config(None, [f"teacher={{cache: {tmp_path}, logits_dtype: float16}}"])
    assert load_config(None, [f"teacher={{cache: {tmp_path}, logits_dtype: float32}}"]).teacher.logits_dtype == "float32"
    assert load_config(None, [f"teacher={{cache: {tmp_path}}}"]).teacher.logits_dtype == "auto"
    with pytest.raises(ConfigError, match="'dtype' is the precision a live teacher"):
        load_config(None, [f"teacher={{cache: {tmp_path}, dtype: bfloat16}}"])
