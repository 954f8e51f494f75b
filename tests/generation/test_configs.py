"""The example configs in configs/generation validate (file paths pointed at existing stand-ins)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmdistill.config import validate_config
from lmdistill.generation.run_config import GenerateConfig, TaskRunConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "generation").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_validates(path, tmp_path):
    raw = yaml.safe_load(path.read_text())
    stand_in = tmp_path / "exists.jsonl"
    stand_in.write_text("")
    for section in ("student", "teacher"):
        if isinstance(raw.get(section), dict) and "path" in raw[section]:
            raw[section]["path"] = str(tmp_path)
    if "store" in raw.get("regime", {}):
        raw["regime"]["store"] = str(stand_in)
    model = GenerateConfig if path.name.startswith("generate") else TaskRunConfig
    cfg = validate_config(raw, str(path), model)
    assert cfg.task.name if model is GenerateConfig else cfg.regime.kind


def test_configs_cover_every_regime():
    kinds = {yaml.safe_load(p.read_text()).get("regime", {}).get("kind") for p in CONFIGS}
    assert {"fixed", "sequence_kd", "on_policy", "scrg", "kid"} <= kinds


def test_regime_config_imports_without_torch_and_shares_the_one_section_base():
    """The generation configs validate without importing torch (a config error costs no model load), and every
    section of every command derives from the one ``lmdistill.config.Section``."""
    import subprocess
    import sys

    code = ("import sys, lmdistill.generation.config as c, lmdistill.config as base; "
            "assert 'torch' not in sys.modules, sorted(sys.modules); "
            "assert c.Section is base.Section and issubclass(c.RegimeConfig, base.Section)")
    subprocess.run([sys.executable, "-c", code], check=True)
