"""Vocabulary alignment, presets, loading."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmdistill.errors import ConfigError
from lmdistill.models import PRESETS, build_from_preset, check_vocab_compatible, count_parameters, load_causal_lm
from lmdistill.data.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="module")
def two_tokenizers(kjv_verses):
    texts = [t for _, t in kjv_verses[:4000]]
    return train_bpe_tokenizer(texts, vocab_size=400), train_bpe_tokenizer(texts[:1500] + ["zebra quantum xylophone"] * 50, vocab_size=420)


def test_padded_rows_are_sliced_not_zeroed(two_tokenizers):
    tok, _ = two_tokenizers
    n = len(tok)
    align = check_vocab_compatible(tok, tok, teacher_rows=n + 64, student_rows=n + 8)
    assert align.real_vocab_size == n
    logits = torch.randn(2, 3, n + 64)
    logits[..., n:] = 100.0  # padding rows that would steal all the mass if kept
    sliced = align.slice(logits)
    assert sliced.shape[-1] == n and torch.equal(sliced, logits[..., :n])
    assert torch.softmax(sliced, -1)[..., :n].sum(-1).allclose(torch.ones(2, 3))


def test_real_mismatch_names_tokens(two_tokenizers):
    a, b = two_tokenizers
    with pytest.raises(ConfigError) as err:
        check_vocab_compatible(a, b, teacher_rows=len(a), student_rows=len(b))
    msg = str(err.value)
    assert "tokenizers differ" in msg and "sequence-level" in msg
    assert "only in" in msg or "different ids" in msg


def test_too_few_rows_is_an_error(two_tokenizers):
    tok, _ = two_tokenizers
    with pytest.raises(ConfigError, match="output layer"):
        check_vocab_compatible(tok, tok, teacher_rows=len(tok), student_rows=len(tok) - 1)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_round_trip(name, two_tokenizers, tmp_path):
    tok, _ = two_tokenizers
    model = build_from_preset(name, tok, max_positions=64, seed=0)
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id
    assert count_parameters(model) > 0
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    again = load_causal_lm(tmp_path / "m")
    x = torch.randint(0, len(tok), (1, 10))
    torch.testing.assert_close(again(input_ids=x).logits, model.eval()(input_ids=x).logits)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "m"), type(model))


def test_missing_local_model_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_causal_lm(str(tmp_path / "nope"))
