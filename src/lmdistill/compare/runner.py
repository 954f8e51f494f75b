"""Running a grid: teachers first (once), then every cell in its own process, resumably; then the report.

* **Finished cells are skipped**: a cell directory with ``result.json`` whose settings hash matches is done. A
  cell whose settings changed since it ran (another teacher, more steps, other evaluation settings) is
  trained again from scratch.
* **Interrupted cells resume** from their newest checkpoint (the trainer restores weights, optimizer, data
  position and RNG exactly), provided the settings did not change since that attempt; otherwise they start over.
* **Crash isolation and parallelism**: each cell is a ``python -m lmdistill.compare.cell`` process (``jobs`` at
  once, each with an equal share of the CPU threads), logging to ``cells/<id>/cell.log``; a failing cell is
  recorded (``failure.json``, its last error line goes into the report) and the others go on; the next run
  tries failed cells again.
* **Equal wall time** (``budget.equal: time``): a short probe run per row measures its seconds per step (see
  :func:`lmdistill.compare.cell.seconds_per_step`); its cells then train for ``budget.seconds`` worth of steps.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmdistill.compare.cell import PROBE_NAME, RESULT_NAME, run_cell_spec
from lmdistill.compare.config import CompareConfig, base_mapping
from lmdistill.compare.grid import Cell, Row, cell_id, config_hash, expand_grid
from lmdistill.compare.teachers import PreparedTeacher, prepare_teacher, resolve_cell_config
from lmdistill.config import validate_config
from lmdistill.data.cache import atomic_write_bytes
from lmdistill.errors import ConfigError, LmdistillError

__all__ = ["Plan", "plan_grid", "run_compare", "cell_action", "FAILURE_NAME", "SPEC_NAME", "LOG_NAME"]

FAILURE_NAME = "failure.json"
SPEC_NAME = "spec.json"
LOG_NAME = "cell.log"
_CELL_FILES = (RESULT_NAME, FAILURE_NAME, "attempts.jsonl")


@dataclass
class Plan:
    """A grid ready to run: its cells (with resolved configs once prepared) and where everything goes."""

    config: CompareConfig
    raw: dict[str, Any]
    source: str
    base: dict[str, Any]
    cells: list[Cell]
    output_dir: Path
    teachers: dict[str, PreparedTeacher] = field(default_factory=dict)
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)  # cell id -> spec (runnable cells)
    evaluation: dict[str, Any] = field(default_factory=dict)  # shared part of the cells' evaluation spec
    notes: list[str] = field(default_factory=list)  # what the report should say (missing corpora, ...)
    calibration: dict[str, float] = field(default_factory=dict)  # row label -> seconds per step
    command: str = ""  # the command line, as the report prints it (default: lmdistill compare SOURCE)

    @property
    def kind(self) -> str:
        return "task" if "regime" in self.base else "run"


def plan_grid(config: CompareConfig, raw: dict[str, Any], source: str) -> Plan:
    """Expand the grid (cheap: no model is built). Unknown objectives and regimes become skipped cells."""
    base = base_mapping(config, source)
    cells = expand_grid(config, base)
    return Plan(config=config, raw=raw, source=source, base=base, cells=cells, output_dir=Path(config.output_dir))


# ----------------------------------------------------------------------------------------- preparation
def _cache_dir(base: dict[str, Any]) -> Path:
    from lmdistill.data.cache import default_cache_dir

    where = (base.get("data") or {}).get("cache_dir") or base.get("cache_dir")
    return Path(where) if where else default_cache_dir()


def _in_domain_corpus(base: dict[str, Any]) -> str:
    if "regime" in base:  # the task's source corpus: kjv_continue -> kjv
        task = ((base.get("regime") or {}).get("task") or {}).get("name", "kjv_continue")
        return str(task).split("_")[0]
    return str((base.get("data") or {}).get("corpus", "kjv"))


def _tokenizer(plan: Plan, teacher: PreparedTeacher | None) -> Any:
    from lmdistill.data.prepare import prepare_data
    from lmdistill.data.tokenizer import load_tokenizer

    if (plan.base.get("tokenizer") or {}).get("path"):
        return load_tokenizer(plan.base["tokenizer"]["path"])
    if teacher is not None:
        return load_tokenizer(teacher.path)
    if (plan.base.get("teacher") or {}).get("cache"):
        from lmdistill.teachers.cache import cache_tokenizer

        return cache_tokenizer(plan.base["teacher"]["cache"])
    student_path = (plan.base.get("student") or {}).get("path")
    if student_path:
        return load_tokenizer(student_path)
    if plan.kind == "task":
        return None  # trained on the task by the cell itself; the cells then tokenize their own streams
    data = plan.base.get("data") or {}
    return prepare_data(data.get("corpus", "kjv"), block_size=int(data.get("block_size", 128)),
                        vocab_size=int((plan.base.get("tokenizer") or {}).get("vocab_size", 8192)),
                        cache_dir=_cache_dir(plan.base)).tokenizer


def _streams_for(plan: Plan, tokenizer: Any, corpora: list[str]) -> dict[str, str]:
    from lmdistill.compare.evaluate import evaluation_streams
    from lmdistill.data.prepare import prepare_data

    if tokenizer is None:
        return {c: "" for c in corpora}
    paths: dict[str, str] = {}
    data = plan.base.get("data") or {}
    fractions = tuple(data.get("split_fractions", (0.9, 0.05, 0.05)))
    if plan.kind == "run":  # in-domain: exactly the stream the trainer validates on
        prepared = prepare_data(data.get("corpus", "kjv"), block_size=int(data.get("block_size", 128)), tokenizer=tokenizer,
                                fractions=fractions, cache_dir=_cache_dir(plan.base))
        paths[_in_domain_corpus(plan.base)] = str(prepared.streams["validation"].path)
    ood = [c for c in corpora if c not in paths]
    for name, stream in evaluation_streams(tokenizer, ood, cache_dir=_cache_dir(plan.base)).items():
        paths[name] = str(stream.path)
    return paths


def _teacher_reference(plan: Plan, teacher: PreparedTeacher, streams: dict[str, str], block_size: int,
                       task_config: Any = None) -> None:
    """The teacher's own numbers (the report's reference row), computed once: bits per byte on the grid's
    streams and, for a task grid (``task_config``: one of its cells' validated config), its task scores as the
    cells are scored (response bits per byte, ROUGE-L, exact match)."""
    from lmdistill.compare.evaluate import evaluate_model_on_streams
    from lmdistill.data.blocks import TokenStream
    from lmdistill.models.loading import count_parameters, load_causal_lm

    if not all(streams.values()):
        return
    ev = plan.config.evaluation
    task_settings = None if task_config is None else task_config.model_dump(
        mode="json", include={"regime": {"task", "max_length"}, "eval": {"batch_size", "max_batches"}, "generation": True})
    key = config_hash([str(teacher.path), streams, ev.model_dump(), block_size] + ([task_settings] if task_settings else []))
    path = plan.output_dir / "teachers" / teacher.name / "reference.json"
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("key") == key:
            return
    except (OSError, ValueError):
        pass  # none yet, or unreadable: computed again
    model = load_causal_lm(teacher.path)
    scores = evaluate_model_on_streams(model, {c: TokenStream.load(Path(p)) for c, p in streams.items()},
                                       block_size=block_size, batch_size=ev.batch_size, max_batches=ev.max_batches)
    reference = {"key": key, "teacher": teacher.name, "path": str(teacher.path),
                 "params_m": count_parameters(model) / 1e6, "scores": scores}
    if task_config is not None:
        from lmdistill.generation.run import score_model_on_task

        reference["task"] = score_model_on_task(task_config, teacher.path)
    atomic_write_bytes(path, json.dumps(reference, indent=1).encode("utf-8"))  # a kill never leaves half a file


def prepare(plan: Plan) -> None:
    """Build the teachers, the evaluation streams and every runnable cell's spec. A cell whose complete config
    does not validate is skipped with the error."""
    from lmdistill.compare.evaluate import installed_corpora
    from lmdistill.data.tokenizer import tokenizer_fingerprint

    config, output_dir = plan.config, plan.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    runnable = [c for c in plan.cells if c.skip is None]
    for name in sorted({c.teacher for c in runnable if c.teacher is not None}):
        try:
            plan.teachers[name] = prepare_teacher(name, config.teachers[name], config, plan.base,
                                                  cache_root=_cache_dir(plan.base))
        except LmdistillError as exc:  # that teacher's cells cannot run; the others still do
            for cell in runnable:
                if cell.teacher == name:
                    cell.skip = f"teacher {name}: {exc}"
    runnable = [c for c in runnable if c.skip is None]
    in_domain = _in_domain_corpus(plan.base)
    if config.evaluation.out_of_domain == "auto":
        ood, missing = installed_corpora(exclude=in_domain)
        for corpus, why in missing.items():
            plan.notes.append(f"out-of-domain corpus {corpus} not evaluated: {why}")
    else:
        ood = [c for c in config.evaluation.out_of_domain if c != in_domain]
    corpora = ([in_domain] if plan.kind == "run" else []) + ood
    block_size = int((plan.base.get("data") or {}).get("block_size", 128)) if plan.kind == "run" else \
        int((plan.base.get("regime") or {}).get("max_length", 128))
    per_teacher: dict[str | None, dict[str, Any]] = {}
    for name in sorted({c.teacher for c in runnable}, key=lambda n: n or ""):
        teacher = plan.teachers.get(name) if name is not None else _base_teacher(plan)
        tokenizer = _tokenizer(plan, teacher)
        streams = _streams_for(plan, tokenizer, corpora)
        per_teacher[name] = {"streams": streams, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer) if tokenizer else None,
                             "teacher_path": str(teacher.path) if teacher else None}
        if teacher is not None and plan.kind == "run":
            _teacher_reference(plan, teacher, streams, block_size)
    plan.evaluation = {"max_batches": config.evaluation.max_batches, "batch_size": config.evaluation.batch_size,
                       "block_size": block_size, "in_domain": in_domain if plan.kind == "run" else None,
                       "cache_dir": str(_cache_dir(plan.base))}
    stores: dict[str, Path] = {}
    first_config: dict[str | None, Any] = {}  # per teacher: its first cell's validated config (task grids)
    for cell in runnable:
        try:
            raw = resolve_cell_config(cell, plan.teachers, output_dir, plan.base, stores)
            first_config.setdefault(cell.teacher, _validate(raw, plan.kind, f"cell {cell.id}"))
        except LmdistillError as exc:
            cell.skip = str(exc)
            continue
        evaluation = {**plan.evaluation, **per_teacher[cell.teacher]}
        plan.specs[cell.id] = {"id": cell.id, "kind": cell.kind, "config": raw, "evaluation": evaluation,
                               "row": {"teacher": cell.row.teacher, "regime": cell.row.regime, "objective": cell.row.objective},
                               "seed": cell.seed, "cell_dir": raw["output_dir"]}
    if plan.kind == "task":  # the teacher's task scores need a cell's complete config (task, eval, generation)
        for name, info in per_teacher.items():
            teacher = plan.teachers.get(name) if name is not None else _base_teacher(plan)
            if teacher is not None and name in first_config:
                _teacher_reference(plan, teacher, info["streams"], block_size, task_config=first_config[name])


def _base_teacher(plan: Plan) -> PreparedTeacher | None:
    """The base config's own live teacher (a grid without ``teachers:``), for evaluation and the reference row."""
    path = (plan.base.get("teacher") or {}).get("path")
    if not path:
        return None
    if not (Path(path).expanduser() / "config.json").is_file():
        raise ConfigError(f"base.teacher.path '{path}' is not a model directory (no config.json)")
    return PreparedTeacher(name="teacher", path=Path(path).expanduser())


def _validate(raw: dict[str, Any], kind: str, what: str) -> Any:
    """The cell's run config, validated as its kind's config model (``what`` names it in errors)."""
    if kind == "task":
        from lmdistill.generation.run_config import TaskRunConfig

        return validate_config(raw, what, model=TaskRunConfig)
    return validate_config(raw, what)


# ----------------------------------------------------------------------------------------- equal time
def _baseline_row(plan: Plan, row: Row) -> Row:
    axes = {"teacher": row.teacher, "regime": row.regime, "objective": row.objective}
    axes.update(plan.config.baseline)
    return Row(**axes)


def steps_for(seconds: float, seconds_per_step: float) -> int:
    """Whole steps that fit in ``seconds`` (at least one); the tolerance keeps ``n * r / r`` at ``n``."""
    return max(1, math.floor(seconds / seconds_per_step + 1e-6))


def calibrate(plan: Plan, jobs: int) -> None:
    """Seconds per step of every row (one probe run each, kept in ``calibration.json``), then each runnable
    cell's ``train.steps`` for the budget's seconds."""
    budget = plan.config.budget
    path = plan.output_dir / "calibration.json"
    saved = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    first: dict[Row, Cell] = {}
    for cell in plan.cells:
        if cell.id in plan.specs:
            first.setdefault(cell.row, cell)
    probes: list[dict[str, Any]] = []
    for row, cell in first.items():
        raw = json.loads(json.dumps(plan.specs[cell.id]["config"]))
        probe_dir = plan.output_dir / "calibration" / cell_id(row, 0).rsplit("--seed", 1)[0]
        raw["output_dir"] = str(probe_dir)
        raw["train"]["steps"] = budget.probe_warmup + budget.probe_steps
        raw["train"]["log_every"] = 1
        raw["eval"] = {**raw.get("eval", {}), "every": 10**9}
        raw["checkpoint"] = {**raw.get("checkpoint", {}), "every": 10**9, "keep": 1}
        if plan.kind == "task":
            raw["generation"] = {**raw.get("generation", {}), "max_examples": 1}
        key = config_hash({**raw, "output_dir": None, "probe_warmup": budget.probe_warmup})
        if saved.get(row.label, {}).get("config_hash") == key:
            plan.calibration[row.label] = saved[row.label]["seconds_per_step"]
            continue
        probes.append({"id": f"probe {row.label}", "kind": plan.kind, "config": raw, "mode": "probe", "overwrite": True,
                       "probe_warmup": budget.probe_warmup, "config_hash": key, "cell_dir": str(probe_dir),
                       "row_label": row.label})
    if probes:
        print(f"equal wall time: timing {len(probes)} row(s), {budget.probe_warmup}+{budget.probe_steps} steps each", flush=True)
        _execute(probes, jobs)
        for probe in probes:
            result = Path(probe["cell_dir"]) / PROBE_NAME
            if result.exists():
                rate = json.loads(result.read_text(encoding="utf-8"))["seconds_per_step"]
                plan.calibration[probe["row_label"]] = rate
                saved[probe["row_label"]] = {"seconds_per_step": rate, "config_hash": probe["config_hash"]}
        path.write_text(json.dumps(saved, indent=1), encoding="utf-8")
    base_steps = int((plan.base.get("train") or {}).get("steps", 500))
    for cell in plan.cells:
        spec = plan.specs.get(cell.id)
        if spec is None:
            continue
        rate = plan.calibration.get(cell.row.label)
        seconds = budget.seconds
        if seconds is None:
            reference = plan.calibration.get(_baseline_row(plan, cell.row).label)
            seconds = None if reference is None else reference * base_steps
        if rate is None or seconds is None:
            cell.skip = "equal wall time: no seconds-per-step measurement for this row or its baseline (its probe failed)"
            del plan.specs[cell.id]
            continue
        spec["config"]["train"]["steps"] = steps_for(seconds, rate)
        spec["budget_seconds"] = seconds


# ----------------------------------------------------------------------------------------- cell states
def cell_action(spec: dict[str, Any]) -> str:
    """What to do with a cell: ``done`` (finished with these settings), ``resume`` (interrupted, same settings,
    a checkpoint exists), ``restart`` (settings changed, or an attempt left no checkpoint) or ``fresh``."""
    from lmdistill.train.checkpoint import CheckpointManager
    from lmdistill.train.rundir import RunDirectory, check_resume_settings

    cell_dir = Path(spec["cell_dir"])
    result = cell_dir / RESULT_NAME
    if result.exists():
        try:
            if json.loads(result.read_text(encoding="utf-8")).get("config_hash") == spec["config_hash"]:
                return "done"
        except ValueError:
            pass
        return "restart"
    previous = cell_dir / SPEC_NAME
    if previous.exists():
        try:
            if json.loads(previous.read_text(encoding="utf-8")).get("config_hash") != spec["config_hash"]:
                return "restart"
        except ValueError:
            return "restart"
    latest = CheckpointManager(cell_dir).latest()
    if latest is not None:
        saved = cell_dir / "config.yaml"
        if saved.exists():
            try:
                config = _validate(spec["config"], spec["kind"], f"cell {spec['id']}")
                saved_settings = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
                check_resume_settings(saved_settings, config, latest.step)  # what the cell's trainer saved
            except (ConfigError, yaml.YAMLError):
                return "restart"
        return "resume"
    return "restart" if cell_dir.exists() and RunDirectory(cell_dir).run_entries() else "fresh"


# ----------------------------------------------------------------------------------------- execution
def _child_env(jobs: int) -> dict[str, str]:
    import lmdistill

    env = dict(os.environ)
    src = str(Path(lmdistill.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if jobs > 1:  # cells share the cores instead of each starting one thread per core
        threads = str(max(1, (os.cpu_count() or 1) // jobs))
        env.setdefault("OMP_NUM_THREADS", threads)
        env.setdefault("MKL_NUM_THREADS", threads)
    return env


def _last_error(log_path: Path) -> str:
    try:
        lines = [line.strip() for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1][len("error:"):].strip()
    return lines[-1] if lines else "no output"


def _record_failure(spec: dict[str, Any], message: str, returncode: int | None) -> None:
    path = Path(spec["cell_dir"]) / FAILURE_NAME
    path.write_text(json.dumps({"config_hash": spec["config_hash"], "error": message, "returncode": returncode}, indent=1),
                    encoding="utf-8")


def _execute(specs: list[dict[str, Any]], jobs: int) -> dict[str, str]:
    """Run the specs, ``jobs`` processes at once (0: in this process); returns ``{id: "ok" | error}``."""
    outcome: dict[str, str] = {}
    total = len(specs)
    for spec in specs:
        cell_dir = Path(spec["cell_dir"])
        cell_dir.mkdir(parents=True, exist_ok=True)
        (cell_dir / SPEC_NAME).write_text(json.dumps(spec, indent=1), encoding="utf-8")
    if jobs == 0:
        for i, spec in enumerate(specs, 1):
            start = time.perf_counter()
            try:
                run_cell_spec(spec)
                outcome[spec["id"]] = "ok"
            except (LmdistillError, RuntimeError, ValueError, OSError) as exc:
                outcome[spec["id"]] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                _record_failure(spec, outcome[spec["id"]], None)
            print(f"[{i}/{total}] {spec['id']}: {outcome[spec['id']]} ({time.perf_counter() - start:.0f}s)", flush=True)
        return outcome
    pending = deque(specs)
    running: dict[str, tuple[subprocess.Popen, dict[str, Any], float, Any]] = {}
    env = _child_env(jobs)
    done = 0
    try:
        while pending or running:
            while pending and len(running) < jobs:
                spec = pending.popleft()
                log_path = Path(spec["cell_dir"]) / LOG_NAME
                log = open(log_path, "a", encoding="utf-8")
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {spec.get('action', spec.get('mode', 'run'))}\n")
                log.flush()
                proc = subprocess.Popen([sys.executable, "-m", "lmdistill.compare.cell", str(Path(spec["cell_dir"]) / SPEC_NAME)],
                                        stdout=log, stderr=subprocess.STDOUT, env=env)
                running[spec["id"]] = (proc, spec, time.perf_counter(), log)
            time.sleep(0.2)
            for key in list(running):
                proc, spec, start, log = running[key]
                if proc.poll() is None:
                    continue
                log.close()
                del running[key]
                done += 1
                if proc.returncode == 0:
                    outcome[key] = "ok"
                else:
                    outcome[key] = _last_error(Path(spec["cell_dir"]) / LOG_NAME)
                    _record_failure(spec, outcome[key], proc.returncode)
                status = "ok" if proc.returncode == 0 else f"FAILED ({outcome[key]})"
                print(f"[{done}/{total}] {key}: {status} ({time.perf_counter() - start:.0f}s)", flush=True)
    except KeyboardInterrupt:
        for proc, _, _, log in running.values():
            proc.terminate()  # the cells keep their last complete checkpoint; a rerun resumes them
        for proc, _, _, log in running.values():
            proc.wait()
            log.close()
        raise
    return outcome


def run_compare(plan: Plan, *, jobs: int | None = None, report_only: bool = False) -> Path:
    """Run what is not finished and write the report; returns ``report.md``'s path."""
    from lmdistill.compare.report import write_report

    jobs = plan.config.jobs if jobs is None else jobs
    started = time.perf_counter()
    if not report_only:
        prepare(plan)
        if plan.config.budget.equal == "time":
            calibrate(plan, jobs)
        to_run = []
        for cell in plan.cells:
            spec = plan.specs.get(cell.id)
            if spec is None:
                continue
            spec["config_hash"] = config_hash({"config": spec["config"], "evaluation": spec["evaluation"]})
            action = cell_action(spec)
            if action == "done":
                continue
            spec["action"] = action
            spec["resume"] = action == "resume"
            spec["overwrite"] = action == "restart"
            if action == "restart":
                for name in _CELL_FILES:
                    (Path(spec["cell_dir"]) / name).unlink(missing_ok=True)
            to_run.append(spec)
        finished = len(plan.specs) - len(to_run)
        skipped = sum(1 for c in plan.cells if c.skip is not None)
        print(f"{len(plan.cells)} cells: {finished} finished, {len(to_run)} to run "
              f"({sum(s['action'] == 'resume' for s in to_run)} resuming), {skipped} skipped", flush=True)
        for cell in plan.cells:
            if cell.skip is not None and cell.seed == plan.config.grid.seeds[0]:
                print(f"  skipped {cell.row.label}: {cell.skip.splitlines()[0]}", flush=True)
        if to_run:
            from lmdistill.compare.report import environment

            (plan.output_dir / "environment.json").write_text(json.dumps(environment(), indent=1), encoding="utf-8")
        _execute(to_run, jobs)
    return write_report(plan, run_seconds=None if report_only else time.perf_counter() - started)
