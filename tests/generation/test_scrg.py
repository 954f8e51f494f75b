"""SCRG: per-position scores against a float64 reference; exactly the chosen error token replaced: the most
divergent disagreeing position (the paper's rule, default) or the first one above a threshold."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lmdistill.generation.batching import encode_prompts
from lmdistill.generation.sampling import SamplingParams, generate
from lmdistill.generation.scrg import first_divergence, max_divergence, position_scores, scrg_revise
from tests.generation.conftest import tiny_gpt2

EOS, PAD, V = 0, 1, 6


class TableLM(torch.nn.Module):
    """A causal LM whose next-token logits depend on (position, current token) through a table: lets a
    test state the exact teacher and student distributions at every step."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        return SimpleNamespace(logits=self.table[position_ids.clamp(max=self.table.shape[0] - 1), input_ids])


def peaked(token: int, p: float) -> torch.Tensor:
    """Logits of a distribution with mass p on ``token`` and the rest spread evenly."""
    probs = torch.full((V,), (1 - p) / (V - 1))
    probs[token] = p
    return probs.log()


def table_models():
    student = torch.zeros(8, V, V)
    teacher = torch.zeros(8, V, V)
    # the student's own sample for prompt [2] is 3 4 5 3 EOS (positions 0..4 predict it)
    student[0, 2], teacher[0, 2] = peaked(3, 0.6), peaked(3, 0.6)  # agree exactly: score 0
    student[1, 3], teacher[1, 3] = peaked(4, 0.5), peaked(4, 0.99)  # large KL, but the same choice: not an error
    student[2, 4], teacher[2, 4] = peaked(5, 0.6), peaked(2, 0.9)  # FIRST real divergence: teacher says 2
    # a later, LARGER divergence: untouched by the "first" rule, the error token under the "max" rule
    student[3, 5], teacher[3, 5] = peaked(3, 0.6), peaked(4, 0.99)
    student[4, 3], teacher[4, 3] = peaked(EOS, 0.6), peaked(EOS, 0.6)
    # after the correction (token 2 at position 3) the student continues 5 then EOS
    student[3, 2] = peaked(5, 0.7)
    student[4, 5] = peaked(EOS, 0.7)
    # after a correction to token 4 at position 3 the student ends
    student[4, 4] = peaked(EOS, 0.7)
    # second prompt [4]: the teacher wants EOS right away where the student said 5
    student[0, 4], teacher[0, 4] = peaked(5, 0.6), peaked(EOS, 0.95)
    return TableLM(student), TableLM(teacher)


def kl_reference(p_logits, q_logits) -> float:
    p = torch.softmax(p_logits.double(), -1).tolist()
    q = torch.softmax(q_logits.double(), -1).tolist()
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def test_position_scores_match_float64_reference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 11, generator=g), torch.randn(7, 11, generator=g) * 2
    tokens = torch.randint(11, (7,), generator=g)
    kl = position_scores(s, t, tokens, "kl")
    tvd = position_scores(s, t, tokens, "tvd")
    nll = position_scores(s, t, tokens, "teacher_nll")
    for i in range(7):
        p = torch.softmax(t[i].double(), -1)
        q = torch.softmax(s[i].double(), -1)
        assert kl[i].item() == pytest.approx(kl_reference(t[i], s[i]), rel=1e-5)
        assert tvd[i].item() == pytest.approx(0.5 * sum(abs(a - b) for a, b in zip(p.tolist(), q.tolist())), rel=1e-5)
        assert nll[i].item() == pytest.approx(-math.log(p[tokens[i]].item()), rel=1e-5)
    assert torch.all(kl >= -1e-6) and torch.all((tvd >= 0) & (tvd <= 1 + 1e-6))


def test_first_divergence_needs_score_and_disagreement():
    scores = torch.tensor([0.1, 2.0, 3.0, 5.0])
    tokens = torch.tensor([4, 4, 4, 4])
    choice = torch.tensor([1, 4, 2, 3])
    assert first_divergence(scores, choice, tokens, 1.0) == 2  # position 1 scores high but agrees
    assert first_divergence(scores, choice, tokens, 4.0) == 3
    assert first_divergence(scores, choice, tokens, 9.0) is None
    assert first_divergence(scores, tokens, tokens, 0.0) is None


