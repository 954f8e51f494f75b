"""Robust active distillation: which examples to show a teacher, robust to the teacher getting some of them wrong.

Baykal, Trinh, Iliopoulos, Menghani and Vee, "Robust Active Distillation", ICLR 2023, arXiv 2210.01213 (RAD). The
paper queries the teacher on points that are at once *informative* for the student and *correctly labelled* by the
teacher, and casts the trade-off between the two as a game: the learner picks a sampling distribution ``p`` over
the candidate points, an adversary then decides on which points the teacher's answer is wrong (at most ``k`` of
them, the number of teacher mistakes to expect), and the learner earns the gain of a drawn point only when the
teacher is right on it. The rule implemented here (:func:`robust_selection_probabilities`):

* gain (informativeness) of point ``i``: ``g_i = 1 - margin_i``, the student's margin being the difference of its
  two largest class probabilities (:func:`student_margins`), so the points closest to the student's decision
  boundary gain most;
* adversary budget: ``k = sum_i (1 - c_i)``, the expected number of teacher mistakes, ``c_i`` the probability that
  the teacher is right on point ``i``;
* payoff of ``p`` against the worst adversary: ``V(p) = sum_i p_i g_i - (the k largest values p_i g_i)`` (a
  fractional ``k`` takes that fraction of the next value);
* solution: with the gains sorted from largest down, ``g_(1) >= g_(2) >= ...``, and ``S_l = sum_{j <= l} 1/g_(j)``,
  take ``l* = argmax_l (l - k) / S_l`` (the largest maximiser, so tied gains are treated alike) and
  ``p_(j) = (1/g_(j)) / S_l*`` for ``j <= l*``, 0 otherwise. The ``l*`` most informative points share the mass so
  that ``p_i g_i`` is the same on all of them (an adversary gains nothing by choosing among them), and the value
  of the game is ``V = (l* - k) / S_l*``. With ``k = 0`` (a teacher never wrong) this is margin sampling, all mass
  on the most informative point(s); the more mistakes to expect, the wider the mass is spread, and within the
  support a *more* informative point gets *less* probability (``p_i`` is proportional to ``1/g_i``).

What the excerpts of the paper available while writing this settled, and what they did not:

* settled: the aim (points both informative and correctly labelled by the teacher), a game-theoretic formulation
  of the trade-off between the two, a parameter-free method, guarantees that hold for worst-case instances;
* ASSUMPTION: the gain is one minus the student's top-2 margin (the paper's informativeness measure as recalled,
  not shown in the excerpts);
* ASSUMPTION: the game is the one above (adversary with a budget of ``k`` wrong answers, payoff the gain of the
  drawn point when the teacher is right), and its solution is the equalising distribution over the ``l*`` largest
  gains; the tests check that solution against a linear program of the game itself, not against this formula;
* ASSUMPTION: ``k`` is estimated as the sum of the per-point probabilities that the teacher is wrong; per-point
  probabilities enter *only* through ``k`` (the adversary, not the estimate, decides where the mistakes fall), so
  the distribution depends on the correctness estimates only through their sum;
* ASSUMPTION: a batch of several points is drawn without replacement in proportion to ``p`` (successive sampling,
  :func:`robust_sample`); once the support is used up, the remaining points follow by decreasing gain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def student_margins(probabilities: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Per row of class probabilities, the largest minus the second largest (1 for a single class)."""
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probabilities: expected a 2-D array (examples x classes), got shape {probs.shape}")
    if probs.shape[1] < 2:
        return np.ones(probs.shape[0])
    top2 = np.sort(probs, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def robust_selection_probabilities(student_margins: Sequence[float] | np.ndarray,
                                   teacher_correct_probs: Sequence[float] | np.ndarray) -> np.ndarray:
    """RAD's sampling distribution over the points (see the module docstring for the rule and its assumptions).

    ``student_margins``: the student's top-2 margin per point, in [0, 1] (gain ``1 - margin``);
    ``teacher_correct_probs``: per point, the probability that the teacher's answer on it is right, in [0, 1]
    (the adversary's budget is ``k = sum(1 - c)``). Returns float64 probabilities summing to 1: the equalising
    distribution ``p_i = (1/g_i) / S_l*`` over the ``l*`` largest gains, ``l* = argmax_l (l - k) / S_l``.

    Degenerate cases: no point with a positive gain: uniform over all points; ``k`` at least the number of points
    with a positive gain (every choice is worth 0 against the adversary): all of them, which is the limit of the
    rule as ``k`` grows to that number."""
    margins = np.asarray(student_margins, dtype=np.float64)
    correct = np.asarray(teacher_correct_probs, dtype=np.float64)
    if margins.ndim != 1 or correct.shape != margins.shape:
        raise ValueError(f"student_margins and teacher_correct_probs must be 1-D of one length, got "
                         f"{margins.shape} and {correct.shape}")
    if not (np.isfinite(margins).all() and np.isfinite(correct).all()):
        raise ValueError("student_margins and teacher_correct_probs must be finite")
    if margins.size and (margins.min() < 0 or margins.max() > 1 or correct.min() < 0 or correct.max() > 1):
        raise ValueError("student_margins and teacher_correct_probs must lie in [0, 1]")
    n = margins.size
    if n == 0:
        return np.zeros(0)
    gains = 1.0 - margins
    k = float(np.sum(1.0 - correct))
    order = np.argsort(-gains, kind="stable")
    positive = int(np.count_nonzero(gains > 0))
    if positive == 0:
        return np.full(n, 1.0 / n)
    inverse = 1.0 / gains[order[:positive]]
    cumulative = np.cumsum(inverse)
    values = (np.arange(1, positive + 1) - k) / cumulative
    best = values.max()
    if best <= 0:
        support = positive
    else:
        tolerance = 1e-12 * max(1.0, abs(best))
        support = int(np.flatnonzero(values >= best - tolerance)[-1]) + 1
    out = np.zeros(n)
    out[order[:support]] = inverse[:support] / cumulative[support - 1]
    return out


def robust_sample(probabilities: Sequence[float] | np.ndarray, gains: Sequence[float] | np.ndarray, n: int,
                  seed: int) -> list[int]:
    """``min(n, len(probabilities))`` distinct indices, drawn without replacement in proportion to
    ``probabilities`` (successive sampling, by Efraimidis-Spirakis keys ``log(u) / p``: the same law as drawing one
    point at a time and renormalising over the rest); points of probability 0 come after every point of positive
    probability, by decreasing gain (then index). Deterministic for a seed."""
    p = np.asarray(probabilities, dtype=np.float64)
    g = np.asarray(gains, dtype=np.float64)
    rng = np.random.default_rng(seed)
    u = 1.0 - rng.random(p.size)  # in (0, 1]
    keys = [(0, math.log(u[i]) / p[i], 0.0, -i) if p[i] > 0 else (-1, 0.0, g[i], -i) for i in range(p.size)]
    ranked = sorted(range(p.size), key=lambda i: keys[i], reverse=True)
    return ranked[: max(0, min(n, p.size))]


__all__ = ["robust_sample", "robust_selection_probabilities", "student_margins"]
