"""The teacher-hacking monitor: proxy (student vs teacher) and golden (student vs oracle) metrics during
distillation, and the flags that say the student is learning the teacher's flaws.

Tiapkin et al., "On Teacher Hacking in Language Model Distillation", arXiv 2502.02671. Their controlled setup:
an oracle model stands for the true distribution, a teacher is distilled from it, a student from the teacher.
On validation prompts they track

* the **proxy metric**: the distance between student and teacher (what distillation optimises), and
* the **golden metric**: the distance between student and oracle (what one wants),

as sequence-level divergences of the models' response distributions. Teacher hacking is the proxy still falling
while the golden metric rises: a U-shaped golden curve over training (their Fig. 4-5; seen with a fixed offline
dataset, not with online generation). Without an oracle they observe that the proxy curve departs from the
polynomial (power-law) convergence it follows otherwise.

Measurement here (``mode: sequence``, the paper's kind): for each validation prompt x, ``generations`` responses
y are sampled once from the reference model p (the teacher for the proxy, the oracle for the golden metric;
temperature 1, fixed seeds, so every evaluation scores the same sequences) and the distance is the sequence-level
KL estimated along them with exact per-token terms,

    D(p, q) = mean_x mean_y  sum_t KL( p(. | x, y_<t) || q(. | x, y_<t) ),   y ~ p(. | x),

summed over the response positions (the closing EOS included). ``mode: token`` is the cheaper variant on the
run's validation text: mean per-token KL(p || student) over packed validation blocks.

Flags (on the logged curves; :func:`golden_u_shape`, :func:`powerlaw_departure`):

* ``teacher_hacking`` (needs an oracle): the golden metric's minimum lies before the last evaluation, it has since
  risen by more than ``rise_tolerance`` (relative), and the proxy is lower than it was at that minimum;
* ``proxy_departs_powerlaw``: a line fitted to log(proxy) against log(step) over the first ``fit_fraction`` of the
  evaluations misses the latest proxy value by more than ``powerlaw_tolerance`` (relative; the signed deviation
  is logged as ``proxy_powerlaw_deviation``, positive when the proxy is above the fit: convergence stalling).

Any run switches it on as its trainer ``evaluator`` (:class:`MonitoredEvaluator`, wrapping the run's own
evaluation); the history survives a resume (read back from ``metrics.jsonl``) and ``monitor.png`` plots both
curves and the proxy-golden plane.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmdistill.config import MonitorConfig
from lmdistill.data.blocks import collate
from lmdistill.errors import ConfigError
from lmdistill.eval.lm import evaluate_lm
from lmdistill.models.modes import eval_mode
from lmdistill.seeds import derived_seed

LogitsFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


# ---------------------------------------------------------------------------------------------- the flags
def golden_u_shape(proxy: Sequence[float], golden: Sequence[float], rise_tolerance: float = 0.02) -> bool:
    """Teacher hacking on the curves so far: the golden metric rose by more than ``rise_tolerance`` of its minimum
    after reaching it (the minimum not being the last point) while the proxy kept falling below its value there."""
    if len(golden) < 3 or len(proxy) != len(golden):
        return False
    g = np.asarray(golden, dtype=np.float64)
    p = np.asarray(proxy, dtype=np.float64)
    best = int(np.argmin(g))
    if best >= len(g) - 1:
        return False
    return bool(g[-1] - g[best] > rise_tolerance * abs(g[best]) and p[-1] < p[best])


def powerlaw_departure(steps: Sequence[float], values: Sequence[float], fit_fraction: float = 0.5) -> float | None:
    """Signed relative deviation of the last value from a power law ``c * step^b`` fitted (least squares in
    log-log space) to the first ``fit_fraction`` of the points; ``None`` with fewer than 3 points to fit or a
    point left to test, or non-positive steps or values."""
    s = np.asarray(steps, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    n_fit = max(3, int(math.floor(fit_fraction * len(s))))
    if len(s) < n_fit + 1 or np.any(s <= 0) or np.any(v <= 0):
        return None
    slope, intercept = np.polyfit(np.log(s[:n_fit]), np.log(v[:n_fit]), 1)
    predicted = math.exp(intercept + slope * math.log(s[-1]))
    return float(v[-1] / predicted - 1.0)


# ---------------------------------------------------------------------------------------------- distances
def _pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


@torch.no_grad()
def sample_responses(logits_of: LogitsFn, prompts: Sequence[Sequence[int]], *, eos_id: int, max_new_tokens: int,
                     seed: int, vocab_size: int | None = None) -> list[list[int]]:
    """One response per prompt sampled at temperature 1 from ``logits_of`` (any text scorer: no KV cache, prompts of
    equal length batched together so no padding shifts positions); the EOS is kept when generated. Prompt i draws
    from a generator seeded by (seed, i): reproducible and independent of batching."""
    out: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for indices in by_length.values():
        seqs = [list(prompts[i]) for i in indices]
        gens = [torch.Generator().manual_seed(derived_seed(seed, i)) for i in indices]
        live = list(range(len(indices)))
        for _ in range(max_new_tokens):
            if not live:
                break
            rows = [seqs[j] for j in live]
            logits = logits_of(torch.tensor(rows, dtype=torch.long), None)[:, -1, :].float()
            if vocab_size is not None:
                logits = logits[:, :vocab_size]
            probs = F.softmax(logits, dim=-1)
            still = []
            for k, j in enumerate(live):
                token = int(torch.multinomial(probs[k], 1, generator=gens[j]))
                seqs[j].append(token)
                out[indices[j]].append(token)
                if token != eos_id:
                    still.append(j)
            live = still
        # equal-length rows stay equal only while all are alive; finished rows leave the batch above
    return out


@torch.no_grad()
def sequence_kl(reference: LogitsFn, other: LogitsFn, prompts: Sequence[Sequence[int]],
                responses: Sequence[Sequence[int]], *, pad_id: int, vocab_size: int, batch_size: int = 16) -> float:
    """Mean over (prompt, response) pairs of ``sum_t KL(reference_t || other_t)`` over the response positions,
    each distribution over the first ``vocab_size`` tokens (computed in float64: the KL of close models is a small
    difference of large terms)."""
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        chunk = range(start, min(start + batch_size, len(prompts)))
        rows = [list(prompts[i]) + list(responses[i]) for i in chunk]
        ids, mask = _pad_right(rows, pad_id)
        ref = F.log_softmax(reference(ids, mask)[..., :vocab_size].double(), dim=-1)
        oth = F.log_softmax(other(ids, mask)[..., :vocab_size].double(), dim=-1)
        for k, i in enumerate(chunk):
            n_p, n_r = len(prompts[i]), len(responses[i])
            if n_r == 0:
                count += 1
                continue
            pos = slice(n_p - 1, n_p + n_r - 1)  # the logits at t predict the token at t + 1
            p_log = ref[k, pos]
            kl = (p_log.exp() * (p_log - oth[k, pos])).sum(-1)
            total += float(kl.sum())
            count += 1
    return total / max(count, 1)


def model_scorer(model: torch.nn.Module) -> LogitsFn:
    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        device = next(model.parameters()).device
        with eval_mode(model):
            extra = {} if attention_mask is None else {"attention_mask": attention_mask.to(device)}
            return model(input_ids=input_ids.to(device), **extra).logits.cpu()
    return fn


def teacher_scorer(teacher: Any) -> LogitsFn:
    """A teacher source's ``logits`` (any :class:`~lmdistill.teachers.base.TeacherSource` that scores text)."""
    if not teacher.scores_text:
        raise ConfigError(f"the teacher-hacking monitor scores the student's tokens with the teacher, but "
                          f"{teacher.description} cannot; use a live teacher (teacher.path) with the student's tokenizer")

    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return teacher.logits(input_ids, attention_mask).cpu()
    return fn


