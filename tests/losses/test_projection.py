"""The projected teacher (losses/projection.py): spellings of real tokenizers, the target against a float64
brute force of its formula, and the objective against KL written out group by group."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.constants import IGNORE_INDEX
from lmdistill.losses import ForwardKL, build_objective, fused_linear_distill, reduce_tokens
from lmdistill.losses.alignment import CrossTokenizerBatcher, align_spans
from lmdistill.losses.crosstok import AlignedTeacher
from lmdistill.losses.projection import (
    ProjectedKD,
    SpelledColumns,
    projected_kl,
    projected_log_probs,
    projected_targets,
    student_spellings,
)
from lmdistill.models.vocab import token_keys
from tests.losses.helpers import aligned_inputs, blocks_of, softmax_np


def test_spellings_of_real_tokenizers_spell_each_teacher_token(student_tok, teacher_tok):
    spell = student_spellings(teacher_tok, student_tok, max_depth=12)
    s_keys, t_keys = token_keys(student_tok), token_keys(teacher_tok)
    mapped = 0
    for tid, key in enumerate(t_keys):
        ids = [int(i) for i in spell[tid] if i >= 0]
        if isinstance(key, tuple):  # a special token: the student's token of the same role
            assert ids == [s_keys.index(key)]
            continue
        if ids:
            mapped += 1
            assert b"".join(s_keys[i] for i in ids) == key
            try:  # the student's own tokenizer spells the decoded text that way
                text = key.decode("utf-8")
            except UnicodeDecodeError:  # a piece of a character: spelled by the BPE alone
                continue
            assert student_tok(text, add_special_tokens=False).input_ids == ids
    plain = sum(isinstance(k, bytes) for k in t_keys)
    assert mapped / plain > 0.98, (mapped, plain)
    # max_depth cuts the long spellings off entirely rather than truncating them
    short = student_spellings(teacher_tok, student_tok, max_depth=2)
    long_ones = ((spell >= 0).sum(1) > 2).nonzero().flatten()
    assert long_ones.numel() and bool((short[long_ones] == -1).all())


def _reference_target(p_t: np.ndarray, spellings: list[list[int]], prefix: list[int], vocab: int):
    target = np.zeros(vocab)
    for u, spelling in enumerate(spellings):
        if len(spelling) > len(prefix) and spelling[: len(prefix)] == prefix:
            target[spelling[len(prefix)]] += p_t[u]
    return target / target.sum() if target.sum() > 0 else None


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), teacher_vocab=st.integers(2, 30), student_vocab=st.integers(2, 8),
       rows=st.integers(1, 6), depth_cap=st.integers(1, 4))
def test_projected_target_matches_the_formula(seed, teacher_vocab, student_vocab, rows, depth_cap):
    rng = np.random.default_rng(seed)
    spellings = [list(rng.integers(0, student_vocab, size=int(rng.integers(0, depth_cap + 1)))) for _ in range(teacher_vocab)]
    table = torch.full((teacher_vocab, depth_cap), -1, dtype=torch.long)
    for u, s in enumerate(spellings):
        table[u, : len(s)] = torch.tensor(s, dtype=torch.long)
    t_logp = torch.log_softmax(torch.tensor(rng.normal(size=(rows, teacher_vocab)) * 2), -1)
    # prefixes of real spellings (mostly with mass) and of random tokens (often without)
    prefixes = []
    for r in range(rows):
        source = spellings[int(rng.integers(teacher_vocab))] if r % 2 == 0 else list(rng.integers(0, student_vocab, 2))
        prefixes.append(source[: int(rng.integers(0, min(len(source), depth_cap - 1) + 1))])
    depth = torch.tensor([len(p) for p in prefixes])
    prefix = torch.full((rows, depth_cap), -1, dtype=torch.long)
    for r, p in enumerate(prefixes):
        prefix[r, : len(p)] = torch.tensor(p, dtype=torch.long)
    got, has = projected_log_probs(t_logp, table, depth, prefix, student_vocab)
    for r in range(rows):
        ref = _reference_target(t_logp[r].exp().numpy(), spellings, prefixes[r], student_vocab)
        assert bool(has[r]) == (ref is not None)
        if ref is not None:
            np.testing.assert_allclose(got[r].exp().numpy(), ref, rtol=1e-12, atol=1e-15)


def test_projected_kd_matches_kl_written_out_group_by_group(batcher, verses, student_tok, teacher_tok):
    blocks = blocks_of(student_tok, verses, 32, 4, start=1500)
    inputs, zs, zt = aligned_inputs(batcher, blocks, len(teacher_tok), seed=3)
    labels = blocks[:, 1:].reshape(-1).clone()
    labels[5] = IGNORE_INDEX
    teacher = AlignedTeacher(zt, inputs.alignment, inputs.teacher_valid, len(teacher_tok))
    objective = ProjectedKD(temperature=1.5)
    objective.spellings = student_spellings(teacher_tok, student_tok)
    objective.student_vocab = len(student_tok)
    got = objective.per_token(zs, teacher, labels).detach().numpy()
    spellings = [[int(i) for i in row if i >= 0] for row in objective.spellings]
    expected = np.zeros(128)
    kinds = set()
    skipped_with_mass = 0
    covered = 0
    for b in range(4):
        s, t = batcher.spans_from_ids(blocks[b].tolist())
        for ra, rb in align_spans(s, t):
            if ra.start == 0 or rb.start == 0:
                continue
            kinds.add((min(len(ra), 2), min(len(rb), 2)))
            p_t = softmax_np(zt[b, rb[0] - 1].numpy() / 1.5)
            for j, k in enumerate(ra):
                row = b * 32 + k - 1
                target = _reference_target(p_t, spellings, [s.ids[i] for i in ra[:j]], len(student_tok))
                if j > 0 and len(rb) > 1:  # inside a token the teacher splits too: the teacher's row is not its
                    skipped_with_mass += target is not None  # distribution there, whatever the spellings say
                    continue
                if labels[row] == IGNORE_INDEX:
                    continue
                if target is None:
                    continue
                q = softmax_np(zs[row].numpy() / 1.5)
                expected[row] = sum(p * (math.log(p) - math.log(q[v])) for v, p in enumerate(target) if p > 0)
                covered += 1
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert objective.last_coverage == pytest.approx(covered / 127)
    assert covered > 60 and (expected > 0).sum() == covered
    assert kinds == {(1, 1), (1, 2), (2, 1), (2, 2)}  # every kind of group occurs
    assert skipped_with_mass > 0, skipped_with_mass


def test_one_tokenizer_projected_kd_is_token_kd(student_tok, verses):
    blocks = blocks_of(student_tok, verses, 20, 2, start=300)
    batcher = CrossTokenizerBatcher(student_tok, student_tok)
    n = len(student_tok)
    inputs, zs, zt = aligned_inputs(batcher, blocks, n, seed=2)
    labels = blocks[:, 1:].reshape(-1).clone()
    labels[::7] = IGNORE_INDEX
    teacher = AlignedTeacher(zt, inputs.alignment, inputs.teacher_valid, n)
    objective = ProjectedKD(student_spellings(student_tok, student_tok), n)
    torch.testing.assert_close(objective.per_token(zs, teacher, labels), ForwardKL().per_token(zs, zt.reshape(-1, n), labels),
                               rtol=1e-10, atol=1e-12)


def test_projected_kd_gradient_and_refusals(batcher, verses, student_tok, teacher_tok):
    blocks = blocks_of(student_tok, verses, 16, 2, start=900)
    inputs, zs, zt = aligned_inputs(batcher, blocks, len(teacher_tok), seed=4)
    teacher = AlignedTeacher(zt, inputs.alignment, inputs.teacher_valid, len(teacher_tok))
    objective = build_objective({"name": "projected_kd", "max_depth": 4})
    with pytest.raises(ValueError, match="bind the run's models"):
        objective.per_token(zs, teacher, blocks[:, 1:].reshape(-1))
    objective.spellings, objective.student_vocab = student_spellings(teacher_tok, student_tok, 4), len(student_tok)
    z = zs.clone().requires_grad_(True)
    objective.per_token(z, teacher, blocks[:, 1:].reshape(-1)).sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="AlignedTeacher"):
        objective.per_token(zs, zt.reshape(-1, zt.shape[-1]), None)
    for bad in ({"temperature": 0}, {"max_depth": 0}):
        with pytest.raises(ValueError, match="projected_kd"):
            ProjectedKD(**bad)


@pytest.mark.parametrize("chunk", [7, 40, 512])
def test_chunked_path_equals_the_plain_one_across_tokenizers(batcher, verses, student_tok, teacher_tok, chunk):
    """Student rows cut into chunks (through aligned groups and sequences) give the plain path's loss and gradients:
    each row's target reads teacher rows only, which every chunk keeps whole."""
    blocks = blocks_of(student_tok, verses, 24, 3, start=2100)
    inputs, _, zt = aligned_inputs(batcher, blocks, len(teacher_tok), seed=6)
    teacher = AlignedTeacher(zt, inputs.alignment, inputs.teacher_valid, len(teacher_tok))
    labels = blocks[:, 1:].reshape(-1).clone()
    labels[[3, 40]] = IGNORE_INDEX
    objective = build_objective({"mix": [{"name": "cross_entropy"}, {"name": "projected_kd", "temperature": 1.5}]})
    for part, _ in objective.parts:
        if isinstance(part, ProjectedKD):
            part.spellings, part.student_vocab = student_spellings(teacher_tok, student_tok), len(student_tok)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(labels.numel(), 16, generator=g, dtype=torch.float64).requires_grad_(True)
    weight = (torch.randn(len(student_tok), 16, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    plain = reduce_tokens(objective.per_token(hidden @ weight.T, teacher, labels), labels)
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    chunked = fused_linear_distill(hidden, weight, teacher, labels, objective, chunk_size=chunk)
    chunked_grads = torch.autograd.grad(chunked, (hidden, weight))
    torch.testing.assert_close(chunked, plain, rtol=1e-10, atol=1e-12)
    for got, expected in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # the objectives that couple a sequence's rows are refused by name, never fed a chunk of them
    with pytest.raises(ValueError, match="'span_kd' couples each sequence's rows across tokenizers"):
        fused_linear_distill(hidden, weight, teacher, labels, build_objective("span_kd"), chunk_size=chunk)
    with pytest.raises(ValueError, match="needs the whole batch"):
        build_objective("uld").per_token(hidden @ weight.T, teacher.cut(0, labels.numel()), labels)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), teacher_vocab=st.integers(2, 40), student_vocab=st.integers(2, 300),
       depth_cap=st.integers(1, 3))
