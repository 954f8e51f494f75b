"""End to end on real text: distil a byte-level bigram teacher of the KJV into a low-rank student."""

from __future__ import annotations

import torch

from lmdistill.losses import SparseTeacher, build_objective, fused_linear_distill, reduce_tokens


def _kjv_bytes(kjv_verses, n_verses=600) -> torch.Tensor:
    text = "\n".join(text for _, text in kjv_verses[:n_verses]).encode("utf-8")
    return torch.tensor(list(text), dtype=torch.long)


def _bigram_teacher_logits(ids: torch.Tensor) -> torch.Tensor:
    counts = torch.full((256, 256), 0.05)
    counts.index_put_((ids[:-1], ids[1:]), torch.ones(len(ids) - 1), accumulate=True)
    return torch.log(counts / counts.sum(-1, keepdim=True))


def _train(ids, teacher_table, objective_spec, *, chunked: bool, steps=20, sparse_k=None):
    torch.manual_seed(0)
    embed = torch.nn.Embedding(256, 16)
    head = torch.nn.Linear(16, 256, bias=False)
    params = list(embed.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=0.05)
    objective = build_objective(objective_spec)
    gen = torch.Generator().manual_seed(1)
    history = []
    for step in range(1, steps + 1):
        pos = torch.randint(0, len(ids) - 1, (1024,), generator=gen)
        inputs, labels = ids[pos], ids[pos + 1]
        labels[::17] = -100  # some ignored positions, as after padding
        teacher_logits = teacher_table[inputs]
        teacher = SparseTeacher.from_logits(teacher_logits, k=sparse_k) if sparse_k else teacher_logits
        hidden = embed(inputs)
        if chunked:
            loss = fused_linear_distill(hidden, head.weight, teacher, labels, objective, chunk_size=300)
        else:
            loss = reduce_tokens(objective.per_token(head(hidden), teacher, labels), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        objective.on_step_end(loss.item(), step, steps)
        history.append(loss.item())
    return history, params, objective


def _kl_to_teacher(params, ids, teacher_table):
    embed_w, head_w = params
    with torch.no_grad():
        student = torch.log_softmax(embed_w[ids[:-1]] @ head_w.T, -1)
        teacher = torch.log_softmax(teacher_table[ids[:-1]], -1)
        return (teacher.exp() * (teacher - student)).sum(-1).mean().item()


def test_chunked_training_on_kjv_reproduces_plain_training_and_learns(kjv_verses):
    ids = _kjv_bytes(kjv_verses)
    table = _bigram_teacher_logits(ids)
    spec = {"mix": [{"name": "forward_kl", "weight": 0.8}, {"name": "cross_entropy", "weight": 0.2}]}
    plain_hist, plain_params, _ = _train(ids, table, spec, chunked=False)
    fused_hist, fused_params, _ = _train(ids, table, spec, chunked=True)
    torch.testing.assert_close(torch.tensor(fused_hist), torch.tensor(plain_hist), rtol=1e-4, atol=1e-5)
    for a, b in zip(fused_params, plain_params):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    before = _kl_to_teacher([torch.nn.Embedding(256, 16).weight, torch.zeros(256, 16)], ids, table)
    after = _kl_to_teacher(fused_params, ids, table)
    assert after < 0.6 * before


def test_taid_with_a_topk_cache_on_kjv(kjv_verses):
    """TAID from a top-16 teacher cache through the chunked path: t advances and the KL to the teacher drops."""
    ids = _kjv_bytes(kjv_verses)
    table = _bigram_teacher_logits(ids)
    history, params, objective = _train(ids, table, {"name": "taid", "alpha": 0.02}, chunked=True, sparse_k=16)
    assert objective.t > 0.4 + 0.6 * 19 / 20 - 1e-9
    start = _kl_to_teacher([torch.nn.Embedding(256, 16).weight, torch.zeros(256, 16)], ids, table)
    assert _kl_to_teacher(params, ids, table) < 0.6 * start
