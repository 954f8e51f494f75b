"""Cross-tokenizer objectives on real tokenizers: character-offset alignment (invariants), span KD, ULD and
MinED against float64 references written from their formulas, the exact same-vocabulary case, a cache signal,
and a short end-to-end distillation across tokenizers on real text."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.constants import IGNORE_INDEX
from lmdistill.losses import CrossEntropy, ForwardKL, GeneralizedJSD, ReverseKL, SparseTeacher, TotalVariation
from lmdistill.losses.alignment import CrossTokenizerBatcher, align_spans, edit_distances, min_edit_distance_map
from lmdistill.losses.crosstok import ULD, AlignedTeacher, MinEDKD, SpanKD, span_log_probs
from lmdistill.models.vocab import shared_vocab, token_keys, vocab_ladder
from tests.losses.helpers import aligned_inputs, blocks_of, softmax_np

UNICODE_TEXT = "Naïve café — 日本語, 🙂!\n\tAnd the LORD said: “Let there be light.”"


# ------------------------------------------------------------------------------------------ alignment
def _check_groups(a, b, groups, *, complete, exact_text=True):
    flat_a = [k for ra, _ in groups for k in ra]
    flat_b = [k for _, rb in groups for k in rb]
    assert flat_a == list(range(len(flat_a))) and flat_b == list(range(len(flat_b)))  # contiguous, in order
    if complete:
        assert len(flat_a) == len(a) and len(flat_b) == len(b)
    for ra, rb in groups:
        # (a block cut mid-character leaves its orphan bytes to the first group, which holds token 0: never used)
        if exact_text and ra and rb and ra.start > 0 and rb.start > 0:
            assert (a.starts[ra[0]], a.ends[ra[-1]]) == (b.starts[rb[0]], b.ends[rb[-1]])  # same text
        inner_a = {a.ends[k] for k in ra[:-1] if a.starts[k + 1] >= a.ends[k]}
        inner_b = {b.ends[k] for k in rb[:-1] if b.starts[k + 1] >= b.ends[k]}
        assert not inner_a & inner_b  # maximal: no common cut inside a group


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("abcdeht LORD.,;:'\n\té—日本🙂")), min_size=1, max_size=80))
def test_alignment_invariants_on_any_text(batcher, text):
    s, t = batcher.spans_from_text(text)
    _check_groups(s, t, align_spans(s, t), complete=True)
    # the trainer's path (student ids -> text -> teacher tokens) gives the same tokenizations here
    ids = batcher.student_tokenizer(text, add_special_tokens=False).input_ids
    s2, t2 = batcher.spans_from_ids(ids)
    assert s2 == s and t2 == t


def test_alignment_of_real_text_and_document_boundaries(batcher, verses, student_tok, teacher_tok):
    s, t = batcher.spans_from_text(" ".join(verses[:40]) + UNICODE_TEXT)
    groups = align_spans(s, t)
    _check_groups(s, t, groups, complete=True)
    one_to_one = sum(len(ra) == 1 and len(rb) == 1 for ra, rb in groups)
    assert one_to_one / len(groups) > 0.5  # two BPEs of English agree on most tokens
    for ra, rb in groups:  # one-to-one groups pair equal strings
        if len(ra) == 1 and len(rb) == 1:
            assert batcher.s_keys[s.ids[ra[0]]] == batcher.t_keys[t.ids[rb[0]]]
    # a packed block: documents separated by eos, cut mid-character at both ends
    ids = student_tok("é end.", add_special_tokens=False).input_ids + [student_tok.eos_token_id] + \
        student_tok("Next é", add_special_tokens=False).input_ids
    s, t = batcher.spans_from_ids(ids[1:])  # starts with the second byte of 'é'
    eos_t = [k for k, tid in enumerate(t.ids) if tid == teacher_tok.eos_token_id]
    eos_s = [k for k, sid in enumerate(s.ids) if sid == student_tok.eos_token_id]
    assert len(eos_t) == 1 and (s.starts[eos_s[0]], s.ends[eos_s[0]]) == (t.starts[eos_t[0]], t.ends[eos_t[0]])
    groups = align_spans(s, t)
    _check_groups(s, t, groups, complete=False)
    assert any(len(ra) == 1 and len(rb) == 1 and s.ids[ra[0]] == student_tok.eos_token_id for ra, rb in groups)


def test_a_word_level_teacher_with_uncovered_spaces(student_tok, verses):
    """Offsets that skip whitespace (a word-level tokenizer): cuts are gaps, groups still cover the same words,
    and span KD stays a finite distribution comparison with the unshared remainder folded or dropped."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(verses[:2000], trainers.WordLevelTrainer(vocab_size=500, special_tokens=["</s>", "[UNK]"]))
    words = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]")
    batcher = CrossTokenizerBatcher(student_tok, words)
    text = " ".join(verses[:20])
    data = text.encode("utf-8")
    s, t = batcher.spans_from_text(text)
    assert any(t.starts[k + 1] > t.ends[k] for k in range(len(t) - 1))  # gaps between words
    groups = align_spans(s, t)
    _check_groups(s, t, groups, complete=True, exact_text=False)
    for ra, rb in groups:
        assert data[s.starts[ra[0]]:s.ends[ra[-1]]].strip() == data[t.starts[rb[0]]:t.ends[rb[-1]]].strip()
    pairing = vocab_ladder(words, student_tok, teacher_rows=len(words), student_rows=len(student_tok))
    assert pairing.rung == "different"
    blocks = blocks_of(student_tok, verses, 24, 2, start=40)
    inputs, zs, zt = aligned_inputs(batcher, blocks, len(words), seed=7)
    teacher = AlignedTeacher(zt, inputs.alignment, inputs.teacher_valid, len(words))
    s_cat, t_cat = SpanKD(pairing).categories(zs, teacher)
    assert torch.logsumexp(s_cat, -1).abs().max() < 1e-9 and torch.logsumexp(t_cat, -1).abs().max() < 1e-9
    losses, valid = SpanKD(pairing).group_losses(zs, teacher, blocks[:, 1:].reshape(-1))
    assert bool(valid.any()) and torch.isfinite(losses[valid]).all()


