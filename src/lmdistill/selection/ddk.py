"""DDK: domain-aware data mixtures for distillation.

Liu et al., "DDK: Distilling Domain Knowledge for Efficient Large Language Models", arXiv 2407.16154
(NeurIPS 2024). The student trains on a mixture of N domains whose sampling weights follow where it lags
the teacher most, measured on a fixed validation sample per domain:

* perplexities (§3.2): ``ell_S[i] = exp(CE(M_S(V_i), Y_i))`` and ``ell_T[i] = exp(CE(M_T(V_i), Y_i))``, the
  exponentiated mean next-token cross-entropy of student and teacher on domain i's validation sample;
* domain discrepancy factor, Eq. 1 (§3.2): ``r[i] = softmax_i(ell_S[i] / ell_T[i])``;
* factor smooth updating, Eq. 2 (§3.3), every K steps with the perplexities measured at that point:
  ``psi[i] = r[i] * exp(ell_S[i] / ell_T[i])`` and ``r[i] = alpha * psi[i] / sum_j psi[j] + (1 - alpha) / N``
  with alpha = 0.5; the constant term keeps every domain's probability at least (1 - alpha) / N;
* Algorithm 1: r_0 from Eq. 1 before the first step, r_t updated after every K steps, and the next K steps
  sample their data by r_t ("domain knowledge guided sampling": a domain's data is read cyclically once
  exhausted);
* the loss, Eq. 3 (§3.4): ``CE + gamma * KL`` at temperature T; the paper's ablations choose gamma = 0.2
  (Table 3) and T = 1 (Table 4). It is the run's objective (``{mix: [{name: cross_entropy, weight: 1},
  {name: forward_kl, weight: 0.2}]}``, see ``configs/datacentric/ddk.yaml``); Eq. 3 writes
  KL(Softmax(z_S/T), Softmax(z_T/T)) without naming a direction, and the paper's KD baseline [26] is
  Hinton et al.'s, so the forward KL(teacher || student) of that baseline is the default.

``smooth: false`` is the paper's "DDK (w/o FS)" ablation (Table 5): r_t is Eq. 1 with the new perplexities.
The teacher's perplexities are measured once (the teacher does not change). ``uniform`` and ``proportional``
(to each domain's training tokens) are the fixed mixtures DDK is compared with.

This module holds the arithmetic (float64), the mixture state a checkpoint saves, the perplexity measurement
and the weight plot; :mod:`lmdistill.train.mixture_source` samples batches by the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from lmdistill.data.blocks import collate
from lmdistill.errors import ConfigError
from lmdistill.eval.lm import add_token_sums
from lmdistill.models.modes import eval_mode

Policy = Literal["ddk", "uniform", "proportional"]
POLICIES: tuple[str, ...] = ("ddk", "uniform", "proportional")


def _as_positive(values: Sequence[float], what: str) -> np.ndarray:
    out = np.asarray(values, dtype=np.float64)
    if out.ndim != 1 or out.size == 0 or not np.all(np.isfinite(out)) or np.any(out <= 0):
        raise ConfigError(f"{what} must be finite positive numbers, one per domain (got {list(values)})")
    return out


def discrepancy_factor(student_ppl: Sequence[float], teacher_ppl: Sequence[float]) -> np.ndarray:
    """Eq. 1: ``softmax_i(ell_S[i] / ell_T[i])`` in float64 (the ratio's maximum is subtracted first, which
    leaves the softmax unchanged and keeps exp finite)."""
    ratio = _as_positive(student_ppl, "student perplexities") / _as_positive(teacher_ppl, "teacher perplexities")
    z = np.exp(ratio - ratio.max())
    return z / z.sum()


def smooth_update(weights: Sequence[float], student_ppl: Sequence[float], teacher_ppl: Sequence[float],
                  alpha: float = 0.5) -> np.ndarray:
    """Eq. 2: ``psi = r * exp(ell_S / ell_T)``; ``alpha * psi / sum(psi) + (1 - alpha) / N`` (float64).

    ``psi / sum(psi)`` is evaluated as a softmax of ``log r + ratio``, the same number without overflow when a
    ratio is large."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"mixture.alpha must lie in [0, 1] (got {alpha})")
    r = np.asarray(weights, dtype=np.float64)
    if r.ndim != 1 or not np.all(np.isfinite(r)) or np.any(r < 0) or r.sum() <= 0:
        raise ConfigError(f"mixture weights must be non-negative numbers with a positive sum (got {list(weights)})")
    ratio = _as_positive(student_ppl, "student perplexities") / _as_positive(teacher_ppl, "teacher perplexities")
    if not (r.size == ratio.size):
        raise ConfigError(f"{r.size} weights for {ratio.size} domains")
    with np.errstate(divide="ignore"):  # a weight that underflowed to 0 in Eq. 1 stays 0 in psi
        log_psi = np.log(r) + ratio
    psi = np.exp(log_psi - log_psi.max())
    return alpha * psi / psi.sum() + (1.0 - alpha) / r.size


