"""Tokenize -> stream -> blocks: exact ids, EOS positions, loss masks, label shift, cache, dtypes."""

from __future__ import annotations

import logging
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmdistill.data import blocks
from lmdistill.data.blocks import IGNORE_INDEX, BlockDataset, TokenStream, collate, token_dtype, tokenize_documents
from lmdistill.data.documents import Document
from lmdistill.errors import ConfigError, DataError

from .conftest import WORDS, make_word_tokenizer

EOS = 0
ALPHA, BETA, GAMMA, DELTA, EPSILON, ZETA = 3, 4, 5, 6, 7, 8  # word-level ids: words[k] = k + 3


def plain(text: str, doc_id: str) -> Document:
    return Document(text=text, doc_id=doc_id, source="test")


def pair(prompt: str, response: str, doc_id: str) -> Document:
    return Document.from_prompt_response(prompt, response, doc_id=doc_id, source="test")


EXAMPLE = [plain("alpha beta", "d1"), pair("gamma", " delta epsilon", "d2"), plain("zeta", "d3")]


def reference_stream(docs, tokenizer) -> tuple[list[int], list[int]]:
    """The layout restated from the spec: doc tokens then EOS; targets = all tokens of plain documents,
    response tokens + EOS of prompt/response documents; never stream position 0."""
    ids: list[int] = []
    mask: list[int] = []
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    for doc in docs:
        if doc.prompt is None:
            tokens = encode(doc.text)
            if tokens:
                ids += tokens + [tokenizer.eos_token_id]
                mask += [1] * (len(tokens) + 1)
        else:
            prompt, response = encode(doc.prompt), encode(doc.response)
            if response:
                ids += prompt + response + [tokenizer.eos_token_id]
                mask += [0] * len(prompt) + [1] * (len(response) + 1)
    if mask:
        mask[0] = 0
    return ids, mask


def test_exact_stream_for_constructed_documents(word_tokenizer, tmp_path):
    stream = tokenize_documents(EXAMPLE, word_tokenizer, tmp_path, "example")
    assert stream.ids.tolist() == [ALPHA, BETA, EOS, GAMMA, DELTA, EPSILON, EOS, ZETA, EOS]
    assert stream.loss_mask.tolist() == [0, 1, 1, 0, 1, 1, 1, 1, 1]
    assert stream.doc_starts.tolist() == [0, 3, 7]
    assert stream.doc_ids == ["d1", "d2", "d3"]
    assert (stream.n_documents, stream.n_tokens, stream.n_targets) == (3, 9, 7)
    assert stream.n_bytes == len("alpha beta") + len("gamma delta epsilon") + len("zeta")
    assert stream.n_target_bytes == len("alpha beta") + len(" delta epsilon") + len("zeta")
    assert stream.ids.dtype == np.uint16 and stream.loss_mask.dtype == np.uint8
    assert isinstance(stream.ids, np.memmap)


def test_exact_blocks_and_label_shift(word_tokenizer, tmp_path):
    stream = tokenize_documents(EXAMPLE, word_tokenizer, tmp_path, "example")
    data = BlockDataset(stream, 4)
    assert len(data) == 2 and data.n_dropped_tokens == 0
    first, second = data[0], data[1]
    assert first["input_ids"].tolist() == [ALPHA, BETA, EOS, GAMMA]
    # labels[t] is the token after input_ids[t]; the prompt token GAMMA is not a target.
    assert first["labels"].tolist() == [BETA, EOS, IGNORE_INDEX, DELTA]
    assert second["input_ids"].tolist() == [DELTA, EPSILON, EOS, ZETA]
    assert second["labels"].tolist() == [EPSILON, EOS, ZETA, EOS]
    assert first["input_ids"].dtype == torch.long and first["labels"].dtype == torch.long
    assert data[-1]["input_ids"].tolist() == second["input_ids"].tolist()
    with pytest.raises(IndexError):
        data[2]
    three = BlockDataset(stream, 3)
    assert len(three) == 2 and three.n_dropped_tokens == 2  # positions 7, 8 are never labels
    assert three[1]["input_ids"].tolist() == [GAMMA, DELTA, EPSILON]
    assert three[1]["labels"].tolist() == [DELTA, EPSILON, EOS]


