"""The report from finished cells: mean ± sd, the best marked, paired differences to the baseline, a
self-contained HTML page, plots and provenance. Cell results are written by hand here (known numbers), the
way cells write them, so every figure in the report can be checked against a hand computation."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

from lmdistill.compare.config import CompareConfig
from lmdistill.compare.grid import NO_AXIS, Row, expand_grid
from lmdistill.compare.report import baseline_row, write_report
from lmdistill.compare.runner import Plan
from lmdistill.config import validate_config

BPB = {"forward_kl": [1.50, 1.52, 1.55], "reverse_kl": [1.40, 1.45, 1.47]}
AGREE = {"forward_kl": [0.30, 0.32, 0.31], "reverse_kl": [0.29, 0.30, 0.28]}


def _plan(tmp_path: Path) -> Plan:
    raw = {"output_dir": str(tmp_path / "grid"), "base": {"data": {"corpus": "kjv"}},
           "teachers": {"t": {"path": str(tmp_path)}},
           "grid": {"objectives": ["forward_kl", "reverse_kl", "not_installed"], "seeds": [0, 1, 2]}}
    config = validate_config(raw, "test", model=CompareConfig)
    plan = Plan(config=config, raw=raw, source="compare.yaml", base=raw["base"], cells=expand_grid(config, raw["base"]),
                output_dir=tmp_path / "grid")
    plan.evaluation = {"in_domain": "kjv"}
    for cell in plan.cells:
        if cell.skip:
            continue
        objective, seed = cell.row.objective, cell.seed
        cell_dir = plan.output_dir / "cells" / cell.id
        cell_dir.mkdir(parents=True)
        metrics = {"bits_per_byte": BPB[objective][seed], "top1_agreement": AGREE[objective][seed],
                   "ood/gcide": 3.0 + seed / 10, "steps": 100.0, "train_seconds": 10.0 + seed, "tokens_per_second": 1000.0,
                   "peak_rss_mb": 500.0}
        (cell_dir / "result.json").write_text(json.dumps({"id": cell.id, "seed": seed, "metrics": metrics}))
        (cell_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"kind": "eval", "step": step, "bits_per_byte": BPB[objective][seed] + 1.0 / step}) + "\n"
            for step in (10, 50, 100)))
        (cell_dir / "config.yaml").write_text(f"objective: {objective}\n")
    ref = plan.output_dir / "teachers" / "t" / "reference.json"
    ref.parent.mkdir(parents=True)
    ref.write_text(json.dumps({"teacher": "t", "path": str(tmp_path), "params_m": 6.9,
                               "scores": {"kjv": {"bits_per_byte": 1.30}, "gcide": {"bits_per_byte": 2.5}}}))
    return plan


def _mean_sd(xs):
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_tables_by_hand(tmp_path):
    plan = _plan(tmp_path)
    md = write_report(plan).read_text(encoding="utf-8")
    results_section = md.split("## Results")[1].split("\n## ")[0]
    lines = {line.split(" | ")[0].lstrip("| "): line for line in results_section.splitlines() if line.startswith("| ")}
    # mean ± sd: forward KL bits/byte 1.50, 1.52, 1.55 -> 1.5233 ± 0.0252; reverse KL is lower, so it is marked
    assert "1.5233 ± 0.0252" in lines["t / forward_kl"] and "**1.4400 ± 0.0361**" in lines["t / reverse_kl"]
    assert "**0.3100 ± 0.0100**" in lines["t / forward_kl"]  # agreement: higher is better
    assert "*1.3000*" in lines["*teacher t (6.9M params)*"]  # the teacher's reference row, never marked
    assert "**1,000 ± 0**" not in md and "1,000 ± 0" in lines["t / forward_kl"]  # a column where all tie: no mark
    # reverse KL - forward KL per seed: -0.10, -0.07, -0.08; t = mean / (sd / sqrt 3), df = 2:
    # p = 1 - |t| / sqrt(2 + t^2) (Student's t with two degrees of freedom)
    mean, sd = _mean_sd([-0.10, -0.07, -0.08])
    t = mean / (sd / math.sqrt(3))
    p = 1 - abs(t) / math.sqrt(2 + t * t)
    diff_row = next(line for line in md.splitlines() if line.startswith("| t / reverse_kl | t / forward_kl"))
    assert f"{mean:+.4f} ± {sd:.4f} (p={p:.3f})" in diff_row
    assert "-0.0833 ± 0.0153 (p=0.011)" in diff_row
    assert "| steps |" not in md  # equal steps: no steps column
    assert "`t--not_installed--seed0` (skipped): objective: unknown objective 'not_installed'" in md
    assert "![learning curves](curves.png)" in md and "lmdistill compare compare.yaml" in md
    assert "| torch |" in md and "`cells/t--reverse_kl--seed2/config.yaml`" in md

    results = json.loads((plan.output_dir / "results.json").read_text())
    test = next(r for r in results["baseline_tests"] if r["method"] == "t / reverse_kl")["tests"]["bits_per_byte"]
    assert math.isclose(test["p"], p, rel_tol=1e-9) and test["n"] == 3
    for png in ("curves.png", "per_method.png"):
        assert (plan.output_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.sources: list[str] = []
        self.best: list[str] = []
        self._in_best = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("img", "script", "link", "iframe"):
            self.sources.append(attrs.get("src") or attrs.get("href") or "")
        if tag not in ("img", "meta", "br"):
            self.open.append(tag)
        self._in_best = tag == "td" and attrs.get("class") == "best"

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()

    def handle_data(self, data):
        if self._in_best:
            self.best.append(data)
            self._in_best = False


def test_html_is_self_contained_and_well_formed(tmp_path):
    plan = _plan(tmp_path)
    write_report(plan)
    page = (plan.output_dir / "report.html").read_text(encoding="utf-8")
    parser = _Tags()
    parser.feed(page)
    assert parser.open == []  # every tag closed, in order
    assert len(parser.sources) == 2 and all(s.startswith("data:image/png;base64,") for s in parser.sources)
    assert "1.4400 ± 0.0361" in parser.best and "0.3100 ± 0.0100" in parser.best
    assert "&lt;" not in "".join(parser.best)
    assert "objective: reverse_kl" in page  # each row's run config is embedded


def test_rows_that_change_another_axis_are_compared_with_the_closest_baseline_row():
    """A regime row with its own objective has no baseline row that differs only in the regime: it is compared
    with the baseline row sharing most of its other axes, when exactly one does; baseline rows never are."""
    t, off, on = "t", "off-policy", "on-policy"
    present = {Row(t, off, "forward_kl"), Row(t, on, "forward_kl"), Row(t, on, "distillm2"), Row(t, "MiniLLM", "minillm")}
    by_regime = {"regime": off}
    assert baseline_row(Row(t, on, "forward_kl"), by_regime, present) == Row(t, off, "forward_kl")
    assert baseline_row(Row(t, on, "distillm2"), by_regime, present) == Row(t, off, "forward_kl")
    assert baseline_row(Row(t, "MiniLLM", "minillm"), by_regime, present) == Row(t, off, "forward_kl")
    assert baseline_row(Row(t, off, "forward_kl"), by_regime, present) is None
    # two teachers: each objective row is compared within its teacher; a row of a third teacher with no baseline
    # row of its own is equally close to both, so it is not compared
    by_objective = {"objective": "forward_kl"}
    two = {Row("t7m", NO_AXIS, "forward_kl"), Row("t12m", NO_AXIS, "forward_kl"), Row("t12m", NO_AXIS, "taid")}
    assert baseline_row(Row("t12m", NO_AXIS, "taid"), by_objective, two) == Row("t12m", NO_AXIS, "forward_kl")
    assert baseline_row(Row("t3", NO_AXIS, "taid"), by_objective, two) is None
    assert baseline_row(Row("t12m", NO_AXIS, "forward_kl"), by_objective, two) is None