# ------------------------------------------------------------------------------------------ span KD: reference
def _fold_columns(own_keys, other_keys, shared):
    """Reference of the prefix fold (SharedVocab's docstring), columns by shared key."""
    out = []
    for key in own_keys:
        if key in shared:
            out.append(key)
        elif isinstance(key, bytes) and any(key[:e] in shared for e in range(1, len(key))):
            out.append(max((key[:e] for e in range(1, len(key)) if key[:e] in shared), key=len))
        else:
            out.append("bucket")
    return out


def _reference_span_categories(side_logits, tokens, rng, text, keys, other_keys):
    """One side's category distribution at one aligned span, from span_log_probs's docstring (float64)."""
    shared = (set(keys) & set(other_keys)) - {None}
    q1 = softmax_np(side_logits[rng[0] - 1])
    x = [tokens[k] for k in rng]
    logp = [math.log(softmax_np(side_logits[k - 1])[tokens[k]]) for k in rng]
    cover = {v for v, key in enumerate(keys) if key == text}
    if isinstance(text, bytes):
        cover |= {v for v, key in enumerate(keys)
                  if isinstance(key, bytes) and key not in shared and key.startswith(text) and key != text}
    if len(x) == 1:
        cover.add(x[0])
    probs = q1.copy()
    path = math.exp(sum(logp)) if len(x) > 1 else 0.0
    span = path + sum(q1[v] for v in cover)
    if len(x) > 1:
        probs[x[0]] = q1[x[0]] - path
    for v in cover:
        probs[v] = 0.0
    cats = {"span": span}
    for v, col in enumerate(_fold_columns(keys, other_keys, shared)):
        cats[col] = cats.get(col, 0.0) + probs[v]
    return cats


