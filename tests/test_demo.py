"""`lmdistill demo` end to end on the real KJV corpus, with the recipes shortened to a few steps."""

from __future__ import annotations

import json

import pytest

from lmdistill.losses import fused
from lmdistill.report import demo


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    # the demo as users run it: the compiled loss kernels on (tests/conftest.py turns them off elsewhere)
    monkeypatch.setenv(fused.ENV_VAR, "1")
    monkeypatch.setattr(fused, "_failed", set())
    real_recipe = demo.recipe

    def short(name):
        raw = real_recipe(name)
        raw["train"].update(steps=4, warmup_steps=1)
        raw["eval"].update(every=1000, max_batches=2)
        return raw

    monkeypatch.setattr(demo, "recipe", short)
    results = demo.run_demo(tmp_path / "out")
    models = [row["model"] for row in results["rows"]]
    assert models == ["teacher", "distilled student", "label-only student"]
    for row in results["rows"]:
        assert row["perplexity"] > 1 and row["bits_per_byte"] > 0
    assert results["rows"][1]["kl_to_teacher"] >= 0
    assert "forward_kl_grad" in fused._compiled and not fused._failed  # the distillation used them
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["rows"][0]["perplexity"] == pytest.approx(results["rows"][0]["perplexity"])
    assert "| teacher |" in (tmp_path / "out" / "table.md").read_text()
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0
    # a second run reuses the pretrained teacher instead of training it again
    capsys.readouterr()
    again = demo.ensure_teacher(tmp_path / "cache" / "demo")
    assert "reusing the cached teacher" in capsys.readouterr().out
    assert (again / "model.safetensors").exists()
