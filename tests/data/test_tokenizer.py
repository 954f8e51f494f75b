"""Byte-level BPE training, loading and fingerprints."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from lmdistill.data.tokenizer import EOS_TOKEN, PAD_TOKEN, load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer
from lmdistill.errors import ConfigError, DataError

SAMPLES = ["In the beginning God created the heaven and the earth.", "  two  spaces\tand a tab\n", "naïve café — ünïcödé 字"]


def test_special_tokens_and_size(kjv_bpe):
    assert len(kjv_bpe) == 1024
    assert kjv_bpe.convert_ids_to_tokens([0, 1]) == [EOS_TOKEN, PAD_TOKEN]
    assert kjv_bpe.eos_token == EOS_TOKEN and kjv_bpe.bos_token == EOS_TOKEN and kjv_bpe.pad_token == PAD_TOKEN
    assert (kjv_bpe.eos_token_id, kjv_bpe.bos_token_id, kjv_bpe.pad_token_id) == (0, 0, 1)
    assert kjv_bpe.unk_token is None
    # Encoding adds no special tokens by itself (the packer adds EOS).
    assert 0 not in kjv_bpe(SAMPLES[0])["input_ids"]
    # Real merges were learned: a frequent KJV word is one token.
    assert len(kjv_bpe(" LORD", add_special_tokens=False)["input_ids"]) == 1


@given(st.text(max_size=200))
@settings(max_examples=150, deadline=None)
def test_byte_level_round_trip_is_lossless(kjv_bpe, text):
    ids = kjv_bpe(text, add_special_tokens=False)["input_ids"]
    assert kjv_bpe.decode(ids) == text
    assert all(0 <= i < len(kjv_bpe) for i in ids)


def test_save_and_reload_round_trip(kjv_bpe, tmp_path):
    kjv_bpe.save_pretrained(tmp_path)
    for reloaded in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)):
        assert reloaded.eos_token == EOS_TOKEN and reloaded.pad_token == PAD_TOKEN and reloaded.bos_token == EOS_TOKEN
        assert reloaded.eos_token_id == 0 and reloaded.pad_token_id == 1
        for text in SAMPLES:
            assert reloaded(text)["input_ids"] == kjv_bpe(text)["input_ids"]
        assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(kjv_bpe)


def test_training_is_deterministic_and_fingerprint_sees_differences(kjv_docs):
    texts = [d.text for d in kjv_docs[:200]]
    a = train_bpe_tokenizer(texts, vocab_size=600)
    b = train_bpe_tokenizer(texts, vocab_size=600)
    c = train_bpe_tokenizer(texts, vocab_size=601)
    d = train_bpe_tokenizer(texts[:100], vocab_size=600)
    assert a.get_vocab() == b.get_vocab()
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    assert len({tokenizer_fingerprint(t) for t in (a, c, d)}) == 3
    assert len(tokenizer_fingerprint(a)) == 64


def test_fingerprint_sees_special_tokens(kjv_bpe, tmp_path):
    kjv_bpe.save_pretrained(tmp_path)
    other = AutoTokenizer.from_pretrained(tmp_path)
    other.pad_token = EOS_TOKEN
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(kjv_bpe)


def test_vocab_too_small():
    with pytest.raises(ConfigError, match="at least 258"):
        train_bpe_tokenizer(["abc"], vocab_size=100)


def test_load_missing_tokenizer_offline(tmp_path):
    with pytest.raises(DataError, match="cannot load tokenizer 'no-such-org/no-such-tokenizer'.*pass a local directory"):
        load_tokenizer("no-such-org/no-such-tokenizer")
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(DataError, match="from a directory, not a file"):
        load_tokenizer(tmp_path / "file.json")
    with pytest.raises(DataError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path)  # a directory without tokenizer files


def _word_level(vocab: dict[str, int], **special):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **special)


def test_load_requires_eos(tmp_path):
    _word_level({"<unk>": 0, "a": 1}).save_pretrained(tmp_path)
    with pytest.raises(DataError, match="has no EOS token.*eos_token"):
        load_tokenizer(tmp_path)


def test_load_sets_missing_pad_to_eos(tmp_path):
    _word_level({"<unk>": 0, "</s>": 1, "a": 2}, eos_token="</s>").save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token == "</s>" and tok.pad_token_id == tok.eos_token_id == 1