def _kl(p, q):
    return sum(pv * (math.log(pv) - math.log(q[k])) for k, pv in p.items() if pv > 0)


def test_span_kd_matches_the_float64_reference(batcher, pairing, verses, student_tok, teacher_tok):
    blocks = blocks_of(student_tok, verses, 24, 2, start=100)
    inputs, zs, zt = aligned_inputs(batcher, blocks, len(teacher_tok), seed=1)
    teacher = AlignedTeacher(zt, inputs.alignment, inputs.teacher_valid, len(teacher_tok))
    labels = blocks[:, 1:].reshape(-1)
    losses, valid = SpanKD(pairing).group_losses(zs, teacher, labels)
    ce, _ = SpanKD(pairing, inner=CrossEntropy()).group_losses(zs, teacher, labels)
    s_keys, t_keys = token_keys(student_tok), token_keys(teacher_tok)
    # two byte-level BPEs share every byte: every unshared token has a shared prefix, no bucket on either side
    shared = (set(s_keys) & set(t_keys)) - {None}
    assert "bucket" not in _fold_columns(t_keys, s_keys, shared) + _fold_columns(s_keys, t_keys, shared)
    g = 0
    for b in range(2):
        s, t = batcher.spans_from_ids(blocks[b].tolist())
        for ra, rb in align_spans(s, t):
            if ra.start == 0 or rb.start == 0:
                continue
            pieces = [s_keys[s.ids[k]] for k in ra]
            text = pieces[0] if len(pieces) == 1 else b"".join(pieces)  # a special token is its own key
            ps = _reference_span_categories(zs.reshape(2, 24, -1)[b].numpy(), s.ids, ra, text, s_keys, t_keys)
            pt = _reference_span_categories(zt[b].numpy(), t.ids, rb, text, t_keys, s_keys)
            assert bool(valid[g])
            assert float(losses[g]) == pytest.approx(_kl(pt, ps), rel=1e-9, abs=1e-12)
            assert float(ce[g]) == pytest.approx(-math.log(ps["span"]), rel=1e-9)
            g += 1
    assert g == inputs.alignment.num_groups and g > 20


@pytest.mark.parametrize("inner", [ForwardKL(), ReverseKL(), GeneralizedJSD(0.5), TotalVariation(), CrossEntropy()],
                         ids=["fkl", "rkl", "jsd", "tvd", "ce"])
def test_same_tokenizer_span_kd_is_exact_token_kd(student_tok, verses, inner):
    """One tokenizer on both sides: every span is one token, and span KD is the objective itself on every row."""
    blocks = blocks_of(student_tok, verses, 20, 2, start=300)
    batcher = CrossTokenizerBatcher(student_tok, student_tok)
    n = len(student_tok)
    pairing = shared_vocab(student_tok, student_tok, teacher_rows=n, student_rows=n)
    inputs, zs, zt = aligned_inputs(batcher, blocks, n, seed=2)
    assert bool(inputs.alignment.one_to_one.all())
    labels = blocks[:, 1:].reshape(-1).clone()
    labels[::7] = IGNORE_INDEX
    teacher = AlignedTeacher(zt, inputs.alignment, inputs.teacher_valid, n)
    got = SpanKD(pairing, inner=inner).per_token(zs, teacher, labels)
    expected = inner.per_token(zs, zt.reshape(-1, n), labels)
    # the first row of each block predicts the only token whose span holds token 0 of neither side: all rows match
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_span_log_probs_gradients_and_normalisation():
    g = torch.Generator().manual_seed(0)
    logp_in = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([0, 1, 2, 3, 4, 5])
    group = torch.tensor([0, 0, 0, 1, 2, 2])
    targets = torch.tensor([1, 3, 0, 2, 4, 4])
    first = torch.tensor([0, 3, 4])
    cover_group, cover_ids = torch.tensor([0, 1, 1, 2]), torch.tensor([2, 2, 0, 3])

    def run(z):
        own, span = span_log_probs(torch.log_softmax(z, -1), rows, group, targets, first, cover_group, cover_ids, 3)
        return torch.cat([own, span.unsqueeze(1)], 1)

    cats = run(logp_in)
    assert torch.logsumexp(cats, -1).abs().max() < 1e-12  # each span's categories are a distribution
    finite = torch.isfinite(cats)
    torch.autograd.gradcheck(lambda z: run(z)[finite], (logp_in,))


