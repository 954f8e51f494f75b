"""Sample-wise fusion of label loss and KD loss from the trilateral geometry of student, teacher and label."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lmdistill.constants import IGNORE_INDEX
from lmdistill.losses.core import Objective, OuterStep, compute_dtype, flatten_inputs, iter_chunks, student_log_probs
from lmdistill.losses.divergences import CrossEntropy, ForwardKL
from lmdistill.losses.signals import (
    EXACT_KINDS,
    Teacher,
    flatten_teacher,
    signal_values,
    teacher_log_probs,
    teacher_rows,
)

__all__ = ["TrilateralFusion", "FEATURE_NAMES"]

FEATURE_NAMES = ("tvd_student_teacher", "student_gold_gap", "teacher_gold_gap", "teacher_vs_class_mean", "student_vs_class_mean")


class TrilateralFusion(Objective):
    """Per-token fusion ratio between a KD loss and label cross-entropy, predicted by a small network.

    Hu et al., "Less or More From Teacher: Exploiting Trilateral Geometry for Knowledge Distillation"
    (TGeo-KD), ICLR 2024, arXiv 2312.15112. Per token i,

        loss_i = a_i * KD_i + (1 - a_i) * CE_i,     a_i = sigmoid(net(f_i)) in (0, 1)

    where ``f_i`` describes the triangle formed by the student prediction S, the teacher prediction T and
    the ground truth G, plus the teacher's class-mean prediction T_bar for the gold class.

    What is simplified relative to the paper (honestly):

    * Geometry features. The paper feeds the network relation vectors of the class dimension; with a
      language-model vocabulary (V up to ~10^5) that input is impractical, so the triangle is described by
      its three side lengths in total variation, which determine it up to congruence: ``TVD(S, T)``,
      ``TVD(S, G) = 1 - q_y`` and ``TVD(T, G) = 1 - p_y``; the inter-sample relation to T_bar is reduced
      to its gold coordinate: ``p_y - pbar_y`` and ``q_y - pbar_y``, where ``pbar_y`` is an exponential
      moving average of the teacher's gold-token probability over training tokens whose gold token is y
      (a ``[V]`` buffer instead of a ``[V, V]`` table of class-mean distributions). S and T are taken at
      the KD objective's temperature; features carry no gradient.
    * Bilevel optimisation. In the paper the network is trained on held-out data through the student's
      update (outer problem) while the student minimises the fused loss (inner problem). Here the ratio is
      *detached* in :meth:`per_token` (so the training loss never trains the network: doing so would just
      push every ratio towards the smaller of the two losses), and :meth:`meta_loss` gives the exact
      hypergradient of a **one-step, output-layer-only** unrolling: the output layer takes one SGD step of
      size ``lr`` on the fused loss of a training batch (hidden states fixed), and the network is moved to
      reduce the label cross-entropy of a held-out batch after that step. The trainer adds
      :meth:`parameters` to its optimizer and adds ``meta_loss(...)`` (whose value is meaningless, its
      gradient w.r.t. the network is the hypergradient) to the loss, every step or every few steps. The
      student body's influence through earlier layers and multi-step unrolling are not modelled.
    """

    name = "tgeo"
    has_outer_step: ClassVar[bool] = True
    nested_objectives: ClassVar[tuple[str, ...]] = ("kd",)  # the registry builds these from their specs

    def __init__(
        self,
        kd: Objective | None = None,
        hidden_size: int = 16,
        class_mean_momentum: float = 0.9,
        seed: int = 0,
    ) -> None:
        self.kd = ForwardKL() if kd is None else kd
        if not isinstance(self.kd, Objective):
            raise ValueError(f"kd must be an objective (build it with build_objective), got {self.kd!r}")
        if not self.kd.requires_teacher or self.kd.batch_coupled or self.kd.needs_batch_context:
            raise ValueError(
                f"kd must be a token-level teacher divergence (forward_kl, jsd, ...), got '{self.kd.name}'"
            )
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be an integer >= 1, got {hidden_size!r}")
        if isinstance(class_mean_momentum, bool) or not isinstance(class_mean_momentum, (int, float)) or not 0 <= class_mean_momentum < 1:
            raise ValueError(f"class_mean_momentum must be in [0, 1), got {class_mean_momentum!r}")
        # the geometry features read the teacher's whole distribution: only exact or completed signals
        self.accepted_signals = self.kd.accepted_signals & EXACT_KINDS
        self.hidden_size = hidden_size
        self.class_mean_momentum = float(class_mean_momentum)
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(len(FEATURE_NAMES), hidden_size), nn.Tanh(), nn.Linear(hidden_size, 1))
        with torch.no_grad():
            for layer in (self.net[0], self.net[2]):
                bound = 1.0 / layer.in_features**0.5
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.zero_()
        self.class_mean: Tensor | None = None  # [V] EMA of the teacher's gold probability per gold token
        self.class_seen: Tensor | None = None  # [V] bool

    # --- the ratio --------------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, student_logits: Tensor, teacher: Teacher, labels: Tensor) -> Tensor:
        """Geometry features ``[N, 5]`` (float32, float64 for float64 inputs; no gradient), in the order of ``FEATURE_NAMES``."""
        logits, teacher, flat_labels, _ = flatten_inputs(student_logits, teacher, labels)
        vocab = logits.shape[-1]
        dtype = compute_dtype(logits, signal_values(teacher))
        temperature = self.geometry_temperature
        q_logp = student_log_probs(logits, temperature, dtype)
        q = q_logp.exp()
        p = teacher_log_probs(teacher, temperature, vocab, dtype, q_logp).exp()
        safe = torch.where(flat_labels != IGNORE_INDEX, flat_labels, 0)
        q_gold = q.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        p_gold = p.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        tvd = 0.5 * (q - p).abs().sum(-1)
        mean_gold = self._class_mean_for(safe, p_gold, vocab)
        return torch.stack([tvd, 1 - q_gold, 1 - p_gold, p_gold - mean_gold, q_gold - mean_gold], dim=-1)

    @property
    def geometry_temperature(self) -> float:
        """Temperature of S and T in the features: the KD objective's (so sparse teachers fit)."""
        return float(getattr(self.kd, "temperature", 1.0))

    def _class_mean_for(self, labels: Tensor, p_gold: Tensor, vocab: int) -> Tensor:
        if self.class_mean is None or self.class_mean.numel() != vocab:
            return p_gold  # nothing seen yet: no deviation from the class mean
        seen = self.class_seen[labels]
        return torch.where(seen, self.class_mean[labels].to(p_gold.dtype), p_gold)

    def ratio(self, features: Tensor) -> Tensor:
        """Fusion ratio ``a = sigmoid(net(f))`` (differentiable w.r.t. the network).

        Evaluated in the features' dtype (float32 parameters are upcast for float64 inputs), so a row's
        ratio does not depend on how many rows are evaluated together.
        """
        first, last = self.net[0], self.net[2]
        dtype = features.dtype
        hidden = torch.tanh(torch.nn.functional.linear(features, first.weight.to(dtype), first.bias.to(dtype)))
        return torch.sigmoid(torch.nn.functional.linear(hidden, last.weight.to(dtype), last.bias.to(dtype)).squeeze(-1))

    # --- the objective ----------------------------------------------------------------------------------
    def per_token(self, student_logits: Tensor, teacher: Teacher | None, labels: Tensor | None, *, context: Any = None) -> Tensor:
        if teacher is None or labels is None:
            raise ValueError("objective 'tgeo' needs a teacher and labels")
        a = self.ratio(self.features(student_logits, teacher, labels)).detach()
        kd = self.kd.per_token(student_logits, teacher, labels)
        ce = CrossEntropy().per_token(student_logits, None, labels)
        a = a.reshape(kd.shape).to(kd.dtype)
        return a * kd + (1 - a) * ce

    # --- the outer problem --------------------------------------------------------------------------------
    def meta_loss(
        self,
        student_hidden: Tensor,
        output_weight: Tensor,
        teacher: Teacher,
        labels: Tensor,
        val_hidden: Tensor,
        val_labels: Tensor,
        *,
        lr: float,
        output_bias: Tensor | None = None,
        chunk_size: int = 1024,
        update_class_means: bool = True,
    ) -> Tensor:
        """Surrogate whose gradient w.r.t. :meth:`parameters` is the one-step, output-layer hypergradient.

        With ``W' = W - lr * grad_W(mean_i [a_i KD_i + (1 - a_i) CE_i])`` (hidden states fixed, mean over
        the valid training tokens), the outer objective is the mean label cross-entropy of the held-out
        tokens under ``W'``. Its derivative w.r.t. a_i is
        ``c_i = -(lr / n) <grad_W L_val(W'), (g_KD,i - g_CE,i) h_i^T>`` (plus the bias term), where g are the
        per-token loss gradients w.r.t. the logits at W. The surrogate is ``sum_i c_i a_i`` with ``c``
        constant. Dense or sparse teachers; memory O(chunk x V). Also folds this batch's teacher gold
        probabilities into the class means (after computing the features) unless ``update_class_means`` is
        false.
        """
        hidden = student_hidden.detach().reshape(-1, student_hidden.shape[-1])
        weight = output_weight.detach()
        bias = None if output_bias is None else output_bias.detach()
        flat_labels = labels.reshape(-1)
        vocab = weight.shape[0]
        valid = flat_labels != IGNORE_INDEX
        n_valid = int(valid.sum())
        if n_valid == 0:
            return sum(p.sum() * 0.0 for p in self.parameters())
        work = torch.float64 if weight.dtype == torch.float64 else torch.float32
        teacher = flatten_teacher(teacher, flat_labels.shape, (*flat_labels.shape, vocab))

        def logits_of(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            z = h.to(work) @ w.to(work).T
            return z if b is None else z + b.to(work)

        def loss_grads(z: Tensor, t_rows: Teacher, y: Tensor) -> tuple[Tensor, Tensor]:
            zz = z.detach().requires_grad_(True)
            with torch.enable_grad():
                kd = self.kd.per_token(zz, t_rows, y)
                g_kd = torch.autograd.grad(kd.sum(), zz)[0]
            p = torch.softmax(z, dim=-1)
            g_ce = p.scatter_add(-1, torch.where(y != IGNORE_INDEX, y, 0).unsqueeze(-1), torch.full((z.shape[0], 1), -1.0, dtype=z.dtype))
            g_ce = g_ce * (y != IGNORE_INDEX).unsqueeze(-1)
            return g_kd, g_ce

        features_list = []
        grad_w = torch.zeros(vocab, hidden.shape[-1], dtype=work)
        grad_b = torch.zeros(vocab, dtype=work)
        with torch.no_grad():
            for start, stop in iter_chunks(hidden.shape[0], chunk_size):
                h, y, t_rows = hidden[start:stop].to(work), flat_labels[start:stop], teacher_rows(teacher, start, stop)
                z = logits_of(h, weight, bias)
                f = self.features(z, t_rows, y)
                features_list.append(f)
                a = self.ratio(f).to(work).unsqueeze(-1)
                g_kd, g_ce = loss_grads(z, t_rows, y)
                g = a * g_kd + (1 - a) * g_ce
                grad_w.addmm_(g.T, h)
                grad_b += g.sum(0)
            stepped_w = weight.to(work) - lr * grad_w / n_valid
            stepped_b = (bias.to(work) if bias is not None else torch.zeros(vocab, dtype=work)) - lr * grad_b / n_valid
            # gradient of the held-out cross-entropy at the stepped output layer
            val_h = val_hidden.detach().reshape(-1, val_hidden.shape[-1])
            val_y = val_labels.reshape(-1)
            val_valid = val_y != IGNORE_INDEX
            m_valid = max(1, int(val_valid.sum()))
            val_grad_w = torch.zeros_like(grad_w)
            val_grad_b = torch.zeros_like(grad_b)
            for start, stop in iter_chunks(val_h.shape[0], chunk_size):
                h, y = val_h[start:stop].to(work), val_y[start:stop]
                z = logits_of(h, stepped_w, stepped_b if (bias is not None) else None)
                g = torch.softmax(z, dim=-1)
                g = g.scatter_add(-1, torch.where(y != IGNORE_INDEX, y, 0).unsqueeze(-1), torch.full((z.shape[0], 1), -1.0, dtype=work))
                g = g * (y != IGNORE_INDEX).unsqueeze(-1)
                val_grad_w.addmm_(g.T, h)
                val_grad_b += g.sum(0)
            val_grad_w /= m_valid
            val_grad_b /= m_valid
            coefficients = []
            for start, stop in iter_chunks(hidden.shape[0], chunk_size):
                h, y, t_rows = hidden[start:stop].to(work), flat_labels[start:stop], teacher_rows(teacher, start, stop)
                z = logits_of(h, weight, bias)
                g_kd, g_ce = loss_grads(z, t_rows, y)
                direction = h @ val_grad_w.T  # <grad_W L_val, g h^T> = g . (G h)
                if bias is not None:
                    direction = direction + val_grad_b
                coefficients.append(-(lr / n_valid) * ((g_kd - g_ce) * direction).sum(-1))
            coefficient = torch.cat(coefficients)
            features = torch.cat(features_list)
            if update_class_means:
                self._update_class_means(features, flat_labels, vocab)
        a = self.ratio(features)
        return (coefficient.to(a.dtype) * torch.where(valid, a, torch.zeros((), dtype=a.dtype))).sum()

    def outer_step(self, step: OuterStep) -> None:
        """The outer problem in training: gradients for the fusion network from :meth:`meta_loss` on the step's
        first micro-batch and a held-out batch of training blocks (reproducible on resume, excluding the step's
        own blocks). The teacher's per-token signal of the batch is built once here: O(tokens x vocab) memory for
        this objective. Each rank computes the hypergradient on its own data and the gradients are averaged over
        ranks, so the network (outside the DDP-wrapped student) stays identical everywhere."""
        batch = step.batch
        held_out = step.held_out(batch)
        if held_out is None:
            return  # no held-out blocks to look ahead on
        hidden = step.student_hidden(batch["input_ids"], batch.get("attention_mask"))
        val_hidden = step.student_hidden(held_out["input_ids"], None)
        with torch.no_grad():
            teacher = step.teacher_signal(batch)
        weight, bias = step.output_layer
        meta = self.meta_loss(hidden, weight, teacher, batch["labels"], val_hidden, held_out["labels"], lr=step.lr,
                              output_bias=bias)
        step.backward(meta)  # scaled like the main loss under fp16, so unscaling at the optimizer step is right
        for p in self.parameters():
            if p.grad is not None:
                p.grad = step.mean_over_ranks(p.grad)

    @torch.no_grad()
    def _update_class_means(self, features: Tensor, labels: Tensor, vocab: int) -> None:
        valid = labels != IGNORE_INDEX
        if self.class_mean is None or self.class_mean.numel() != vocab:
            self.class_mean = torch.zeros(vocab, dtype=torch.float32)
            self.class_seen = torch.zeros(vocab, dtype=torch.bool)
        y = labels[valid]
        p_gold = 1 - features[valid, 2]
        sums = torch.zeros(vocab, dtype=torch.float32).index_add_(0, y, p_gold.float())
        counts = torch.zeros(vocab, dtype=torch.float32).index_add_(0, y, torch.ones_like(p_gold, dtype=torch.float32))
        present = counts > 0
        batch_mean = sums[present] / counts[present]
        old = self.class_mean[present]
        seen = self.class_seen[present]
        m = self.class_mean_momentum
        self.class_mean[present] = torch.where(seen, m * old + (1 - m) * batch_mean, batch_mean)
        self.class_seen[present] = True

    # --- state ----------------------------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def state_dict(self) -> dict:
        return {
            "net": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
            "class_mean": None if self.class_mean is None else self.class_mean.clone(),
            "class_seen": None if self.class_seen is None else self.class_seen.clone(),
            "kd": self.kd.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        expected = {"net", "class_mean", "class_seen", "kd"}
        if set(state) != expected:
            raise ValueError(f"tgeo state must have keys {sorted(expected)}, got {sorted(state)}")
        self.net.load_state_dict(state["net"])
        self.class_mean = None if state["class_mean"] is None else state["class_mean"].clone()
        self.class_seen = None if state["class_seen"] is None else state["class_seen"].clone()
        self.kd.load_state_dict(state["kd"])

    def on_step_end(self, loss: float, step: int, total_steps: int) -> None:
        self.kd.on_step_end(loss, step, total_steps)

    def config(self) -> dict:
        return {
            "name": self.name,
            "kd": self.kd.config(),
            "hidden_size": self.hidden_size,
            "class_mean_momentum": self.class_mean_momentum,
            "seed": self.seed,
        }
