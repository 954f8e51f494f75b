"""Config validation: unknown keys are named with the allowed ones; overrides are checked the same way."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmdistill.embed.config import (
    EmbedConfig,
    apply_overrides,
    load_config,
    negatives_source,
    parse_config,
    resolve_model_path,
)
from lmdistill.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "embed"


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_top_level_key_names_key_and_allowed(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, {"method": "infonce", "trian": {"steps": 3}}))
    text = str(exc.value)
    assert "trian: unknown key" in text and "did you mean 'train'" in text
    assert "allowed keys here:" in text and "task" in text and "mcl" in text and "margin_mse" in text


def test_unknown_nested_key_names_its_section_keys(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, {"method": "flipped_kd", "lm": {"path": str(tmp_path), "lora_rank": 8}}))
    text = str(exc.value)
    assert "lm.lora_rank: unknown key" in text and "lora_r" in text and "representation_module" in text


def test_bad_values_and_method_requirements(tmp_path):
    with pytest.raises(ConfigError, match="method"):
        load_config(write(tmp_path, {"method": "simclr"}))
    with pytest.raises(ConfigError, match="lm.path"):
        parse_config({"method": "flipped_kd"})
    with pytest.raises(ConfigError, match="train.steps"):
        parse_config({"method": "infonce", "train": {"steps": 0}})
    with pytest.raises(ConfigError, match="negatives_from"):
        parse_config({"method": "margin_mse", "mining": {"negatives_from": "none"}})
    with pytest.raises(ConfigError, match="pos_threshold"):
        parse_config({"method": "infonce", "mcl": {"pos_threshold": 0.9, "neg_threshold": 0.1}})
    # Local paths are checked when the config is read, before any model loads ('minilm' is an alias).
    with pytest.raises(ConfigError, match="student.path.*encoder path './no-such-encoder' does not exist"):
        parse_config({"method": "infonce", "student": {"path": "./no-such-encoder"}})
    with pytest.raises(ConfigError, match="lm.path.*does not exist"):
        parse_config({"method": "flipped_kd", "lm": {"path": "./no-such-lm"}})


def test_overrides_apply_and_are_validated(tmp_path):
    path = write(tmp_path, {"method": "infonce", "train": {"steps": 10}})
    cfg = load_config(path, ["train.steps=7", "task.name=gcide-paraphrase", "m3.score_weights=[1, 0.5, 1]"])
    assert cfg.train.steps == 7 and cfg.task.name == "gcide-paraphrase"
    assert cfg.m3.score_weights == (1.0, 0.5, 1.0)
    with pytest.raises(ConfigError, match="train.stepz: unknown key"):
        load_config(path, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(path, ["train.steps"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"method": "x"}, ["method.sub=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [infonce\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_default_negative_sources():
    assert negatives_source(parse_config({"method": "infonce"})) == "none"
    assert negatives_source(parse_config({"method": "margin_mse"})) == "teacher"
    assert negatives_source(parse_config({"method": "m3"})) == "bm25"
    assert negatives_source(parse_config({"method": "m3", "mining": {"negatives_from": "teacher"}})) == "teacher"


def test_model_path_resolution(tmp_path):
    assert (Path(resolve_model_path("minilm")) / "config.json").is_file()
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_example_configs_validate(path):
    # flipped_kd's example needs an LM directory: point it at an existing directory for validation.
    cfg = load_config(path, [f"lm.path={CONFIGS}"] if "flipped" in path.name else [])
    assert isinstance(cfg, EmbedConfig)


def test_example_configs_exist_for_every_method():
    methods = {yaml.safe_load(p.read_text())["method"] for p in CONFIGS.glob("*.yaml")}
    assert methods == {"infonce", "margin_mse", "flipped_kd", "m3"}
