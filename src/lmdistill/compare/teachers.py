"""The grid's teachers, built once and shared by every cell: an existing model, or one pretrained (and, for task
grids, fine-tuned) on first use and cached by its settings; optionally an offline teacher cache every cell trains
from; and, for sequence-level KD cells, the teacher's answers to the task's training prompts.

Built teachers live under the data cache (``$LMDISTILL_CACHE_DIR``): ``demo/teacher-<key>`` for the built-in
recipes (the same directory ``lmdistill demo`` uses, so the two commands share the demo teacher) and
``teachers/<name>-<key>`` otherwise, ``<key>`` a hash of the run config after overrides. An interrupted build
resumes from its newest checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmdistill.compare.cell import cell_dir
from lmdistill.compare.config import TEACHER_ANSWERS, BuildSpec, CompareConfig, TeacherChoice
from lmdistill.compare.grid import Cell
from lmdistill.config import apply_overrides, read_config_mapping, validate_config
from lmdistill.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["PreparedTeacher", "prepare_teacher", "built_teacher_dir", "resolve_cell_config", "ensure_answers"]


@dataclass
class PreparedTeacher:
    name: str
    path: Path  # the live teacher (evaluation always scores with it)
    cache: Path | None = None  # an offline cache the cells train from, when the choice asks for one
    options: dict[str, Any] = field(default_factory=dict)
    built_from: dict[str, Any] = field(default_factory=dict)  # what built it (for the report)

    def section(self) -> dict[str, Any]:
        """The cells' ``teacher:`` section."""
        if self.cache is not None:
            return {"cache": str(self.cache), **{k: v for k, v in self.options.items() if k != "dtype"}}
        return {"path": str(self.path), **self.options}


def _read_build(spec: BuildSpec, what: str) -> dict[str, Any]:
    if spec.recipe is not None:
        from lmdistill.report.demo import recipe

        try:
            raw = recipe(spec.recipe)
        except FileNotFoundError:
            raise ConfigError(f"{what}.recipe: no built-in recipe '{spec.recipe}' (e.g. demo_teacher)") from None
    else:
        raw = read_config_mapping(spec.config, f"{what}.config: file")  # missing or broken: a one-line error
    return apply_overrides(copy.deepcopy(raw), list(spec.set))


def _key(payload: Any) -> str:
    # the same hash as lmdistill.report.demo.demo_teacher_dir, so an unchanged demo recipe maps to its directory
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]


def built_teacher_dir(choice: TeacherChoice, cache_root: Path) -> tuple[Path, dict[str, Any], dict[str, Any] | None]:
    """Where a choice's built teacher lives (its run directory), with the pretraining and sft run configs."""
    assert choice.pretrain is not None
    pre_raw = _read_build(choice.pretrain, "pretrain")
    pre_key = _key(pre_raw)
    stem = choice.pretrain.recipe or Path(choice.pretrain.config or "teacher").stem
    pre_dir = cache_root / ("demo" if stem.startswith("demo_") else "teachers") / (
        f"teacher-{pre_key}" if stem.startswith("demo_") else f"{stem}-{pre_key}")
    if choice.sft is None:
        return pre_dir, pre_raw, None
    sft_raw = _read_build(choice.sft, "sft")
    sft_raw["student"] = {"path": str(pre_dir / "final")}
    return cache_root / "teachers" / f"sft-{_key([pre_key, sft_raw])}", pre_raw, sft_raw


def _start_or_resume(run_dir: Path) -> bool:
    """True to resume (a checkpoint exists); otherwise whatever an interrupted attempt left is removed."""
    from lmdistill.train.checkpoint import CheckpointManager
    from lmdistill.train.rundir import RunDirectory

    if CheckpointManager(run_dir).latest() is not None:
        return True
    directory = RunDirectory(run_dir)
    if run_dir.exists() and directory.run_entries():
        directory.acquire()
        try:
            directory.clear()
        finally:
            directory.release()
    return False


def _pretrain(run_dir: Path, raw: dict[str, Any], what: str) -> Path:
    from lmdistill.train.run import run_training

    final = run_dir / "final"
    if (final / "model.safetensors").exists():
        print(f"{what}: reusing {final}", flush=True)
        return final
    raw = {**raw, "output_dir": str(run_dir)}
    config = validate_config(raw, what)
    print(f"{what}: pretraining {config.student.preset or config.student.path} for {config.train.steps} steps -> {final}",
          flush=True)
    run_training(config, resume=_start_or_resume(run_dir))
    return final


def _sft(run_dir: Path, raw: dict[str, Any], what: str) -> Path:
    from lmdistill.generation.run import run_task
    from lmdistill.generation.run_config import TaskRunConfig

    final = run_dir / "final"
    if (final / "model.safetensors").exists():
        print(f"{what}: reusing {final}", flush=True)
        return final
    raw = {**raw, "output_dir": str(run_dir)}
    config = validate_config(raw, what, model=TaskRunConfig)
    print(f"{what}: fine-tuning on {config.regime.task.name} for {config.train.steps} steps -> {final}", flush=True)
    run_task(config, resume=_start_or_resume(run_dir))
    return final