def test_span_kd_refuses_mismatched_inputs(batcher, pairing, verses, student_tok, teacher_tok):
    blocks = blocks_of(student_tok, verses, 16, 2, start=500)
    inputs, zs, zt = aligned_inputs(batcher, blocks, len(teacher_tok), seed=3)
    teacher = AlignedTeacher(zt, inputs.alignment, inputs.teacher_valid, len(teacher_tok))
    with pytest.raises(ValueError, match="needs an AlignedTeacher"):
        SpanKD(pairing).per_token(zs, zt.reshape(-1, len(teacher_tok)), blocks[:, 1:].reshape(-1))
    with pytest.raises(ValueError, match="other student tokens"):
        SpanKD(pairing).per_token(zs, teacher, blocks[:, 1:].reshape(-1).roll(1))
    with pytest.raises(ValueError, match="temperature on span_kd itself"):
        SpanKD(pairing, inner=ForwardKL(2.0))


def test_span_kd_from_a_cache_signal(batcher, pairing, verses, student_tok, teacher_tok):
    """A top-k cache of the teacher's tokens works as the signal; with k = V it is the live teacher exactly."""
    blocks = blocks_of(student_tok, verses, 16, 2, start=700)
    inputs, zs, zt = aligned_inputs(batcher, blocks, len(teacher_tok), seed=4)
    labels = blocks[:, 1:].reshape(-1)
    dense = AlignedTeacher(zt, inputs.alignment, inputs.teacher_valid, len(teacher_tok))
    flat = zt.reshape(-1, len(teacher_tok))
    full = AlignedTeacher(SparseTeacher.from_logits(flat, k=len(teacher_tok)), inputs.alignment, inputs.teacher_valid, len(teacher_tok))
    topk = AlignedTeacher(SparseTeacher.from_logits(flat, k=32), inputs.alignment, inputs.teacher_valid, len(teacher_tok))
    for objective in (SpanKD(pairing), ULD()):
        torch.testing.assert_close(objective.per_token(zs, full, labels), objective.per_token(zs, dense, labels))
        approx = objective.per_token(zs, topk, labels)
        assert torch.isfinite(approx).all() and not torch.equal(approx, objective.per_token(zs, dense, labels))


# ------------------------------------------------------------------------------------------ ULD
def test_uld_matches_the_paper_formula(batcher, verses, student_tok, teacher_tok):
    blocks = blocks_of(student_tok, verses, 20, 3, start=900)
    inputs, zs, zt = aligned_inputs(batcher, blocks, len(teacher_tok), seed=5)
    labels = blocks[:, 1:].reshape(-1).clone()
    labels[3:9] = IGNORE_INDEX
    teacher_valid = inputs.teacher_valid.clone()
    teacher_valid[1, :4] = False
    teacher = AlignedTeacher(zt, inputs.alignment, teacher_valid, len(teacher_tok))
    got = ULD(student_temperature=2.0, teacher_temperature=1.5).per_token(zs, teacher, labels).reshape(3, 20)
    zs3, lab3 = zs.reshape(3, 20, -1).numpy(), labels.reshape(3, 20).numpy()
    for b in range(3):
        s_rows = [r for r in range(20) if lab3[b, r] != IGNORE_INDEX]
        t_rows = [r for r in range(zt.shape[1]) if teacher_valid[b, r]]
        expected = np.zeros(20)
        for rs, rt in zip(s_rows, t_rows):  # k-th with k-th, up to the shorter
            ps = np.sort(softmax_np(zs3[b, rs] / 2.0))[::-1]
            pt = np.sort(softmax_np(zt[b, rt].numpy() / 1.5))[::-1]
            pt = np.pad(pt, (0, max(0, len(ps) - len(pt))))
            ps = np.pad(ps, (0, max(0, len(pt) - len(ps))))
            expected[rs] = np.abs(ps - pt).sum()
        np.testing.assert_allclose(got[b].detach().numpy(), expected, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------ MinED
def _levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="abcé ", max_size=7), min_size=1, max_size=5),
       st.lists(st.text(alphabet="abcé ", max_size=9), min_size=1, max_size=6))