# ---------------------------------------------------------------------------------------------- the monitor
class TeacherHackingMonitor:
    """Measures proxy and golden metrics for a student, keeps their history and computes the flags.

    ``teacher`` and ``oracle`` are text scorers (``(input_ids, attention_mask) -> logits``); ``prompts`` are token
    ids of validation prompts (sequence mode) and ``blocks`` validation blocks (token mode)."""

    def __init__(self, config: MonitorConfig, *, teacher: LogitsFn, oracle: LogitsFn | None = None,
                 prompts: Sequence[Sequence[int]] = (), blocks: Any = None, eos_id: int, pad_id: int,
                 vocab_size: int) -> None:
        if config.mode == "sequence" and not prompts:
            raise ConfigError("monitor.mode: sequence needs validation prompts")
        if config.mode == "token" and blocks is None:
            raise ConfigError("monitor.mode: token needs validation blocks")
        self.config = config
        self.teacher, self.oracle = teacher, oracle
        self.prompts = [list(p) for p in prompts][: config.prompts]
        self.blocks = blocks
        self.eos_id, self.pad_id, self.vocab_size = eos_id, pad_id, vocab_size
        self.history: list[dict[str, float]] = []
        self._samples: dict[str, tuple[list[list[int]], list[list[int]]]] = {}

    def _reference_samples(self, name: str, scorer: LogitsFn) -> tuple[list[list[int]], list[list[int]]]:
        """(prompts, responses) sampled once from the reference model ``name`` (``generations`` per prompt)."""
        if name not in self._samples:
            c = self.config
            prompts = [p for p in self.prompts for _ in range(c.generations)]
            responses = sample_responses(scorer, prompts, eos_id=self.eos_id, max_new_tokens=c.max_new_tokens,
                                         seed=derived_seed(c.seed, name), vocab_size=self.vocab_size)
            self._samples[name] = (prompts, responses)
        return self._samples[name]

    def distance(self, name: str, reference: LogitsFn, student: LogitsFn) -> float:
        c = self.config
        if c.mode == "sequence":
            prompts, responses = self._reference_samples(name, reference)
            return sequence_kl(reference, student, prompts, responses, pad_id=self.pad_id, vocab_size=self.vocab_size,
                               batch_size=c.batch_size)
        return _token_kl(reference, student, self.blocks, c.prompts, self.vocab_size, c.batch_size)

    def measure(self, student: LogitsFn, step: int) -> dict[str, float]:
        """Proxy (and golden) metric of ``student`` after ``step`` steps, appended to the history, with the flags."""
        point = {"step": float(step), "proxy_kl": self.distance("teacher", self.teacher, student)}
        if self.oracle is not None:
            point["golden_kl"] = self.distance("oracle", self.oracle, student)
        self.history = [h for h in self.history if h["step"] < step] + [point]
        return {**{k: v for k, v in point.items() if k != "step"}, **self.flags()}

    def flags(self) -> dict[str, float]:
        c = self.config
        proxy = [h["proxy_kl"] for h in self.history]
        out: dict[str, float] = {}
        if self.oracle is not None:
            out["teacher_hacking"] = float(golden_u_shape(proxy, [h["golden_kl"] for h in self.history], c.rise_tolerance))
        deviation = powerlaw_departure([h["step"] for h in self.history], proxy, c.fit_fraction)
        if deviation is not None:
            out["proxy_powerlaw_deviation"] = deviation
            out["proxy_departs_powerlaw"] = float(abs(deviation) > c.powerlaw_tolerance)
        return out

    def restore(self, records: Sequence[dict[str, Any]], before_step: int) -> None:
        """Take the history back from a run's evaluation records (``metrics.jsonl``) of steps before ``before_step``."""
        self.history = [
            {"step": float(r["step"]), "proxy_kl": float(r["proxy_kl"]),
             **({"golden_kl": float(r["golden_kl"])} if "golden_kl" in r else {})}
            for r in records if r.get("kind") == "eval" and "proxy_kl" in r and int(r["step"]) < before_step
        ]

    def plot(self, path: str | Path) -> Path:
        return plot_monitor({"run": self.history}, path)


