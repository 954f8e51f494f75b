"""The regimes as batch sources: fixed vs on-policy (GKD), the lambda coin, KID and SCRG batches,
sequence-level KD data from a resumable store, and config validation."""

from __future__ import annotations

import pytest
import torch

from lmdistill.config import validate_config
from lmdistill.errors import ConfigError, DataError
from lmdistill.generation.batching import encode_examples, encode_prompts
from lmdistill.generation.config import RegimeConfig, SamplingConfig
from lmdistill.generation.run_config import TaskRunConfig
from lmdistill.generation.kid import n_rewritten
from lmdistill.generation.sampling import SamplingParams
from lmdistill.generation.seqkd import documents_from_store, fill_store_local
from lmdistill.generation.sources import OnPolicySource, build_batch_source
from lmdistill.generation.store import ResponseStore
from tests.generation.conftest import tiny_gpt2


@pytest.fixture(scope="module")
def student(verse_tokenizer):
    return tiny_gpt2(verse_tokenizer, layers=1, seed=21)


def source(kind, tokenizer, docs, student=None, teacher=None, **regime):
    src = build_batch_source(RegimeConfig(kind=kind, max_length=64, **regime), tokenizer=tokenizer, global_batch=4,
                             seed=7, documents=docs)
    if student is not None:
        src.use_models(student, teacher, len(tokenizer))
    return src


def test_lambda_zero_is_the_fixed_regime(verse_tokenizer, continue_task, student):
    docs = continue_task["train"][:20]
    fixed = source("fixed", verse_tokenizer, docs)
    never = source("on_policy", verse_tokenizer, docs, student, lmbda=0.0)
    for step in range(4):
        a, b = fixed.micro_batches(step, 0, 1, 2), never.micro_batches(step, 0, 1, 2)
        for x, y in zip(a, b):
            for key in ("input_ids", "labels", "attention_mask", "example_index"):
                assert torch.equal(x[key], y[key])
            assert y["on_policy"].sum() == 0


def test_on_policy_batches_hold_the_students_own_samples(verse_tokenizer, continue_task, student):
    docs = continue_task["train"][:8]
    src = source("on_policy", verse_tokenizer, docs, student, lmbda=1.0,
                 sampling=SamplingConfig(greedy=True, max_new_tokens=10))
    (batch,) = src.micro_batches(0, 0, 1, 4)
    assert batch["on_policy"].tolist() == [1.0] * 4
    eos, pad = verse_tokenizer.eos_token_id, verse_tokenizer.pad_token_id
    for row, i in enumerate(batch["example_index"].tolist()):
        prompt = encode_prompts(verse_tokenizer, [docs[i].prompt])[0]
        hf = student.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, eos_token_id=eos, pad_token_id=pad,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
        labels = batch["labels"][row]
        assert labels[: len(prompt) - 1].eq(-100).all()
        assert [t for t in labels.tolist() if t != -100] == hf  # the student's greedy answer is the target
        assert batch["input_ids"][row, : len(prompt)].tolist() == prompt


def test_lambda_coin_is_per_step_and_has_the_right_rate(verse_tokenizer, continue_task, student):
    src = source("on_policy", verse_tokenizer, continue_task["train"][:8], student, lmbda=0.3)
    coins = [src.uses_student(s) for s in range(3000)]
    assert abs(sum(coins) / len(coins) - 0.3) < 0.03
    again = source("on_policy", verse_tokenizer, continue_task["train"][:8], student, lmbda=0.3)
    assert coins[:50] == [again.uses_student(s) for s in range(50)]


def test_on_policy_sampling_is_reproducible_per_step(verse_tokenizer, continue_task, student):
    docs = continue_task["train"][:8]
    a = source("on_policy", verse_tokenizer, docs, student, lmbda=1.0)
    b = source("on_policy", verse_tokenizer, docs, student, lmbda=1.0)
    x, y = a.micro_batches(5, 0, 1, 4)[0], b.micro_batches(5, 0, 1, 4)[0]
    assert torch.equal(x["input_ids"], y["input_ids"])
    z = a.micro_batches(6, 0, 1, 4)[0]
    assert not torch.equal(x["input_ids"][:, :20], z["input_ids"][:, :20])


def test_kid_batches_keep_gold_targets(verse_tokenizer, continue_task, student):
    docs = continue_task["train"][:12]
    fixed = source("fixed", verse_tokenizer, docs)
    kid = source("kid", verse_tokenizer, docs, student, kid_mask_ratio=0.5)
    examples = encode_examples(verse_tokenizer, docs)
    for step in range(3):
        f, k = fixed.micro_batches(step, 0, 1, 4)[0], kid.micro_batches(step, 0, 1, 4)[0]
        assert torch.equal(f["labels"], k["labels"]) and torch.equal(f["attention_mask"], k["attention_mask"])
        for row, i in enumerate(k["example_index"].tolist()):
            ex = examples[i]
            assert int(k["kid_rewritten"][row]) == n_rewritten(len(ex.response) - 1, 0.5)
            changed = torch.nonzero(f["input_ids"][row] != k["input_ids"][row]).flatten().tolist()
            assert all(len(ex.prompt) <= t < len(ex.prompt) + len(ex.response) - 1 for t in changed)


