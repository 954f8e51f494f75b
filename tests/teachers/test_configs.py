"""The example configs in configs/cache/ validate (with local paths filled in) and reject unknown keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmdistill.config import RunConfig, load_config
from lmdistill.errors import ConfigError
from lmdistill.selection.run import MiniPLMConfig
from lmdistill.teachers.cache.command import CacheTeacherConfig

CONFIGS = Path(__file__).parents[2] / "configs" / "cache"


def test_example_configs_validate(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    cache = load_config(CONFIGS / "kjv_k32.yaml", [f"teacher.path={model}"], model=CacheTeacherConfig)
    assert cache.cache.k == 32 and cache.cache.dtype == "float16" and cache.data.block_size == 128
    lowrank = load_config(CONFIGS / "kjv_lowrank.yaml", [f"teacher.path={model}"], model=CacheTeacherConfig)
    assert lowrank.cache.mode == "lowrank" and lowrank.cache.k == 128 and lowrank.data == cache.data
    run = load_config(CONFIGS / "distill_from_cache.yaml", [f"teacher.cache={model}"], model=RunConfig)
    assert run.teacher.cache == str(model) and run.teacher.path is None
    assert run.data.block_size == cache.data.block_size and run.data.corpus == cache.data.corpus
    sel = load_config(CONFIGS / "miniplm_kjv.yaml", [f"teacher.path={model}", f"reference.path={model}"], model=MiniPLMConfig)
    assert sel.selection.fraction == 0.5


def test_unknown_keys_and_bad_values_are_named(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(ConfigError, match=r"cache\.topk: unknown key"):
        load_config(CONFIGS / "kjv_k32.yaml", [f"teacher.path={model}", "cache.topk=3"], model=CacheTeacherConfig)
    with pytest.raises(ConfigError, match=r"cache\.dtype"):
        load_config(CONFIGS / "kjv_k32.yaml", [f"teacher.path={model}", "cache.dtype=int8"], model=CacheTeacherConfig)
    with pytest.raises(ConfigError, match="teacher path"):
        load_config(CONFIGS / "kjv_k32.yaml", [f"teacher.path={tmp_path / 'absent' / 'x'}"], model=CacheTeacherConfig)
    with pytest.raises(ConfigError, match=r"selection\.fraction"):
        load_config(CONFIGS / "miniplm_kjv.yaml", [f"teacher.path={model}", f"reference.path={model}",
                                                   "selection.fraction=1.5"], model=MiniPLMConfig)
