"""KID: which positions are rewritten, and with exactly the student's own predictions."""

from __future__ import annotations

import torch

from lmdistill.generation.batching import Example, collate_examples, encode_examples
from lmdistill.generation.kid import candidate_positions, choose_positions, imperfect_inputs, n_rewritten
from tests.generation.conftest import tiny_gpt2


def test_ratio_rounds_half_up_with_at_least_one():
    assert [n_rewritten(n, 0.3) for n in (0, 1, 2, 5, 10, 11)] == [0, 1, 1, 2, 3, 3]
    assert n_rewritten(7, 1.0) == 7
    assert n_rewritten(4, 0.5) == 2


def test_candidates_are_the_response_input_tokens():
    batch = collate_examples([Example((3, 4, 5), (6, 7, 0)), Example((9,), (8, 0))], pad_id=1, max_length=32)
    # row 0: input [3 4 5 6 7]: response tokens 6, 7 sit at input positions 3, 4 (EOS is never an input)
    # row 1: input [9 8 pad pad pad]: response token 8 at position 1
    got = candidate_positions(batch["labels"], batch["attention_mask"])
    assert [c.tolist() for c in got] == [[3, 4], [1]]


def test_choose_positions_size_and_uniformity():
    cands = torch.tensor([4, 5, 6, 7, 8, 9, 10, 11, 12, 13])
    seen = torch.zeros(14)
    for seed in range(300):
        chosen = choose_positions(cands, 0.3, torch.Generator().manual_seed(seed))
        assert chosen.numel() == 3 and torch.all(chosen[1:] > chosen[:-1])
        seen[chosen] += 1
    assert seen[:4].sum() == 0
    # each candidate is chosen with probability 3/10: 90 of 300 expected
    assert torch.all((seen[4:] > 60) & (seen[4:] < 120))


def test_imperfect_inputs_use_the_students_own_predictions(verse_tokenizer, continue_task):
    student = tiny_gpt2(verse_tokenizer, layers=1, seed=4)
    examples = encode_examples(verse_tokenizer, continue_task["train"][:6])
    batch = collate_examples(examples, verse_tokenizer.pad_token_id, max_length=96)
    before = {k: v.clone() for k, v in batch.items()}
    MASK = verse_tokenizer.eos_token_id  # lmdistill's BOS (the paper's example mask token is "<s>")
    new_ids, chosen = imperfect_inputs(student, batch, 0.4, mask_token_id=MASK, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(batch[k], before[k]) for k in batch)  # the batch itself is untouched
    cands = candidate_positions(batch["labels"], batch["attention_mask"])
    masked_differs = False
    for row, (ex, c, ch) in enumerate(zip(examples, cands, chosen)):
        n_response_inputs = len(ex.response) - 1  # EOS is a target, never an input
        assert c.tolist() == list(range(len(ex.prompt), len(ex.prompt) + n_response_inputs))
        assert ch.numel() == n_rewritten(n_response_inputs, 0.4) and set(ch.tolist()) <= set(c.tolist())
        gold = batch["input_ids"][row]
        for t in range(gold.numel()):
            if t in ch.tolist():
                # the student's greedy guess for token t from the MASKED prefix: earlier chosen tokens replaced by
                # the mask token (the paper's "predicting" step), unpadded, in a separate pass
                prefix = gold[:t].clone()
                prefix[[u for u in ch.tolist() if u < t]] = MASK
                with torch.no_grad():
                    guess = int(student(input_ids=prefix[None]).logits[0, -1].argmax())
                    gold_guess = int(student(input_ids=gold[:t][None]).logits[0, -1].argmax())
                assert int(new_ids[row, t]) == guess
                masked_differs |= guess != gold_guess
            else:
                assert int(new_ids[row, t]) == int(gold[t])
    assert any(int(new_ids[r, t]) != int(batch["input_ids"][r, t]) for r, ch in enumerate(chosen) for t in ch.tolist())
    # the masking matters: somewhere the masked-prefix guess is not the gold-prefix guess
    assert masked_differs
