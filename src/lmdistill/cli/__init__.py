"""The ``lmdistill`` command line. Thin: each command validates a config and calls one function."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from lmdistill.errors import LmdistillError

# Offline by default: model hubs are unreachable here, and a run must never hang on a download.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    name="lmdistill",
    help="Knowledge distillation for language models: from data to a distilled student and a report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SetOption = typer.Option(None, "--set", help="override a config key: --set train.steps=100 (repeatable)")
ResumeOption = typer.Option(False, "--resume", help="continue from the newest intact checkpoint in output_dir")
OverwriteOption = typer.Option(
    False, "--overwrite", help="replace the earlier run in output_dir (removes its checkpoints, metrics and final model)"
)


def _configure_logging(verbose: bool) -> None:
    """INFO lines of lmdistill (DEBUG with ``-v``); other libraries' chatter (transformers' weight-loading bars,
    its attention-mask and generation warnings, HTTP clients) only with ``-v``."""
    root = logging.getLogger()
    # one handler of ours on the current stderr, replacing the one an earlier command in this process added (other
    # handlers, e.g. a test runner's log capture, stay)
    for handler in [h for h in root.handlers if getattr(h, "_lmdistill", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._lmdistill = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "matplotlib", "PIL", "torch", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    from transformers.utils import logging as hf_logging

    if verbose:
        hf_logging.set_verbosity_info()
    else:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    _configure_logging(verbose)


def _train_command(config: Optional[Path], overrides: Optional[list[str]], resume: bool, overwrite: bool,
                   need_teacher: bool) -> None:
    from lmdistill.config import load_config
    from lmdistill.train.run import run_training

    cfg = load_config(config, overrides or [])
    if need_teacher and cfg.teacher is None:
        raise LmdistillError("distill needs a 'teacher:' section with the teacher's path (or --set teacher.path=DIR)")
    result = run_training(cfg, resume=resume, overwrite=overwrite)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: one summary, from rank 0
        return
    typer.echo(json.dumps({"output_dir": str(result.output_dir), **{k: v for k, v in result.final_metrics.items() if k != "kind"},
                           "train_tokens_per_second": round(result.tokens_per_second, 1)}, indent=2))


@app.command()
def pretrain(
    config: Optional[Path] = typer.Argument(None, help="YAML run config (defaults apply without one)"),
    set: Optional[list[str]] = SetOption,
    resume: bool = ResumeOption,
    overwrite: bool = OverwriteOption,
) -> None:
    """Train a model from scratch on a corpus with the next-token loss (how a teacher is made here)."""
    _train_command(config, set, resume, overwrite, need_teacher=False)


@app.command()
def distill(
    config: Path = typer.Argument(..., help="YAML run config with teacher, student, data and objective"),
    set: Optional[list[str]] = SetOption,
    resume: bool = ResumeOption,
    overwrite: bool = OverwriteOption,
) -> None:
    """Distil a teacher into a student with any objective or mixture of objectives.

    With a `regime:` section (fixed, sequence_kd, on_policy, scrg, kid, minillm) the run trains on a
    prompt/response task with that data regime and then scores the student's generations."""
    if config.is_file() and "regime" in (_read_yaml(config) or {}):
        from lmdistill.cli.generation import task_distill

        _replace_task_run(config, set, resume, overwrite)
        task_distill(config, set, resume)
        return
    _train_command(config, set, resume, overwrite, need_teacher=True)


def _replace_task_run(config: Path, overrides: Optional[list[str]], resume: bool, overwrite: bool) -> None:
    """``--overwrite`` for task runs (sft, distill with a regime): remove the earlier run before the task
    pipeline starts; its trainer then finds an empty directory (and refuses a non-empty one by itself)."""
    if not overwrite:
        return
    from lmdistill.config import load_config
    from lmdistill.errors import ConfigError
    from lmdistill.generation.run_config import TaskRunConfig
    from lmdistill.train.rundir import RunDirectory

    if resume:
        raise ConfigError("--resume and --overwrite exclude each other: resume the run, or replace it")
    cfg = load_config(config, list(overrides or []), model=TaskRunConfig)
    run_dir = RunDirectory(cfg.output_dir)
    try:
        run_dir.acquire()
        removed = run_dir.clear()
    finally:
        run_dir.release()
    if removed:
        typer.echo(f"--overwrite: removed the earlier run's {', '.join(removed)} from {cfg.output_dir}", err=True)