def test_collate_stacks_blocks(word_tokenizer, tmp_path):
    data = BlockDataset(tokenize_documents(EXAMPLE * 4, word_tokenizer, tmp_path, "x"), 5)
    batch = collate([data[i] for i in range(3)])
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == (3, 5) and batch["labels"].shape == (3, 5)
    assert batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"][1], data[1]["labels"])
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=collate)
    assert [b["input_ids"].shape[0] for b in loader] == [2] * (len(data) // 2) + [1] * (len(data) % 2)


words = st.lists(st.sampled_from(WORDS), min_size=0, max_size=6).map(" ".join)
documents = st.lists(
    st.one_of(words.map(lambda t: ("plain", t, "")), st.tuples(st.just("pair"), words, words)), min_size=1, max_size=12
)


@given(documents, st.integers(min_value=1, max_value=9))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_stream_and_blocks_match_reference(word_tokenizer, spec, block_size):
    docs = []
    for k, (kind, a, b) in enumerate(spec):
        docs.append(plain(a, f"p{k}") if kind == "plain" else pair(a, " " + b if b else "", f"q{k}"))
    ref_ids, ref_mask = reference_stream(docs, word_tokenizer)
    with tempfile.TemporaryDirectory() as cache:
        if not ref_ids:
            with pytest.raises(DataError, match="no document produced any token"):
                tokenize_documents(docs, word_tokenizer, Path(cache), "h")
            return
        stream = tokenize_documents(docs, word_tokenizer, Path(cache), "h")
        assert stream.ids.tolist() == ref_ids and stream.loss_mask.tolist() == ref_mask
        assert [ref_ids[s - 1] for s in stream.doc_starts.tolist()[1:]] == [EOS] * (stream.n_documents - 1)
        n_blocks = (len(ref_ids) - 1) // block_size
        if n_blocks == 0:
            with pytest.raises(DataError, match="fewer than block_size"):
                BlockDataset(stream, block_size)
            return
        data = BlockDataset(stream, block_size)
        assert len(data) == n_blocks and data.n_dropped_tokens == len(ref_ids) - 1 - n_blocks * block_size
        labels_seen = []
        for i in range(n_blocks):
            item = data[i]
            lo = i * block_size
            assert item["input_ids"].tolist() == ref_ids[lo : lo + block_size]
            expected = [t if m else IGNORE_INDEX for t, m in zip(ref_ids[lo + 1 : lo + block_size + 1], ref_mask[lo + 1 : lo + block_size + 1])]
            assert item["labels"].tolist() == expected
            labels_seen += expected
        # Every position 1..n_blocks*L is a label exactly once, in order.
        covered = ref_ids[1 : 1 + n_blocks * block_size]
        assert [t for t, label in zip(covered, labels_seen) if label != IGNORE_INDEX] == [
            t for t, m in zip(covered, ref_mask[1 : 1 + n_blocks * block_size]) if m
        ]


def test_prompt_and_response_are_tokenized_separately(kjv_bpe, tmp_path):
    prompt, response = "Complete the verse: The LORD is my shep", "herd; I shall not want."
    stream = tokenize_documents([pair(prompt, response, "v")], kjv_bpe, tmp_path, "bpe")
    p = kjv_bpe(prompt, add_special_tokens=False)["input_ids"]
    r = kjv_bpe(response, add_special_tokens=False)["input_ids"]
    assert stream.ids.tolist() == p + r + [kjv_bpe.eos_token_id]
    assert stream.loss_mask.tolist() == [0] * len(p) + [1] * (len(r) + 1)
    # Joint tokenization would merge across the boundary ("shep"+"herd"); separate tokenization must not.
    assert kjv_bpe(prompt + response, add_special_tokens=False)["input_ids"] != p + r


def test_cache_is_reused_without_tokenizing(word_tokenizer, tmp_path, monkeypatch):
    calls = []
    real_encoder = blocks._encoder

    def counting_encoder(tokenizer):
        encode = real_encoder(tokenizer)

        def wrapped(texts):
            calls.append(len(texts))
            return encode(texts)

        return wrapped

    monkeypatch.setattr(blocks, "_encoder", counting_encoder)
    first = tokenize_documents(EXAMPLE, word_tokenizer, tmp_path, "c")
    assert calls and sum(calls) == 4  # two plain texts + one prompt + one response
    calls.clear()
    second = tokenize_documents(list(EXAMPLE), word_tokenizer, tmp_path, "c")
    assert calls == []
    assert second.path == first.path and second.ids.tolist() == first.ids.tolist()
    assert isinstance(second.ids, np.memmap)
    # Any change of content, boundary or tokenizer is a different stream.
    changed_text = [plain("alpha gamma", "d1"), *EXAMPLE[1:]]
    moved_boundary = [EXAMPLE[0], pair("gamma delta", " epsilon", "d2"), EXAMPLE[2]]
    other_tokenizer = make_word_tokenizer(list(reversed(WORDS)))
    for docs, tok in ((changed_text, word_tokenizer), (moved_boundary, word_tokenizer), (EXAMPLE, other_tokenizer)):
        calls.clear()
        stream = tokenize_documents(docs, tok, tmp_path, "c")
        assert calls and stream.path != first.path
    assert tokenize_documents(moved_boundary, word_tokenizer, tmp_path, "c").loss_mask.tolist() == [0, 1, 1, 0, 0, 1, 1, 1, 1]
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("c-")]) == 4


