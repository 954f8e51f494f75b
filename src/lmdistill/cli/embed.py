"""`lmdistill embed-distill` and `lmdistill embed-eval`: thin wrappers over `lmdistill.embed.run`.

Both are plain functions with typer parameter declarations; `lmdistill.cli` registers them as commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def embed_distill(
    config: Path = typer.Argument(..., help="YAML config (see configs/embed/); method: infonce | margin_mse | flipped_kd | m3"),
    set: list[str] = typer.Option([], "--set", help="key=value overrides, e.g. --set train.steps=50 (repeatable)"),
) -> None:
    """Train an embedding model with one distillation method on the GCIDE retrieval task and evaluate it."""
    from lmdistill.embed.config import load_config
    from lmdistill.embed.evaluate import format_table
    from lmdistill.embed.run import run_distill

    cfg = load_config(config, list(set or []))
    rows = run_distill(cfg, log=typer.echo)
    typer.echo("")
    typer.echo(format_table(rows))
    typer.echo(f"\nsaved to {cfg.output_dir}")


def embed_eval(
    runs: Optional[list[Path]] = typer.Argument(None, help="run directories written by embed-distill"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="config whose task/eval sections to use (default: the first run's)"),
    set: list[str] = typer.Option([], "--set", help="key=value overrides, e.g. --set task.eval_queries=200"),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="include BM25 and the teacher zero-shot"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="also write the table (Markdown) and rows (JSON) here"),
) -> None:
    """Evaluate saved runs (and baselines) on the retrieval task and print the metrics table."""
    from lmdistill.embed.config import apply_overrides, load_config, parse_config
    from lmdistill.embed.evaluate import format_table
    from lmdistill.embed.run import baseline_rows, evaluate_run_dir, read_run, task_from_config
    from lmdistill.errors import ConfigError

    run_dirs = list(runs or [])
    if config is not None:
        cfg = load_config(config, list(set or []))
    elif run_dirs:
        stored = read_run(run_dirs[0])["config"]
        cfg = parse_config(apply_overrides(stored, list(set or [])), f"{run_dirs[0]}/run.json")
    else:
        cfg = parse_config(apply_overrides({"method": "infonce"}, list(set or [])), "defaults")
    if not run_dirs and not baselines:
        raise ConfigError("nothing to evaluate: give run directories or keep --baselines")
    task = task_from_config(cfg)
    typer.echo(f"task {task.summary()}")
    rows = baseline_rows(task, cfg) if baselines else []
    for run_dir in run_dirs:
        rows.extend(evaluate_run_dir(run_dir, task, cfg))
    table = format_table(rows)
    typer.echo(table)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.with_suffix(".md").write_text(table + "\n")
        output.with_suffix(".json").write_text(json.dumps([r.to_json() for r in rows], indent=2))
