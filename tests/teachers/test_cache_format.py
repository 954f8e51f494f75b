"""The shard codec: what is written is read back bit for bit, in every value and id dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.teachers.cache import ShardLayout, decode_shard, encode_shard, index_dtype


@given(st.integers(min_value=1, max_value=2**33))
def test_index_dtype_is_the_smallest_that_holds_every_id(vocab):
    dtype = index_dtype(vocab)
    assert np.iinfo(dtype).max >= vocab - 1
    smaller = {np.dtype(np.uint16): np.uint8, np.dtype(np.uint32): np.uint16, np.dtype(np.uint64): np.uint32}
    if dtype in smaller:
        assert np.iinfo(smaller[dtype]).max < vocab - 1


def test_index_dtype_boundaries():
    assert index_dtype(256) == np.uint8 and index_dtype(257) == np.uint16
    assert index_dtype(65536) == np.uint16 and index_dtype(65537) == np.uint32
    assert index_dtype(32000) == np.uint16 and index_dtype(151936) == np.uint32


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 4), length=st.integers(1, 7), k=st.integers(1, 9),
    value_dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
    vocab=st.sampled_from([200, 5000, 70000]),
    seed=st.integers(0, 2**31 - 1),
)
def test_encode_decode_round_trip_is_exact(n, length, k, value_dtype, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    layout = ShardLayout(n, length, k, value_dtype, index_dtype(vocab).name)
    # Values already representable in the value dtype must come back bit for bit.
    logprobs = (-20 * torch.rand(n, length, k, generator=gen)).to(getattr(torch, value_dtype))
    residual = torch.log(torch.rand(n, length, generator=gen)).to(getattr(torch, value_dtype))
    residual[0, 0] = float("-inf")  # k = V: no residual
    ids = torch.randint(0, vocab, (n, length, k), generator=gen)
    data = encode_shard(logprobs, ids, residual, layout)
    assert len(data) == layout.nbytes
    lp, ix, res = decode_shard(data, layout)
    got_lp = torch.from_numpy(lp.copy())
    got_res = torch.from_numpy(res.copy())
    if value_dtype == "bfloat16":
        got_lp, got_res = got_lp.view(torch.bfloat16), got_res.view(torch.bfloat16)
    assert torch.equal(got_lp.view(torch.uint8), logprobs.contiguous().view(torch.uint8))
    assert torch.equal(got_res.view(torch.uint8), residual.contiguous().view(torch.uint8))
    assert ix.dtype == index_dtype(vocab)
    assert np.array_equal(ix.astype(np.int64), ids.numpy())


def test_layout_size_is_the_stored_bytes_plus_alignment():
    for k, value, ids in ((32, "float16", "uint16"), (8, "bfloat16", "uint32"), (5, "float32", "uint8")):
        layout = ShardLayout(7, 33, k, value, ids)
        per_token = ShardLayout.bytes_per_token(k, value, ids)
        tokens = 7 * 33
        assert tokens * per_token <= layout.nbytes < tokens * per_token + 2 * 64
    # the budget: the default (k=32, float16, uint16 ids) at vocabulary 32k
    assert ShardLayout.bytes_per_token(32, "float16", index_dtype(32768).name) == 130


def test_encode_refuses_ids_that_do_not_fit():
    layout = ShardLayout(1, 2, 2, "float16", "uint8")
    with pytest.raises(ValueError, match="do not fit"):
        encode_shard(torch.zeros(1, 2, 2), torch.full((1, 2, 2), 300), torch.zeros(1, 2), layout)
