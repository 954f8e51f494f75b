"""Padded prompt/response batches: exact labels and masks, truncation, agreement with the packed stream."""

from __future__ import annotations

import numpy as np
import torch

from lmdistill.data.blocks import tokenize_documents
from lmdistill.generation.batching import Example, PromptResponseSource, collate_examples, encode_examples

PAD = 1


def test_collate_exact_layout():
    batch = collate_examples([Example((3, 4, 5), (6, 7, 0)), Example((9,), (8, 0))], PAD, max_length=32)
    assert batch["input_ids"].tolist() == [[3, 4, 5, 6, 7], [9, 8, PAD, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7, 0], [8, 0, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_truncation_keeps_a_target():
    long_response = Example((3, 4), tuple(range(10, 20)) + (0,))
    b = collate_examples([long_response], PAD, max_length=5)
    assert b["input_ids"].tolist() == [[3, 4, 10, 11, 12]]
    assert b["labels"].tolist() == [[-100, 10, 11, 12, 13]]  # the response tail and EOS are cut
    long_prompt = Example(tuple(range(30, 40)), (7, 0))
    b = collate_examples([long_prompt], PAD, max_length=4)
    assert b["input_ids"].tolist() == [[37, 38, 39, 7]]
    assert b["labels"].tolist() == [[-100, -100, 7, 0]]


def test_same_targets_as_the_packed_token_stream(tmp_path, verse_tokenizer, continue_task):
    """The batch layout and lmdistill.data.blocks' stream layout agree token for token."""
    docs = continue_task["train"][:20]
    stream = tokenize_documents(docs, verse_tokenizer, tmp_path, "pairs", show_progress=False)
    examples = encode_examples(verse_tokenizer, docs)
    ids = np.asarray(stream.ids)
    mask = np.asarray(stream.loss_mask)
    bos = verse_tokenizer.eos_token_id  # lmdistill tokenizers: EOS doubles as BOS
    for k, ex in enumerate(examples):
        assert ex.prompt[0] == bos
        start = int(stream.doc_starts[k])  # the document's first token; the previous EOS precedes it
        end = start + len(ex.prompt) - 1 + len(ex.response)
        preceding = [bos] if k == 0 else [int(ids[start - 1])]
        assert preceding + ids[start:end].tolist() == list(ex.prompt + ex.response)
        batch = collate_examples([ex], PAD, max_length=200)
        targets = [t for t in batch["labels"][0].tolist() if t != -100]
        stream_targets = ids[start:end][mask[start:end] == 1].tolist()
        assert targets == stream_targets


def test_source_walks_the_examples_in_a_seeded_order(verse_tokenizer, continue_task):
    docs = continue_task["train"][:10]
    src = PromptResponseSource.from_documents(docs, verse_tokenizer, global_batch=5, seed=1, max_length=64)
    seen = []
    for step in range(2):  # one epoch
        (batch,) = src.micro_batches(step, 0, 1, 5)
        seen += batch["example_index"].tolist()
        for row, i in enumerate(batch["example_index"].tolist()):
            expected = collate_examples([src.examples[i]], PAD, 64)
            n = int(expected["attention_mask"].sum())
            assert torch.equal(batch["input_ids"][row, :n], expected["input_ids"][0, :n])
            assert torch.equal(batch["labels"][row, :n], expected["labels"][0, :n])
    assert sorted(seen) == list(range(10))
    # two ranks together read the one-process batch
    src4 = PromptResponseSource.from_documents(docs, verse_tokenizer, global_batch=4, seed=1, max_length=64)
    r0 = src4.micro_batches(3, 0, 2, 2)[0]["example_index"].tolist()
    r1 = src4.micro_batches(3, 1, 2, 2)[0]["example_index"].tolist()
    assert r0 + r1 == src4.micro_batches(3, 0, 1, 4)[0]["example_index"].tolist()
