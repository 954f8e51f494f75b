"""The generation-based data regimes as batch sources of the one trainer.

Each regime is a :class:`~lmdistill.train.sources.BatchSource`: for optimizer step ``step`` it
returns this rank's micro-batches (``input_ids``, pre-shifted ``labels``, ``attention_mask``). The
trainer is the same for all of them; the objective (``cross_entropy``, ``forward_kl``, ``jsd``, ...)
is applied to whatever tokens the source puts in the batch, with the teacher's logits computed by
the trainer on the batch's own ``input_ids``.

Randomness (the on-policy coin, student samples, KID positions) comes from generators seeded by
(seed, step, rank, micro-batch), so a run is reproducible and a resumed run reads the same batches
as an uninterrupted one, given the same weights.

=============== ===================================================================================
regime          training sequences of a step
=============== ===================================================================================
fixed           prompt + gold reference (:class:`PromptResponseSource`)
sequence_kd     prompt + the teacher's stored answer (Kim & Rush 2016, arXiv 1606.07947)
on_policy       GKD (Agarwal et al., "On-Policy Distillation of Language Models: Learning from
                Self-Generated Mistakes", arXiv 2306.13649, Algorithm 1): with probability lambda
                prompt + a sample from the current student, else the fixed responses
scrg            as on_policy, the student samples revised by SCRG (arXiv 2407.10068)
kid             prompt + gold reference with a share of its tokens masked, predicted by the student on
                the masked sequence and rewritten; gold targets (KID, arXiv 2410.11371)
minillm         prompt + a sample from the teacher-mixed policy alpha p + (1 - alpha) q at every step,
                for the ``minillm`` objective (MiniLLM, arXiv 2306.08543)
=============== ===================================================================================
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from lmdistill.data.documents import Document
from lmdistill.errors import ConfigError, LmdistillError
from lmdistill.generation.batching import (
    Example,
    PromptResponseSource,
    bos_id_of,
    collate_examples,
    encode_examples,
    pad_id_of,
)
from lmdistill.generation.config import RegimeConfig
from lmdistill.generation.kid import imperfect_inputs
from lmdistill.generation.sampling import SamplingParams, generate, generate_mixed
from lmdistill.generation.scrg import scrg_revise
from lmdistill.generation.seqkd import documents_from_store
from lmdistill.generation.tasks import build_task
from lmdistill.losses.minillm import MIX_ALPHA_FIELD
from lmdistill.seeds import derived_seed


class _StudentAccess:
    """Models a source needs at batch time: the live student (unwrapped from DDP) and the teacher,
    from the bound trainer, or set directly (``use_models``) outside a trainer."""

    trainer: Any
    student_model: torch.nn.Module | None = None
    teacher_model: Any = None
    vocab_size: int | None = None

    def use_models(self, student: torch.nn.Module, teacher: Any = None, vocab_size: int | None = None) -> None:
        self.student_model, self.teacher_model, self.vocab_size = student, teacher, vocab_size

    def _student(self) -> torch.nn.Module:
        if self.student_model is not None:
            return self.student_model
        if self.trainer is None:
            raise LmdistillError(f"{type(self).__name__} needs the student: bind it to a trainer first")
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def _teacher(self) -> Any:
        teacher = self.teacher_model if self.teacher_model is not None else getattr(self.trainer, "teacher", None)
        if teacher is None:
            raise ConfigError(f"regime {type(self).__name__} needs a teacher: add a teacher section to the config")
        return teacher

    def _vocab(self) -> int | None:
        if self.vocab_size is not None:
            return self.vocab_size
        return getattr(self.trainer, "vocab_size", None)


class OnPolicySource(_StudentAccess, PromptResponseSource):
    """GKD's data regime (arXiv 2306.13649): at each step, with probability ``lmbda`` (one coin per
    step, as in the paper's Algorithm 1) the responses of the step's prompts are sampled from the
    current student (no gradient through sampling), otherwise the fixed responses are used; the
    objective then scores those tokens against the teacher. ``lmbda = 1`` is purely on-policy,
    ``0`` is supervised/token-level KD. Batches carry ``on_policy`` [B] (1.0 for student samples)."""

    def __init__(self, examples: Sequence[Example], *, pad_id: int, eos_id: int, global_batch: int, seed: int,
                 max_length: int = 128, lmbda: float = 0.5, params: SamplingParams = SamplingParams(greedy=False)) -> None:
        super().__init__(examples, pad_id=pad_id, global_batch=global_batch, seed=seed, max_length=max_length)
        if not 0.0 <= lmbda <= 1.0:
            raise ConfigError(f"regime.lmbda must lie in [0, 1], got {lmbda}")
        self.eos_id = eos_id
        self.lmbda = lmbda
        self.params = params
        self.stats = {"student_steps": 0, "fixed_steps": 0, "student_samples": 0}

    def uses_student(self, step: int) -> bool:
        """The step's coin (the same on every rank)."""
        return random.Random(derived_seed(self.seed, step, "lambda")).random() < self.lmbda

    def _generator(self, step: int, rank: int, micro_index: int, tag: str) -> torch.Generator:
        return torch.Generator().manual_seed(derived_seed(self.seed, step, rank, micro_index, tag))

    def sample(self, examples: list[Example], generator: torch.Generator) -> list[Example]:
        """Replace each example's response by a student sample (EOS kept when generated)."""
        outputs = generate(self._student(), [e.prompt for e in examples], eos_token_id=self.eos_id,
                           pad_token_id=self.pad_id, params=self.params, generator=generator, vocab_size=self._vocab())
        return [Example(e.prompt, tuple(o)) for e, o in zip(examples, outputs)]

    def transform(self, examples: list[Example], step: int, rank: int, micro_index: int) -> dict[str, torch.Tensor]:
        on_policy = self.uses_student(step)
        if micro_index == 0:
            self.stats["student_steps" if on_policy else "fixed_steps"] += 1
        if on_policy:
            examples = self.revise(self.sample(examples, self._generator(step, rank, micro_index, "sample")), step, rank, micro_index)
            self.stats["student_samples"] += len(examples)
        batch = collate_examples(examples, self.pad_id, self.max_length)
        batch["on_policy"] = torch.full((len(examples),), float(on_policy))
        return batch

    def revise(self, examples: list[Example], step: int, rank: int, micro_index: int) -> list[Example]:
        return examples

    def state_dict(self) -> dict[str, Any]:
        return {"stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.update(state.get("stats", {}))


class SCRGSource(OnPolicySource):
    """On-policy samples revised by SCRG before training (Liu et al. 2024, arXiv 2407.10068; see
    :mod:`lmdistill.generation.scrg`): the teacher replaces the error token (by default the most
    divergent of the positions where its choice differs from the student's) and the student
    re-generates the rest. Batches also carry ``scrg_position`` [B] (-1: sample kept unchanged)."""

    def __init__(self, examples: Sequence[Example], *, threshold: float = 0.0, metric: str = "kl",
                 selection: str = "max", **kwargs: Any) -> None:
        super().__init__(examples, **kwargs)
        self.threshold = threshold
        self.metric = metric
        self.selection = selection
        self.stats.update(revised=0)
        self._positions: list[int] = []

    def revise(self, examples: list[Example], step: int, rank: int, micro_index: int) -> list[Example]:
        revisions = scrg_revise(
            self._student(), self._teacher(), [e.prompt for e in examples], [e.response for e in examples],
            threshold=self.threshold, metric=self.metric, selection=self.selection, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
            params=self.params, generator=self._generator(step, rank, micro_index, "scrg"), vocab_size=self._vocab(),
        )
        self._positions = [-1 if r.position is None else r.position for r in revisions]
        self.stats["revised"] += sum(r.position is not None for r in revisions)
        return [Example(e.prompt, tuple(r.response)) for e, r in zip(examples, revisions)]

    def transform(self, examples: list[Example], step: int, rank: int, micro_index: int) -> dict[str, torch.Tensor]:
        self._positions = [-1] * len(examples)
        batch = super().transform(examples, step, rank, micro_index)
        batch["scrg_position"] = torch.tensor(self._positions, dtype=torch.long)
        return batch


class MiniLLMSource(OnPolicySource):
    """MiniLLM's data (Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models", arXiv 2306.08543,
    Eq. 4): at every step each prompt's response is sampled token by token from the teacher-mixed policy
    ``mix_alpha * p + (1 - mix_alpha) * q`` (:func:`~lmdistill.generation.sampling.generate_mixed`, temperature 1,
    the step's seeded generator), with the current student q and the teacher p. Batches carry ``on_policy`` [B]
    (1.0) and ``mix_alpha`` [B], which the ``minillm`` objective reads for its importance weights.

    The teacher it samples from is the teacher model itself (``teacher_lm``, set by the task run; or a model given
    to :meth:`use_models`), each model stepping with its own KV cache."""

    def __init__(self, examples: Sequence[Example], *, mix_alpha: float = 0.2, **kwargs: Any) -> None:
        kwargs["lmbda"] = 1.0  # every step samples
        super().__init__(examples, **kwargs)
        if not 0.0 <= mix_alpha <= 1.0:
            raise ConfigError(f"regime.mix_alpha must lie in [0, 1], got {mix_alpha}")
        self.mix_alpha = float(mix_alpha)
        self.teacher_lm: torch.nn.Module | None = None

    def _teacher_lm(self) -> torch.nn.Module | None:
        if self.mix_alpha == 0.0:
            return None  # the teacher has no share of the sampling policy
        for candidate in (self.teacher_lm, self.teacher_model):
            if isinstance(candidate, torch.nn.Module):
                return candidate
        raise ConfigError("regime minillm samples from the teacher model at every generation step: give the source the "
                          "teacher model (a live teacher, teacher.path)")

    def sample(self, examples: list[Example], generator: torch.Generator) -> list[Example]:
        outputs = generate_mixed(self._student(), self._teacher_lm(), [e.prompt for e in examples],
                                 alpha=self.mix_alpha, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                                 max_new_tokens=self.params.max_new_tokens, generator=generator, vocab_size=self._vocab())
        return [Example(e.prompt, tuple(o)) for e, o in zip(examples, outputs)]

    def transform(self, examples: list[Example], step: int, rank: int, micro_index: int) -> dict[str, torch.Tensor]:
        batch = super().transform(examples, step, rank, micro_index)
        batch[MIX_ALPHA_FIELD] = torch.full((len(examples),), self.mix_alpha)
        return batch


def check_regime_objective(kind: str, objective: Any) -> None:
    """The ``minillm`` regime and the ``minillm`` objective go together (one is a policy gradient on the other's
    samples): a :class:`ConfigError` of one line when only one of them is configured. ``objective`` is an
    :class:`~lmdistill.losses.Objective` (a mixture counts when one of its parts is ``minillm``)."""
    names = [leaf.name for leaf in objective.leaves()]
    if kind == "minillm" and "minillm" not in names:
        raise ConfigError(f"regime.kind=minillm trains with objective: minillm (its policy gradient is what the "
                          f"teacher-mixed samples are for), got objective '{objective.name}'")
    if kind != "minillm" and "minillm" in names:
        raise ConfigError(f"objective 'minillm' is a policy gradient on teacher-mixed samples: use it with regime.kind: "
                          f"minillm (mix_alpha: 0 samples from the student alone), not regime.kind={kind}")


class KIDSource(_StudentAccess, PromptResponseSource):
    """KID's imperfect data (Zhong et al. 2024, arXiv 2410.11371; see :mod:`lmdistill.generation.kid`):
    a ``ratio`` share (paper: 0.2) of each response's input tokens is masked with ``mask_token_id``,
    predicted by the student on the masked sequence and rewritten with those predictions; targets stay
    gold. Batches carry ``kid_rewritten`` [B] (rewritten tokens per row)."""

    def __init__(self, examples: Sequence[Example], *, ratio: float = 0.2, mask_token_id: int, **kwargs: Any) -> None:
        super().__init__(examples, **kwargs)
        self.ratio = ratio
        self.mask_token_id = mask_token_id

    def transform(self, examples: list[Example], step: int, rank: int, micro_index: int) -> dict[str, torch.Tensor]:
        batch = collate_examples(examples, self.pad_id, self.max_length)
        generator = torch.Generator().manual_seed(derived_seed(self.seed, step, rank, micro_index, "kid"))
        new_ids, chosen = imperfect_inputs(self._student(), batch, self.ratio, mask_token_id=self.mask_token_id,
                                         generator=generator, vocab_size=self._vocab())
        batch["input_ids"] = new_ids
        batch["kid_rewritten"] = torch.tensor([len(c) for c in chosen], dtype=torch.long)
        return batch


def build_batch_source(
    regime: RegimeConfig,
    *,
    tokenizer: Any,
    global_batch: int,
    seed: int,
    documents: Sequence[Document] | None = None,
) -> PromptResponseSource:
    """The batch source of ``regime`` over the task's training examples (``documents``, default: the
    training split of ``regime.task``). The trainer binds it (``bind(trainer)``) to reach the live
    student and the teacher."""
    docs = list(documents) if documents is not None else build_task(regime.task)["train"]
    if regime.kind == "sequence_kd":
        docs = documents_from_store(docs, regime.store)  # type: ignore[arg-type]
    common = dict(pad_id=pad_id_of(tokenizer), global_batch=global_batch, seed=seed, max_length=regime.max_length)
    if regime.kind in ("fixed", "sequence_kd"):
        return PromptResponseSource(encode_examples(tokenizer, docs), **common)
    if regime.kind == "kid":
        return KIDSource(encode_examples(tokenizer, docs), ratio=regime.kid_mask_ratio, mask_token_id=bos_id_of(tokenizer),
                         **common)
    if regime.off_policy_store:
        docs = documents_from_store(docs, regime.off_policy_store)
    examples = encode_examples(tokenizer, docs)
    params = SamplingParams.from_config(regime.sampling)
    on_policy = dict(eos_id=tokenizer.eos_token_id, lmbda=regime.lmbda, params=params, **common)
    if regime.kind == "on_policy":
        return OnPolicySource(examples, **on_policy)
    if regime.kind == "scrg":
        return SCRGSource(examples, threshold=regime.scrg_threshold, metric=regime.scrg_metric,
                          selection=regime.scrg_selection, **on_policy)
    if regime.kind == "minillm":
        return MiniLLMSource(examples, mix_alpha=regime.mix_alpha, **on_policy)
    raise ConfigError(f"unknown regime.kind {regime.kind!r}")
