"""`lmdistill report RUN_DIRS`: the table holds each run's last evaluation; curves and files are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmdistill.errors import DataError
from lmdistill.report.runs import report_runs, summarize_run


def _run(root: Path, name: str, objective, evals: list[tuple[int, float]], finished: bool) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"objective": objective, "train": {"steps": 20}}))
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(1, 21 if finished else 11):
            f.write(json.dumps({"kind": "train", "step": step, "loss": 5.0 - step / 10, "tokens_per_second": 1000.0 + step}) + "\n")
            for at, bpb in evals:
                if at == step:
                    f.write(json.dumps({"kind": "eval", "step": step, "loss": bpb, "perplexity": 2 ** bpb,
                                        "bits_per_byte": bpb, "top1_agreement": 0.5, "kl_to_teacher": 0.1}) + "\n")
    if finished:
        (run / "final").mkdir()
    return run


def test_the_table_reports_each_runs_last_evaluation(tmp_path):
    kd = _run(tmp_path, "kd", {"mix": [{"name": "forward_kl", "weight": 0.5}, {"name": "cross_entropy", "weight": 0.5}]},
              [(10, 1.6), (20, 1.45)], finished=True)
    ce = _run(tmp_path, "ce", "cross_entropy", [(10, 1.7)], finished=False)
    out = report_runs([kd, ce], tmp_path / "report")
    rows = {r["run"]: r for r in out["rows"]}
    assert rows["kd"]["bits_per_byte"] == 1.45 and rows["kd"]["steps"] == 20 and rows["kd"]["status"] == "finished"
    assert rows["kd"]["objective"] == "0.5*forward_kl + 0.5*cross_entropy"
    assert rows["ce"]["bits_per_byte"] == 1.7 and rows["ce"]["status"] == "at step 10/20"
    assert rows["kd"]["tokens_per_second"] == 1020.0
    for name in ("table.md", "results.json", "curves.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert "| kd | 0.5*forward_kl + 0.5*cross_entropy | 20 |" in (tmp_path / "report" / "table.md").read_text()


def test_a_final_directory_is_pointed_back_to_its_run(tmp_path):
    kd = _run(tmp_path, "kd", "forward_kl", [(20, 1.5)], finished=True)
    with pytest.raises(DataError, match=f"did you mean {kd}"):
        summarize_run(kd / "final")