def _read_yaml(path: Path) -> dict | None:
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None  # load_config reports it with the file name
    return loaded if isinstance(loaded, dict) else None


@app.command("eval")
def eval_command(
    model: str = typer.Argument(..., help="model directory (save_pretrained) or hub id"),
    corpus: str = typer.Option("kjv", help="corpus name or data file"),
    split: str = typer.Option("validation", help="train, validation or test"),
    block_size: int = typer.Option(128, help="tokens per evaluated block"),
    teacher: Optional[str] = typer.Option(None, help="also report agreement with this teacher"),
    max_batches: Optional[int] = typer.Option(None, help="cap on evaluated batches"),
) -> None:
    """Perplexity and bits per byte of a model on a corpus split (and agreement with a teacher)."""
    from lmdistill.eval.run import evaluate_model

    metrics = evaluate_model(model, corpus=corpus, split=split, block_size=block_size, teacher=teacher, max_batches=max_batches)
    typer.echo(json.dumps(metrics, indent=2))


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="run directories (each run's output_dir)"),
    output: Path = typer.Option(Path("runs/report"), help="where table.md, results.json and curves.png go"),
    title: str = typer.Option("", help="title of the curves figure"),
) -> None:
    """The demo's table and learning curves for any runs (read from what they logged)."""
    from lmdistill.report.runs import report_runs

    out = report_runs(list(run_dirs), output, title=title)
    typer.echo(out["table"])
    typer.echo("written: " + ", ".join(out["files"]))


@app.command()
def presets() -> None:
    """List the from-scratch model presets."""
    from lmdistill.models.presets import PRESETS

    for name, p in PRESETS.items():
        typer.echo(f"{name:22s} {p.family:6s} layers={p.layers} hidden={p.hidden}  {p.description}")


@app.command()
def demo(
    output: Path = typer.Option(Path("runs/demo"), help="where the table, plots and models go"),
    set: Optional[list[str]] = SetOption,
) -> None:
    """Pretrain a teacher on KJV (cached), distil a student, train its label-only twin, report."""
    from lmdistill.report.demo import run_demo

    run_demo(output, overrides=set or [])


def _register_package_commands() -> None:
    """Commands defined next to their packages (their modules import heavy libraries lazily)."""
    from lmdistill.cli import cache as cache_cli
    from lmdistill.cli import compare as compare_cli
    from lmdistill.cli import datacentric as datacentric_cli
    from lmdistill.cli import embed as embed_cli
    from lmdistill.cli import generation as generation_cli
    from lmdistill.cli import selection as selection_cli

    app.command("cache-teacher")(cache_cli.cache_teacher)
    select_app = typer.Typer(help="Data-level distillation: choose the training data with a teacher.", no_args_is_help=True)
    select_app.command("miniplm")(selection_cli.select_miniplm)
    app.add_typer(select_app, name="select")

    def sft(
        config: Path = typer.Argument(..., help="YAML task-run config (see configs/generation/sft_teacher.yaml)"),
        set: Optional[list[str]] = SetOption,
        resume: bool = ResumeOption,
        overwrite: bool = OverwriteOption,
    ) -> None:
        _replace_task_run(config, set, resume, overwrite)
        generation_cli.sft(config, set, resume)

    app.command("sft", help=generation_cli.sft.__doc__)(sft)
    app.command("generate")(generation_cli.generate)
    app.command("serve")(generation_cli.serve)
    app.command("embed-distill")(embed_cli.embed_distill)
    app.command("embed-eval")(embed_cli.embed_eval)
    app.command("compare")(compare_cli.compare)
    app.command("distill-mixture")(datacentric_cli.distill_mixture)
    app.command("active-distill")(datacentric_cli.active_distill)
    app.command("hacking-report")(datacentric_cli.hacking_report)


_register_package_commands()


def main() -> None:
    try:
        app()
    except LmdistillError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted; the last complete checkpoint is kept", err=True)
        sys.exit(130)
