"""`lmdistill cache-teacher`: a thin wrapper over :func:`lmdistill.teachers.cache.command.build_teacher_cache`.

A plain function with typer parameter declarations; `lmdistill.cli` registers it:

    app.command("cache-teacher")(cache_cli.cache_teacher)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

# (offline by default: importing this module runs lmdistill.cli's __init__, which sets the HF_*_OFFLINE variables)
SetOption = typer.Option(None, "--set", help="override a config key: --set cache.k=64 (repeatable)")


def cache_teacher(
    config: Path = typer.Argument(..., help="YAML cache-teacher config (see configs/cache/kjv_k32.yaml)"),
    set: Optional[list[str]] = SetOption,
) -> None:
    """Run a teacher once over a tokenized dataset and store what it predicts per token (cache.mode: low-rank
    codes by default; top-k, sampled or hybrid entries), sharded, checksummed and resumable: a rerun verifies the
    finished shards and recomputes damaged ones. Train from it with `teacher: {cache: DIR}`.
    Several processes: `torchrun --nproc_per_node=N -m lmdistill.cli cache-teacher CONFIG`."""
    from lmdistill.config import load_config
    from lmdistill.teachers.cache.command import CacheTeacherConfig, build_teacher_cache

    cfg = load_config(config, list(set or []), model=CacheTeacherConfig)
    summary = build_teacher_cache(cfg)
    if summary["rank"] == 0:
        typer.echo(json.dumps(summary, indent=2))