def prepare_teacher(name: str, choice: TeacherChoice, config: CompareConfig, base: dict[str, Any], *,
                    cache_root: Path) -> PreparedTeacher:
    """The teacher ``name`` ready for the cells (built once when it has to be)."""
    what = f"teachers.{name}"
    built: dict[str, Any] = {}
    if choice.path is not None:
        path = Path(choice.path).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"{what}.path '{choice.path}' is not a model directory (no config.json); build it first "
                              f"(e.g. lmdistill demo) or give {what}.pretrain: {{recipe: demo_teacher}}")
        built["path"] = str(path)
    else:
        run_dir, pre_raw, sft_raw = built_teacher_dir(choice, cache_root)
        pre_dir = run_dir if sft_raw is None else Path(sft_raw["student"]["path"]).parent
        path = _pretrain(pre_dir, pre_raw, f"{what}.pretrain")
        built["pretrain"] = {"run_dir": str(pre_dir), "config": pre_raw}
        if sft_raw is not None:
            path = _sft(run_dir, sft_raw, f"{what}.sft")
            built["sft"] = {"run_dir": str(run_dir), "config": sft_raw}
    cache = None
    if choice.cache is not None:
        cache = _build_cache(name, path, choice, config, base)
        built["cache"] = {"dir": str(cache), "settings": choice.cache}
    return PreparedTeacher(name=name, path=path, cache=cache, options=dict(choice.options), built_from=built)


def _build_cache(name: str, path: Path, choice: TeacherChoice, config: CompareConfig, base: dict[str, Any]) -> Path:
    from lmdistill.teachers.cache.command import CacheTeacherConfig, build_teacher_cache

    if "regime" in base:
        raise ConfigError(f"teachers.{name}.cache: task grids train on sequences made during training (student "
                          "samples), which no offline cache holds; remove cache")
    output = Path(config.output_dir) / "teachers" / name / "cache"
    raw = {"output": str(output), "data": base.get("data", {}), "teacher": {"path": str(path)}, "cache": choice.cache}
    if "dtype" in choice.options:
        raw["teacher"]["dtype"] = choice.options["dtype"]
    cache_config = validate_config(raw, f"teachers.{name}.cache", model=CacheTeacherConfig)
    print(f"teachers.{name}.cache: building (or checking) the offline teacher cache {output}", flush=True)
    build_teacher_cache(cache_config, show_progress=False)
    return output


def ensure_answers(teacher: PreparedTeacher, regime: dict[str, Any], base: dict[str, Any], output_dir: Path) -> Path:
    """The teacher's greedy answers to the task's training prompts (``lmdistill generate``), written once per
    (teacher, task) and resumed when interrupted; sequence-level KD cells read them."""
    from lmdistill.generation.run import run_generate
    from lmdistill.generation.run_config import GenerateConfig

    task = regime.get("task", {})
    max_new = ((base.get("generation") or {}).get("sampling") or {}).get("max_new_tokens", 48)
    store = output_dir / "teachers" / teacher.name / f"answers-{_key(task)}.jsonl"
    store.parent.mkdir(parents=True, exist_ok=True)
    raw = {"task": task, "split": "train", "store": str(store), "teacher": {"path": str(teacher.path)},
           "sampling": {"greedy": True, "max_new_tokens": max_new}}
    report = run_generate(validate_config(raw, f"teacher answers of {teacher.name}", model=GenerateConfig))
    if report.requested:
        print(f"teachers.{teacher.name}: {report.requested} answers written to {store}", flush=True)
    return store


def resolve_cell_config(cell: Cell, teachers: dict[str, PreparedTeacher], output_dir: Path, base: dict[str, Any],
                        stores: dict[str, Path] | None = None) -> dict[str, Any]:
    """The cell's complete raw run config: its output directory, teacher section and answer store filled in
    (``stores`` remembers the answer stores already checked, so the seeds of a row check theirs once)."""
    raw = copy.deepcopy(cell.config)
    raw["output_dir"] = str(cell_dir(output_dir, cell.id))
    if cell.teacher is not None:
        teacher = teachers[cell.teacher]
        raw["teacher"] = teacher.section()
        regime = raw.get("regime")
        if regime is not None and regime.get("store") == TEACHER_ANSWERS:
            stores = {} if stores is None else stores
            key = json.dumps([teacher.name, regime.get("task", {})], sort_keys=True)
            if key not in stores:
                stores[key] = ensure_answers(teacher, regime, base, output_dir)
            regime["store"] = str(stores[key])
    return raw