def test_failed_tokenization_leaves_no_partial_cache(word_tokenizer, tmp_path, monkeypatch):
    def broken_encoder(tokenizer):
        def encode(texts):
            raise RuntimeError("disk full")

        return encode

    monkeypatch.setattr(blocks, "_encoder", broken_encoder)
    with pytest.raises(RuntimeError, match="disk full"):
        tokenize_documents(EXAMPLE, word_tokenizer, tmp_path, "fail")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert tokenize_documents(EXAMPLE, word_tokenizer, tmp_path, "fail").n_tokens == 9


def test_token_dtype_choice(tmp_path):
    assert token_dtype(8192) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(151_000) == np.uint32
    many = [f"w{k}" for k in range(70_000)]
    big = make_word_tokenizer(many)
    stream = tokenize_documents([plain("w0 w69999 w65533", "big")], big, tmp_path, "big")
    assert stream.ids.dtype == np.uint32
    assert stream.ids.tolist() == [3, 70_002, 65_536, EOS]
    assert BlockDataset(stream, 3)[0]["input_ids"].tolist() == [3, 70_002, 65_536]


def test_empty_documents_are_skipped_and_logged(word_tokenizer, tmp_path, caplog):
    docs = [plain("", "empty"), plain("alpha", "a"), pair("beta", "", "noresp"), plain("beta", "b")]
    with caplog.at_level(logging.WARNING, logger="lmdistill.data.blocks"):
        stream = tokenize_documents(docs, word_tokenizer, tmp_path, "skip")
    assert stream.ids.tolist() == [ALPHA, EOS, BETA, EOS] and stream.doc_ids == ["a", "b"]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 1 document(s) with no tokens (empty text): empty" in messages
    assert "skipped 1 document(s) with no response tokens (empty response): noresp" in messages


def test_non_ascii_bytes_are_counted_in_utf8(word_tokenizer, tmp_path):
    stream = tokenize_documents([plain("alpha café ünï", "u")], word_tokenizer, tmp_path, "u")
    assert stream.n_bytes == len("alpha café ünï".encode()) == 17


def test_block_dataset_validation(word_tokenizer, tmp_path):
    stream = tokenize_documents(EXAMPLE, word_tokenizer, tmp_path, "v")
    with pytest.raises(ConfigError, match="block_size"):
        BlockDataset(stream, 0)
    with pytest.raises(DataError, match="9 tokens, fewer than block_size \\+ 1 = 10"):
        BlockDataset(stream, 9)
    assert len(BlockDataset(stream, 8)) == 1


def test_stream_pickles_as_a_reference_to_its_files(word_tokenizer, tmp_path):
    stream = tokenize_documents(EXAMPLE * 100, word_tokenizer, tmp_path, "pk")
    payload = pickle.dumps(stream)
    assert len(payload) < 2000  # the arrays are not copied into the pickle
    clone = pickle.loads(payload)
    assert isinstance(clone, TokenStream) and isinstance(clone.ids, np.memmap)
    assert clone.ids.tolist() == stream.ids.tolist() and clone.n_bytes == stream.n_bytes


def test_real_corpus_end_to_end(kjv_docs, kjv_bpe, tmp_path):
    """KJV chapters through the real BPE: EOS exactly at document ends, every token a target but the first."""
    docs = kjv_docs[:40]
    stream = tokenize_documents(docs, kjv_bpe, tmp_path, "kjv40")
    ends = np.flatnonzero(np.asarray(stream.ids) == kjv_bpe.eos_token_id)
    assert ends.tolist() == (np.append(stream.doc_starts[1:], stream.n_tokens) - 1).tolist()
    assert stream.n_targets == stream.n_tokens - 1
    assert stream.n_bytes == sum(len(d.text.encode()) for d in docs)
    first_doc = np.asarray(stream.ids[: ends[0]]).tolist()
    assert kjv_bpe.decode(first_doc) == docs[0].text