def static_weights(policy: str, sizes: Sequence[float]) -> np.ndarray:
    """The fixed mixtures: ``uniform`` (1/N each) or ``proportional`` to the domains' sizes (training tokens)."""
    if policy == "uniform":
        return np.full(len(sizes), 1.0 / len(sizes))
    if policy == "proportional":
        s = _as_positive(sizes, "domain sizes")
        return s / s.sum()
    raise ConfigError(f"mixture.policy {policy!r} has no fixed weights; use one of {', '.join(POLICIES)}")


class MixtureWeights:
    """The sampling weights over domains and how they change: the state a checkpoint saves.

    ``history`` lists every setting of the weights: ``{"step": s, "weights": [...], "student_ppl": [...],
    "ratio": [...]}`` where s counts the optimizer steps done when they were set (the weights drive the steps
    after s). Fixed policies have one entry at step 0."""

    def __init__(self, names: Sequence[str], policy: str = "ddk", *, interval: int = 50, alpha: float = 0.5,
                 smooth: bool = True, sizes: Sequence[float] | None = None) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"mixture.policy {policy!r} is not one of {', '.join(POLICIES)}")
        if interval < 1:
            raise ConfigError(f"mixture.interval must be at least 1 step (got {interval})")
        self.names = list(names)
        self.policy = policy
        self.interval = interval
        self.alpha = alpha
        self.smooth = smooth
        self.teacher_ppl: list[float] | None = None
        self.history: list[dict[str, Any]] = []
        self.weights: list[float] | None = None
        if policy != "ddk":
            if policy == "proportional" and sizes is None:
                raise ConfigError("a proportional mixture needs the domains' sizes")
            self.weights = static_weights(policy, sizes if sizes is not None else [1.0] * len(self.names)).tolist()
            self.history.append({"step": 0, "weights": list(self.weights)})

    @property
    def adaptive(self) -> bool:
        return self.policy == "ddk"

    def due(self, step: int) -> bool:
        """Whether the weights are (re)computed before optimizer step ``step`` (0-based): before the first
        step, then after every ``interval`` steps, once each."""
        if not self.adaptive:
            return False
        if self.weights is None:
            return True
        return step % self.interval == 0 and step > self.history[-1]["step"]

    def update(self, step: int, student_ppl: Sequence[float], teacher_ppl: Sequence[float] | None = None) -> list[float]:
        """Set the weights from the perplexities measured after ``step`` steps (Eq. 1 the first time and
        without smoothing, Eq. 2 otherwise); returns them."""
        if teacher_ppl is not None:
            self.teacher_ppl = [float(v) for v in teacher_ppl]
        if self.teacher_ppl is None:
            raise ConfigError("DDK needs the teacher's perplexities before its first update")
        if self.weights is None or not self.smooth:
            new = discrepancy_factor(student_ppl, self.teacher_ppl)
        else:
            new = smooth_update(self.weights, student_ppl, self.teacher_ppl, self.alpha)
        self.weights = [float(w) for w in new]
        ratio = (np.asarray(student_ppl, dtype=np.float64) / np.asarray(self.teacher_ppl)).tolist()
        self.history.append({"step": int(step), "weights": list(self.weights),
                             "student_ppl": [float(v) for v in student_ppl], "ratio": ratio})
        return self.weights

    def state_dict(self) -> dict[str, Any]:
        # JSON floats round-trip exactly (repr), so a resumed run continues with the very same weights
        return {"names": self.names, "policy": self.policy, "weights": self.weights, "teacher_ppl": self.teacher_ppl,
                "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("names") != self.names or state.get("policy") != self.policy:
            raise ConfigError(f"the checkpoint's mixture is over {state.get('names')} ({state.get('policy')}), this run's over "
                              f"{self.names} ({self.policy}); resume with the same domains and mixture.policy")
        self.weights = state["weights"]
        self.teacher_ppl = state["teacher_ppl"]
        self.history = [dict(h) for h in state["history"]]


class FirstBlocks(Dataset):
    """The first ``n`` items of a dataset: the fixed per-domain validation sample DDK measures on."""

    def __init__(self, dataset: Dataset, n: int | None) -> None:
        self.dataset = dataset
        self.n = len(dataset) if n is None else min(n, len(dataset))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.dataset[index]


LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def mean_nll(logits_of: LogitsFn, dataset: Dataset, *, batch_size: int = 16, rank: int = 0, world_size: int = 1,
             all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             device: torch.device | str = "cpu") -> float:
    """Mean next-token cross-entropy (nats per target) of ``logits_of(input_ids)`` over ``dataset``'s blocks;
    batches are split over ranks and the sums all-reduced, so every rank gets the same number."""
    sums = torch.zeros(4, dtype=torch.float64)
    n_batches = math.ceil(len(dataset) / batch_size)  # type: ignore[arg-type]
    for b in range(rank, n_batches, world_size):
        batch = collate([dataset[i] for i in range(b * batch_size, min((b + 1) * batch_size, len(dataset)))])  # type: ignore[arg-type]
        logits = logits_of(batch["input_ids"].to(device))
        add_token_sums(sums, logits.float().cpu(), batch["labels"])
    if all_reduce is not None:
        sums = all_reduce(sums)
    return sums[0].item() / max(sums[1].item(), 1.0)


def model_logits(model: torch.nn.Module, vocab_size: int | None = None) -> LogitsFn:
    """``input_ids -> logits`` of a causal LM in eval mode (sliced to ``vocab_size`` real tokens)."""

    def fn(input_ids: torch.Tensor) -> torch.Tensor:
        with eval_mode(model):
            logits = model(input_ids=input_ids).logits
        return logits if vocab_size is None else logits[..., :vocab_size]

    return fn


def domain_perplexities(logits_of: LogitsFn, samples: Sequence[Dataset], **kwargs: Any) -> list[float]:
    """``exp(mean CE)`` on each domain's validation sample (the paper's ell_S or ell_T)."""
    return [math.exp(min(mean_nll(logits_of, sample, **kwargs), 700.0)) for sample in samples]


def plot_weights(history: Sequence[dict[str, Any]], names: Sequence[str], path: str | Path,
                 title: str = "domain weights") -> Path:
    """A step plot of each domain's sampling weight over training (and, for DDK, the perplexity ratios
    ell_S/ell_T the paper plots in its Fig. 3)."""
    from lmdistill.report.plots import plt, save_figure  # headless matplotlib, imported only to plot

    path = Path(path)
    with_ratio = any("ratio" in h for h in history)
    fig, axes = plt.subplots(1, 2 if with_ratio else 1, figsize=(10 if with_ratio else 5.5, 3.6), squeeze=False)
    steps = [h["step"] for h in history]
    for i, name in enumerate(names):
        axes[0, 0].step(steps, [h["weights"][i] for h in history], where="post", label=name)
        if with_ratio:
            pts = [(h["step"], h["ratio"][i]) for h in history if "ratio" in h]
            axes[0, 1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    axes[0, 0].set(xlabel="step", ylabel="sampling weight", title=title)
    axes[0, 0].legend(fontsize=8)
    if with_ratio:
        axes[0, 1].set(xlabel="step", ylabel="ell_S / ell_T", title="student / teacher perplexity")
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = [
    "POLICIES", "FirstBlocks", "MixtureWeights", "discrepancy_factor", "domain_perplexities", "mean_nll",
    "model_logits", "plot_weights", "smooth_update", "static_weights",
]
