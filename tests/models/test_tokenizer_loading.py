"""A tokenizer saved next to a model of any family loads back as exactly the saved tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from lmdistill.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer
from lmdistill.models.families import FAMILIES, save_family_model


@pytest.fixture(scope="module")
def numbers_bpe(kjv_verses):
    """A byte-level BPE (GPT-2's pre-tokenizer keeps digit runs together) that learned multi-digit tokens."""
    texts = [f"{ref} {text}" for ref, text in kjv_verses[:3000]] + [" 1234 5678 1234 5678"] * 50
    return train_bpe_tokenizer(texts, vocab_size=700)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_saved_tokenizer_is_loaded_as_saved(family, numbers_bpe, tmp_path):
    """Next to a Qwen2 (or Phi-3 ...) config, AutoTokenizer builds that family's tokenizer class from the saved
    vocabulary with the family's own pre-tokenizer (Qwen's splits digits one by one): other ids for the same text.
    load_tokenizer gives back the saved tokenizer for every family."""
    directory = save_family_model(tmp_path / family, family, numbers_bpe, hidden=16, heads=2, layers=1)
    loaded = load_tokenizer(directory)
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(numbers_bpe)
    text = "Genesis 12:34 1234 and 5678"
    assert loaded(text)["input_ids"] == numbers_bpe(text)["input_ids"]
    if family == "qwen2":  # the failure this guards against, as transformers shows it
        rebuilt = AutoTokenizer.from_pretrained(directory)
        assert rebuilt(text)["input_ids"] != numbers_bpe(text)["input_ids"]


def _fingerprint_by_definition(tokenizer) -> str:
    """The fingerprint's definition in one piece (what the data and teacher caches were keyed by)."""
    import hashlib
    import json

    model = json.loads(tokenizer.backend_tokenizer.to_str())
    model.pop("truncation", None)
    model.pop("padding", None)
    special = {
        "eos": [tokenizer.eos_token, tokenizer.eos_token_id], "bos": [tokenizer.bos_token, tokenizer.bos_token_id],
        "pad": [tokenizer.pad_token, tokenizer.pad_token_id], "unk": [tokenizer.unk_token, tokenizer.unk_token_id],
        "added": sorted((str(k), v) for k, v in tokenizer.get_added_vocab().items()),
    }
    payload = json.dumps({"model": model, "special": special}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def test_fingerprint_keeps_its_definition_and_sees_changes(numbers_bpe, qwen_hf, tmp_path):
    """Hashed in two parts (the large model part once per process), the fingerprint is still the definition's
    digest, for this project's BPE and for Qwen's converted one; a changed special token still changes it."""
    for tokenizer in (numbers_bpe, qwen_hf, numbers_bpe):  # the second call of a tokenizer hits the memo
        assert tokenizer_fingerprint(tokenizer) == _fingerprint_by_definition(tokenizer)
    numbers_bpe.save_pretrained(tmp_path)
    other = load_tokenizer(tmp_path)
    other.pad_token = other.eos_token
    assert tokenizer_fingerprint(other) == _fingerprint_by_definition(other) != tokenizer_fingerprint(numbers_bpe)
