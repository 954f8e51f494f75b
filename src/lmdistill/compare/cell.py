"""One cell of a grid, run in its own process: ``python -m lmdistill.compare.cell SPEC.json``.

The spec (written by :mod:`lmdistill.compare.runner`) holds the cell's complete run config and how to
evaluate it. The cell trains through the one trainer (``run_training``, or ``run_task`` for a run with a
regime), continuing its newest checkpoint when the runner says so, then evaluates the final model on the grid's
validation streams and writes ``result.json`` into its directory, atomically: a cell with that file is finished.

Each attempt (a first run, or a resume after an interruption) appends a line to ``attempts.jsonl``: the steps it
trained, its training seconds, its wall time and its peak resident memory (``ru_maxrss`` of this process). The
result sums the time over attempts and takes the largest peak.

Mode ``probe`` (equal-wall-time budgets) trains a few steps without evaluation and writes ``probe.json`` with the
measured seconds per step over the steps after the warm-up.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from lmdistill.errors import LmdistillError

__all__ = ["run_cell_spec", "main", "cell_dir", "RESULT_NAME", "ATTEMPTS_NAME", "PROBE_NAME", "seconds_per_step"]

RESULT_NAME = "result.json"
ATTEMPTS_NAME = "attempts.jsonl"
PROBE_NAME = "probe.json"


def cell_dir(output_dir: Path | str, cell_id: str) -> Path:
    """Where a grid's cell trains and keeps its result: ``OUTPUT_DIR/cells/CELL_ID``."""
    return Path(output_dir) / "cells" / cell_id


def _write_json_atomic(path: Path, payload: Any) -> None:
    from lmdistill.data.cache import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(payload, indent=1, default=str).encode("utf-8"))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB: ``VmHWM`` of ``/proc/self/status`` where there is
    one. Not ``ru_maxrss`` on Linux: it survives ``exec``, so a cell process started by a compare process that
    had pretrained a teacher reported that process's peak (every cell of a grid the same figure)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / 1024.0 if sys.platform != "darwin" else kib / 2**20


def _latest_step(output_dir: Path) -> int:
    from lmdistill.train.checkpoint import CheckpointManager

    latest = CheckpointManager(output_dir).latest()
    return 0 if latest is None else latest.step


def _clear(output_dir: Path) -> None:
    from lmdistill.train.rundir import RunDirectory

    directory = RunDirectory(output_dir)
    directory.acquire()
    try:
        directory.clear()
    finally:
        directory.release()


def _train(spec: dict[str, Any]) -> dict[str, Any]:
    """Train (or continue) the cell; returns this attempt's training numbers and, for task runs, their metrics."""
    from lmdistill.config import validate_config

    raw, kind = spec["config"], spec["kind"]
    output_dir = Path(raw["output_dir"])
    resume = bool(spec.get("resume"))
    start_step = _latest_step(output_dir) if resume else 0
    if kind == "task":
        from lmdistill.generation.run import run_task
        from lmdistill.generation.run_config import TaskRunConfig

        config = validate_config(raw, f"cell {spec['id']}", model=TaskRunConfig)
        if spec.get("overwrite"):
            _clear(output_dir)
        metrics = run_task(config, resume=resume)
        block = config.regime.max_length
        return {"start_step": start_step, "end_step": config.train.steps, "train_seconds": metrics["train_seconds"],
                "tokens_per_step": config.train.batch_size * block, "task": metrics}
    from lmdistill.train.run import run_training

    config = validate_config(raw, f"cell {spec['id']}")
    result = run_training(config, resume=resume, overwrite=bool(spec.get("overwrite")))
    return {"start_step": start_step, "end_step": config.train.steps, "train_seconds": result.train_seconds,
            "tokens_per_step": config.train.batch_size * config.data.block_size}


