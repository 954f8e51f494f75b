"""Tables and figures for reports (matplotlib, headless)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a run's ``metrics.jsonl``."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table; ``columns`` are (key, header, format) such as ("bits_per_byte", "bits/byte", ".3f")."""
    header = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, rule]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, fmt) if fmt else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: str | Path, *, title: str = "") -> Path:
    """Training loss and validation loss per step for several runs, side by side."""
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for name, records in runs.items():
        train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
        val = [(r["step"], r["loss"]) for r in records if r.get("kind") == "eval"]
        if train:
            ax_train.plot(*zip(*train), label=name)
        if val:
            ax_val.plot(*zip(*val), marker="o", label=name)
    ax_train.set(xlabel="step", ylabel="training objective", title="training objective (each run's own)")
    ax_val.set(xlabel="step", ylabel="validation NLL (nats/token)", title="validation loss")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_mean_curves(
    series: dict[str, dict[int, list[float]]], path: str | Path, *, ylabel: str, title: str = "", xlabel: str = "step"
) -> Path:
    """One line per name: the mean over runs (seeds) at each x, with a band of +- one standard deviation where
    more than one run has a value there. ``series`` maps name -> {x: [value per run]}."""
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, points in series.items():
        xs = sorted(points)
        if not xs:
            continue
        means = [sum(points[x]) / len(points[x]) for x in xs]
        (line,) = ax.plot(xs, means, marker="o", markersize=3, label=name)
        spread = [(x, m, _std(points[x])) for x, m in zip(xs, means) if len(points[x]) > 1]
        if spread:
            sx, sm, ss = zip(*spread)
            ax.fill_between(sx, [m - s for m, s in zip(sm, ss)], [m + s for m, s in zip(sm, ss)],
                            color=line.get_color(), alpha=0.15)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2 if len(series) > 8 else 1)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_metric_points(
    panels: Sequence[tuple[str, Sequence[str], Sequence[float], Sequence[float | None]]], path: str | Path,
    *, title: str = "",
) -> Path:
    """Per-method panels side by side, one per metric: (panel title, names, means, standard deviations or
    None), each method a dot at its mean with a +- one standard deviation whisker. Dots rather than bars: the
    axis spans the values, not zero, so close methods stay apart without bars whose lengths would mislead."""
    n = max(1, len(panels))
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    n_methods = max((len(p[1]) for p in panels), default=1)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, max(3.0, 0.3 * n_methods + 1.5) * rows), squeeze=False)
    for ax, (panel_title, names, means, stds) in zip(axes.flat, panels):
        positions = list(range(len(names)))
        errors = [s if s is not None else 0.0 for s in stds]
        ax.errorbar(means, positions, xerr=errors, fmt="o", color="#4c72b0", ecolor="#4c72b0", capsize=3)
        ax.set_yticks(positions, labels=list(names), fontsize="small")
        low = min(m - e for m, e in zip(means, errors)) if means else 0.0
        high = max(m + e for m, e in zip(means, errors)) if means else 1.0
        pad = (high - low) * 0.15 or abs(high) * 0.05 or 1.0
        ax.set_xlim(low - pad, high + pad)
        ax.set_ylim(len(names) - 0.5, -0.5)
        ax.set_title(panel_title, fontsize="medium")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def _std(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parents created) and release it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
