"""The example configs in configs/datacentric validate (model paths pointed at an existing stand-in), and the CLI
functions run on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmdistill.config import validate_config
from lmdistill.selection.active import ActiveConfig
from lmdistill.selection.ddk_run import MixtureRunConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "datacentric").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_validates(path, tmp_path):
    raw = yaml.safe_load(path.read_text())
    for section in ("student", "teacher"):
        if isinstance(raw.get(section), dict) and "path" in raw[section]:
            raw[section]["path"] = str(tmp_path)
    if path.name.startswith("pgkd"):
        if "local" in raw["teacher"]:
            raw["teacher"]["local"] = str(tmp_path)
        cfg = validate_config(raw, str(path), ActiveConfig)
        assert cfg.active.selection == "hard"
    else:
        text = path.read_text()
        if "# monitor:" in text:  # the commented monitor example is a valid section too
            raw["monitor"] = yaml.safe_load(text.split("# monitor:", 1)[1].splitlines()[0])
            raw["monitor"]["oracle"] = str(tmp_path)
        cfg = validate_config(raw, str(path), MixtureRunConfig)
        assert [d.name for d in cfg.domains] == ["kjv", "gcide", "jargon", "fortunes"]


def test_configs_cover_the_three_mixtures_and_both_tasks():
    raws = {p.name: yaml.safe_load(p.read_text()) for p in CONFIGS}
    assert {r["mixture"]["policy"] for r in raws.values() if "mixture" in r} == {"ddk", "uniform"}
    assert {r["task"]["name"] for r in raws.values() if "task" in r} == {"fortunes", "gcide_pos"}


def test_hacking_report_reads_logged_curves(tmp_path):
    from typer.testing import CliRunner
    import typer

    from lmdistill.cli import datacentric

    run = tmp_path / "run"
    run.mkdir()
    proxy = [2.0, 1.5, 1.2, 1.0, 0.9, 0.8, 0.75, 0.7]
    golden = [3.0, 2.5, 2.2, 2.1, 2.15, 2.3, 2.45, 2.6]
    lines = [json.dumps({"kind": "train", "step": 1, "loss": 3.0})]
    lines += [json.dumps({"kind": "eval", "step": 10 * (i + 1), "proxy_kl": p, "golden_kl": g}) for i, (p, g) in enumerate(zip(proxy, golden))]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    app = typer.Typer()
    app.command()(datacentric.hacking_report)
    app.command("other")(datacentric.active_distill)  # two commands: typer then expects the command name
    result = CliRunner().invoke(app, ["hacking-report", str(run), "--plot", str(tmp_path / "curves.png")])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)[0]
    assert row["teacher_hacking"] is True and row["golden_min"] == 2.1 and row["evaluations"] == 8
    assert (tmp_path / "curves.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 1, "loss": 1.0}) + "\n")
    result = CliRunner().invoke(app, ["hacking-report", str(empty)])
    assert result.exit_code != 0 and "no teacher-hacking monitor" in str(result.exception)