def test_edit_distances_match_the_dynamic_programme(queries, candidates):
    got = edit_distances(queries, candidates)
    assert got.tolist() == [[_levenshtein(q, c) for c in candidates] for q in queries]


def test_mined_map_against_brute_force(student_tok, teacher_tok):
    mapping = min_edit_distance_map(teacher_tok, student_tok)
    t_keys, s_keys = token_keys(teacher_tok), token_keys(student_tok)
    s_text = {sid: k.decode("utf-8", errors="replace") for sid, k in enumerate(s_keys) if isinstance(k, bytes)}
    s_index = {k: sid for sid, k in reversed(list(enumerate(s_keys))) if k is not None}
    unshared = [tid for tid, k in enumerate(t_keys) if isinstance(k, bytes) and k not in s_index]
    assert len(unshared) > 50
    for tid, key in enumerate(t_keys):
        if key in s_index:
            assert int(mapping[tid]) == s_index[key]
    for tid in unshared[::7]:
        text = t_keys[tid].decode("utf-8", errors="replace")
        best = min(s_text, key=lambda sid: (_levenshtein(text, s_text[sid]), sid))
        assert int(mapping[tid]) == best, (t_keys[tid], s_keys[int(mapping[tid])], s_keys[best])


def test_mined_objective_matches_its_formula(batcher, verses, student_tok, teacher_tok):
    blocks = blocks_of(student_tok, verses, 20, 2, start=1100)
    inputs, zs, zt = aligned_inputs(batcher, blocks, len(teacher_tok), seed=6)
    labels = blocks[:, 1:].reshape(-1)
    mapping = min_edit_distance_map(teacher_tok, student_tok)
    teacher = AlignedTeacher(zt, inputs.alignment, inputs.teacher_valid, len(teacher_tok))
    got = MinEDKD(mapping, len(student_tok)).per_token(zs, teacher, labels)
    expected = np.array([-math.log(softmax_np(zs[r].numpy())[int(labels[r])]) for r in range(40)])  # one-hot on gold
    for b in range(2):
        s, t = batcher.spans_from_ids(blocks[b].tolist())
        for ra, rb in align_spans(s, t):
            if len(ra) == 1 and len(rb) == 1 and ra.start > 0 and rb.start > 0:
                row = b * 20 + ra[0] - 1
                pt = softmax_np(zt[b, rb[0] - 1].numpy())
                target = np.zeros(len(student_tok))
                for u, v in enumerate(mapping.tolist()):
                    if v >= 0:
                        target[v] += pt[u]
                target /= target.sum()
                q = softmax_np(zs[row].numpy())
                expected[row] = sum(p * (math.log(p) - math.log(q[v])) for v, p in enumerate(target) if p > 0)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-9)


# ------------------------------------------------------------------------------------------ end to end
def _tiny_lm(vocab, hidden, seed, eos):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=hidden, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos)
    return GPT2LMHeadModel(cfg)


