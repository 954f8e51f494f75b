"""Data-centric distillation commands: domain mixtures (DDK), performance-guided active distillation (PGKD) and
the teacher-hacking report. Plain functions with typer parameter declarations; ``lmdistill.cli`` registers them:

    app.command("distill-mixture")(datacentric_cli.distill_mixture)
    app.command("active-distill")(datacentric_cli.active_distill)
    app.command("hacking-report")(datacentric_cli.hacking_report)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

SetOption = typer.Option(None, "--set", help="override a config key: --set mixture.policy=uniform (repeatable)")
ResumeOption = typer.Option(False, "--resume", help="continue from the newest intact checkpoint in output_dir")
OverwriteOption = typer.Option(False, "--overwrite", help="replace the earlier run in output_dir")


def distill_mixture(
    config: Path = typer.Argument(..., help="YAML mixture-run config (see configs/datacentric/ddk.yaml)"),
    set: Optional[list[str]] = SetOption,
    resume: bool = ResumeOption,
    overwrite: bool = OverwriteOption,
) -> None:
    """Distil on a mixture of domains: DDK's adaptive weights (arXiv 2407.16154) or a uniform / size-proportional
    mixture; per-domain validation bits per byte, the weight history in mixture.json and mixture.png."""
    from lmdistill.config import load_config
    from lmdistill.selection.ddk_run import MixtureRunConfig, run_mixture

    cfg = load_config(config, list(set or []), model=MixtureRunConfig)
    summary = run_mixture(cfg, resume=resume, overwrite=overwrite)
    typer.echo(json.dumps({k: summary[k] for k in ("output_dir", "policy", "validation", "blocks_drawn")}, indent=2))


def active_distill(
    config: Path = typer.Argument(..., help="YAML active-distillation config (see configs/datacentric/pgkd_fortunes.yaml)"),
    set: Optional[list[str]] = SetOption,
) -> None:
    """Performance-guided active distillation (PGKD, arXiv 2411.05045): train a classifier, show the teacher its
    hard validation mistakes, add the labelled examples it writes, repeat; resumable (rerun the same command)."""
    from lmdistill.config import load_config
    from lmdistill.selection.active import ActiveConfig, run_active

    cfg = load_config(config, list(set or []), model=ActiveConfig)
    summary = run_active(cfg)
    rows = [{"round": r["round"], "train_size": r["train_size"], "queries_used": r["queries_used"],
             "validation_accuracy": round(r["validation"]["accuracy"], 4), "test_accuracy": round(r["test"]["accuracy"], 4)}
            for r in summary["rounds"]]
    typer.echo(json.dumps({"output_dir": summary["output_dir"], "stopped": summary["stopped"], "rounds": rows}, indent=2))


def hacking_report(
    runs: list[Path] = typer.Argument(..., help="run directories whose metrics.jsonl has the monitor's proxy_kl"),
    plot: Optional[Path] = typer.Option(None, help="write the curves of all runs to this PNG"),
    rise_tolerance: float = typer.Option(0.02, help="relative rise of the golden metric that flags teacher hacking"),
    powerlaw_tolerance: float = typer.Option(0.1, help="relative miss of the proxy's power-law fit that flags it"),
) -> None:
    """Teacher-hacking flags (arXiv 2502.02671) of finished or running distillations from their logged proxy
    (student vs teacher) and golden (student vs oracle) metrics."""
    from lmdistill.errors import DataError
    from lmdistill.eval.monitor import golden_u_shape, plot_monitor, powerlaw_departure

    curves, rows = {}, []
    for run in runs:
        path = run / "metrics.jsonl"
        if not path.is_file():
            raise DataError("no metrics.jsonl here", path=run, hint="give the output_dir of a run")
        evals = [r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if r.get("kind") == "eval"
                 and "proxy_kl" in r]
        if not evals:
            raise DataError("no evaluation carries proxy_kl: the run had no teacher-hacking monitor", path=path)
        history = [{"step": float(r["step"]), "proxy_kl": r["proxy_kl"], **({"golden_kl": r["golden_kl"]} if "golden_kl" in r else {})}
                   for r in evals]
        curves[run.name] = history
        proxy = [h["proxy_kl"] for h in history]
        deviation = powerlaw_departure([h["step"] for h in history], proxy)
        row = {"run": str(run), "evaluations": len(history), "proxy_first": proxy[0], "proxy_last": proxy[-1],
               "proxy_powerlaw_deviation": deviation,
               "proxy_departs_powerlaw": None if deviation is None else abs(deviation) > powerlaw_tolerance}
        if "golden_kl" in history[0]:
            golden = [h["golden_kl"] for h in history]
            row.update(golden_min=min(golden), golden_last=golden[-1],
                       teacher_hacking=golden_u_shape(proxy, golden, rise_tolerance))
        rows.append(row)
    if plot is not None:
        plot_monitor(curves, plot)
    typer.echo(json.dumps(rows, indent=2))
