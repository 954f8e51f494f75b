"""Grid expansion: the compare config's axes (teachers x regimes x objectives x seeds) into cells.

A *row* is one method setting (teacher, regime, objective), a *cell* one row trained with one seed. Each cell
gets a raw run config: the base config with the row's objective, regime and seed put in, plus the entries'
own overrides (``set``). Teacher sections are filled in later, once the teachers exist
(:func:`lmdistill.compare.teachers.resolve_cell_config`).

Cells that cannot run (an objective or regime this installation does not have, an objective that needs a
teacher in a grid without one) are kept with a ``skip`` reason, so one unknown name never stops the grid and
the report lists what was left out and why.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, get_args

from lmdistill.compare.config import CompareConfig
from lmdistill.config import apply_overrides
from lmdistill.errors import ConfigError

__all__ = ["Row", "Cell", "expand_grid", "objective_label", "regime_label", "config_hash", "NO_AXIS"]

NO_AXIS = "-"  # the label of an axis a grid does not vary (no teacher, no regime)
_ENTRY_KEYS = ("label", "set")  # keys of a grid entry that are not part of the objective or regime itself


@dataclass(frozen=True)
class Row:
    """One method setting: what a report row shows. Labels are what the config's entries are called."""

    teacher: str
    regime: str
    objective: str

    def axis(self, name: str) -> str:
        return {"teacher": self.teacher, "regime": self.regime, "objective": self.objective}[name]

    @property
    def label(self) -> str:
        return " / ".join(part for part in (self.teacher, self.regime, self.objective) if part != NO_AXIS) or "run"


@dataclass
class Cell:
    """One training run of the grid."""

    id: str
    row: Row
    seed: int
    kind: str  # "run" (RunConfig) or "task" (TaskRunConfig: a regime section)
    config: dict[str, Any]  # the raw run config, teacher section not yet filled in
    teacher: str | None  # the teacher choice's name (None: base's own teacher section, or none)
    skip: str | None = None  # why the cell does not run
    notes: list[str] = field(default_factory=list)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def objective_label(spec: Any) -> str:
    """A short readable name of an objective spec: ``jsd(beta=0.5)``, ``mix(0.5*forward_kl+0.5*cross_entropy)``."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict):
        if spec.get("label"):
            return str(spec["label"])
        if "mix" in spec:
            return objective_label(spec["mix"])
        params = {k: v for k, v in spec.items() if k not in ("name", *_ENTRY_KEYS)}
        name = str(spec.get("name", "?"))
        return name if not params else f"{name}({', '.join(f'{k}={_format_value(v)}' for k, v in sorted(params.items()))})"
    if isinstance(spec, list):
        parts = []
        for part in spec:
            weight = part.get("weight", 1.0) if isinstance(part, dict) else 1.0
            inner = {k: v for k, v in part.items() if k != "weight"} if isinstance(part, dict) else part
            parts.append(f"{_format_value(weight)}*{objective_label(inner)}")
        return f"mix({'+'.join(parts)})"
    return str(spec)


def regime_label(entry: dict[str, Any]) -> str:
    """``on_policy(lmbda=0.5)``; the task and sequence length are the base's, so they are left out."""
    if entry.get("label"):
        return str(entry["label"])
    params = {k: v for k, v in entry.items() if k not in ("kind", "task", "max_length", "store", *_ENTRY_KEYS)}
    kind = str(entry.get("kind", "fixed"))
    return kind if not params else f"{kind}({', '.join(f'{k}={_format_value(v)}' for k, v in sorted(params.items()))})"


def _slug(text: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.=+-]+", "_", text)).strip("_") or "x"


def cell_id(row: Row, seed: int) -> str:
    """A directory name readable by people, unique per (row, seed): long names are cut and get a hash."""
    parts = [p for p in (row.teacher, row.regime, row.objective) if p != NO_AXIS]
    slug = "--".join(_slug(p) for p in parts) or "run"
    if len(slug) > 80:
        slug = slug[:70] + "-" + hashlib.sha1(slug.encode()).hexdigest()[:8]
    return f"{slug}--seed{seed}"


