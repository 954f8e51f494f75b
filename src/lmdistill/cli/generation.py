"""`lmdistill sft`, `lmdistill distill`, `lmdistill generate`, `lmdistill serve`: thin wrappers
over :mod:`lmdistill.generation.run` and :mod:`lmdistill.generation.server`.

Plain functions with typer parameter declarations; `lmdistill.cli` registers them as commands:

    app.command("sft")(generation_cli.sft)
    app.command("generate")(generation_cli.generate)
    app.command("serve")(generation_cli.serve)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

SetOption = typer.Option(None, "--set", help="override a config key: --set train.steps=100 (repeatable)")


def _load_task_run(config: Path, overrides: Optional[list[str]]):
    from lmdistill.config import load_config
    from lmdistill.generation.run_config import TaskRunConfig

    return load_config(config, list(overrides or []), model=TaskRunConfig)


def _print_metrics(metrics: dict) -> None:
    shown = {k: metrics[k] for k in ("output_dir", "final_model", "regime", "train_seconds") if k in metrics}
    shown["validation"] = metrics.get("validation", {})
    shown["generation"] = metrics.get("generation", {})
    typer.echo(json.dumps(shown, indent=2))


def sft(
    config: Path = typer.Argument(..., help="YAML task-run config (see configs/generation/sft_teacher.yaml)"),
    set: Optional[list[str]] = SetOption,
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in output_dir"),
) -> None:
    """Fine-tune a model on a task's prompt/response pairs (loss on responses only), e.g. the teacher."""
    from lmdistill.errors import ConfigError
    from lmdistill.generation.run import run_task

    cfg = _load_task_run(config, set)
    if cfg.regime.kind != "fixed":
        raise ConfigError(f"sft trains on the task's references: regime.kind must be 'fixed' (got {cfg.regime.kind!r})")
    _print_metrics(run_task(cfg, resume=resume))


def task_distill(
    config: Path = typer.Argument(..., help="YAML task-run config with a regime (fixed, sequence_kd, on_policy, scrg, kid, minillm)"),
    set: Optional[list[str]] = SetOption,
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in output_dir"),
) -> None:
    """Distil a teacher into a student on a task with a generation-based regime, then score generations."""
    from lmdistill.generation.run import run_task

    _print_metrics(run_task(_load_task_run(config, set), resume=resume))


def generate(
    config: Path = typer.Argument(..., help="YAML generate config (see configs/generation/generate_local.yaml)"),
    set: Optional[list[str]] = SetOption,
) -> None:
    """A teacher (local model or OpenAI-compatible endpoint) answers a task's prompts into a resumable
    JSONL store: the dataset of sequence-level KD. Rerun to resume after an interruption."""
    from lmdistill.config import load_config
    from lmdistill.generation.run import run_generate
    from lmdistill.generation.run_config import GenerateConfig

    cfg = load_config(config, list(set or []), model=GenerateConfig)

    def progress(done: int, total: int) -> None:
        if done == total or done % 100 == 0:
            typer.echo(f"  {done}/{total} answers", err=True)

    report = run_generate(cfg, progress=progress)
    typer.echo(json.dumps({"store": cfg.store, "requested": report.requested, "already_stored": report.already_stored}, indent=2))


def serve(
    model: Path = typer.Argument(..., help="model directory (save_pretrained, with its tokenizer)"),
    host: str = typer.Option("127.0.0.1", help="address to bind"),
    port: int = typer.Option(8000, help="port (0: any free port)"),
    name: str = typer.Option("lmdistill-local", help="model name reported by the API"),
    api_key_env: Optional[str] = typer.Option(None, help="require the key held by this environment variable"),
    max_body_bytes: int = typer.Option(1 << 20, min=1, help="largest request body accepted (413 above)"),
    timeout: float = typer.Option(30.0, min=0.001, help="seconds a request may take to arrive; slower connections are closed"),
    max_connections: int = typer.Option(32, min=1, help="connections served at once; more are answered 503"),
    max_tokens_limit: int = typer.Option(256, min=1, help="largest max_tokens a request may ask for"),
) -> None:
    """Serve a local causal LM behind an OpenAI-compatible /v1/chat/completions and /v1/completions API
    (streaming, usage, the tokenizer's chat template: see lmdistill.generation.server)."""
    import time

    from lmdistill.data.tokenizer import load_tokenizer
    from lmdistill.errors import ConfigError
    from lmdistill.generation.server import ModelServer
    from lmdistill.models.loading import load_causal_lm

    key = None
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise ConfigError(f"environment variable {api_key_env!r} is not set")
    # log_size=0: a long-running server keeps no log of prompts (the log is for tests)
    server = ModelServer(load_causal_lm(model), load_tokenizer(model), model_name=name, host=host, port=port, api_key=key,
                         max_body_bytes=max_body_bytes, timeout=timeout, max_connections=max_connections,
                         max_new_tokens_limit=max_tokens_limit, log_size=0)
    with server:
        typer.echo(f"serving {model} as '{name}' at {server.base_url} (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
