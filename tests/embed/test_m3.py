"""M3 heads: scores against float64 references of the paper's formulas; index path equals training path."""

from __future__ import annotations

import math

import pytest
import torch

from lmdistill.embed.encoder import TextEncoder
from lmdistill.embed.m3 import M3Encoder, maxsim_scores

QUERIES = ["the nut of the oak", "a cheat, an impostor"]
DOCS = ["acorn: the nut of the oak oak tree", "deceiver: one who deceives; a cheat", "river: a flowing stream"]


@pytest.fixture(scope="module")
def m3(minilm_path):
    torch.manual_seed(0)
    model = M3Encoder(TextEncoder.from_pretrained(minilm_path, num_layers=1, max_seq_length=32), colbert_dim=8)
    with torch.no_grad():  # a positive bias so most tokens get a weight through the ReLU
        model.sparse_linear.bias.fill_(0.5)
    return model.eval().double()


def ref_sparse(q, d, m3) -> list[list[float]]:
    """s_lex = Σ over shared terms of w_q,t · w_p,t, a term weighted by its max over occurrences."""
    specials = set(m3.special_ids.tolist())

    def weights(out, i):
        w: dict[int, float] = {}
        for tok, val, keep in zip(out.input_ids[i].tolist(), out.token_weights[i].tolist(), out.multi_mask[i].tolist()):
            if tok in specials:
                continue
            w[tok] = max(w.get(tok, 0.0), val)
        return w

    rows = []
    for i in range(q.input_ids.shape[0]):
        wq = weights(q, i)
        row = []
        for j in range(d.input_ids.shape[0]):
            wd = weights(d, j)
            row.append(sum(wq[t] * wd[t] for t in wq.keys() & wd.keys()))
        rows.append(row)
    return rows


def ref_multi(q, d) -> list[list[float]]:
    rows = []
    for i in range(q.multi.shape[0]):
        qv = [q.multi[i, a] for a in range(q.multi.shape[1]) if q.multi_mask[i, a]]
        row = []
        for j in range(d.multi.shape[0]):
            dv = [d.multi[j, b] for b in range(d.multi.shape[1]) if d.multi_mask[j, b]]
            row.append(sum(max(float(x @ y) for y in dv) for x in qv) / len(qv))
        rows.append(row)
    return rows


def test_head_scores_match_reference_formulas(m3):
    with torch.no_grad():
        q, d = m3(QUERIES), m3(DOCS)
        sparse = m3.sparse_scores(q, d)
        multi = m3.multi_scores(q, d)
        dense = m3.dense_scores(q, d)
    torch.testing.assert_close(sparse, torch.tensor(ref_sparse(q, d, m3), dtype=torch.float64), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(multi, torch.tensor(ref_multi(q, d), dtype=torch.float64), rtol=1e-9, atol=1e-12)
    for i in range(len(QUERIES)):
        for j in range(len(DOCS)):
            a, b = q.dense[i], d.dense[j]
            assert dense[i, j].item() == pytest.approx(float(a @ b) / math.sqrt(float(a @ a) * float(b @ b)), rel=1e-9)


def test_special_tokens_and_padding_carry_no_lexical_weight(m3):
    with torch.no_grad():
        out = m3(QUERIES)
    specials = torch.isin(out.input_ids, m3.special_ids)
    assert specials.any()
    assert (out.token_weights[specials] == 0).all()
    assert (out.token_weights >= 0).all()


def test_sparse_weights_take_the_max_over_repeated_terms(m3):
    with torch.no_grad():
        out = m3(["oak oak oak tree"])
        vec = m3.lexical_vectors(out)
    oak = m3.backbone.tokenizer.convert_tokens_to_ids("oak")
    positions = (out.input_ids[0] == oak).nonzero().flatten()
    assert len(positions) == 3
    assert vec[0, oak].item() == pytest.approx(out.token_weights[0, positions].max().item())


def test_index_scores_equal_training_scores(m3):
    """The retrieval path (sparse matrices, padded multi-vectors) gives the training path's numbers."""
    with torch.no_grad():
        q, d = m3(QUERIES), m3(DOCS)
        expected = {"dense": m3.dense_scores(q, d), "sparse": m3.sparse_scores(q, d), "multi": m3.multi_scores(q, d)}
    got = m3.float().encode_all(DOCS, batch_size=2).scores(m3.encode_all(QUERIES, batch_size=1))
    m3.double()
    for head in expected:
        torch.testing.assert_close(got[head].double(), expected[head], atol=1e-5, rtol=1e-4)


def test_maxsim_ignores_padding():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    q_mask = torch.tensor([[1, 1, 0]])
    d = torch.tensor([[[1.0, 0.0], [5.0, 5.0]]])
    d_mask = torch.tensor([[1, 0]])
    # Valid query tokens (1,0) and (0,1) against the one valid document token (1,0): (1 + 0) / 2.
    assert maxsim_scores(q, q_mask, d, d_mask).item() == pytest.approx(0.5)


def test_save_and_load(m3, tmp_path):
    m3.float().save(tmp_path / "m3")
    again = M3Encoder.load(tmp_path / "m3")
    a = m3.encode_all(DOCS).scores(m3.encode_all(QUERIES))
    b = again.encode_all(DOCS).scores(again.encode_all(QUERIES))
    m3.double()
    for head in a:
        torch.testing.assert_close(a[head], b[head], atol=1e-5, rtol=1e-5)
