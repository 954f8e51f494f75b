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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
