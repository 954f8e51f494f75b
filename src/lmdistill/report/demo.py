"""``make demo``: the main job on the embedded default (KJV).

1. Pretrain the teacher, unless a teacher trained with the same recipe is cached.
2. Distil a student from it with the default objective.
3. Train the same student, same steps and data, with labels only.
4. Print and write a table (teacher, label-only student, distilled student) and loss curves.

The recipes live in ``lmdistill/recipes/`` as ordinary run configs; ``--set`` overrides apply to the
student runs (e.g. ``--set train.steps=100`` for a quicker look).
"""

from __future__ import annotations

import hashlib
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lmdistill.config import RunConfig, apply_overrides, validate_config
from lmdistill.data.cache import default_cache_dir
from lmdistill.data.prepare import prepare_data
from lmdistill.data.tokenizer import load_tokenizer
from lmdistill.eval.lm import evaluate_lm
from lmdistill.models.loading import count_parameters, load_causal_lm
from lmdistill.report.plots import markdown_table, plot_curves, read_metrics
from lmdistill.teachers.live import load_live_teacher
from lmdistill.train.run import run_training


def recipe(name: str) -> dict[str, Any]:
    text = resources.files("lmdistill.recipes").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def demo_teacher_dir(cache_root: Path) -> Path:
    """Where the demo teacher's run lives under ``cache_root``: keyed by its recipe, so other teachers cached
    beside it (``lmdistill compare`` builds them there too) are never taken for it."""
    key = hashlib.sha1(json.dumps(recipe("demo_teacher"), sort_keys=True).encode()).hexdigest()[:10]
    return cache_root / f"teacher-{key}"


def ensure_teacher(cache_root: Path) -> Path:
    """The demo teacher, pretrained once per recipe and reused afterwards."""
    raw = recipe("demo_teacher")
    run_dir = demo_teacher_dir(cache_root)
    final = run_dir / "final"
    if (final / "model.safetensors").exists():
        print(f"reusing the cached teacher {final}")
        return final
    raw["output_dir"] = str(run_dir)
    config = validate_config(raw, "recipe demo_teacher")
    print(f"pretraining the demo teacher ({config.student.preset}, {config.train.steps} steps) -> {final}")
    resume = (run_dir / "checkpoints" / "latest").exists()  # an interrupted pretraining continues
    run_training(config, resume=resume, overwrite=not resume)  # killed before its first checkpoint: start again
    return final


def run_demo(output: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    output = Path(output)
    cache_root = Path(default_cache_dir()) / "demo"
    teacher_dir = ensure_teacher(cache_root)
    teacher_seconds = time.perf_counter() - start

    runs: dict[str, Any] = {}
    for name, recipe_name in (("distilled student", "demo_distill"), ("label-only student", "demo_label_only")):
        raw = apply_overrides(recipe(recipe_name), list(overrides or []))
        raw["output_dir"] = str(output / recipe_name.removeprefix("demo_"))
        if "teacher" in raw:
            raw["teacher"]["path"] = str(teacher_dir)
        else:
            raw.setdefault("tokenizer", {})["path"] = str(teacher_dir)
        config = validate_config(raw, f"recipe {recipe_name}")
        print(f"\n== {name}: objective {config.objective}, {config.train.steps} steps")
        t0 = time.perf_counter()
        result = run_training(config, overwrite=True)  # the demo's students are retrained on every run
        runs[name] = {"result": result, "seconds": time.perf_counter() - t0, "config": config}

    # The teacher, and agreement of each student with it, on the same validation blocks.
    tokenizer = load_tokenizer(teacher_dir)
    live = load_live_teacher(teacher_dir, tokenizer=tokenizer)
    teacher_model = live.model
    cfg0: RunConfig = runs["distilled student"]["config"]
    data = prepare_data(cfg0.data.corpus, block_size=cfg0.data.block_size, tokenizer=tokenizer)
    stream = data.streams["validation"]
    bpt = stream.bytes_per_target

    rows = []
    t_metrics = evaluate_lm(teacher_model, data.blocks("validation"), bytes_per_token=bpt, batch_size=cfg0.eval.batch_size)
    rows.append({"model": "teacher", "params_m": count_parameters(teacher_model) / 1e6, **t_metrics, "top1_agreement": 1.0})
    for name, run in runs.items():
        student = load_causal_lm(run["result"].output_dir / "final")
        metrics = evaluate_lm(student, data.blocks("validation"), bytes_per_token=bpt, batch_size=cfg0.eval.batch_size, teacher=live)
        rows.append({
            "model": name, "params_m": count_parameters(student) / 1e6, **metrics,
            "steps": run["config"].train.steps, "train_s": run["result"].train_seconds,
            "tokens_per_s": run["result"].tokens_per_second,
        })
    bpb = {row["model"]: row["bits_per_byte"] for row in rows}
    gap = bpb["label-only student"] - bpb["teacher"]
    closed = (bpb["label-only student"] - bpb["distilled student"]) / gap if gap > 0 else float("nan")
    table = markdown_table(rows, [
        ("model", "model", ""), ("params_m", "params (M)", ".2f"), ("steps", "steps", ""),
        ("perplexity", "val perplexity", ".2f"), ("bits_per_byte", "val bits/byte", ".4f"),
        ("top1_agreement", "top-1 agreement", ".3f"), ("kl_to_teacher", "KL to teacher", ".4f"),
        ("train_s", "train s", ".0f"), ("tokens_per_s", "train tokens/s", ",.0f"),
    ])
    kd_s, label_s = runs["distilled student"]["result"].train_seconds, runs["label-only student"]["result"].train_seconds
    summary = (
        f"{table}\n\nstudent-teacher gap closed by distillation: {closed:.1%} (bits/byte)\n"
        f"distillation step time / label-only step time at equal steps: {kd_s / label_s:.2f}x\n"
        f"teacher ready in {teacher_seconds:.0f}s; demo wall time {time.perf_counter() - start:.0f}s\n"
    )
    plot = plot_curves(
        {name: read_metrics(run["result"].output_dir / "metrics.jsonl") for name, run in runs.items()},
        output / "curves.png", title="KJV: distilled vs label-only student",
    )
    output.mkdir(parents=True, exist_ok=True)
    (output / "table.md").write_text(summary, encoding="utf-8")
    results = {"rows": rows, "gap_closed": closed, "kd_time_ratio": kd_s / label_s, "wall_seconds": time.perf_counter() - start}
    (output / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print("\n" + summary + f"written: {output / 'table.md'}, {plot}")
    return results
