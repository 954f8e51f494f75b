"""Grid expansion: the product of the axes, labels, per-entry overrides, skipped cells and config errors
(no model is built here)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.compare.config import CompareConfig
from lmdistill.compare.grid import expand_grid, objective_label, regime_label
from lmdistill.config import validate_config
from lmdistill.errors import ConfigError

BASE = {"data": {"corpus": "kjv", "block_size": 32}, "student": {"preset": "gpt2-student-1.5m"},
        "train": {"steps": 10, "lr": 0.003}}
TASK_BASE = {"student": {"preset": "gpt2-student-1.5m"}, "objective": "forward_kl",
             "regime": {"kind": "fixed", "max_length": 48, "task": {"name": "kjv_continue", "prompt_words": 4}}}


def config(**raw) -> CompareConfig:
    raw.setdefault("base", BASE)
    return validate_config(raw, "test", model=CompareConfig)


def cells_of(cfg: CompareConfig):
    return expand_grid(cfg, cfg.base if isinstance(cfg.base, dict) else {})


def test_product_order_seeds_and_labels(tmp_path):
    cfg = config(teachers={"small": {"path": str(tmp_path)}, "large": {"path": str(tmp_path)}},
                 grid={"objectives": ["forward_kl", {"name": "jsd", "beta": 0.25}], "seeds": [3, 7]})
    cells = cells_of(cfg)
    assert [(c.teacher, c.row.objective, c.seed) for c in cells] == [
        (t, o, s) for t, o, s in itertools.product(["small", "large"], ["forward_kl", "jsd(beta=0.25)"], [3, 7])]
    assert all(c.config["train"]["seed"] == c.seed for c in cells)
    assert cells[2].config["objective"] == {"name": "jsd", "beta": 0.25}
    assert cells[2].id == "small--jsd_beta=0.25--seed3"
    assert all(c.skip is None and c.kind == "run" for c in cells)
    assert BASE["train"] == {"steps": 10, "lr": 0.003}  # the base mapping is never modified


def test_entry_label_and_overrides(tmp_path):
    cfg = config(teachers={"t": {"path": str(tmp_path)}}, grid={"objectives": [
        "forward_kl", {"name": "forward_kl", "temperature": 2.0, "label": "fkl-T2", "set": ["train.lr=0.001"]}]})
    plain, warm = cells_of(cfg)
    assert warm.row.objective == "fkl-T2"
    assert warm.config["objective"] == {"name": "forward_kl", "temperature": 2.0}  # label and set are not params
    assert warm.config["train"]["lr"] == 0.001 and plain.config["train"]["lr"] == 0.003


def test_unknown_objective_is_skipped_not_fatal(tmp_path):
    cfg = config(teachers={"t": {"path": str(tmp_path)}},
                 grid={"objectives": ["forward_kl", "not_installed", {"name": "jsd", "bta": 0.5}], "seeds": [0, 1]})
    cells = cells_of(cfg)
    skipped = {c.row.objective: c.skip for c in cells if c.skip}
    assert set(skipped) == {"not_installed", "jsd(bta=0.5)"}
    assert "unknown objective 'not_installed'" in skipped["not_installed"]
    assert "unknown parameter" in skipped["jsd(bta=0.5)"] and "beta" in skipped["jsd(bta=0.5)"]
    assert [c.row.objective for c in cells if c.skip is None] == ["forward_kl", "forward_kl"]


def test_objective_needing_a_teacher_is_skipped_without_one():
    cells = cells_of(config(grid={"objectives": ["cross_entropy", "forward_kl"]}))
    assert cells[0].skip is None
    assert "needs a teacher" in cells[1].skip


def test_task_regimes_inherit_task_and_unknown_kind_is_skipped(tmp_path):
    cfg = config(base=TASK_BASE, teachers={"t": {"path": str(tmp_path)}}, grid={"regimes": [
        {"kind": "fixed", "label": "off-policy"}, {"kind": "on_policy", "lmbda": 0.5},
        {"kind": "not_installed"},
        {"kind": "on_policy", "lmbda": 0.5, "label": "on-policy DistiLLM-2", "set": ["objective=distillm2"]}]})
    cells = cells_of(cfg)
    assert [c.row.regime for c in cells] == ["off-policy", "on_policy(lmbda=0.5)", "not_installed", "on-policy DistiLLM-2"]
    assert all(c.kind == "task" and c.config["regime"]["task"] == TASK_BASE["regime"]["task"] for c in cells)
    assert cells[1].config["regime"] == {"task": TASK_BASE["regime"]["task"], "max_length": 48, "kind": "on_policy", "lmbda": 0.5}
    assert "regime.kind 'not_installed' is not available" in cells[2].skip
    assert cells[3].row.objective == "distillm2" and cells[3].config["objective"] == "distillm2"


@pytest.mark.parametrize("raw, message", [
    ({"base": {**BASE, "teacher": {"path": "x"}}, "teachers": {"t": {"path": "y"}}}, "exclude each other"),
    ({"grid": {"regimes": [{"kind": "fixed"}]}}, "needs a task base"),
    ({"grid": {"objectives": ["forward_kl", {"name": "fkl", "label": "forward_kl"}]}, "teachers": {"t": {"path": "y"}}},
     "both labelled"),
])
def test_expansion_errors(raw, message):
    with pytest.raises(ConfigError, match=message):
        cells_of(config(**raw))


@pytest.mark.parametrize("raw, message", [
    ({"grid": {"seeds": [1, 1]}}, "distinct"),
    ({"grid": {"teachers": ["nope"]}}, "not among teachers"),
    ({"teachers": {"t": {}}}, "exactly one of 'path'"),
    ({"teachers": {"t": {"path": "a", "sft": {"recipe": "demo_teacher"}}}}, "'sft' fine-tunes a teacher built by 'pretrain'"),
    ({"baseline": {"optimizer": "adam"}}, "unknown axes"),
    ({"budget": {"equal": "steps", "seconds": 10}}, "equal: time"),
    ({"gird": {}}, "did you mean 'grid'"),
])
def test_config_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        config(**raw)


def test_labels():
    assert objective_label({"mix": [{"name": "forward_kl", "weight": 0.5}, {"name": "cross_entropy", "weight": 0.5}]}) == \
        "mix(0.5*forward_kl+0.5*cross_entropy)"
    assert objective_label({"name": "taid", "t_start": 0.2, "alpha": 5e-4}) == "taid(alpha=0.0005, t_start=0.2)"
    assert regime_label({"kind": "scrg", "lmbda": 0.5, "task": {"name": "x"}, "max_length": 9}) == "scrg(lmbda=0.5)"


OBJECTIVES = ["forward_kl", "reverse_kl", "tvd", "taid", "atkd", {"name": "jsd", "beta": 0.1}, {"name": "jsd", "beta": 0.9},
              "not_installed"]


@settings(max_examples=60, deadline=None)
@given(objectives=st.lists(st.sampled_from(range(len(OBJECTIVES))), min_size=1, max_size=6, unique=True),
       seeds=st.lists(st.integers(0, 10_000), min_size=1, max_size=4, unique=True),
       n_teachers=st.integers(1, 3))
def test_every_row_and_seed_exactly_once(objectives, seeds, n_teachers):
    teachers = {f"t{i}": {"path": "/tmp"} for i in range(n_teachers)}
    cfg = config(teachers=teachers, grid={"objectives": [OBJECTIVES[i] for i in objectives], "seeds": seeds})
    cells = cells_of(cfg)
    assert len(cells) == len(objectives) * len(seeds) * n_teachers
    assert len({c.id for c in cells}) == len(cells)
    assert len({(c.row, c.seed) for c in cells}) == len(cells)
    assert sorted({c.seed for c in cells}) == sorted(seeds)
    assert all((c.skip is not None) == (c.row.objective == "not_installed") for c in cells)