def test_distilling_across_tokenizers_on_real_text(batcher, pairing, verses, student_tok, teacher_tok):
    """A teacher trained on KJV in its own tokens teaches a student with another tokenizer through span KD:
    the held-out span KD falls and the student's next-span predictions come to agree with the teacher's."""
    teacher = _tiny_lm(len(teacher_tok), 48, 0, teacher_tok.eos_token_id)
    t_blocks = blocks_of(teacher_tok, verses, 32, 64, start=0)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for step in range(60):
        batch = t_blocks[(step * 8) % 64:][:8]
        loss = torch.nn.functional.cross_entropy(teacher(input_ids=batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval()
    student = _tiny_lm(len(student_tok), 32, 1, student_tok.eos_token_id)
    train = blocks_of(student_tok, verses, 32, 48, start=0)
    held_out = blocks_of(student_tok, verses, 32, 4, start=20000)
    objective = SpanKD(pairing)

    def evaluate():
        inputs = batcher(held_out)
        with torch.no_grad():
            zt = teacher(input_ids=inputs.teacher_input_ids, attention_mask=inputs.teacher_attention_mask).logits
            zs = student(input_ids=held_out[:, :-1]).logits.flatten(0, 1)
        aligned = AlignedTeacher(zt, inputs.alignment, inputs.teacher_valid, len(teacher_tok))
        loss, valid = objective.group_losses(zs, aligned, held_out[:, 1:].reshape(-1))
        s_cat, t_cat = objective.categories(zs, aligned)
        agree = (s_cat.argmax(-1) == t_cat.argmax(-1))[valid].double().mean()
        return float(loss[valid].mean()), float(agree)

    before, agree_before = evaluate()
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    for step in range(40):
        block = train[(step * 8) % 48:][:8]
        inputs = batcher(block)
        with torch.no_grad():
            zt = teacher(input_ids=inputs.teacher_input_ids, attention_mask=inputs.teacher_attention_mask).logits
        aligned = AlignedTeacher(zt, inputs.alignment, inputs.teacher_valid, len(teacher_tok))
        labels = block[:, 1:].reshape(-1)
        per_token = objective.per_token(student(input_ids=block[:, :-1]).logits.flatten(0, 1), aligned, labels)
        loss = per_token.sum() / (labels != IGNORE_INDEX).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, agree_after = evaluate()
    assert after < 0.6 * before and agree_after > agree_before + 0.1, (before, after, agree_before, agree_after)


@settings(max_examples=25, deadline=None)
@given(cap=st.integers(min_value=1, max_value=40))
def test_a_teacher_position_cap_keeps_the_groups_before_the_cut(batcher, verses, student_tok, cap):
    """A teacher whose position table is shorter than its tokenization: inputs are cut at ``cap`` and exactly the
    groups whose teacher tokens all sit before the cut stay aligned, unchanged."""
    blocks = blocks_of(student_tok, verses, 24, 3)
    full = batcher(blocks)
    cut = batcher(blocks, max_teacher_len=cap)
    assert cut.teacher_input_ids.shape[1] <= cap
    rows = cut.teacher_attention_mask.sum(1)
    assert torch.equal(cut.teacher_input_ids[:, :cap] * cut.teacher_attention_mask,
                       full.teacher_input_ids[:, : cut.teacher_input_ids.shape[1]] * cut.teacher_attention_mask)
    lt_full, lt_cut = full.alignment.teacher_len, cut.alignment.teacher_len

    def groups(a, lt):  # each group as (student rows, teacher (sequence, row) pairs)
        out = {}
        for g in range(a.num_groups):
            s_rows = tuple(a.s_rows[a.s_group == g].tolist())
            t_rows = tuple((r // lt, r % lt) for r in a.t_rows[a.t_group == g].tolist())
            out[s_rows] = t_rows
        return out

    before, after = groups(full.alignment, lt_full), groups(cut.alignment, lt_cut)
    expected = {s: t for s, t in before.items() if all(r < int(rows[b]) for b, r in t)}
    assert after == expected