def test_the_kl_on_the_spelled_columns_is_the_kl_on_the_whole_vocabulary(seed, teacher_vocab, student_vocab, depth_cap):
    """Targets and KL live on the few student ids spellings use; on the whole vocabulary they are the same."""
    g = torch.Generator().manual_seed(seed)
    spellings = torch.randint(-1, student_vocab, (teacher_vocab, 3), generator=g)
    t_logp = torch.randn(6, teacher_vocab, generator=g, dtype=torch.float64).log_softmax(-1)
    s_logp = torch.randn(6, student_vocab, generator=g, dtype=torch.float64).log_softmax(-1)
    depth = torch.randint(0, depth_cap, (6,), generator=g)
    prefix = torch.where(torch.arange(3) < depth.unsqueeze(1), spellings[torch.randint(0, teacher_vocab, (6,), generator=g)], -1)
    columns = SpelledColumns.of(spellings, student_vocab)
    target, has = projected_targets(t_logp, spellings, depth, prefix, columns)
    assert target.shape == (6, columns.used.numel()) and bool((target[~has] == 0).all())
    got = projected_kl(target, s_logp, columns.used)
    dense, dense_has = projected_log_probs(t_logp, spellings, depth, prefix, student_vocab)
    expected = torch.where(dense > float("-inf"), dense.exp() * (dense - s_logp), torch.zeros((), dtype=dense.dtype)).sum(-1)
    assert torch.equal(has, dense_has)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