@torch.no_grad()
def _token_kl(reference: LogitsFn, student: LogitsFn, blocks: Any, n_blocks: int, vocab_size: int, batch_size: int) -> float:
    total, count = 0.0, 0
    n = min(n_blocks, len(blocks))
    for start in range(0, n, batch_size):
        batch = collate([blocks[i] for i in range(start, min(start + batch_size, n))])
        valid = batch["labels"] != -100
        ref = F.log_softmax(reference(batch["input_ids"], None)[..., :vocab_size].float(), dim=-1)[valid]
        oth = F.log_softmax(student(batch["input_ids"], None)[..., :vocab_size].float(), dim=-1)[valid]
        total += float((ref.exp() * (ref - oth)).sum(-1).double().sum())
        count += int(valid.sum())
    return total / max(count, 1)


def plot_monitor(runs: dict[str, Sequence[dict[str, float]]], path: str | Path) -> Path:
    """Proxy and golden curves against steps, and the golden metric against the proxy (the paper's Fig. 4 plane)."""
    from lmdistill.report.plots import plt, save_figure  # headless matplotlib, imported only to plot

    fig, (ax_curves, ax_plane) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, history in runs.items():
        steps = [h["step"] for h in history]
        line = ax_curves.plot(steps, [h["proxy_kl"] for h in history], marker=".", label=f"{name}: proxy")[0]
        if history and "golden_kl" in history[0]:
            golden = [h["golden_kl"] for h in history]
            ax_curves.plot(steps, golden, marker=".", linestyle="--", color=line.get_color(), label=f"{name}: golden")
            ax_plane.plot([h["proxy_kl"] for h in history], golden, marker="o", color=line.get_color(), label=name)
    ax_curves.set(xlabel="step", ylabel="sequence KL", title="proxy (teacher) and golden (oracle)")
    ax_curves.legend(fontsize=7)
    ax_plane.set(xlabel="proxy: KL to teacher", ylabel="golden: KL to oracle", title="golden vs proxy")
    ax_plane.invert_xaxis()  # optimisation moves right
    if ax_plane.lines:
        ax_plane.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- the evaluator