def config_hash(payload: Any) -> str:
    """A stable hash of a JSON-able value (a cell's settings): a finished cell is reused only while it matches."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _objective_problem(spec: Any, has_teacher: bool) -> str | None:
    from lmdistill.losses import build_objective

    try:
        objective = build_objective(spec)
    except ConfigError as exc:
        return str(exc)
    if objective.requires_teacher and not has_teacher:
        return f"objective '{objective.name}' needs a teacher and this grid has none (add teachers:)"
    return None


def _regime_problem(entry: dict[str, Any]) -> str | None:
    from lmdistill.generation.config import RegimeKind

    kinds = get_args(RegimeKind)
    kind = entry.get("kind", "fixed")
    if kind not in kinds:
        return f"regime.kind '{kind}' is not available in this installation (available: {', '.join(kinds)})"
    return None


def _entry(spec: Any) -> tuple[Any, list[str]]:
    """(the objective or regime itself, its overrides) of a grid entry."""
    if isinstance(spec, dict):
        overrides = spec.get("set", [])
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"grid entry {spec!r}: 'set' must be a list of key.path=value strings")
        return {k: v for k, v in spec.items() if k not in _ENTRY_KEYS}, overrides
    return spec, []


def expand_grid(config: CompareConfig, base: dict[str, Any]) -> list[Cell]:
    """Every cell of the grid, in a stable order (teacher, regime, objective, seed)."""
    base = copy.deepcopy(base)
    kind = "task" if "regime" in base else "run"
    if config.teachers and "teacher" in base:
        raise ConfigError("base.teacher and teachers exclude each other: name the teacher under teachers (path: DIR)")
    if kind == "run" and config.grid.regimes:
        raise ConfigError("grid.regimes needs a task base: add a 'regime' section (with its task) to base")
    teacher_names: list[str | None] = list(config.grid.teachers or config.teachers) or [None]
    has_teacher = bool(config.teachers) or "teacher" in base
    objectives = config.grid.objectives or [base.get("objective", "cross_entropy")]
    base_regime = base.get("regime") or {}
    regimes: list[Any] = config.grid.regimes or ([base_regime] if kind == "task" else [None])

    cells: list[Cell] = []
    rows_seen: dict[tuple[str, str, str], Any] = {}
    for teacher in teacher_names:
        for regime_spec in regimes:
            regime, regime_overrides = _entry(regime_spec) if regime_spec is not None else (None, [])
            if regime is not None:
                if not isinstance(regime, dict):
                    raise ConfigError(f"grid.regimes: each entry is a mapping with 'kind', got {regime_spec!r}")
                common = {k: base_regime[k] for k in ("task", "max_length") if k in base_regime}
                regime = {**common, **regime}
            r_label = NO_AXIS if regime is None or (not config.grid.regimes) else regime_label(regime_spec)
            for objective_spec in objectives:
                objective, objective_overrides = _entry(objective_spec)
                if isinstance(objective, dict) and not objective:
                    raise ConfigError(f"grid.objectives: entry {objective_spec!r} names no objective")
                raw = copy.deepcopy(base)
                raw["objective"] = copy.deepcopy(objective)
                if regime is not None:
                    raw["regime"] = copy.deepcopy(regime)
                try:
                    raw = apply_overrides(raw, [*regime_overrides, *objective_overrides])
                except ConfigError as exc:
                    raise ConfigError(f"grid entry {objective_spec!r} / {regime_spec!r}: {exc}") from None
                # an entry's overrides may set the objective itself (a regime row with its own objective)
                o_label = objective_label(objective_spec) if raw["objective"] == objective else objective_label(raw["objective"])
                row = Row(teacher=teacher or NO_AXIS, regime=r_label, objective=o_label)
                key = (row.teacher, row.regime, row.objective)
                identity = (raw["objective"], raw.get("regime"))
                if key in rows_seen and rows_seen[key] != identity:
                    raise ConfigError(f"two grid entries are both labelled '{row.label}': give one of them a 'label'")
                rows_seen[key] = identity
                skip = _objective_problem(raw["objective"], has_teacher) or (
                    _regime_problem(raw["regime"]) if regime is not None else None)
                for seed in config.grid.seeds:
                    seeded = copy.deepcopy(raw)
                    seeded.setdefault("train", {})["seed"] = seed
                    cells.append(Cell(id=cell_id(row, seed), row=row, seed=seed, kind=kind, config=seeded,
                                      teacher=teacher, skip=skip))
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"two cells map to the directory '{dup}': give the grid entries distinct labels")
    return cells
