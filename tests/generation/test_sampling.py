"""Generation: KV cache vs no cache, padding, agreement with transformers' generate, sampling, log-likelihoods."""

from __future__ import annotations

import pytest
import torch

from lmdistill.errors import ConfigError
from lmdistill.generation.batching import encode_prompts
from lmdistill.generation.sampling import SamplingParams, filter_logits, generate, sequence_logprobs
from tests.generation.conftest import tiny_gpt2


@pytest.fixture(scope="module")
def prompts(verse_tokenizer, continue_task):
    # real prompts of different lengths, so rows are left-padded by different amounts
    docs = continue_task["test"][:6]
    ids = encode_prompts(verse_tokenizer, [d.prompt for d in docs])
    assert len({len(p) for p in ids}) > 1
    return ids


def test_cached_and_uncached_greedy_outputs_are_identical(trained_tiny, verse_tokenizer, prompts):
    params = SamplingParams(greedy=True, max_new_tokens=30)
    eos, pad = verse_tokenizer.eos_token_id, verse_tokenizer.pad_token_id
    cached = generate(trained_tiny, prompts, eos_token_id=eos, pad_token_id=pad, params=params, use_cache=True)
    uncached = generate(trained_tiny, prompts, eos_token_id=eos, pad_token_id=pad, params=params, use_cache=False)
    assert cached == uncached
    assert any(out and out[-1] == eos for out in cached)  # the trained model does stop
    assert all(len(out) <= 30 for out in cached)


def test_cached_and_uncached_sampling_agree_with_the_same_seed(trained_tiny, verse_tokenizer, prompts):
    params = SamplingParams(greedy=False, temperature=1.3, top_k=50, max_new_tokens=20)
    kw = dict(eos_token_id=verse_tokenizer.eos_token_id, pad_token_id=verse_tokenizer.pad_token_id, params=params)
    a = generate(trained_tiny, prompts, use_cache=True, generator=torch.Generator().manual_seed(3), **kw)
    b = generate(trained_tiny, prompts, use_cache=False, generator=torch.Generator().manual_seed(3), **kw)
    c = generate(trained_tiny, prompts, use_cache=True, generator=torch.Generator().manual_seed(4), **kw)
    assert a == b
    assert a != c


def test_batched_left_padding_equals_one_prompt_at_a_time(trained_tiny, verse_tokenizer, prompts):
    params = SamplingParams(greedy=True, max_new_tokens=25)
    kw = dict(eos_token_id=verse_tokenizer.eos_token_id, pad_token_id=verse_tokenizer.pad_token_id, params=params)
    batched = generate(trained_tiny, prompts, **kw)
    single = [generate(trained_tiny, [p], **kw)[0] for p in prompts]
    assert batched == single


def test_greedy_matches_transformers_generate(trained_tiny, verse_tokenizer, prompts):
    eos = verse_tokenizer.eos_token_id
    for p in prompts[:3]:
        ours = generate(trained_tiny, [p], eos_token_id=eos, params=SamplingParams(greedy=True, max_new_tokens=25))[0]
        hf = trained_tiny.generate(torch.tensor([p]), do_sample=False, max_new_tokens=25, eos_token_id=eos,
                                   pad_token_id=verse_tokenizer.pad_token_id, attention_mask=torch.ones(1, len(p), dtype=torch.long))
        assert ours == hf[0, len(p):].tolist()


def test_vocab_limit_never_emits_padded_rows(verse_tokenizer, prompts):
    # a model with 40 padded output rows whose logits are pushed up: they must never be chosen
    model = tiny_gpt2(verse_tokenizer, layers=1, seed=1)
    real = len(verse_tokenizer)
    with torch.no_grad():
        grown = torch.nn.Embedding(real + 40, model.config.n_embd)
        grown.weight[:real] = model.transformer.wte.weight
        grown.weight[real:] = 5.0 * model.transformer.wte.weight[:40]
        model.transformer.wte = grown
        model.lm_head.weight = grown.weight
        model.config.vocab_size = real + 40
    params = SamplingParams(greedy=False, temperature=2.0, max_new_tokens=15)
    out = generate(model, prompts, eos_token_id=verse_tokenizer.eos_token_id, params=params,
                   generator=torch.Generator().manual_seed(0), vocab_size=real)
    assert max(max(o) for o in out) < real


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False, False]]
    # nucleus: 0.5 + 0.2 = 0.7 < 0.8, so the third token is needed; the rest are dropped
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).tolist() == [[True, False, False, False, False]]


def test_top_k_one_sampling_is_greedy(trained_tiny, verse_tokenizer, prompts):
    kw = dict(eos_token_id=verse_tokenizer.eos_token_id, pad_token_id=verse_tokenizer.pad_token_id)
    greedy = generate(trained_tiny, prompts, params=SamplingParams(greedy=True, max_new_tokens=12), **kw)
    top1 = generate(trained_tiny, prompts, params=SamplingParams(greedy=False, top_k=1, max_new_tokens=12),
                    generator=torch.Generator().manual_seed(9), **kw)
    assert greedy == top1


def test_too_long_generation_is_a_clear_error(verse_tokenizer, prompts):
    model = tiny_gpt2(verse_tokenizer, layers=1, positions=32)
    with pytest.raises(ConfigError, match="positions"):
        generate(model, prompts, eos_token_id=0, params=SamplingParams(max_new_tokens=30))


def test_sequence_logprobs_match_float64_reference(trained_tiny, verse_tokenizer, prompts):
    responses = [[5, 9, 33], [], [7], [100, 101, 102, 103]]
    got = sequence_logprobs(trained_tiny, prompts[:4], responses, pad_token_id=verse_tokenizer.pad_token_id)
    reference = trained_tiny.to(torch.float64)
    try:
        for (total, count), p, r in zip(got, prompts[:4], responses):
            expected = 0.0
            for j, tok in enumerate(r):  # one unpadded forward pass per token
                with torch.no_grad():
                    logits = reference(input_ids=torch.tensor([list(p) + r[:j]])).logits[0, -1]
                expected += torch.log_softmax(logits, -1)[tok].item()
            assert count == len(r)
            assert total == pytest.approx(expected, abs=1e-4)
    finally:
        trained_tiny.to(torch.float32)


def test_response_nll_matches_an_unpadded_float64_reference(trained_tiny, verse_tokenizer, continue_task):
    from lmdistill.generation.batching import encode_examples
    from lmdistill.generation.metrics import response_nll

    docs = continue_task["validation"][:7]
    got = response_nll(trained_tiny, verse_tokenizer, docs, batch_size=3)
    total, count = 0.0, 0
    reference = trained_tiny.to(torch.float64)
    try:
        for ex in encode_examples(verse_tokenizer, docs):
            seq = torch.tensor([list(ex.prompt + ex.response)])
            with torch.no_grad():
                logp = torch.log_softmax(reference(input_ids=seq).logits[0], -1)
            for j, tok in enumerate(ex.response):  # response tokens and the closing EOS
                total -= logp[len(ex.prompt) - 1 + j, tok].item()
                count += 1
    finally:
        trained_tiny.to(torch.float32)
    assert got == pytest.approx(total / count, rel=1e-5)