def _evaluate(spec: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The final model on the grid's validation streams (bits per byte; agreement and KL in-domain)."""
    from lmdistill.compare.evaluate import evaluate_model_on_streams, evaluation_streams
    from lmdistill.data.blocks import TokenStream
    from lmdistill.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    from lmdistill.models.loading import load_causal_lm

    ev = spec["evaluation"]
    final = Path(spec["config"]["output_dir"]) / "final"
    tokenizer = load_tokenizer(final)
    model = load_causal_lm(final)
    if tokenizer_fingerprint(tokenizer) == ev.get("tokenizer_fingerprint"):
        streams = {name: TokenStream.load(Path(path)) for name, path in ev["streams"].items()}
    else:  # a student with its own tokenizer: its own streams of the same documents
        streams = evaluation_streams(tokenizer, list(ev["streams"]), cache_dir=Path(ev["cache_dir"]))
    teacher, vocab = None, len(tokenizer)
    if ev.get("teacher_path") and ev.get("in_domain"):
        from lmdistill.teachers.live import load_live_teacher

        teacher = load_live_teacher(ev["teacher_path"], tokenizer=load_tokenizer(ev["teacher_path"]),
                                    student_tokenizer=tokenizer, student_rows=model.get_output_embeddings().weight.shape[0])
        vocab = teacher.alignment.real_vocab_size
    return evaluate_model_on_streams(model, streams, block_size=ev["block_size"], batch_size=ev["batch_size"],
                                     max_batches=ev["max_batches"], teacher=teacher, teacher_on=ev.get("in_domain"),
                                     vocab_size=vocab)


def _read_attempts(path: Path, config_hash: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if record.get("config_hash") == config_hash:
            out.append(record)
    return out


def cell_metrics(trained: dict[str, Any], scores: dict[str, dict[str, float]], in_domain: str | None) -> dict[str, float]:
    """The flat metrics of a cell: in-domain bits per byte, agreement and KL (from the task's response-level
    validation for task runs), ``ood/<corpus>`` bits per byte, and ROUGE-L / exact match of task runs."""
    metrics: dict[str, float] = {}
    task = trained.get("task")
    if task is not None:
        validation = task.get("validation", {})
        for key in ("bits_per_byte", "perplexity", "top1_agreement", "kl_to_teacher"):
            if key in validation:
                metrics[key] = float(validation[key])
        generation = task.get("generation", {})
        for key in ("rouge_l", "exact_match"):
            if key in generation:
                metrics[key] = float(generation[key])
    elif in_domain is not None and in_domain in scores:
        for key in ("bits_per_byte", "perplexity", "top1_agreement", "kl_to_teacher"):
            if key in scores[in_domain]:
                metrics[key] = float(scores[in_domain][key])
    for corpus, values in scores.items():
        if corpus != in_domain:
            metrics[f"ood/{corpus_name(corpus)}"] = float(values["bits_per_byte"])
    return metrics


def corpus_name(corpus: str) -> str:
    """A corpus as tables name it: the built-in name, or a data file's stem."""
    return Path(corpus).stem if Path(corpus).suffix else Path(corpus).name


def _run_probe(spec: dict[str, Any]) -> dict[str, Any]:
    trained = _train(spec)
    records = [json.loads(line) for line in (Path(spec["config"]["output_dir"]) / "metrics.jsonl")
               .read_text(encoding="utf-8").splitlines() if line.strip()]
    rate = seconds_per_step(records, trained["tokens_per_step"], warmup=int(spec["probe_warmup"]))
    probe = {"id": spec["id"], "seconds_per_step": rate, "steps": trained["end_step"], "warmup": spec["probe_warmup"],
             "config_hash": spec["config_hash"]}
    _write_json_atomic(Path(spec["cell_dir"]) / PROBE_NAME, probe)
    return probe


def seconds_per_step(records: list[dict[str, Any]], tokens_per_step: int, *, warmup: int) -> float:
    """Seconds per training step after the first ``warmup`` steps, from a run's train records.

    The trainer logs ``tokens_per_second`` = steps done x tokens per step / seconds since the loop started, so
    each logged step's elapsed time is recovered exactly; the rate is the slope between the last warm-up step
    (or the loop's start) and the last step, which leaves out first-step costs (compilation, caches)."""
    elapsed = {int(r["step"]): int(r["step"]) * tokens_per_step / r["tokens_per_second"]
               for r in records if r.get("kind") == "train" and r.get("tokens_per_second")}
    if not elapsed:
        raise LmdistillError("the probe run logged no training steps (train.log_every too large?)")
    last = max(elapsed)
    first = max((s for s in elapsed if s <= warmup), default=0)
    if last <= first:
        raise LmdistillError(f"the probe run needs more than {warmup} steps to time (it ran {last})")
    return (elapsed[last] - elapsed.get(first, 0.0)) / (last - first)


def run_cell_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one cell (or probe) described by ``spec``; returns what it wrote."""
    if spec.get("mode") == "probe":
        return _run_probe(spec)
    cell_dir = Path(spec["cell_dir"])
    started = time.perf_counter()
    trained = _train(spec)
    scores = _evaluate(spec)
    attempt = {
        "config_hash": spec["config_hash"], "start_step": trained["start_step"], "end_step": trained["end_step"],
        "train_seconds": trained["train_seconds"], "wall_seconds": time.perf_counter() - started,
        "peak_rss_mb": peak_rss_mb(), "time": time.time(),
    }
    with open(cell_dir / ATTEMPTS_NAME, "a", encoding="utf-8") as f:
        f.write(json.dumps(attempt) + "\n")
    attempts = _read_attempts(cell_dir / ATTEMPTS_NAME, spec["config_hash"])
    train_seconds = sum(a["train_seconds"] for a in attempts)
    steps_trained = sum(a["end_step"] - a["start_step"] for a in attempts)
    metrics = cell_metrics(trained, scores, spec["evaluation"].get("in_domain"))
    metrics.update({
        "steps": float(trained["end_step"]),
        "train_seconds": train_seconds,
        "tokens_per_second": steps_trained * trained["tokens_per_step"] / max(train_seconds, 1e-9),
        "wall_seconds": sum(a["wall_seconds"] for a in attempts),
        "peak_rss_mb": max(a["peak_rss_mb"] for a in attempts),
    })
    result = {"id": spec["id"], "row": spec["row"], "seed": spec["seed"], "config_hash": spec["config_hash"],
              "metrics": metrics, "scores": scores, "attempts": attempts}
    if trained.get("task") is not None:
        result["generation_samples"] = trained["task"].get("samples", [])[:5]
    _write_json_atomic(cell_dir / RESULT_NAME, result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m lmdistill.compare.cell SPEC.json", file=sys.stderr)
        return 2
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    try:
        run_cell_spec(spec)
    except LmdistillError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; the last complete checkpoint is kept", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
