"""embed-distill / embed-eval as typer commands, end to end on the real GCIDE task (small sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from lmdistill.cli.embed import embed_distill, embed_eval
from lmdistill.errors import ConfigError

app = typer.Typer()
app.command("embed-distill")(embed_distill)
app.command("embed-eval")(embed_eval)

from tests.embed.helpers import SMALL_TASK

SMALL = {
    "task": SMALL_TASK,
    "train": {"steps": 3, "batch_size": 8, "log_every": 1},
    "eval": {"batch_size": 32, "throughput_texts": 16},
    "student": {"num_layers": 1, "max_seq_length": 32},
    "teacher": {"max_seq_length": 32},
    "mining": {"top_k": 5},
}


def write_config(tmp_path: Path, method: str, cache: Path, **extra) -> Path:
    data = {"method": method, "output_dir": str(tmp_path / "runs" / method), **SMALL, **extra}
    data["task"] = {**SMALL["task"], "cache_dir": str(cache)}
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_surfaces_as_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: infonce\ntrain: {stepz: 3}\n")
    result = CliRunner().invoke(app, ["embed-distill", str(path)])
    assert isinstance(result.exception, ConfigError)
    assert "train.stepz" in str(result.exception) and "steps" in str(result.exception)


@pytest.mark.slow
def test_each_method_runs_and_embed_eval_prints_the_table(tmp_path, tiny_gpt2, gcide_cache):
    runner = CliRunner()
    run_dirs = []
    for method, extra in (
        ("infonce", {}),
        ("margin_mse", {}),
        ("m3", {"m3": {"colbert_dim": 8}}),
        ("flipped_kd", {"lm": {"path": str(tiny_gpt2), "lora_r": 4, "max_seq_length": 32}}),
    ):
        config = write_config(tmp_path, method, gcide_cache, **extra)
        result = runner.invoke(app, ["embed-distill", str(config), "--set", "train.steps=2"])
        assert result.exit_code == 0, result.output + repr(result.exception)
        run_dir = tmp_path / "runs" / method
        meta = json.loads((run_dir / "run.json").read_text())
        assert meta["method"] == method and meta["config"]["train"]["steps"] == 2
        losses = json.loads((run_dir / "losses.json").read_text())["loss"]
        assert len(losses) == 2
        assert "| method |" in result.output and "recall@10" in result.output
        for row in meta["rows"]:
            assert 0.0 <= row["metrics"]["recall@10"] <= 1.0 and row["texts_per_s"] > 0
        run_dirs.append(run_dir)

    out = tmp_path / "table"
    result = runner.invoke(app, ["embed-eval", *map(str, run_dirs), "--output", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    names = [row["name"] for row in json.loads(out.with_suffix(".json").read_text())]
    assert names[:2] == ["BM25 (bm25s)", "MiniLM-L6 zero-shot (teacher)"]
    assert {"InfoNCE student", "Margin-MSE student", "M3 combined", "Flipped-KD LM (LoRA encoder, MCL)"} <= set(names)
    table = out.with_suffix(".md").read_text()
    assert table.count("\n") == len(names) + 2 - 1 + 1  # header, rule, one line per row
    # Re-evaluating a saved run reproduces the metrics it recorded after training.
    stored = json.loads((run_dirs[0] / "run.json").read_text())["rows"][0]["metrics"]
    again = next(r for r in json.loads(out.with_suffix(".json").read_text()) if r["name"] == "InfoNCE student")
    assert again["metrics"] == pytest.approx(stored, abs=1e-6)