def test_max_divergence_takes_the_largest_disagreeing_score():
    scores = torch.tensor([0.1, 9.0, 3.0, 5.0, 5.0])
    tokens = torch.tensor([4, 4, 4, 4, 4])
    choice = torch.tensor([1, 4, 2, 3, 0])
    assert max_divergence(scores, choice, tokens) == 3  # position 1 scores highest but agrees; tie 3/4: earliest
    assert max_divergence(scores, choice, tokens, threshold=6.0) is None
    assert max_divergence(torch.tensor([0.0, 0.0]), torch.tensor([1, 2]), torch.tensor([1, 3])) is None  # score 0 is no error
    assert max_divergence(scores, tokens, tokens) is None


def test_scrg_replaces_exactly_the_first_divergent_token():
    student, teacher = table_models()
    params = SamplingParams(greedy=True, max_new_tokens=6)
    # sanity of the construction: the student's own greedy samples
    samples = generate(student, [[2], [4]], eos_token_id=EOS, pad_token_id=PAD, params=params, use_cache=False)
    assert samples[0] == [3, 4, 5, 3, EOS]
    # KL at the agreeing-but-different position 1 is above the threshold, so only disagreement saves it
    assert kl_reference(teacher.table[1, 3], student.table[1, 3]) > 0.5
    revised = scrg_revise(student, teacher, [[2], [4]], samples, threshold=0.5, metric="kl", selection="first",
                          eos_token_id=EOS, pad_token_id=PAD, params=params, use_cache=False)
    first, second = revised
    assert first.position == 2 and first.replaced == 5 and first.teacher_token == 2
    # prefix kept, token replaced by the teacher's, rest re-generated by the student (5 then EOS)
    assert first.response == [3, 4, 2, 5, EOS]
    # the teacher's token is EOS: the response ends there, nothing is re-generated
    assert second.position == 0 and second.response == [EOS]


def test_scrg_default_replaces_exactly_the_most_divergent_token():
    student, teacher = table_models()
    params = SamplingParams(greedy=True, max_new_tokens=6)
    samples = generate(student, [[2], [4]], eos_token_id=EOS, pad_token_id=PAD, params=params, use_cache=False)
    kl2 = kl_reference(teacher.table[2, 4], student.table[2, 4])
    kl3 = kl_reference(teacher.table[3, 5], student.table[3, 5])
    # position 1 has a large KL but the same choice; of the disagreeing positions 2 and 3, 3 diverges most
    assert kl_reference(teacher.table[1, 3], student.table[1, 3]) > 0.5 and kl3 > kl2 > 0
    first, second = scrg_revise(student, teacher, [[2], [4]], samples, eos_token_id=EOS, pad_token_id=PAD,
                                params=params, use_cache=False)  # defaults: KL, selection "max", threshold 0
    assert first.position == 3 and first.replaced == 3 and first.teacher_token == 4
    assert first.response == [3, 4, 5, 4, EOS]  # prefix kept, teacher token, student's continuation
    assert second.position == 0 and second.response == [EOS]
    # above a threshold between the two scores the "max" rule still picks 3, and none above both
    mid = scrg_revise(student, teacher, [[2]], samples[:1], threshold=(kl2 + kl3) / 2, eos_token_id=EOS,
                      pad_token_id=PAD, params=params, use_cache=False)
    assert mid[0].position == 3
    none = scrg_revise(student, teacher, [[2]], samples[:1], threshold=kl3 + 1, eos_token_id=EOS, pad_token_id=PAD,
                       params=params, use_cache=False)
    assert none[0].position is None and none[0].response == samples[0]


