"""`lmdistill select miniplm`: a thin wrapper over :func:`lmdistill.selection.run.run_miniplm_selection`.

A plain function with typer parameter declarations; `lmdistill.cli` registers it under a `select` group:

    select_app = typer.Typer(help="Select training data with a teacher.", no_args_is_help=True)
    select_app.command("miniplm")(selection_cli.select_miniplm)
    app.add_typer(select_app, name="select")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

# (offline by default: importing this module runs lmdistill.cli's __init__, which sets the HF_*_OFFLINE variables)
SetOption = typer.Option(None, "--set", help="override a config key: --set selection.fraction=0.3 (repeatable)")


def select_miniplm(
    config: Path = typer.Argument(..., help="YAML selection config (see configs/cache/miniplm_kjv.yaml)"),
    set: Optional[list[str]] = SetOption,
) -> None:
    """MiniPLM difference sampling (arXiv:2410.17215): score every document of a split by the teacher's
    minus a small reference model's mean log-likelihood and keep the top fraction, in corpus order,
    as refined.jsonl. Teacher and reference may use different tokenizers."""
    from lmdistill.config import load_config
    from lmdistill.selection.run import MiniPLMConfig, run_miniplm_selection

    cfg = load_config(config, list(set or []), model=MiniPLMConfig)
    typer.echo(json.dumps(run_miniplm_selection(cfg), indent=2))
