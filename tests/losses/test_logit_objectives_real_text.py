"""End to end on real text: AKL, DistiLLM-2, DAC-KL and the span loss distil a byte-level bigram teacher of the
KJV into a low-rank student, on the plain and the chunked path alike."""

from __future__ import annotations

import pytest
import torch

from lmdistill.losses import ForwardKL, OuterStep, fused_linear_distill, reduce_tokens
from lmdistill.losses.akl import AdaptiveKL
from lmdistill.losses.dackl import DACKL, SpanCorrelation
from lmdistill.losses.distillm2 import DistiLLM2
from lmdistill.losses.registry import Mixture

SEQUENCES, LENGTH = 32, 32


def _corpus(kjv_verses, n_verses=600) -> tuple[torch.Tensor, torch.Tensor]:
    text = "\n".join(text for _, text in kjv_verses[:n_verses]).encode("utf-8")
    ids = torch.tensor(list(text), dtype=torch.long)
    counts = torch.full((256, 256), 0.05)
    counts.index_put_((ids[:-1], ids[1:]), torch.ones(len(ids) - 1), accumulate=True)
    return ids, torch.log(counts / counts.sum(-1, keepdim=True))


def _kl_to_teacher(embed_w, head_w, ids, table) -> float:
    with torch.no_grad():
        student = torch.log_softmax(embed_w[ids[:-1]] @ head_w.T, -1)
        teacher = torch.log_softmax(table[ids[:-1]], -1)
        return (teacher.exp() * (teacher - student)).sum(-1).mean().item()


def _train(ids, table, make_objective, *, chunked: bool, steps: int = 20):
    torch.manual_seed(0)
    embed = torch.nn.Embedding(256, 16)
    head = torch.nn.Linear(16, 256, bias=False)
    objective = make_objective()
    params = list(embed.parameters()) + list(head.parameters()) + objective.parameters()
    optimizer = torch.optim.Adam(params, lr=0.05)
    gen = torch.Generator().manual_seed(1)
    history = []
    for step in range(1, steps + 1):
        start = torch.randint(0, len(ids) - LENGTH - 1, (SEQUENCES,), generator=gen)
        pos = (start[:, None] + torch.arange(LENGTH)).reshape(-1)  # 32 real stretches of 32 bytes
        inputs, labels = ids[pos], ids[pos + 1].clone()
        labels[::17] = -100
        batch = {"input_ids": inputs.reshape(SEQUENCES, LENGTH), "labels": labels.reshape(SEQUENCES, LENGTH),
                 "on_policy": (torch.arange(SEQUENCES) % 3 == 0).float()}  # a third marked student-generated
        bound = objective.for_batch(batch) if isinstance(objective, DistiLLM2) else objective  # the trainer hook's job
        teacher = table[inputs]
        hidden = embed(inputs)
        if chunked:
            loss = fused_linear_distill(hidden, head.weight, teacher, labels, bound, chunk_size=200)
        else:
            loss = reduce_tokens(bound.per_token(head(hidden), teacher, labels), labels)
        optimizer.zero_grad()
        loss.backward()
        if objective.has_outer_step:
            objective.outer_step(OuterStep(
                step=step, lr=0.05, batch=batch, student_hidden=lambda i, m: embed(i).detach(),
                output_layer=(head.weight, None), teacher_signal=lambda b: table[b["input_ids"].reshape(-1)],
                held_out=lambda b: None, backward=lambda x: x.backward(), mean_over_ranks=lambda t: t))
        optimizer.step()
        objective.on_step_end(loss.item(), step, steps)
        history.append(loss.item())
    return history, (embed.weight, head.weight), objective


OBJECTIVES = {
    "akl": lambda: AdaptiveKL(),
    "distillm2": lambda: DistiLLM2(adaptive_alpha=True),
    "dackl": lambda: DACKL(),
    "span_with_forward_kl": lambda: Mixture([(ForwardKL(), 1.0), (SpanCorrelation(span_size=4), 10.0)]),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_learns_and_the_chunked_path_reproduces_plain_training(kjv_verses, name):
    ids, table = _corpus(kjv_verses)
    start = _kl_to_teacher(torch.nn.Embedding(256, 16).weight, torch.zeros(256, 16), ids, table)
    plain_hist, plain_params, plain_obj = _train(ids, table, OBJECTIVES[name], chunked=False)
    fused_hist, fused_params, fused_obj = _train(ids, table, OBJECTIVES[name], chunked=True)
    torch.testing.assert_close(torch.tensor(fused_hist), torch.tensor(plain_hist), rtol=1e-4, atol=1e-5)
    for a, b in zip(fused_params, plain_params):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert _kl_to_teacher(*fused_params, ids, table) < 0.6 * start
    if name == "distillm2":  # the curriculum ran: beta at its end value, anchors measured at step 1
        state = fused_obj.state_dict()
        assert state["beta"] == 1.5 and state["anchor_teacher"] is not None and state["anchor_student"] is not None
    if name == "dackl":  # the bounds network moved, identically on both paths
        assert any(not torch.equal(p, q) for p, q in zip(fused_obj.parameters(), DACKL().parameters()))
        for p, q in zip(fused_obj.parameters(), plain_obj.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)