def lm_metrics(trainer: Any) -> dict[str, float]:
    """What the trainer evaluates without an evaluator of its own (packed validation blocks)."""
    acc = trainer.accelerator
    teacher = trainer.teacher if trainer.teacher is not None and trainer.teacher.scores_text else None
    return evaluate_lm(
        acc.unwrap_model(trainer.model), trainer.val_data, bytes_per_token=trainer.val_bytes_per_token,
        batch_size=trainer.config.eval.batch_size, max_batches=trainer.config.eval.max_batches, teacher=teacher,
        vocab_size=trainer.vocab_size, rank=acc.process_index, world_size=acc.num_processes,
        all_reduce=lambda t: acc.reduce(t.to(acc.device), reduction="sum").cpu(),
    )


def block_prompts(blocks: Any, n: int, prompt_tokens: int) -> list[list[int]]:
    """The first ``prompt_tokens`` tokens of the first ``n`` validation blocks: prompts for packed-text runs."""
    return [blocks[i]["input_ids"][:prompt_tokens].tolist() for i in range(min(n, len(blocks)))]


class MonitoredEvaluator:
    """A trainer ``evaluator``: the run's own metrics (``base``, or the trainer's packed-block evaluation) plus
    the monitor's. The monitor is built at the first call from the trainer (its teacher, tokenizer, validation
    blocks) and ``config``; on a resumed run its history is read back from ``metrics.jsonl``. With ``plot`` the
    main process redraws ``<output_dir>/monitor.png`` after each evaluation."""

    def __init__(self, config: MonitorConfig, *, base: Callable[[Any], dict[str, float]] | None = None,
                 prompts: Sequence[Sequence[int]] | None = None, plot: bool = True) -> None:
        self.config = config
        self.base = base
        self.prompts = prompts
        self.plot = plot
        self.monitor: TeacherHackingMonitor | None = None

    def _build(self, trainer: Any) -> TeacherHackingMonitor:
        c = self.config
        if trainer.teacher is None:
            raise ConfigError("monitor: the teacher-hacking monitor compares the student with its teacher; the run has none")
        oracle = None
        if c.oracle is not None:
            from lmdistill.data.tokenizer import load_tokenizer
            from lmdistill.teachers.live import load_live_teacher

            student = trainer.accelerator.unwrap_model(trainer.model)
            oracle = teacher_scorer(load_live_teacher(
                c.oracle, tokenizer=load_tokenizer(c.oracle), student_tokenizer=trainer.tokenizer,
                student_rows=student.get_output_embeddings().weight.shape[0]))
        tok = trainer.tokenizer
        prompts = self.prompts if self.prompts is not None else block_prompts(trainer.val_data, c.prompts, c.prompt_tokens)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        monitor = TeacherHackingMonitor(c, teacher=teacher_scorer(trainer.teacher), oracle=oracle, prompts=prompts,
                                        blocks=trainer.val_data, eos_id=tok.eos_token_id, pad_id=pad,
                                        vocab_size=trainer.vocab_size)
        metrics_file = Path(trainer.output_dir) / "metrics.jsonl"
        if trainer.step > 0 and metrics_file.exists():
            records = [json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines() if line.strip()]
            monitor.restore(records, before_step=trainer.step)
        return monitor

    def __call__(self, trainer: Any) -> dict[str, float]:
        metrics = dict(self.base(trainer) if self.base is not None else lm_metrics(trainer))
        if self.monitor is None:
            self.monitor = self._build(trainer)
        student = trainer.accelerator.unwrap_model(trainer.model)
        metrics.update(self.monitor.measure(model_scorer(student), trainer.step))
        if self.plot and trainer.accelerator.is_main_process:
            self.monitor.plot(Path(trainer.output_dir) / "monitor.png")
        return metrics


__all__ = [
    "MonitorConfig", "MonitoredEvaluator", "TeacherHackingMonitor", "block_prompts", "golden_u_shape", "lm_metrics",
    "model_scorer", "plot_monitor", "powerlaw_departure", "sample_responses", "sequence_kl", "teacher_scorer",
]