def test_scrg_source_revises_student_samples(verse_tokenizer, continue_task, student, trained_tiny):
    docs = continue_task["train"][:8]
    src = source("scrg", verse_tokenizer, docs, student, trained_tiny, lmbda=1.0, scrg_threshold=0.0,
                 sampling=SamplingConfig(greedy=True, max_new_tokens=10))
    plain = source("on_policy", verse_tokenizer, docs, student, lmbda=1.0, sampling=SamplingConfig(greedy=True, max_new_tokens=10))
    (batch,) = src.micro_batches(0, 0, 1, 4)
    (sample,) = plain.micro_batches(0, 0, 1, 4)
    positions = batch["scrg_position"].tolist()
    assert src.stats["revised"] == sum(p >= 0 for p in positions) > 0
    for row, j in enumerate(positions):
        n_prompt = int((sample["labels"][row] == -100).cumprod(0).sum()) + 1  # prompt tokens
        new = batch["input_ids"][row].tolist() + [None]
        old = sample["input_ids"][row].tolist() + [None]
        if j >= 0:  # the same prefix up to the corrected token, which differs from the student's
            assert new[: n_prompt + j] == old[: n_prompt + j]
            assert batch["labels"][row, n_prompt + j - 1] != sample["labels"][row, n_prompt + j - 1]


def test_sequence_kd_store_is_resumable_and_feeds_the_source(tmp_path, verse_tokenizer, continue_task, trained_tiny):
    docs = continue_task["train"][:10]
    prompts = [d.prompt for d in docs]
    params = SamplingParams(greedy=True, max_new_tokens=10)
    path = tmp_path / "teacher.jsonl"
    report = fill_store_local(trained_tiny, verse_tokenizer, prompts, ResponseStore(path), teacher_id="t", params=params, batch_size=4)
    assert report.requested == 10
    # "crash" after 7 answers: later lines lost, the last one cut in the middle
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:7]) + lines[7][:15])
    resumed = fill_store_local(trained_tiny, verse_tokenizer, prompts, ResponseStore(path), teacher_id="t", params=params, batch_size=4)
    assert resumed.already_stored == 7 and resumed.requested == 3
    assert len(path.read_text().splitlines()) == 10
    kd_docs = documents_from_store(docs, path)
    for doc, kd in zip(docs, kd_docs):
        out = trained_tiny.generate(torch.tensor([encode_prompts(verse_tokenizer, [doc.prompt])[0]]), do_sample=False,
                                    max_new_tokens=10, eos_token_id=0, pad_token_id=1)
        prompt_len = len(encode_prompts(verse_tokenizer, [doc.prompt])[0])
        tokens = [t for t in out[0, prompt_len:].tolist() if t != 0]
        assert kd.response == verse_tokenizer.decode(tokens) and kd.doc_id == doc.doc_id
        assert kd.meta["reference"] == doc.response.strip()
    src = build_batch_source(RegimeConfig(kind="sequence_kd", store=str(path), max_length=64), tokenizer=verse_tokenizer,
                             global_batch=10, seed=0, documents=docs)
    assert [e.response for e in src.examples] == [e.response for e in encode_examples(verse_tokenizer, kd_docs)]
    with pytest.raises(DataError, match="1 of 11 prompts have no teacher answer"):
        documents_from_store(docs + continue_task["train"][10:11], path)


def test_regime_config_rejects_parameters_of_other_regimes(tmp_path):
    with pytest.raises(ValueError, match="kid_mask_ratio applies to kid"):
        RegimeConfig(kind="on_policy", kid_mask_ratio=0.3)
    with pytest.raises(ValueError, match="needs regime.store"):
        RegimeConfig(kind="sequence_kd")
    with pytest.raises(ConfigError, match="did you mean 'lmbda'"):
        validate_config({"regime": {"kind": "on_policy", "lmbdaa": 0.5}}, "test", TaskRunConfig)
    cfg = validate_config({"regime": {"kind": "scrg", "lmbda": 1.0, "scrg_threshold": 2.0},
                           "teacher": {"path": str(tmp_path)}}, "test", TaskRunConfig)
    assert cfg.regime.scrg_metric == "kl" and cfg.regime.scrg_selection == "max"
    assert RegimeConfig(kind="kid").kid_mask_ratio == 0.2  # the paper's default alpha
    with pytest.raises(ConfigError, match="scrg needs a teacher"):
        validate_config({"regime": {"kind": "scrg"}}, "test", TaskRunConfig)


def test_on_policy_source_without_student_is_a_clear_error(verse_tokenizer, continue_task):
    src = source("on_policy", verse_tokenizer, continue_task["train"][:4], lmbda=1.0)
    assert isinstance(src, OnPolicySource)
    with pytest.raises(Exception, match="bind it to a trainer"):
        src.micro_batches(0, 0, 1, 4)


def test_regime_config_round_trips_through_a_dump():
    for regime in (RegimeConfig(kind="kid", kid_mask_ratio=0.2), RegimeConfig(kind="scrg", lmbda=1.0, scrg_metric="tvd")):
        assert RegimeConfig.model_validate(regime.model_dump(mode="json")) == regime