def test_scrg_keeps_samples_below_the_threshold_and_respects_the_budget():
    student, teacher = table_models()
    samples = [[3, 4, 5, 3, EOS]]
    kept = scrg_revise(student, teacher, [[2]], samples, threshold=50.0, selection="first", eos_token_id=EOS, pad_token_id=PAD,
                       params=SamplingParams(greedy=True, max_new_tokens=6), use_cache=False)
    assert kept[0].position is None and kept[0].response == samples[0]
    # with a budget of 3 tokens the corrected prefix (3 tokens) is already the whole response
    short = scrg_revise(student, teacher, [[2]], samples, threshold=0.5, selection="first", eos_token_id=EOS, pad_token_id=PAD,
                        params=SamplingParams(greedy=True, max_new_tokens=3), use_cache=False)
    assert short[0].response == [3, 4, 2]


def test_scrg_with_real_models_against_independent_checks(trained_tiny, verse_tokenizer, continue_task):
    """Student: an untrained tiny GPT-2; teacher: the trained one. Checked independently: the kept prefix
    had no earlier divergence (float64 scores from separate forward passes), the replaced token is the
    teacher's argmax, and the tail is the student's greedy continuation per transformers' generate."""
    student = tiny_gpt2(verse_tokenizer, layers=1, seed=11)
    eos, pad = verse_tokenizer.eos_token_id, verse_tokenizer.pad_token_id
    prompts = encode_prompts(verse_tokenizer, [d.prompt for d in continue_task["test"][:5]])
    params = SamplingParams(greedy=True, max_new_tokens=12)
    samples = generate(student, prompts, eos_token_id=eos, pad_token_id=pad, params=params)

    def reference_kls(p, sample):
        out = []
        for k in range(len(sample)):
            with torch.no_grad():
                ids = torch.tensor([list(p) + sample[:k]])
                out.append(kl_reference(trained_tiny(input_ids=ids).logits[0, -1], student(input_ids=ids).logits[0, -1]))
        return out

    # a threshold in the middle of the observed scores, so some samples keep a prefix before the correction
    threshold = float(torch.tensor([v for p, smp in zip(prompts, samples) for v in reference_kls(p, smp)]).median())
    revised = scrg_revise(student, trained_tiny, prompts, samples, threshold=threshold, selection="first",
                          eos_token_id=eos, pad_token_id=pad, params=params)
    # the default rule on the same samples: the largest reference KL among the disagreeing positions
    by_max = scrg_revise(student, trained_tiny, prompts, samples, eos_token_id=eos, pad_token_id=pad, params=params)
    for p, sample, rev in zip(prompts, samples, by_max):
        kls = reference_kls(p, sample)
        disagree = []
        for k in range(len(sample)):
            with torch.no_grad():
                choice = int(trained_tiny(input_ids=torch.tensor([list(p) + sample[:k]])).logits[0, -1].argmax())
            if choice != sample[k] and kls[k] > 0:
                disagree.append(k)
        expected = max(disagree, key=lambda k: kls[k]) if disagree else None
        assert rev.position == expected
        if expected is not None:
            assert rev.response[:expected] == sample[:expected]
    assert any(r.position is not None and r.position > 0 for r in revised)
    for p, sample, rev in zip(prompts, samples, revised):
        j = rev.position
        end = len(sample) if j is None else j
        for k in range(end + (j is not None)):
            with torch.no_grad():
                ids = torch.tensor([list(p) + sample[:k]])
                s_logits = student(input_ids=ids).logits[0, -1].double()
                t_logits = trained_tiny(input_ids=ids).logits[0, -1].double()
            diverges = kl_reference(t_logits, s_logits) > threshold and int(t_logits.argmax()) != sample[k]
            assert diverges == (k == j), (k, j)
            if k == j:
                assert rev.response[j] == int(t_logits.argmax())
        if j is None:
            assert rev.response == sample
            continue
        assert rev.response[:j] == sample[:j]
        prefix = list(p) + rev.response[: j + 1]
        if rev.response[j] != eos and j + 1 < params.max_new_tokens:
            hf = student.generate(torch.tensor([prefix]), do_sample=False, max_new_tokens=params.max_new_tokens - j - 1,
                                  eos_token_id=eos, pad_token_id=pad, attention_mask=torch.ones(1, len(prefix), dtype=torch.long))
            assert rev.response[j + 1:] == hf[0, len(prefix):].tolist()
